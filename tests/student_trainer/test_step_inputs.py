"""A step's inputs: records the student cannot format (too long) and records the teacher service refuses (its own
control tokens in the text, alone over its token budget) are skipped, counted and replaced like unreadable ones; the micro-batches keep their
size and every sample in them has the teacher's features."""

from __future__ import annotations

import json

import pytest

from genrecal.families import load_vlm
from genrecal.resilient_teacher import open_teacher
from student_trainer.config import TrainConfig
from student_trainer.data import ShardedBatches
from student_trainer.dataset import LazySamples, MicroBatchLoader
from student_trainer.step_inputs import StepBuilder
from teacher_server.launch import TeacherProcess

pytestmark = pytest.mark.slow


def test_samples_too_long_for_the_student_or_refused_by_the_teacher_are_skipped_and_replaced(
        models, vqa_data, tmp_path):
    teacher_path, student_path = models
    records = json.loads(vqa_data.read_text())[:6]
    records[1]["conversations"][0]["value"] += " <|vision_start|>"  # a Qwen-VL control token: the teacher refuses
    records[2]["conversations"][1]["value"] = " ".join(["red"] * 300)  # longer than max_length for the student
    records[3]["conversations"][1]["value"] = " ".join(["red"] * 50)  # alone over the teacher's token budget
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "img").symlink_to(vqa_data.parent / "img")

    server = TeacherProcess(teacher_path, "--max-batch-tokens", "64")
    try:
        config = TrainConfig(student=str(student_path), data=str(data), output=str(tmp_path / "out"),
                             teacher_addr=server.address, grad_accum=3, micro_batch_size=2, max_length=128)
        dataset = LazySamples(data)
        batches = ShardedBatches(len(dataset), config.micro_batch_size, seed=0)
        loader = MicroBatchLoader(dataset, batches, start=0, stop=config.grad_accum, workers=0)
        teacher = open_teacher(addr=server.address, max_length=config.max_length)
        bad = {}
        builder = StepBuilder(dataset, loader, load_vlm(student_path), teacher, config, bad)
        try:
            inputs = builder.build(0)  # the step reads all 6 records once
            builder.release(inputs)
        finally:
            builder.close()
            teacher.close()
    finally:
        server.kill()

    assert sorted(bad) == [1, 2, 3]
    assert bad[1].reason.startswith("the teacher refused it: turn 0 (user) contains the special token '<|vision_start|>'")
    assert "exceed max_length=128" in bad[2].reason
    assert bad[3].reason.startswith("the teacher refused it: ") and "max_batch_tokens=64" in bad[3].reason
    ids = [[s.sample_id for s in group] for group in inputs.groups]
    assert all(len(group) == 2 for group in ids) and not {"c1", "c2", "c3"} & {i for group in ids for i in group}
    for group, batch, features in zip(inputs.groups, inputs.student_batches, inputs.features, strict=True):
        assert batch.sample_ids == [s.sample_id for s in group] == [f.sample_id for f in features]
