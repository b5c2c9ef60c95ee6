"""TrainConfig's image-resolution fields: parsed from flag text, checked per family, saved and resumed."""

from __future__ import annotations

import argparse
import json

import pytest

from student_trainer.config import TrainConfig, add_train_arguments, config_from_args, load_config_file


@pytest.fixture
def base(models, vqa_data, tmp_path) -> dict:
    teacher, student = models
    return dict(student=str(student), data=str(vqa_data), output=str(tmp_path / "run"), teacher_model=str(teacher))


def parse(argv: list[str]) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_image_options_flag_round_trips_through_config_json(base, tmp_path):
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in base.items()]
    # the tiny student is an InternVL, the tiny teacher a Qwen2-VL: each side takes its own family's knobs
    config = parse([*argv, "--image-options", "max_patches=6,min_patches=1",
                    "--teacher-image-options", '{"max_pixels": 50176}'])
    assert config.image_options == {"max_patches": 6, "min_patches": 1}
    assert config.teacher_image_options == {"max_pixels": 50176}
    config.save(tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["image_options"] == {"max_patches": 6, "min_patches": 1}
    again = TrainConfig(**load_config_file(tmp_path / "config.json"))
    assert again.image_options == config.image_options and again.run_differences(saved) == {}
    # run-defining: resuming at another resolution is a different run
    other = TrainConfig(**{**base, "image_options": "max_patches=2"})
    assert other.run_differences(saved)["image_options"] == ({"max_patches": 6, "min_patches": 1},
                                                             {"max_patches": 2})
    assert TrainConfig(**base).image_options is None  # default: the checkpoint's own settings


def test_image_options_are_checked_for_each_sides_family(base):
    with pytest.raises(ValueError, match=r"internvl: unknown image option\(s\) \['max_pixels'\].*max_patches"):
        TrainConfig(**base, image_options="max_pixels=50176")  # a Qwen2-VL knob for the InternVL student
    with pytest.raises(ValueError, match="qwen2_vl: image option max_pixels='big' is not an integer"):
        TrainConfig(**base, teacher_image_options="max_pixels=big")
    remote = {**base, "teacher_model": None, "teacher_addr": "localhost:1"}
    with pytest.raises(ValueError, match="start it with --image-options"):
        TrainConfig(**remote, teacher_image_options="max_pixels=50176")
