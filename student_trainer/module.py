"""The module a stage trains: the student VLM and the Recalibrator as ONE ``nn.Module``, whose ``forward`` is the
loss of one micro-batch (:func:`genrecal.distill.genrecal_objective`), or with ``pending=True`` its first phase
with the Score in flight (:func:`genrecal.distill.start_objective`, for :mod:`student_trainer.accumulate`). A new
loss option is a change here (and in :class:`genrecal.distill.LossConfig`), nowhere else in the trainer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from genrecal.distill import LossConfig, PendingObjective, start_objective
from genrecal.families import EncodedBatch, LoadedVLM
from genrecal.recalibrator import Recalibrator
from genrecal.stages import Stage
from genrecal.teacher import Teacher, TeacherFeatures

STUDENT_PREFIX = "student."
RECALIBRATOR_PREFIX = "recalibrator."


class DistillationModule(nn.Module):
    """The student VLM and the Recalibrator as ONE module, so DeepSpeed shards, steps and checkpoints them together.

    ``state_dict`` keys are ``student.<the HF model's keys>`` and ``recalibrator.<Recalibrator keys>``.
    """

    def __init__(self, student: LoadedVLM, recalibrator: Recalibrator | None):
        super().__init__()
        self.student = student.model
        self.recalibrator = recalibrator
        self._student = student  # the adapter and processor around self.student (not a submodule)

    def forward(
        self,
        stage: Stage,
        batch: EncodedBatch,
        *,
        teacher: Teacher | None = None,
        features: Sequence[TeacherFeatures] | None = None,
        teacher_tokens: float | None = None,
        student_tokens: float | None = None,
        losses: LossConfig,
        pending: bool = False,
        sft_head_calls: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]] | tuple[list[torch.Tensor], PendingObjective]:
        """The micro-batch's loss (a tensor: DeepSpeed hooks its backward on it) and its metrics.

        ``pending=True``: the graph tensors the loss will flow through (DeepSpeed hooks those instead) and the
        :class:`~genrecal.distill.PendingObjective` whose ``finish()`` gives the loss once the Score is back.
        ``sft_head_calls``: the chunks L3 runs the student's head in, equal on every rank (see
        :mod:`student_trainer.accumulate`).
        """
        objective = start_objective(
            stage, self._student, batch, recalibrator=self.recalibrator, teacher=teacher, features=features,
            teacher_tokens=teacher_tokens, student_tokens=student_tokens, losses=losses,
            sft_head_calls=sft_head_calls,
        )
        if pending:
            return objective.graph_tensors(), objective
        done = objective.finish()
        return done.loss, done.metrics


def split_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A :class:`DistillationModule` state dict as (the student's HF keys, the Recalibrator's keys)."""
    student = {k[len(STUDENT_PREFIX):]: v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}
    recalibrator = {
        k[len(RECALIBRATOR_PREFIX):]: v.contiguous() for k, v in state.items() if k.startswith(RECALIBRATOR_PREFIX)
    }
    return student, recalibrator
