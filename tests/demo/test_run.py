"""A shortened run of the whole demo pipeline (``python -m demo.run``) as a subprocess, the way the README runs it:
easy-VQA conversion -> the shipped teacher and base student rebuilt -> teacher server -> DeepSpeed trainer stages
1-3 -> alignment plot -> the three evaluations and the table. Only the sizes of the run are cut; every component is
the real one."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from student_trainer.evaluate import exact_match

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_shortened_demo_runs_end_to_end_and_prints_the_table(tmp_path):
    work = tmp_path / "demo"
    cmd = [sys.executable, "-m", "demo.run", "--workdir", str(work), "--distill-limit", "30", "--test-limit", "6",
           "--steps-per-stage", "1", "--grad-accum", "1", "--micro-batch-size", "2"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The trainer's output goes to its log; its progress bars also reach the terminal, each stage finished.
    for stage in ("1 (alignment)", "2 (distillation)", "3 (sft)"):
        assert re.search(rf"stage {re.escape(stage)}: +100%\|", result.stderr), result.stderr[-3000:]

    # The table: one row per model, with the overall and per-type accuracy over the 6 test questions.
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model"))
    assert lines[header].split() == ["model", "accuracy", "colour", "shape", "yes_no", "n"]
    rows = {line[:16].strip(): line[16:].split() for line in lines[header + 2 : header + 5]}
    assert list(rows) == ["teacher", "student before", "student after"]
    assert all(row[-1] == "6" for row in rows.values())

    saved = json.loads((work / "results.json").read_text())
    assert set(saved["accuracy"]) == {"teacher", "student before", "student after"}
    for name, row in rows.items():  # the printed table is the saved one
        assert row[0] == f"{100 * saved['accuracy'][name]:.1f}%"
    # ... and the saved accuracy is what the model answered: each model's report holds its 6 answers to the test
    # questions (references from the converted test data), and the accuracy is the share of exact matches.
    answers = {r["id"]: (r["conversations"][-1]["value"], r["type"])
               for r in json.loads((work / "data" / "test.json").read_text())}
    for name in rows:
        report = json.loads((work / f"eval_{name.replace(' ', '_')}.json").read_text())
        predictions = report["predictions"]
        assert len(predictions) == report["count"] == 6
        for p in predictions:
            assert (p["reference"], p["question_type"]) == answers[p["sample_id"]]
            assert p["exact_match"] == exact_match(p["prediction"], p["reference"]), p
        assert saved["accuracy"][name] == report["accuracy"] == sum(p["exact_match"] for p in predictions) / 6
    # The shipped teacher names colours and shapes (docs/demo.md: colour 100 %): it answers its colour questions.
    teacher = json.loads((work / "eval_teacher.json").read_text())["predictions"]
    colour = [p for p in teacher if p["question_type"] == "colour"]
    assert all(p["exact_match"] for p in colour), colour
    assert {"data", "teacher and student preparation", "training (stages 1-3)", "evaluation", "total"} <= set(saved["timings_s"])

    # The teacher and the base student came from the shipped weights and the teacher was served; the student went
    # through all three stages on the distillation data and came out as a plain checkpoint of its own family,
    # changed by the training.
    for name in ("teacher", "student"):
        assert json.loads((work / "cache" / name / "DONE").read_text())["source"] == "shipped weights"
    assert len(json.loads((work / "data" / "train_distill.json").read_text())) == 30
    run = work / "run"
    for stage in (1, 2, 3):
        assert (run / f"stage{stage}" / "DONE").is_file()
        assert (run / f"stage{stage}" / "loss_curves.png").stat().st_size > 0
    before = load_file(work / "cache" / "student" / "model" / "model.safetensors")
    after = load_file(run / "final" / "model.safetensors")
    assert before.keys() == after.keys() and any((before[k] != after[k]).any() for k in before)
    assert (work / "alignment.png").stat().st_size > 0
    assert "teacher server on 127.0.0.1:" in result.stdout
