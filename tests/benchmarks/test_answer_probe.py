"""benchmarks/answer_probe.py: the state it probes is the one the student's head reads for the first answer token,
the probe separates what is linearly separable and not what is not, and the command runs on a real checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genrecal.families import load_vlm
from tests.conftest import load_benchmark_script

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def load_probe():
    return load_benchmark_script("answer_probe")


def write_data(root: Path, rng: np.random.Generator) -> Path:
    """The benchmark's data layout in miniature: colour questions, some distillation answers noisy."""
    (root / "images").mkdir(parents=True)
    files = {"train_distill.json": [], "test_balanced.json": []}
    for name, count in (("train_distill.json", 12), ("test_balanced.json", 6)):
        for i in range(count):
            colour = list(COLOURS)[i % len(COLOURS)]
            pixels = np.clip(np.array(COLOURS[colour]) + rng.integers(-20, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            image = f"images/{name[:5]}{i}.png"
            Image.fromarray(pixels).save(root / image)
            record = {"id": f"{name[:5]}{i}", "image": image, "type": "colour", "conversations": [
                {"from": "human", "value": "<image>\nwhat color is the shape?"}, {"from": "gpt", "value": colour}]}
            if name == "train_distill.json" and i % 4 == 0:  # a wrong label, its clean answer kept
                record["clean_answer"] = colour
                record["conversations"][-1]["value"] = list(COLOURS)[(i + 1) % len(COLOURS)]
            files[name].append(record)
    for name, records in files.items():
        (root / name).write_text(json.dumps(records))
    return root


def test_the_probed_state_is_the_one_the_head_reads_for_the_first_answer_token(tiny_checkpoint, tmp_path, rng):
    probe = load_probe()
    data = write_data(tmp_path / "data", rng)
    vlm = load_vlm(tiny_checkpoint("internvl", tokenizer="llama2", hidden_size=64))
    vlm.model.eval()
    records = probe.clean_records(data / "train_distill.json", "colour", 5)
    assert [r["conversations"][-1]["value"] for r in records] == [list(COLOURS)[i % 3] for i in range(5)]  # clean
    states, answers, head_right = probe.first_answer_states(vlm, records, data)
    assert states.shape == (5, 64) and answers == [list(COLOURS)[i % 3] for i in range(5)]
    # The same state from the model's own forward on the prompt alone (chat template with the generation prompt):
    # its last position is the one that predicts the first answer token.
    for i, record in enumerate(records):
        question = record["conversations"][0]["value"].replace("<image>\n", "")
        prompt = vlm.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True, tokenize=False)
        inputs = vlm.processor(text=[prompt], images=[[Image.open(data / record["image"]).convert("RGB")]],
                               return_tensors="pt")
        with torch.no_grad():
            out = vlm.model(**inputs, output_hidden_states=True)
        torch.testing.assert_close(states[i], out.hidden_states[-1][0, -1].float(), rtol=1e-4, atol=1e-5)
        first = vlm.processor.tokenizer(answers[i], add_special_tokens=False)["input_ids"][0]
        assert bool(head_right[i]) == (int(out.logits[0, -1].argmax()) == first)


def test_the_probe_separates_what_is_separable_and_not_random_labels():
    probe = load_probe()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=generator)
    labels = ["a" if v > 0 else "b" for v in (x[:, 3] - x[:, 7]).tolist()]
    assert probe.linear_probe(x[:300], labels[:300], x[300:], labels[300:]) >= 0.9  # chance: 0.5
    noise = ["a" if v > 0 else "b" for v in torch.randn(400, generator=generator).tolist()]
    assert probe.linear_probe(x[:300], noise[:300], x[300:], noise[300:]) < 0.7


def test_a_random_language_model_keeps_only_the_vision_encoder_and_projector(tiny_checkpoint):
    probe = load_probe()
    vlm = load_vlm(tiny_checkpoint("internvl", tokenizer="llama2", hidden_size=64))
    fresh = probe.with_random_language_model(vlm, seed=1)  # (the tiny checkpoint is itself HF's init with seed 0)
    groups = vlm.adapter.parameter_groups(vlm.model)
    kept = {id(p) for group in ("vision_encoder", "projector") for p in groups[group]}
    new = dict(fresh.model.named_parameters())
    assert kept and len(new) == len(dict(vlm.model.named_parameters()))
    for name, param in vlm.model.named_parameters():
        if id(param) in kept:
            assert torch.equal(new[name], param), name
        elif param.dim() >= 2:  # re-drawn (biases and norms start at 0 / 1 in both)
            assert not torch.equal(new[name], param), name
    assert fresh.processor is vlm.processor and fresh.head is not vlm.head


@pytest.mark.slow
def test_the_command_prints_head_and_probe_per_type(tiny_checkpoint, tmp_path, rng, capsys):
    probe = load_probe()
    data = write_data(tmp_path / "data", rng)
    model = tiny_checkpoint("internvl", tokenizer="llama2", hidden_size=64)
    probe.main(["--data", str(data), "--models", str(model), "--types", "colour", "--train-per-type", "9"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["model", "type", "head", "probe", "n"]
    row = lines[1].split()
    assert row[1] == "colour" and row[-1] == "6" and all(0 <= float(v.rstrip("%")) <= 100 for v in row[2:4])
