"""benchmarks/distillation.py on a shortened config: every variant runs and gets a finite accuracy in [0, 1]."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_distillation", REPO / "benchmarks" / "distillation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def write_data(root: Path, rng: np.random.Generator) -> Path:
    """A few easy-VQA-like records (colour and yes/no questions on solid pictures), LLaVA format."""
    (root / "images").mkdir(parents=True)
    records = {"train": [], "test": []}
    for split, count in (("train", 8), ("test", 4)):
        for i in range(count):
            colour = list(COLOURS)[i % len(COLOURS)]
            pixels = np.clip(np.array(COLOURS[colour]) + rng.integers(-20, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            name = f"images/{split}{i}.png"
            Image.fromarray(pixels).save(root / name)
            question, answer, kind = (("What colour is the shape?", colour, "colour") if i % 2 == 0
                                      else (f"Is the shape {colour}?", "yes", "yes_no"))
            records[split].append({"id": f"{split}-{i}", "image": name, "type": kind, "conversations": [
                {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]})
    for split, rows in records.items():
        (root / f"{split}.json").write_text(json.dumps(rows))
    return root


@pytest.mark.slow
def test_every_variant_runs_and_reports_accuracy_in_unit_interval(tiny_checkpoint, tmp_path, rng):
    bench = load_benchmark()
    teacher = tiny_checkpoint("qwen2_vl", tokenizer="gpt2", hidden_size=64)
    data = write_data(tmp_path / "data", rng)
    cfg = bench.BenchConfig(seeds=[0], steps_per_stage=1, warmup_steps=1, batch_size=2, grad_accum=1, test_limit=4,
                            eval_batch_size=4, max_new_tokens=2, student_hidden=32, same_hidden=32)
    results = bench.run_benchmark(Path(teacher), data, tmp_path / "out", cfg)

    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["variants"].keys() == results["variants"].keys()
    expected = {"base", "base_same_tok", *bench.VARIANTS}
    assert set(saved["variants"]) == expected
    accuracies = [saved["teacher"]["accuracy"]] + [row["mean"] for row in saved["variants"].values()]
    assert all(math.isfinite(a) and 0.0 <= a <= 1.0 for a in accuracies)
    assert all(row["n"] == 1 and row["runs"][0]["count"] == 4 for row in saved["variants"].values())
    # Equal budgets: single-stage variants run 3N steps, GenRecal N per stage.
    runs = tmp_path / "out" / "runs" / "seed0"
    assert len((runs / "sft" / "stage3" / "metrics.jsonl").read_text().splitlines()) == 3
    assert len((runs / "uld" / "stage3" / "metrics.jsonl").read_text().splitlines()) == 3
    assert len((runs / "sft_n" / "stage3" / "metrics.jsonl").read_text().splitlines()) == 1
    # Every variant starts from the warmed-up base student, which the warm-up changed.
    init = tmp_path / "out" / "init" / "seed0"
    for kind in ("cross", "same"):
        assert len((init / f"student_{kind}_warmup" / "stage3" / "metrics.jsonl").read_text().splitlines()) == 1
        before = load_file(init / f"student_{kind}" / "model.safetensors")
        after = load_file(init / f"student_{kind}_warmup" / "stage3" / "student" / "model.safetensors")
        assert before.keys() == after.keys()
        assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(len((runs / "genrecal" / f"stage{s}" / "metrics.jsonl").read_text().splitlines()) == 1 for s in (1, 2, 3))
    assert "ULD" in (runs / "uld" / "stage3" / "metrics.jsonl").read_text()
    assert "KD" in (runs / "same_tok_kd" / "stage3" / "metrics.jsonl").read_text()
    table = bench.markdown_table(saved)
    assert "GenRecal" in table and "teacher" in table
