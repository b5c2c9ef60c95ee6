"""The three stages in one process, teacher and student of different families and tokenizers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from genrecal.distill import LossConfig
from genrecal.families import load_vlm
from genrecal.inprocess import StageRunConfig, run_stages
from genrecal.sample import Sample, Turn

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def colour_samples(n: int, rng) -> list[Sample]:
    samples = []
    for i in range(n):
        name = list(COLOURS)[i % len(COLOURS)]
        pixels = np.clip(np.array(COLOURS[name]) + rng.integers(-20, 20, (64, 64, 3)), 0, 255).astype(np.uint8)
        samples.append(Sample(f"c{i}", [Turn("user", "<image>\nWhat colour is the picture?"), Turn("assistant", name)],
                              [Image.fromarray(pixels)]))
    return samples


@pytest.mark.slow
def test_three_stages_losses_fall_and_final_student_reloads_and_generates(tiny_checkpoint, tmp_path, rng):
    teacher = tiny_checkpoint("qwen2_vl", tokenizer="gpt2", hidden_size=96, intermediate_size=192)
    student = tiny_checkpoint("internvl", tokenizer="llama2", hidden_size=64)
    samples = colour_samples(12, rng)
    config = StageRunConfig(steps_per_stage=4, batch_size=3, grad_accum=2, lr=2e-3, lr_end=2e-4,
                            losses=LossConfig())
    histories = run_stages(teacher, student, samples, tmp_path / "run", config)

    assert sorted(histories) == [1, 2, 3]
    assert all(len(rows) == 4 for rows in histories.values())
    first, last = histories[1][0], histories[1][-1]
    assert last["L1_ce"] < first["L1_ce"] and last["L2_ce"] < first["L2_ce"]
    assert histories[2][-1]["L3"] < histories[2][0]["L3"]
    assert histories[2][-1]["L1_ce"] < histories[2][0]["L1_ce"]
    assert histories[3][-1]["L3"] < histories[3][0]["L3"]
    # The teacher's own CE on its answers, in the stages with a teacher (its reference curve), as the trainer logs it.
    assert all(0 < r["teacher_ce"] < 20 for r in histories[1] + histories[2])
    assert "teacher_ce" not in histories[3][0]
    assert [r["lr"] for r in histories[3]] == pytest.approx(np.linspace(2e-3, 2e-4, 4).tolist())
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["stages"] == [1, 2, 3] and saved["grad_accum"] == 2

    final = tmp_path / "run" / "stage3" / "student"
    with safe_open(final / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if "proj_pre" in k or "rec_body" in k or "proj_post" in k]
    assert (tmp_path / "run" / "stage1" / "recalibrator.safetensors").is_file()
    assert not (tmp_path / "run" / "stage3" / "recalibrator.safetensors").exists()

    vlm = load_vlm(final)  # strict: no missing or unexpected keys
    assert type(vlm.model).__name__ == "InternVLForConditionalGeneration"
    messages = samples[0].messages()[:1]
    prompt = vlm.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = vlm.processor(text=[prompt], images=[samples[0].images], return_tensors="pt")
    with torch.no_grad():
        generated = vlm.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    new_tokens = generated[0, inputs["input_ids"].shape[1]:]
    assert 1 <= new_tokens.numel() <= 4
    assert isinstance(vlm.processor.tokenizer.decode(new_tokens, skip_special_tokens=True), str)
    # The trained student prefers the trained answers over a token it never saw as an answer.
    with torch.no_grad():
        logits = vlm.model(**inputs).logits[0, -1]
    tok = vlm.processor.tokenizer
    colour_ids = [tok(name, add_special_tokens=False).input_ids[0] for name in COLOURS]
    other = tok("zebra", add_special_tokens=False).input_ids[0]
    assert logits[colour_ids].max() > logits[other]
