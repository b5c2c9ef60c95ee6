"""The step's typed metrics and the export's gather. The step itself (forward to the Recalibrator outputs, the
Score in flight, backward, optimizer step) is checked end to end in test_recipe.py: gradients of 2 ranks equal one
big batch's, and the overlapped loop trains bit for bit like the sequential one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from genrecal.distill import LossParts
from student_trainer.step import StepMetrics

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("export_probe.py")


def metrics(**overrides) -> StepMetrics:
    values = dict(
        loss=1.5, parts=LossParts(l1_ce=0.5, l1_kl=0.25, l3=0.75), student_answer_tokens=12,
        teacher_answer_tokens=10, teacher_ce=0.4, samples=4, data_position=6, skipped_records=1, lr=1e-4,
        step_time_s=0.5, tokens_per_s=200.0, teacher_wait_share=0.1,
        wire_bytes={"Encode_sent": 100, "Score_received": 50}, sample_ids=None,
    )
    return StepMetrics(**{**values, **overrides})


def test_step_metrics_row_keeps_the_metric_column_names():
    row = metrics().to_row()
    assert row == {
        "L1_ce": 0.5, "L1_kl": 0.25, "L3": 0.75, "loss": 1.5, "skipped_records": 1, "student_answer_tokens": 12,
        "samples": 4, "data_position": 6, "teacher_answer_tokens": 10, "teacher_ce": 0.4, "lr": 1e-4,
        "step_time_s": 0.5, "tokens_per_s": 200.0, "teacher_wait_share": 0.1, "wire_encode_sent_bytes": 100,
        "wire_score_received_bytes": 50,
    }
    # Stage 3 without a teacher: no teacher columns, no wire bytes; --log-sample-ids adds the ids.
    row = metrics(parts=LossParts(l3=0.75), teacher_answer_tokens=None, teacher_ce=None, teacher_wait_share=None,
                  wire_bytes=None, sample_ids=["a", "b"]).to_row()
    assert not {"teacher_answer_tokens", "teacher_ce", "teacher_wait_share", "L1_ce"} & set(row)
    assert row["sample_ids"] == ["a", "b"] and row["L3"] == 0.75


@pytest.mark.slow
def test_full_state_dict_equals_deepspeeds_zero3_consolidation(subprocess_env, tmp_path):
    """2 gloo ranks, ZeRO-3 after two optimizer steps: the export's gather (public GatheredParameters) gives the
    same tensors as DeepSpeed's internal consolidation, tied weights stay tied, and ZeRO-2 gives them too."""
    out = tmp_path / "states.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(PROBE),
               str(out)]
    result = subprocess.run(command, cwd=REPO, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    states = torch.load(out, weights_only=True)
    ours, reference, zero2 = states["ours"], states["reference"], states["zero2"]
    assert list(ours) == list(reference) == list(zero2)
    for key in reference:
        assert ours[key].dtype == reference[key].dtype and torch.equal(ours[key], reference[key]), key
        torch.testing.assert_close(ours[key], zero2[key], rtol=1e-5, atol=1e-7)  # the same training, ZeRO-2
    assert ours["embed.weight"].data_ptr() == ours["head.weight"].data_ptr()  # tied: one tensor
    assert not torch.equal(ours["body.0.weight"], states["initial"]["body.0.weight"])  # the steps trained it
