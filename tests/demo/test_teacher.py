"""The demo's teacher and student: a shortened teacher preparation gives a loadable, trained checkpoint (vision
tower untouched), a second call is a cache hit, and the student is another family with another tokenizer."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest
import torch
from PIL import Image

from demo.easy_vqa import convert_easy_vqa
from demo.teacher import (
    DONE,
    StudentRecipe,
    TeacherRecipe,
    balanced_training_records,
    prepare_teacher,
    student_init,
    write_training_splits,
)
from genrecal.families import load_vlm
from genrecal.tiny import TinySizes, write_tiny_checkpoint

# A teacher small and short enough for the test suite (the demo's default trains for minutes).
SHORT = TeacherRecipe(
    sizes=TinySizes(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                    vision_hidden_size=32, vision_layers=1, vision_heads=2),
    image_side=84, questions_per_type=6, steps=3, batch_size=4, lr=1e-3, lr_end=1e-4,
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("easy_vqa")
    convert_easy_vqa(out, train_limit=120, test_limit=12)
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, data_dir):
    cache = tmp_path_factory.mktemp("cache")
    started = time.perf_counter()
    teacher = prepare_teacher(cache, data_dir, recipe=SHORT)
    return cache, teacher, time.perf_counter() - started


def test_a_short_preparation_gives_a_loadable_sft_trained_teacher(prepared, tmp_path):
    cache, teacher, seconds = prepared
    assert seconds < 60
    assert teacher == cache / "teacher" / "model"
    vlm = load_vlm(teacher)  # strict: every key present and expected
    assert vlm.model.config.architectures == ["Qwen2VLForConditionalGeneration"]
    # The processor scales a 64x64 picture up to image_side: 84 px = 6x6 patches (9 image tokens after merging).
    inputs = vlm.processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[Image.new("RGB", (64, 64))])
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 6]]
    done = json.loads((cache / "teacher" / DONE).read_text())
    assert done["samples"] == 3 * SHORT.questions_per_type  # balanced: shape, colour, yes_no
    assert done["options"]["recipe"]["steps"] == SHORT.steps
    # Stage-3 SFT changed the language model and projector (the patch merger) but not the frozen ViT.
    initial = load_vlm(write_tiny_checkpoint("qwen2_vl", tmp_path / "init", sizes=SHORT.sizes, tokenizer="gpt2"))
    initial, trained = initial.model.state_dict(), vlm.model.state_dict()
    assert initial.keys() == trained.keys()
    vision = [n for n in initial if n.startswith("model.visual.") and not n.startswith("model.visual.merger.")]
    assert vision and all(torch.equal(initial[name], trained[name]) for name in vision)
    for name in ("model.visual.merger.mlp.0.weight", "model.language_model.layers.0.mlp.up_proj.weight",
                 "lm_head.weight"):
        assert not torch.equal(initial[name], trained[name]), name
    # The training subset is kept next to the model; its images resolve against the data folder.
    subset = json.loads((cache / "teacher" / "train_subset.json").read_text())
    assert len(subset) == done["samples"]


def test_a_second_call_is_a_cache_hit(prepared, data_dir):
    cache, teacher, _ = prepared
    done = cache / "teacher" / DONE
    stamp = done.stat().st_mtime_ns
    started = time.perf_counter()
    assert prepare_teacher(cache, data_dir, recipe=SHORT) == teacher
    assert time.perf_counter() - started < 2
    assert done.stat().st_mtime_ns == stamp


def test_other_options_retrain(tmp_path, data_dir):
    cache = tmp_path / "cache"
    prepare_teacher(cache, data_dir, recipe=SHORT)
    stamp = (cache / "teacher" / DONE).stat().st_mtime_ns
    changed = replace(SHORT, steps=2)
    prepare_teacher(cache, data_dir, recipe=changed)
    done = json.loads((cache / "teacher" / DONE).read_text())
    assert done["options"]["recipe"]["steps"] == 2
    assert (cache / "teacher" / DONE).stat().st_mtime_ns != stamp


def test_student_is_another_family_and_tokenizer(tmp_path, prepared):
    _, teacher, _ = prepared
    student = student_init(tmp_path, recipe=StudentRecipe(warmup_steps=0))
    teacher_vlm, student_vlm = load_vlm(teacher), load_vlm(student)
    assert student_vlm.model.config.architectures != teacher_vlm.model.config.architectures
    assert student_vlm.adapter.model_type == "internvl"
    assert len(student_vlm.processor.tokenizer) != len(teacher_vlm.processor.tokenizer)  # Llama-2 vs GPT-2
    assert student_vlm.processor.tokenizer.tokenize("shape") != teacher_vlm.processor.tokenizer.tokenize("shape")
    assert json.loads((student / "genrecal_tiny.json").read_text())["tokenizer"] == "llama2"
    # Smaller than the default teacher; a second call is a cache hit.
    assert StudentRecipe().sizes.hidden_size < TeacherRecipe().sizes.hidden_size
    stamp = (tmp_path / "student" / DONE).stat().st_mtime_ns
    assert student_init(tmp_path, recipe=StudentRecipe(warmup_steps=0)) == student
    assert (tmp_path / "student" / DONE).stat().st_mtime_ns == stamp


def test_base_student_is_warmed_up_on_a_pool_the_distillation_never_sees(tmp_path, data_dir):
    warmup_json, distill_json = write_training_splits(data_dir)
    train = json.loads((data_dir / "train.json").read_text())
    warmup, distill = json.loads(warmup_json.read_text()), json.loads(distill_json.read_text())
    assert len(warmup) == 30 and len(distill) == 90  # every 4th of the 120 training questions
    assert {r["id"] for r in warmup}.isdisjoint(r["id"] for r in distill)
    assert sorted(r["id"] for r in warmup + distill) == sorted(r["id"] for r in train)

    recipe = StudentRecipe(warmup_steps=3, warmup_batch_size=4)
    base = student_init(tmp_path, warmup_json, recipe=recipe)
    done = json.loads((tmp_path / "student" / DONE).read_text())
    assert done["samples"] == 30 and done["options"]["recipe"]["warmup_steps"] == 3
    random = load_vlm(write_tiny_checkpoint("internvl", tmp_path / "random", sizes=recipe.sizes, tokenizer="llama2"))
    trained = load_vlm(base)
    before, after = random.model.state_dict(), trained.model.state_dict()
    assert before.keys() == after.keys()
    assert not torch.equal(before["model.language_model.layers.0.mlp.up_proj.weight"],
                           after["model.language_model.layers.0.mlp.up_proj.weight"])
    vision = [n for n in before if n.startswith("model.vision_tower.")]
    assert vision and all(torch.equal(before[n], after[n]) for n in vision)  # the vision tower stays frozen
    # Same recipe and data: a cache hit; other warm-up data: rebuilt.
    stamp = (tmp_path / "student" / DONE).stat().st_mtime_ns
    assert student_init(tmp_path, warmup_json, recipe=recipe) == base
    assert (tmp_path / "student" / DONE).stat().st_mtime_ns == stamp
    other = data_dir / "other_warmup.json"  # image paths are relative to the JSON's folder
    other.write_text(json.dumps(warmup[:20]))
    student_init(tmp_path, other, recipe=recipe)
    assert json.loads((tmp_path / "student" / DONE).read_text())["samples"] == 20


def test_a_warm_up_without_data_says_what_to_pass(tmp_path):
    with pytest.raises(ValueError, match="write_training_splits"):
        student_init(tmp_path)
    with pytest.raises(ValueError, match="warmup_steps >= 0"):
        StudentRecipe(warmup_steps=-1)


def test_balanced_training_records(data_dir):
    records = balanced_training_records(data_dir / "train.json", per_type=5, seed=0)
    counts = {t: sum(r["type"] == t for r in records) for t in ("colour", "shape", "yes_no")}
    assert counts == {"colour": 5, "shape": 5, "yes_no": 5}
    assert records == balanced_training_records(data_dir / "train.json", per_type=5, seed=0)
    assert records != balanced_training_records(data_dir / "train.json", per_type=5, seed=1)


def test_recipe_validation():
    with pytest.raises(ValueError, match="steps"):
        TeacherRecipe(steps=0)
    with pytest.raises(ValueError, match="lr_end"):
        TeacherRecipe(lr=1e-4, lr_end=1e-3)
    with pytest.raises(ValueError, match="sizes.image_size"):
        TeacherRecipe(family="llava")  # a fixed-resolution family: image_side does not apply
    with pytest.raises(ValueError, match="multiple of 28"):
        TeacherRecipe(image_side=100)


def test_missing_data_says_how_to_convert(tmp_path):
    with pytest.raises(ValueError, match="python -m demo.easy_vqa"):
        prepare_teacher(tmp_path / "cache", tmp_path / "nothing", recipe=SHORT)
