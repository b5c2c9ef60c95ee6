"""The trainer CLI on the lazy data path: records of every format in one file with a bad one in the middle, and a
resume with DataLoader workers that neither repeats nor skips a sample (sample ids compared with an uninterrupted
run)."""

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


def mix_formats(records):
    """Records 0-2 and 4 rewritten as ShareGPT with a system turn, OpenAI messages with an ``images`` list, with an
    inline image, and text-only (student_trainer/records.py); 5 stays LLaVA; 3 is broken."""
    records[0]["conversations"].insert(0, {"from": "system", "value": "You name colours."})

    def messages(record, image_part):
        question, answer = (turn["value"].removeprefix("<image>\n") for turn in record["conversations"])
        return [{"role": "user", "content": [image_part, {"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]}]

    records[1] = {"id": "c1", "images": [records[1]["image"]], "messages": messages(records[1], {"type": "image"})}
    records[2] = {"id": "c2", "messages": messages(records[2], {"type": "image", "path": records[2]["image"]})}
    records[3]["image"] = "img/missing.png"
    records[4] = {"id": "c4", "messages": [{"role": "system", "content": "Answer yes or no."},
                                           {"role": "user", "content": "Is grass green?"},
                                           {"role": "assistant", "content": "yes"}]}
    records[6]["conversations"][1]["value"] = " ".join(["red"] * 400)  # c6: longer than --max-length 256


def test_mixed_formats_train_and_bad_or_too_long_records_are_skipped_counted_and_replaced(
        models, vqa_data, subprocess_env, tmp_path):
    data = jsonl_copy(vqa_data, tmp_path, 7, mix_formats)
    _, student = models
    result = train_cli(subprocess_env, "--student", student, "--data", data, "--output", tmp_path / "out",
                       "--steps-per-stage", "4", "--save-every", "100", "--validate-data", "--max-length", "256",
                       *STAGE3)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = metric_rows(tmp_path / "out", 3)
    ids = [r["sample_ids"] for r in rows]
    assert all(len(step) == 2 for step in ids) and not any({"c3", "c6"} & set(step) for step in ids)
    assert {"c0", "c1", "c2", "c4", "c5"} <= {i for step in ids for i in step}  # every format trained on
    counts = [r["skipped_records"] for r in rows]
    assert counts == sorted(counts) and counts[-1] == 2  # each counted once, when its step met it
    assert "data validation of" in result.stderr and "1 of 7 records are bad" in result.stderr
    assert "skipping bad record 3 ('c3')" in result.stderr and "does not exist" in result.stderr
    assert "skipping bad record 6 ('c6')" in result.stderr and "exceed max_length=256" in result.stderr
    assert "skipped 2 bad record(s) during training" in result.stderr


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
