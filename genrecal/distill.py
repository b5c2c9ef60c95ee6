"""One GenRecal training step's objective: L1 + L2 through the Recalibrator and the teacher's head, plus L3.

The teacher is a :class:`genrecal.teacher.Teacher`: its ``score_paths(features, {path: answer_outputs}, *,
normalizer, ce_weight, kl_weight) -> {path: (HeadScore, per-sample gradients)}`` scores L1 and L2 together —
:class:`genrecal.teacher.InProcessTeacher` here, the gRPC client (one round trip) in the student trainer. The head gradient comes back as a tensor and enters autograd through a surrogate
``(r * g.detach()).sum()`` (:func:`genrecal.losses.surrogate_loss`), so the RPC boundary does not change the
mathematics.

**Two phases.** :func:`start_objective` runs everything up to the Recalibrator outputs (the student body, L3 and
the logit-distillation baselines, both Recalibrator paths) and *sends* the Score; the
:class:`PendingObjective` it returns holds that graph and the call in flight, and :meth:`PendingObjective.finish`
waits for the answer and builds the surrogate terms (:class:`StepObjective`). A teacher that scores
asynchronously (:class:`genrecal.teacher.AsyncScoring`: the trainer's wrapper around a remote teacher) is not
waited for in between, so the trainer can run the next micro-batch's forward while the Score travels
(:mod:`student_trainer.accumulate`); any other teacher scores inside :func:`start_objective`.
:func:`genrecal_objective` is the two back to back: the same tensors, the same additions in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from torch import Tensor

from genrecal.families import EncodedBatch, LoadedVLM
from genrecal.losses import student_sft_loss, surrogate_loss
from genrecal.recalibrator import Recalibrator, RecalibratorInput
from genrecal.stages import STAGES, Stage
from genrecal.teacher import AsyncScoring, PendingScore, TeacherFeatures

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


@dataclass
class StepObjective:
    loss: Tensor  # scalar to back-propagate; its gradient is exactly that of the stage's losses
    metrics: dict[str, float] = field(default_factory=dict)  # L1_ce, L1_kl, L2_ce, L2_kl, L3, token counts


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


@dataclass
class PendingObjective:
    """A micro-batch's objective with its Score in flight: the graph up to the Recalibrator outputs, the L3 part.

    Holding one keeps the micro-batch's autograd graph alive (activations included) until :meth:`finish` and the
    backward of its loss.
    """

    partial: Tensor | None  # L3 (+ a logit-distillation term) already weighted; None without L3
    metrics: dict[str, float]
    outputs_by_path: dict[str, list[Tensor]]  # path -> B x (La_l, D_l), in the graph; empty without the teacher
    score: PendingScore | None  # the Score call of both paths; None without the teacher
    losses: LossConfig
    teacher_tokens: float | None = None  # this micro-batch's teacher answer tokens (a metric)

    def graph_tensors(self) -> list[Tensor]:
        """Every tensor the loss's gradient flows through (DeepSpeed hooks the backward prologue on them)."""
        tensors = [] if self.partial is None else [self.partial]
        return tensors + [r for outputs in self.outputs_by_path.values() for r in outputs]

    def finish(self) -> StepObjective:
        """Wait for the Score (if any) and return the loss: ``partial + sum over paths of the surrogate``."""
        total, metrics = self.partial, dict(self.metrics)
        if self.score is not None:
            scores = self.score.result()  # sync point: the teacher's answer
            for name, outputs in self.outputs_by_path.items():
                score, grads = scores[name]
                value = self.losses.ce_weight * float(score.ce) + self.losses.kl_weight * float(score.kl)
                term = surrogate_loss(torch.cat(outputs), torch.cat(grads), value=value)
                total = term if total is None else total + term
                metrics.update({f"{name}_ce": float(score.ce), f"{name}_kl": float(score.kl)})
            metrics["teacher_tokens"] = self.teacher_tokens
        self.outputs_by_path, self.score = {}, None  # the loss holds the graph from here on
        return StepObjective(loss=total, metrics=metrics)


def genrecal_objective(stage: Stage, student: LoadedVLM, batch: EncodedBatch, **kwargs) -> StepObjective:
    """The stage's loss for one micro-batch: :func:`start_objective` (same arguments) then
    :meth:`PendingObjective.finish`.

    ``teacher_tokens`` / ``student_tokens`` normalise L1/L2 and L3: pass the answer-token counts of the whole
    optimizer step (all micro-batches, all ranks) so accumulated gradients equal one large batch's.
    """
    return start_objective(stage, student, batch, **kwargs).finish()


def start_objective(
    stage: Stage,
    student: LoadedVLM,
    batch: EncodedBatch,
    *,
    recalibrator: Recalibrator | None = None,
    teacher=None,
    features: Sequence[TeacherFeatures] | None = None,
    teacher_tokens: float | None = None,
    student_tokens: float | None = None,
    losses: LossConfig = LossConfig(),
    sft_head_calls: int | None = None,
) -> PendingObjective:
    """The first phase of :func:`genrecal_objective`: the forward up to the Recalibrator outputs, L3, and the
    Score of both paths sent (one call: one round trip to a remote teacher). ``teacher_tokens`` /
    ``student_tokens``: the normalisers (see :func:`genrecal_objective`). ``sft_head_calls``: how many chunks L3
    calls the student's head in (:func:`genrecal.losses.student_sft_loss`; the same on every rank under ZeRO-3)."""
    spec = STAGES[Stage(stage)]
    metrics: dict[str, float] = {}
    partial = None
    train_student = "body" in spec.trainable
    with torch.set_grad_enabled(train_student):  # stage 1: the student is frozen, z_qs is a constant
        hidden = student.body_hidden_states(batch)  # (B, L_s, D_s)

    if "L3" in spec.losses:
        l3, n = student_sft_loss(hidden, student.head, batch.labels(), normalizer=student_tokens,
                                 head_calls=sft_head_calls)
        partial = losses.sft_weight * l3
        metrics.update(L3=float(l3.detach()), student_tokens=float(n))
        if losses.logit_distillation is not None:
            from genrecal.baselines import logit_distillation_loss

            if features is None:
                raise ValueError(f"--logit-distillation {losses.logit_distillation} needs the teacher's features")
            term = logit_distillation_loss(losses.logit_distillation, hidden, student.head, batch, features,
                                           normalizer=student_tokens)
            partial = partial + losses.logit_distillation_weight * term
            metrics[losses.logit_distillation.upper()] = float(term.detach())

    if not spec.needs_teacher:
        return PendingObjective(partial, metrics, {}, None, losses)
    if recalibrator is None or teacher is None or features is None:
        raise ValueError(f"stage {int(stage)} needs the Recalibrator, a teacher and the teacher's features")
    paths = [("L1", student_path_inputs(hidden, batch, features), False)]
    if losses.regularisation:
        paths.append(("L2", regularisation_path_inputs(features), True))
    outputs_by_path = {  # path -> B x (La_l, D_l)
        name: recalibrator(inputs, question_from_teacher=question_from_teacher)
        for name, inputs, question_from_teacher in paths
    }
    score = send_score(
        teacher, features, {name: [r.detach() for r in outputs] for name, outputs in outputs_by_path.items()},
        normalizer=teacher_tokens, ce_weight=losses.ce_weight, kl_weight=losses.kl_weight,
    )
    return PendingObjective(partial, metrics, outputs_by_path, score, losses,
                            teacher_tokens=float(sum(f.num_answer_tokens for f in features)))


def send_score(teacher, features: Sequence[TeacherFeatures], outputs_by_path: dict[str, list[Tensor]],
               **kwargs) -> PendingScore:
    """The Score of ``outputs_by_path``: sent without waiting to an :class:`~genrecal.teacher.AsyncScoring`
    teacher; any other teacher answers now (an already completed future)."""
    if isinstance(teacher, AsyncScoring):
        return teacher.score_paths_async(features, outputs_by_path, **kwargs)
    done: Future = Future()
    done.set_result(teacher.score_paths(features, outputs_by_path, **kwargs))
    return done
