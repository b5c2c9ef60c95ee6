"""TrainConfig and the trainer's command line: flags over --config files, subcommands, old spellings of saved
configs, image-resolution fields, and a --help that answers without importing torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from genrecal.cli import config_from_args, load_config_file
from student_trainer.__main__ import build_parser, with_command
from student_trainer.config import DEFAULT_DEEPSPEED_CONFIG, TrainConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def base(models, vqa_data, tmp_path) -> dict:
    teacher, student = models
    return dict(student=str(student), data=str(vqa_data), output=str(tmp_path / "run"), teacher_model=str(teacher))


def parse(argv: list[str]):
    """What ``python -m student_trainer ARGV`` would run with: (command, config)."""
    args = build_parser("genrecal-train").parse_args(with_command(argv))
    return args.command, config_from_args(args.config_class, args)


def flags(values: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in values.items()]


# ---- the command line ----------------------------------------------------------------------------------------
def test_config_file_then_command_line_overrides(models, vqa_data, tmp_path):
    teacher, student = models
    file = tmp_path / "run.yaml"
    file.write_text(f"student: {student}\ndata: {vqa_data}\noutput: {tmp_path / 'o'}\nteacher-model: {teacher}\n"
                    "grad_accum: 4\nlr: 3.0e-4\nlr_end: 1e-5\nregularisation: false\nreport_to: none\n")
    command, config = parse(["--config", str(file), "--grad-accum", "8", "--report-to", "tensorboard", "wandb"])
    assert command == "train"  # no command: train, also when the first argument is --config
    assert (config.grad_accum, config.lr, config.lr_end, config.regularisation) == (8, 3e-4, 1e-5, False)
    assert config.report_to == ["tensorboard", "wandb"]  # flag > file > default
    assert config.deepspeed == str(DEFAULT_DEEPSPEED_CONFIG) and config.micro_batch_size == 1  # defaults
    file.write_text(file.read_text() + "warmup_step: 1\n")
    with pytest.raises(ValueError, match=r"run.yaml: unknown option 'warmup_step'; did you mean 'warmup_steps'\?"):
        parse(["--config", str(file)])


def test_subcommands_and_the_default_command(base, tmp_path):
    assert with_command(["--local_rank=0", "--config", "run.yaml"])[0] == "train"  # the deepspeed launcher's
    assert with_command([]) == ["train"] and with_command(["-h"]) == ["-h"]
    command, config = parse(["train", *flags(base), "--stages", "sft"])
    assert command == "train" and config.stages == "3"
    command, config = parse(["train", *flags(base), "--data-config", "shapes", "--data-split", "validation"])
    assert (config.data_config, config.data_split) == ("shapes", "validation")  # what the run opens the data with
    command, config = parse(["eval", "--model", base["student"], "--data", base["data"], "--limit", "2"])
    assert command == "eval" and (config.model, config.limit, config.data_config) == (base["student"], 2, None)
    recalibrator = tmp_path / "recalibrator.safetensors"
    recalibrator.write_bytes(b"")
    command, config = parse(["align", "--student", base["student"], "--recalibrator", str(recalibrator),
                             "--teacher-model", base["teacher_model"], "--data", base["data"], "--output", "fig7.png",
                             "--no-centre", "--dtype", "float32"])
    assert command == "align" and (config.limit, config.centre, config.dtype) == (32, False, "float32")
    with pytest.raises(ValueError, match="the alignment check runs the teacher on the pairs: pass --teacher-addr"):
        parse(["align", "--student", base["student"], "--recalibrator", str(recalibrator), "--data", base["data"],
               "--output", "x.png"])
    with pytest.raises(ValueError, match="teacher_addr must be HOST:PORT"):  # checked as train checks it
        parse(["align", "--student", base["student"], "--recalibrator", str(recalibrator), "--data", base["data"],
               "--output", "x.png", "--teacher-addr", "teacher-node"])
    with pytest.raises(ValueError, match="missing --student, --data, --output"):
        parse([])


def test_only_the_new_dtype_names_on_the_command_line(base):
    parser = build_parser("genrecal-train")
    for argv in (["--precision", "bf16"], ["--dtype", "bf16"], ["--teacher-wire-dtype", "fp32"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["train", *flags(base), *argv])
    _, config = parse([*flags(base), "--dtype", "float32", "--teacher-wire-dtype", "float32"])
    assert (config.dtype, config.teacher_wire_dtype) == ("float32", "float32")
    import torch

    assert (config.torch_dtype, config.wire_dtype) == (torch.float32, torch.float32)


def test_a_run_saved_with_the_old_dtype_names_resumes(base, tmp_path):
    """A config.json written before the rename (``precision: fp32``, ``teacher_wire_dtype: bf16``) is the same run:
    resuming compares equal, and the file still loads as a --config."""
    config = TrainConfig(**base, dtype="float32")
    saved = config.to_dict()
    saved.pop("dtype")
    saved.update(precision="fp32", teacher_wire_dtype="bf16")
    assert config.run_differences(saved) == {}
    assert TrainConfig(**base, dtype="bfloat16").run_differences(saved) == {"dtype": ("float32", "bfloat16")}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert TrainConfig(**load_config_file(tmp_path / "config.json", TrainConfig)) == config


def test_a_run_saved_before_the_wire_dtype_option_resumes_only_on_its_old_wire(base):
    """Runs written before --teacher-wire-dtype sent Score's tensors in the training dtype: resuming an fp32 run on
    today's default (bf16 wire) is refused and names the setting, instead of changing the arithmetic silently."""
    saved = TrainConfig(**base, dtype="float32").to_dict()
    del saved["teacher_wire_dtype"]
    assert TrainConfig(**base, dtype="float32").run_differences(saved) == {
        "teacher_wire_dtype": ("float32", "bfloat16")}
    assert TrainConfig(**base, dtype="float32", teacher_wire_dtype="float32").run_differences(saved) == {}


def test_test_only_flags_are_hidden_but_accepted(base, capsys):
    with pytest.raises(SystemExit):
        build_parser("genrecal-train").parse_args(["train", "--help"])
    text = capsys.readouterr().out
    assert "--stop-after-steps" not in text and "--local_rank" not in text and "--no-tensorboard" not in text
    assert "model and teacher:" in text and "precision and memory:" in text and "--report-to" in text
    _, config = parse([*flags(base), "--stop-after-steps", "3", "--local_rank=0", "--no-tensorboard"])
    assert config.stop_after_steps == 3 and config.tensorboard is False


def test_every_flag_has_help():
    parser = build_parser("genrecal-train")
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert set(commands) == {"train", "eval", "align"}
    for command in commands.values():
        missing = [a.option_strings for a in command._actions if a.option_strings and not a.help]
        assert not missing, f"{command.prog}: flags without help: {missing}"


def test_report_to_none_stands_alone(base):
    assert TrainConfig(**base).report_to == ["tensorboard"]
    assert TrainConfig(**base, report_to="wandb").report_to == ["wandb"]
    with pytest.raises(ValueError, match="'none' means no tracker; pass it alone"):
        TrainConfig(**base, report_to=["none", "wandb"])
    with pytest.raises(ValueError, match=r"report_to: unknown \[.mlflow.\]; choose among tensorboard, wandb, none"):
        TrainConfig(**base, report_to=["mlflow"])


HELP_SCRIPT = """
import contextlib, io, json, sys
from student_trainer.__main__ import eval_main, main
from teacher_server.__main__ import main as teacher_main

for entry, argv in ((main, ["--help"]), (main, ["train", "--help"]), (main, ["eval", "--help"]),
                    (main, ["align", "--help"]), (eval_main, ["--help"]), (teacher_main, ["--help"])):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        entry(argv)
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules} & {"torch", "transformers", "deepspeed"})))
"""


def test_help_imports_no_torch():
    result = subprocess.run([sys.executable, "-c", HELP_SCRIPT], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout) == []


@pytest.mark.parametrize("script, expected", [
    ("genrecal-train", "train"), ("genrecal-eval", "--max-new-tokens"), ("genrecal-teacher", "--max-batch-tokens"),
])
def test_console_scripts_answer_help(script, expected):
    path = Path(sys.executable).parent / script
    if not path.exists():
        pytest.skip(f"{script} is not installed in this environment (pip install -e . creates it)")
    result = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith(f"usage: {script}") and expected in result.stdout


# ---- image resolution ------------------------------------------------------------------------------------------
def test_image_options_flag_round_trips_through_config_json(base, tmp_path):
    # the tiny student is an InternVL, the tiny teacher a Qwen2-VL: each side takes its own family's knobs
    _, config = parse([*flags(base), "--image-options", "max_patches=6,min_patches=1",
                       "--teacher-image-options", '{"max_pixels": 50176}'])
    assert config.image_options == {"max_patches": 6, "min_patches": 1}
    assert config.teacher_image_options == {"max_pixels": 50176}
    config.save(tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["image_options"] == {"max_patches": 6, "min_patches": 1}
    again = TrainConfig(**load_config_file(tmp_path / "config.json", TrainConfig))
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
