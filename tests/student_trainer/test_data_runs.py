"""The trainer CLI on the lazy data path: a bad record in the middle of a run, and a resume with DataLoader
workers that neither repeats nor skips a sample (sample ids compared with an uninterrupted run)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import concurrently
from tests.student_trainer.test_recipe import metric_rows, train_cli

pytestmark = pytest.mark.slow
STAGE3 = ["--stages", "3", "--grad-accum", "2", "--micro-batch-size", "1", "--seed", "0", "--no-tensorboard",
          "--data-workers", "2", "--log-sample-ids"]


def jsonl_copy(vqa_data, tmp_path, count, edit=None):
    records = json.loads(vqa_data.read_text())[:count]
    if edit is not None:
        edit(records)
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "img").symlink_to(vqa_data.parent / "img")
    return path


def test_a_bad_record_in_the_middle_is_skipped_counted_and_replaced(models, vqa_data, subprocess_env, tmp_path):
    def break_one(records):
        records[3]["image"] = "img/missing.png"

    data = jsonl_copy(vqa_data, tmp_path, 6, break_one)
    _, student = models
    result = train_cli(subprocess_env, "--student", student, "--data", data, "--output", tmp_path / "out",
                       "--steps-per-stage", "4", "--save-every", "100", "--validate-data", *STAGE3)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = metric_rows(tmp_path / "out", 3)
    ids = [r["sample_ids"] for r in rows]
    assert all(len(step) == 2 for step in ids) and not any("c3" in step for step in ids)
    counts = [r["skipped_records"] for r in rows]
    met = next(i for i, n in enumerate(counts) if n)  # the step whose data held the bad record
    assert counts == [0] * met + [1] * (len(rows) - met)
    assert "data validation of" in result.stderr and "1 of 6 records are bad" in result.stderr
    assert "skipping bad record 3 ('c3')" in result.stderr and "does not exist" in result.stderr
    assert "skipped 1 bad record(s) during training" in result.stderr


def test_resume_with_data_workers_neither_repeats_nor_skips(models, vqa_data, subprocess_env, tmp_path):
    data = jsonl_copy(vqa_data, tmp_path, 5)  # 5 records, 2 per step: epochs wrap inside steps
    _, student = models
    flags = ["--student", student, "--data", data, "--steps-per-stage", "5", "--save-every", "2", *STAGE3]
    whole, stopped = concurrently(  # independent runs
        lambda: train_cli(subprocess_env, *flags, "--output", tmp_path / "whole"),
        lambda: train_cli(subprocess_env, *flags, "--output", tmp_path / "resumed", "--stop-after-steps", "3"),
    )
    assert whole.returncode == 0, whole.stderr[-4000:]
    assert stopped.returncode == 0, stopped.stderr[-4000:]
    assert [r["step"] for r in metric_rows(tmp_path / "resumed", 3)] == [0, 1, 2]  # checkpoint at step 2
    resumed = train_cli(subprocess_env, *flags, "--output", tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    want, got = metric_rows(tmp_path / "whole", 3), metric_rows(tmp_path / "resumed", 3)
    assert [r["step"] for r in got] == [0, 1, 2, 3, 4]
    assert [r["sample_ids"] for r in got] == [r["sample_ids"] for r in want]
    assert [r["L3"] for r in got] == pytest.approx([r["L3"] for r in want], rel=1e-5)
