"""Logit-distillation baselines GenRecal is compared against (benchmarks only; in-process teacher).

- **ULD** (Universal Logit Distillation, Boizard et al. 2024): works across tokenizers by comparing *sorted*
  probability vectors, so no vocabulary mapping is needed. Answers are aligned by position: the k-th answer token
  of the student against the k-th of the teacher, for ``k < min(La_s, La_l)``; the shorter vocabulary is padded
  with zeros. Loss = student CE + ``weight`` × mean_k ``sum_v |sort(p_s)_v - sort(p_l)_v|``.
- **Token-level KD** (classic, same tokenizer only): ``KL(P_l || P_s)`` at the shared answer prediction positions,
  plus student CE. Refuses tokenizers that differ.

Both take the teacher's full next-token distributions at its answer prediction positions, computed here from the
teacher's kept prediction states through its head (in chunks of tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genrecal.families import EncodedBatch
from genrecal.teacher import TeacherFeatures


def student_answer_log_probs(hidden: Tensor, head: nn.Linear, batch: EncodedBatch) -> list[Tensor]:
    """Per sample ``(La_s, V_s)`` fp32 log-probabilities of the student at its answer prediction positions."""
    out = []
    for i in range(hidden.shape[0]):
        states = hidden[i, batch.prediction_positions(i)]  # (La_s, D_s)
        out.append(F.log_softmax(head(states).float(), dim=-1))
    return out


@torch.no_grad()
def teacher_answer_log_probs(head: nn.Linear, features: Sequence[TeacherFeatures], chunk: int = 512) -> list[Tensor]:
    """Per sample ``(La_l, V_l)`` fp32 log-probabilities of the teacher at its own answer prediction positions."""
    out = []
    for f in features:
        if f.prediction_states is None:
            raise ValueError(f"sample {f.sample_id!r}: the teacher's prediction states are needed (in-process teacher)")
        states = f.prediction_states.to(head.weight.device, head.weight.dtype)
        out.append(torch.cat([F.log_softmax(head(s).float(), dim=-1) for s in states.split(chunk)]))
    return out


def uld_distance(student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
    """Per-position ULD distance ``sum_v |sort(p_s)_v - sort(p_l)_v|`` for position-aligned rows -> ``(K,)``.

    ``student_log_probs`` (K, V_s) and ``teacher_log_probs`` (K, V_l); the smaller vocabulary is zero-padded.
    """
    p_s = student_log_probs.exp().sort(dim=-1, descending=True).values
    p_l = teacher_log_probs.exp().sort(dim=-1, descending=True).values
    width = max(p_s.shape[-1], p_l.shape[-1])
    p_s = F.pad(p_s, (0, width - p_s.shape[-1]))
    p_l = F.pad(p_l, (0, width - p_l.shape[-1]))
    return (p_s - p_l).abs().sum(dim=-1)


def uld_loss(student_lp: Sequence[Tensor], teacher_lp: Sequence[Tensor], normalizer: float | None = None) -> tuple[Tensor, int]:
    """Sum over samples of position-aligned ULD distances (``min(La_s, La_l)`` positions each) / ``normalizer``."""
    total, count = None, 0
    for s, t in zip(student_lp, teacher_lp, strict=True):
        k = min(s.shape[0], t.shape[0])
        if k == 0:
            continue
        d = uld_distance(s[:k], t[:k].to(s.device)).sum()
        total = d if total is None else total + d
        count += k
    if total is None:
        return torch.zeros((), requires_grad=True), 0
    return total / float(normalizer if normalizer else count), count


def token_kd_loss(student_lp: Sequence[Tensor], teacher_lp: Sequence[Tensor], normalizer: float | None = None) -> tuple[Tensor, int]:
    """Classic KD, ``KL(P_l || P_s)`` per answer position, for a teacher and student that share one tokenizer.

    Rows must align one to one (same tokenizer, same answer tokens); the common vocabulary prefix is compared
    (checkpoints of one tokenizer may pad their embedding matrices to different sizes).
    """
    total, count = None, 0
    for s, t in zip(student_lp, teacher_lp, strict=True):
        if s.shape[0] != t.shape[0]:
            raise ValueError(
                f"token-level KD needs one tokenizer: the student has {s.shape[0]} answer tokens, the teacher "
                f"{t.shape[0]}; use ULD or GenRecal across tokenizers"
            )
        vocab = min(s.shape[-1], t.shape[-1])
        t = t[:, :vocab].to(s.device)
        t = t - torch.logsumexp(t, dim=-1, keepdim=True)  # renormalise over the shared vocabulary
        s_ = s[:, :vocab] - torch.logsumexp(s[:, :vocab], dim=-1, keepdim=True)
        kl = (t.exp() * (t - s_)).sum()
        total = kl if total is None else total + kl
        count += s.shape[0]
    if total is None:
        return torch.zeros((), requires_grad=True), 0
    return total / float(normalizer if normalizer else count), count


def logit_distillation_loss(kind: str, hidden: Tensor, head: nn.Linear, batch: EncodedBatch,
                            features: Sequence[TeacherFeatures], normalizer: float | None = None) -> Tensor:
    """The ``kind`` ("kd" or "uld") term of one micro-batch: summed over its answer positions / ``normalizer``.

    ``hidden`` (B, L, D_s) is the student body's output; the teacher's distributions come with ``features``
    (``TeacherFeatures.answer_log_probs``, asked for at encode time).
    """
    missing = [f.sample_id for f in features if f.answer_log_probs is None]
    if missing:
        raise ValueError(f"samples {missing[:3]}: the teacher's answer distributions are missing; encode with "
                         "answer_log_probs=True")
    student_lp = student_answer_log_probs(hidden, head, batch)
    teacher_lp = [f.answer_log_probs for f in features]
    if kind == "uld":
        return uld_loss(student_lp, teacher_lp, normalizer=normalizer)[0]
    if kind == "kd":
        return token_kd_loss(student_lp, teacher_lp, normalizer=normalizer)[0]
    raise ValueError(f"unknown logit distillation {kind!r}; choose kd or uld")
