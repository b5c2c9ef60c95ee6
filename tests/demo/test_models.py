"""The demo's models: rebuilt from the shipped weights, they see; the command that made them runs at toy size."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

from demo.models import BENCHMARK_ONLY, RECIPES, SHIPPED, WEIGHTS_DIR, from_shipped, prepare_models
from genrecal.families import load_vlm
from genrecal.sample import Sample, Turn

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> dict[str, Path]:
    return prepare_models(tmp_path_factory.mktemp("models"), tmp_path_factory.mktemp("no-data"))


def picture(colour: str, shape: str = "rectangle") -> Image.Image:
    image = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse([12, 12, 52, 52], fill=colour)
    else:
        draw.rectangle([12, 12, 52, 52], fill=colour)
    return image


def answer_logits(vlm, question: str, images: list[Image.Image]) -> torch.Tensor:
    """(len(images), V) logits of the first answer token, the same question about each picture."""
    samples = [Sample(f"s{i}", [Turn("user", f"<image>\n{question}"), Turn("assistant", "x")], [im])
               for i, im in enumerate(images)]
    batch = vlm.encode(samples)
    with torch.no_grad():
        hidden = vlm.body_hidden_states(batch)
        positions = [batch.prediction_positions(i)[0] for i in range(len(samples))]
        return torch.stack([vlm.head(hidden[i, p]) for i, p in enumerate(positions)])


def test_shipped_weights_fit_the_budget_and_match_their_recipes():
    sizes = {}
    for name in SHIPPED + BENCHMARK_ONLY:
        path = WEIGHTS_DIR / f"{name}.safetensors"
        sizes[name] = path.stat().st_size
        with safe_open(path, "pt") as f:
            assert f.metadata()["recipe_fingerprint"] == RECIPES[name].fingerprint(), name
    assert sum(sizes[n] for n in SHIPPED) <= 20 * 1024 * 1024  # the demo's teacher and student (issue 9)
    assert sizes["student_same_tok"] <= 8 * 1024 * 1024  # the benchmark's control student (bf16, GPT-2 vocab)
    assert sorted(p.stem for p in WEIGHTS_DIR.glob("*.safetensors")) == sorted(SHIPPED + BENCHMARK_ONLY)


def test_the_benchmarks_student_loads_from_its_shipped_weights(tmp_path):
    path = from_shipped("student_same_tok", tmp_path / "model")
    assert path is not None
    vlm = load_vlm(path)
    assert vlm.adapter.model_type == RECIPES["student_same_tok"].family
    logits = answer_logits(vlm, "what color is the shape?", [picture(c) for c in ("red", "blue", "green", "yellow")])
    assert (logits - logits[0]).abs().max() > 1.0  # its answer moves with the picture (measured 2.7)


def test_teacher_and_student_differ_in_everything_genrecal_bridges(shipped):
    teacher, student = (load_vlm(shipped[n]) for n in ("teacher", "student"))
    assert teacher.adapter.model_type != student.adapter.model_type
    assert type(teacher.processor.tokenizer).__name__ != type(student.processor.tokenizer).__name__
    assert teacher.head.weight.shape[1] > student.head.weight.shape[1]  # D_l > D_s
    image = picture("red")
    tokens = [int((vlm.encode([Sample("s", [Turn("user", "<image>\nq"), Turn("assistant", "a")], [image])])
                   .input_ids == vlm.model.config.image_token_id).sum()) for vlm in (teacher, student)]
    assert tokens[0] != tokens[1] and min(tokens) > 0
    # Rec-body (two of the student's decoder blocks) is at most a third of the student's decoder.
    decoder = student.adapter.text_model(student.model)
    per_block = sum(p.numel() for p in decoder.layers[0].parameters())
    assert 2 * per_block <= sum(p.numel() for p in decoder.layers.parameters()) / 3 + 1


@pytest.mark.parametrize("name", ["teacher", "student"])
def test_the_answer_logits_move_with_the_picture(shipped, name):
    vlm = load_vlm(shipped[name])
    logits = answer_logits(vlm, "what color is the shape?", [picture(c) for c in ("red", "blue", "green", "yellow")])
    assert (logits - logits[0]).abs().max() > 1.0


def test_the_teacher_names_the_colour_it_sees(shipped):
    vlm = load_vlm(shipped["teacher"])
    colours = ["red", "blue", "green", "yellow"]
    logits = answer_logits(vlm, "what color is the shape?", [picture(c) for c in colours])
    first_ids = [int(vlm.encode([Sample("s", [Turn("user", "<image>\nq"), Turn("assistant", c)], [picture(c)])])
                     .answer_token_ids(0)[0]) for c in colours]  # each colour's first answer token, in context
    predicted = logits[:, first_ids].argmax(dim=1).tolist()
    assert predicted == list(range(len(colours)))


def test_the_student_sees_colours_and_shapes_it_has_not_learnt_to_name(shipped):
    """The base student's vision (7-px patches, pre-trained on drawn pictures) tells colours and shapes apart —
    nearest class mean of its projector output on drawn pictures, far above chance — while its language model met
    only 50 colour and 50 shape questions: that naming gap is what the distillation closes."""
    from demo.easy_vqa import SHAPES
    from demo.pictures import labelled_pictures
    from demo.pretrain import picture_features
    from demo.splits import COLOURS

    vlm = load_vlm(shipped["student"])
    vlm.model.eval()
    drawn = list(itertools.islice(labelled_pictures(99), 400))
    with torch.no_grad():
        features = picture_features(vlm, [image for image, _ in drawn])
    fit, held_out = slice(0, 200), slice(200, 400)
    for attribute, classes, at_least in (("colour", len(COLOURS), 0.6), ("shape", len(SHAPES), 0.6)):
        labels = torch.tensor([getattr(label, attribute) for _, label in drawn])
        means = torch.stack([features[fit][labels[fit] == c].mean(0) for c in range(classes)])
        accuracy = (torch.cdist(features[held_out], means).argmin(1) == labels[held_out]).float().mean()
        assert accuracy >= at_least, (attribute, float(accuracy))  # chance: 1/8 and 1/3 (the 14-px ViT: ~0.4 shape)
    assert dict(RECIPES["student"].type_limits) == {"colour": 50, "shape": 50}


def test_a_changed_recipe_does_not_use_the_shipped_weights(tmp_path, monkeypatch):
    import dataclasses

    import demo.models as models

    changed = dataclasses.replace(RECIPES["student"], seed=123)
    monkeypatch.setitem(models.RECIPES, "student", changed)
    assert from_shipped("student", tmp_path / "model") is None


def test_type_limits_keep_the_first_questions_of_a_type():
    import dataclasses

    from demo.models import training_records

    train = [{"id": f"train-{i}", "image": f"images/train/{i}.png", "type": ("colour", "shape", "yes_no")[i % 3],
              "conversations": []} for i in range(600)]
    recipe = dataclasses.replace(RECIPES["student"], data="train", per_type=150, type_limits=(("colour", 20),))
    chosen = training_records(recipe, train)
    counts = {k: sum(r["type"] == k for r in chosen) for k in ("colour", "shape", "yes_no")}
    assert counts == {"colour": 20, "shape": 150, "yes_no": 150}
    unlimited = training_records(dataclasses.replace(recipe, type_limits=()), train)
    assert [r for r in unlimited if r["type"] == "colour"][:20] == [r for r in chosen if r["type"] == "colour"]


@pytest.mark.slow
def test_the_build_command_reproduces_weights_at_toy_size(tmp_path):
    """``python -m demo.models build`` (the command that made the shipped files), 2 steps, one model."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = tmp_path / "weights"
    result = subprocess.run(
        [sys.executable, "-m", "demo.models", "build", "--only", "student", "--steps", "2", "--out", str(out),
         "--work", str(tmp_path / "work"), "--evaluate", "8"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with safe_open(out / "student.safetensors", "pt") as f:
        assert f.metadata()["recipe_fingerprint"] != RECIPES["student"].fingerprint()  # 2 steps, not the recipe
        keys = set(f.keys())
    with safe_open(WEIGHTS_DIR / "student.safetensors", "pt") as f:
        assert keys == set(f.keys())
    record = json.loads((tmp_path / "work" / "student" / "genrecal_pretraining.json").read_text())
    assert record["recipe"]["pretraining"]["steps"] == 2 and record["samples"] > 600
    assert record["recipe"]["pretraining"]["vision_steps"] == 2  # --steps caps the vision phase too
    assert "overall" in result.stdout
