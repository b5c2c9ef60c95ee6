"""benchmarks/stage2_gradients.py on tiny real checkpoints: the four gradients it compares are the ones it names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from genrecal.families import load_vlm
from genrecal.recalibrator import Recalibrator
from tests.conftest import load_benchmark_script

COLOURS = ("red", "green", "blue", "yellow")


def load_diagnostic():
    return load_benchmark_script("stage2_gradients")


def write_distill(root: Path, rng: np.random.Generator, *, wrong: bool) -> Path:
    """16 colour questions; with ``wrong``, every other answer replaced as the benchmark's noise does."""
    records = []
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
        answer = COLOURS[i % 4]
        record = {"id": f"q{i}", "image": f"{i}.png", "type": "colour", "conversations": [
            {"from": "human", "value": "<image>\nwhat color is the shape?"}, {"from": "gpt", "value": answer}]}
        if wrong and i % 2:
            record["clean_answer"] = answer
            record["conversations"][-1]["value"] = COLOURS[(i + 1) % 4]
        records.append(record)
    path = root / "train_distill.json"
    path.write_text(json.dumps(records))
    return path


def test_gradients_of_l1_and_of_sft_on_noisy_and_clean_labels(teacher_student_checkpoints, tmp_path, rng):
    diagnostic = load_diagnostic()
    teacher, student = (Path(p) for p in teacher_student_checkpoints)
    torch.manual_seed(0)
    vlm = load_vlm(student)
    recalibrator = Recalibrator(vlm.adapter.recalibrator_spec(vlm.model), load_vlm(teacher).head.weight.shape[1])
    save_file(recalibrator.state_dict(), tmp_path / "recalibrator.safetensors")
    for wrong in (False, True):
        root = tmp_path / f"wrong{wrong}"
        root.mkdir()
        grads = diagnostic.stage2_gradients(teacher, student, tmp_path / "recalibrator.safetensors",
                                            write_distill(root, rng, wrong=wrong), limit=16)
        assert set(grads) == {"L1", "L1_kl", "L3_noisy", "L3_clean"}
        assert all(g.norm() > 0 for g in grads.values())
        assert not torch.allclose(grads["L1"], grads["L1_kl"])  # the CE part is in L1, not in L1_kl
        # Clean data: the labels trained on are the clean ones; noisy data: they differ.
        assert torch.allclose(grads["L3_noisy"], grads["L3_clean"]) == (not wrong)
