"""The module a stage trains: the student VLM and the Recalibrator as ONE ``nn.Module``, whose ``forward`` is a
micro-batch's forward up to the Recalibrator outputs (:func:`genrecal.distill.recalibrate`). The step
(:mod:`student_trainer.step`) sends the Score of those outputs and builds the loss from its answer
(:func:`genrecal.distill.finish_objective`). A new loss option is a change in :mod:`genrecal.distill` (and
:class:`genrecal.distill.LossConfig`), nowhere else in the trainer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from genrecal.distill import LossConfig, Recalibrated, recalibrate
from genrecal.families import EncodedBatch, LoadedVLM
from genrecal.recalibrator import Recalibrator
from genrecal.stages import Stage
from genrecal.teacher import TeacherFeatures

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
        features: Sequence[TeacherFeatures] | None = None,
        student_tokens: float | None = None,
        losses: LossConfig,
        sft_head_calls: int | None = None,
    ) -> Recalibrated:
        """The micro-batch's Recalibrator outputs of both paths, L3 and the logit-distillation term: every tensor
        its loss flows through, so DeepSpeed's ``engine(...)`` hooks its backward prologue on them (and ZeRO-3
        gathers the parameters this forward uses). ``student_tokens``: L3's normaliser, the step's global count;
        ``sft_head_calls``: the chunks L3 runs the student's head in, equal on every rank (see
        :mod:`student_trainer.step`)."""
        return recalibrate(
            stage, self._student, batch, recalibrator=self.recalibrator, features=features,
            student_tokens=student_tokens, losses=losses, sft_head_calls=sft_head_calls,
        )


def full_state_dict(module: nn.Module, *, is_main: bool) -> dict[str, torch.Tensor] | None:
    """``module.state_dict()`` with full tensors, copied to the CPU of the main rank (None on the others). Every
    rank must call it: under ZeRO-3 the parameters of one module at a time are gathered from their shards
    (``deepspeed.zero.GatheredParameters``), so at most one module's full parameters are materialised at once;
    without ZeRO-3 that context does nothing. A tensor under several keys (tied embeddings) stays one tensor."""
    import deepspeed

    entries = module.state_dict(keep_vars=True)  # key -> the Parameter or buffer itself (ZeRO-3: an empty shard)
    by_owner: dict[str, list[str]] = {}  # the owning module's prefix -> its keys, in state_dict order
    for key in entries:
        by_owner.setdefault(key.rpartition(".")[0], []).append(key)
    state: dict[str, torch.Tensor] | None = {} if is_main else None
    copies: dict[int, torch.Tensor] = {}  # id(tensor) -> its CPU copy
    for keys in by_owner.values():
        params = [entries[k] for k in keys if isinstance(entries[k], nn.Parameter)]
        with deepspeed.zero.GatheredParameters(params):  # a collective under ZeRO-3; released (re-partitioned) on exit
            if state is not None:
                for key in keys:
                    tensor = entries[key]
                    if id(tensor) not in copies:
                        copies[id(tensor)] = tensor.detach().to("cpu", copy=True)
                    state[key] = copies[id(tensor)]
    return state


def split_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A :class:`DistillationModule` state dict as (the student's HF keys, the Recalibrator's keys)."""
    student = {k[len(STUDENT_PREFIX):]: v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}
    recalibrator = {
        k[len(RECALIBRATOR_PREFIX):]: v.contiguous() for k, v in state.items() if k.startswith(RECALIBRATOR_PREFIX)
    }
    return student, recalibrator
