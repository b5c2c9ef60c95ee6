"""One GenRecal training step's objective: L1 + L2 through the Recalibrator and the teacher's head, plus L3.

The teacher is a :class:`genrecal.teacher.Teacher`: its ``score_paths(features, {path: answer_outputs}, *,
normalizer, ce_weight, kl_weight) -> {path: (HeadScore, per-sample gradients)}`` scores L1 and L2 together —
:class:`genrecal.teacher.InProcessTeacher` here, the gRPC client (one round trip) in the student trainer. The head gradient comes back as a tensor and enters autograd through a surrogate
``(r * g.detach()).sum()`` (:func:`genrecal.losses.surrogate_loss`), so the RPC boundary does not change the
mathematics.

**Two phases.** :func:`recalibrate` runs everything up to the Recalibrator outputs (the student body, L3 and
the logit-distillation baselines, both Recalibrator paths) and returns them as :class:`Recalibrated`; the teacher
scores those outputs; :func:`finish_objective` builds the loss from the Score (:class:`StepObjective`, its parts
typed as :class:`LossParts`). :func:`genrecal_objective` is the three back to back (the reference loop,
:mod:`genrecal.inprocess`); the DeepSpeed trainer runs the same three with the Score in flight during the next
micro-batch's forward (:mod:`student_trainer.step`): the same tensors, the same additions in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import torch
from torch import Tensor

from genrecal.families import EncodedBatch, LoadedVLM
from genrecal.losses import student_sft_loss, surrogate_loss
from genrecal.recalibrator import Recalibrator, RecalibratorInput
from genrecal.stages import STAGES, Stage
from genrecal.teacher import ScoredPaths, Teacher, TeacherFeatures

LOGIT_DISTILLATION = (None, "kd", "uld")


@dataclass(frozen=True)
class LossConfig:
    """Weights of the loss terms; the ablations of the paper switch parts off."""

    ce_weight: float = 1.0  # the CE part of L1/L2 (L_ar); 0 = KL-only ablation
    kl_weight: float = 1.0
    regularisation: bool = True  # L2, the regularisation path; False = its ablation
    sft_weight: float = 1.0  # L3
    # Baselines GenRecal is compared with (genrecal.baselines): added to L3 wherever L3 is on, weighted by
    # logit_distillation_weight. "kd": token-level KD (one tokenizer only); "uld": ULD (any tokenizers).
    logit_distillation: str | None = None
    logit_distillation_weight: float = 1.0

    def __post_init__(self) -> None:
        for name in ("ce_weight", "kl_weight", "sft_weight", "logit_distillation_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"LossConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.logit_distillation not in LOGIT_DISTILLATION:
            raise ValueError(f"LossConfig.logit_distillation must be one of {LOGIT_DISTILLATION}, "
                             f"got {self.logit_distillation!r}")
        if self.ce_weight == 0 and self.kl_weight == 0:
            raise ValueError("LossConfig: ce_weight and kl_weight are both 0, so L1/L2 would be empty; set one > 0")


def _part(key: str):
    return field(default=None, metadata={"key": key})


@dataclass
class LossParts:
    """The loss parts of a micro-batch (or, summed, of a step), each already divided by the step's answer-token
    count; ``None``: a part the stage (or the loss options) does not compute. Metric rows name them ``L1_ce``,
    ``L1_kl``, ``L2_ce``, ``L2_kl``, ``L3``, ``KD``, ``ULD`` (:meth:`to_row`)."""

    l1_ce: float | None = _part("L1_ce")  # the student path through the Recalibrator (Alg. 1): CE, KL to the teacher
    l1_kl: float | None = _part("L1_kl")
    l2_ce: float | None = _part("L2_ce")  # the regularisation path (Alg. 2)
    l2_kl: float | None = _part("L2_kl")
    l3: float | None = _part("L3")  # the student's CE on its own answers (unweighted)
    kd: float | None = _part("KD")  # the logit-distillation baselines' term (unweighted), --logit-distillation
    uld: float | None = _part("ULD")

    def __add__(self, other: LossParts) -> LossParts:
        """Part by part (both sides come from the same stage and options, so compute the same parts)."""
        summed = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if (a is None) != (b is None):
                raise AssertionError(f"loss part {f.name} is computed on one side of the sum only")
            summed[f.name] = None if a is None else a + b
        return LossParts(**summed)

    def values(self) -> list[float]:
        """Every part in field order, 0.0 where not computed: a vector to all-reduce (:meth:`with_values`)."""
        return [getattr(self, f.name) or 0.0 for f in fields(self)]

    def with_values(self, values: Sequence[float]) -> LossParts:
        """These parts with ``values`` (field order, as :meth:`values` gives them); parts not computed stay None."""
        names = [f.name for f in fields(self)]
        if len(values) != len(names):
            raise AssertionError(f"{len(values)} values for {len(names)} loss parts")
        return LossParts(**{n: None if getattr(self, n) is None else float(v)
                            for n, v in zip(names, values, strict=True)})

    def to_row(self) -> dict[str, float]:
        """The computed parts under their metric names (``{"L1_ce": ..., "L3": ...}``)."""
        return {f.metadata["key"]: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass
class StepObjective:
    """One micro-batch's objective: the loss to back-propagate and its parts."""

    loss: Tensor  # scalar; its gradient is exactly that of the stage's losses
    parts: LossParts
    student_tokens: int | None = None  # this micro-batch's L3 tokens; None without L3
    teacher_tokens: int | None = None  # this micro-batch's teacher answer tokens; None without L1/L2

    @property
    def metrics(self) -> dict[str, float]:
        """The parts and token counts under their metric names (the reference loop sums these over a step)."""
        row = self.parts.to_row()
        if self.student_tokens is not None:
            row["student_tokens"] = float(self.student_tokens)
        if self.teacher_tokens is not None:
            row["teacher_tokens"] = float(self.teacher_tokens)
        return row


def student_path_inputs(
    student_hidden: Tensor, batch: EncodedBatch, features: Sequence[TeacherFeatures]
) -> list[RecalibratorInput]:
    """Alg. 1 inputs ``[z_qs; z_al]``: the student's question features with the teacher's answer features."""
    inputs = []
    for i, teacher in enumerate(features):
        if teacher.sample_id != batch.sample_ids[i]:
            raise ValueError(f"teacher features are for sample {teacher.sample_id!r}, the student batch has {batch.sample_ids[i]!r}")
        segments = batch.question_segments(i)
        if len(segments) != len(teacher.answer_segments):
            raise ValueError(
                f"sample {teacher.sample_id!r}: the student sees {len(segments)} answers, the teacher "
                f"{len(teacher.answer_segments)}; both must format the same conversation"
            )
        questions = [student_hidden[i, s:e] for s, e in segments]  # (Lq_k, D_s)
        inputs.append(RecalibratorInput(question_segments=questions, answer_segments=teacher.answer_segments))
    return inputs


def regularisation_path_inputs(features: Sequence[TeacherFeatures]) -> list[RecalibratorInput]:
    """Alg. 2 inputs ``[z_ql; z_al]``: teacher features throughout."""
    return [RecalibratorInput(question_segments=f.question_segments, answer_segments=f.answer_segments) for f in features]


class Recalibrated(NamedTuple):
    """The first phase of a micro-batch's objective (:func:`recalibrate`): everything up to the Recalibrator outputs.

    Tensors (and builtins) only: as a module's forward output, DeepSpeed finds every tensor the loss will flow
    through and hooks its backward prologue on them (``engine(...)``). Holding one keeps the micro-batch's
    autograd graph (activations included) alive until the backward of its loss.
    """

    outputs_by_path: dict[str, list[Tensor]]  # path ("L1", "L2") -> B x (La_l, D_l), in the graph; {} without them
    sft: Tensor | None  # L3 / student_tokens (unweighted), in the graph; None in a stage without L3
    sft_tokens: int | None  # this micro-batch's L3 tokens
    logit_distillation: Tensor | None  # the KD / ULD term (unweighted); None unless --logit-distillation

    def for_score(self) -> dict[str, list[Tensor]]:
        """The Recalibrator outputs to send to the teacher's Score: detached (the gradient comes back as a tensor)."""
        return {name: [r.detach() for r in outputs] for name, outputs in self.outputs_by_path.items()}


def recalibrate(
    stage: Stage,
    student: LoadedVLM,
    batch: EncodedBatch,
    *,
    recalibrator: Recalibrator | None = None,
    features: Sequence[TeacherFeatures] | None = None,
    student_tokens: float | None = None,
    losses: LossConfig = LossConfig(),
    sft_head_calls: int | None = None,
) -> Recalibrated:
    """The forward of one micro-batch up to the Recalibrator outputs of both paths, with L3 and the
    logit-distillation term. ``student_tokens``: L3's normaliser (see :func:`genrecal_objective`);
    ``sft_head_calls``: how many chunks L3 calls the student's head in (:func:`genrecal.losses.student_sft_loss`;
    the same on every rank under ZeRO-3)."""
    spec = STAGES[Stage(stage)]
    with torch.set_grad_enabled("body" in spec.trainable):  # stage 1: the student is frozen, z_qs is a constant
        hidden = student.body_hidden_states(batch)  # (B, L_s, D_s)

    sft = sft_tokens = term = None
    if "L3" in spec.losses:
        sft, sft_tokens = student_sft_loss(hidden, student.head, batch.labels(), normalizer=student_tokens,
                                           head_calls=sft_head_calls)
        if losses.logit_distillation is not None:
            from genrecal.baselines import logit_distillation_loss

            if features is None:
                raise ValueError(f"--logit-distillation {losses.logit_distillation} needs the teacher's features")
            term = logit_distillation_loss(losses.logit_distillation, hidden, student.head, batch, features,
                                           normalizer=student_tokens)
    if not spec.needs_teacher:
        return Recalibrated({}, sft, sft_tokens, term)
    if recalibrator is None or features is None:
        raise ValueError(f"stage {int(stage)} needs the Recalibrator and the teacher's features")
    paths = [("L1", student_path_inputs(hidden, batch, features), False)]
    if losses.regularisation:
        paths.append(("L2", regularisation_path_inputs(features), True))
    outputs_by_path = {  # path -> B x (La_l, D_l)
        name: recalibrator(inputs, question_from_teacher=question_from_teacher)
        for name, inputs, question_from_teacher in paths
    }
    return Recalibrated(outputs_by_path, sft, sft_tokens, term)


def finish_objective(recalibrated: Recalibrated, scores: ScoredPaths | None, losses: LossConfig,
                     features: Sequence[TeacherFeatures] | None = None) -> StepObjective:
    """The second phase: the loss from the Recalibrator outputs and the teacher's Score of them (``scores``, None
    in a stage without the teacher): ``sft_weight * L3 (+ the logit-distillation term) + one surrogate per path``,
    added in that order."""
    total = None
    if recalibrated.sft is not None:
        total = losses.sft_weight * recalibrated.sft
    if recalibrated.logit_distillation is not None:
        total = total + losses.logit_distillation_weight * recalibrated.logit_distillation
    head_scores, teacher_tokens = {}, None  # path -> HeadScore
    if recalibrated.outputs_by_path:
        if scores is None or features is None:
            raise ValueError("the Recalibrator outputs need the teacher's Score of them and the features")
        for name, outputs in recalibrated.outputs_by_path.items():
            score, grads = scores[name]
            value = losses.ce_weight * float(score.ce) + losses.kl_weight * float(score.kl)
            term = surrogate_loss(torch.cat(outputs), torch.cat(grads), value=value)
            total = term if total is None else total + term
            head_scores[name] = score
        teacher_tokens = sum(f.num_answer_tokens for f in features)
    l1, l2 = head_scores.get("L1"), head_scores.get("L2")
    term = _value(recalibrated.logit_distillation)
    parts = LossParts(
        l1_ce=_value(l1 and l1.ce), l1_kl=_value(l1 and l1.kl), l2_ce=_value(l2 and l2.ce),
        l2_kl=_value(l2 and l2.kl), l3=_value(recalibrated.sft),
        kd=term if losses.logit_distillation == "kd" else None,
        uld=term if losses.logit_distillation == "uld" else None,
    )
    return StepObjective(loss=total, parts=parts, student_tokens=recalibrated.sft_tokens,
                         teacher_tokens=teacher_tokens)


def _value(x: Tensor | float | None) -> float | None:
    return None if x is None else float(x.detach() if isinstance(x, Tensor) else x)


def genrecal_objective(
    stage: Stage,
    student: LoadedVLM,
    batch: EncodedBatch,
    *,
    recalibrator: Recalibrator | None = None,
    teacher: Teacher | None = None,
    features: Sequence[TeacherFeatures] | None = None,
    teacher_tokens: float | None = None,
    student_tokens: float | None = None,
    losses: LossConfig = LossConfig(),
    sft_head_calls: int | None = None,
) -> StepObjective:
    """The stage's loss for one micro-batch: :func:`recalibrate`, the teacher's Score of both paths (one call),
    :func:`finish_objective`.

    ``teacher_tokens`` / ``student_tokens`` normalise L1/L2 and L3: pass the answer-token counts of the whole
    optimizer step (all micro-batches, all ranks) so accumulated gradients equal one large batch's.
    """
    recalibrated = recalibrate(stage, student, batch, recalibrator=recalibrator, features=features,
                               student_tokens=student_tokens, losses=losses, sft_head_calls=sft_head_calls)
    scores = None
    if recalibrated.outputs_by_path:
        if teacher is None:
            raise ValueError(f"stage {int(stage)} needs a teacher to score the Recalibrator outputs")
        scores = teacher.score_paths(features, recalibrated.for_score(), normalizer=teacher_tokens,
                                     ce_weight=losses.ce_weight, kl_weight=losses.kl_weight)
    return finish_objective(recalibrated, scores, losses, features)
