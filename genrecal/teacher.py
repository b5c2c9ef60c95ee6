"""The teacher's side of GenRecal, independent of transport.

For each sample the teacher (a frozen VLM) formats the conversation with its own processor and template and
runs its body once (``no_grad``). The student needs the answer features ``z_al`` (and the question features
``z_ql`` for the regularisation path); the teacher keeps, for scoring, its own states at its prediction
positions (they give ``P_l``) and its answer token ids (``gt_l``), and reports its own CE on its answers (the
reference curve of the paper's loss plots). :class:`InProcessTeacher` holds both sides in one process; the gRPC
service (``teacher_server``) splits them across the network with the same math.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from genrecal.families import EncodedBatch, LoadedVLM
from genrecal.head_scoring import HeadScore, score_with_head, token_ce_with_head
from genrecal.identity import checkpoint_fingerprint, teacher_identity, tokenizer_fingerprint
from genrecal.sample import Sample


@dataclass
class TeacherFeatures:
    """One sample as the teacher sees it. Widths are the teacher's hidden size ``D_l``."""

    sample_id: str
    answer_segments: list[Tensor]  # k-th: (La_k, D_l) z_al, body states at answer-token positions of answer k
    question_segments: list[Tensor]  # k-th: (Lq_k, D_l) z_ql, body states of the non-answer tokens before answer k
    answer_token_ids: Tensor  # (La,) gt_l, all answers concatenated
    # (La, D_l) body states at the prediction positions, for P_l. Only the teacher holds them: a remote teacher
    # keeps them server-side under `handle` and the student's copy has None here.
    prediction_states: Tensor | None = None
    handle: str | None = None
    # (La, V_l) fp32 log P_l, the teacher's own next-token distributions at its La prediction positions; only when
    # asked for (``encode(..., answer_log_probs=True)``): the logit-distillation baselines need them.
    answer_log_probs: Tensor | None = None
    # The teacher's own mean token CE on its answers, -mean log P_l(gt_l) over the La prediction positions (nats per
    # token; 0.0 without answer tokens). None from a teacher that does not report it (a server before this field).
    teacher_ce: float | None = None

    @property
    def num_answer_tokens(self) -> int:
        return int(self.answer_token_ids.shape[0])


@torch.no_grad()
def extract_teacher_features(vlm: LoadedVLM, batch: EncodedBatch) -> list[TeacherFeatures]:
    """Run the teacher body once over ``batch`` and slice out what GenRecal needs, per sample."""
    hidden = vlm.body_hidden_states(batch)  # (B, L_l, D_l)
    features = []
    for i, sample_id in enumerate(batch.sample_ids):
        states = hidden[i]  # (L_l, D_l)
        features.append(
            TeacherFeatures(
                sample_id=sample_id,
                answer_segments=[states[s:e] for s, e in batch.answer_spans[i]],
                question_segments=[states[s:e] for s, e in batch.question_segments(i)],
                answer_token_ids=batch.answer_token_ids(i),
                prediction_states=states[batch.prediction_positions(i)],
            )
        )
    return features


@torch.no_grad()
def own_answer_ce(head: nn.Linear, features: Sequence[TeacherFeatures], chunk_size: int = 512) -> list[float]:
    """Per sample, the teacher's own mean token CE on its answers (``TeacherFeatures.teacher_ce``), nats/token.

    One chunked head pass over all samples' prediction states ``(sum La, D_l)`` and one host sync; fp32 softmax
    (:func:`genrecal.head_scoring.token_ce_with_head`). A sample without answer tokens gets 0.0.
    """
    if not features:
        return []
    if any(f.prediction_states is None for f in features):
        raise ValueError("the teacher's own CE needs its prediction states (only the teacher holds them)")
    weight = head.weight  # (V_l, D_l)
    states = torch.cat([f.prediction_states for f in features]).to(weight.device, weight.dtype)  # (N, D_l)
    labels = torch.cat([f.answer_token_ids for f in features]).to(weight.device)  # (N,)
    token_ce = token_ce_with_head(weight, states, labels, head_bias=head.bias, chunk_size=chunk_size)  # (N,)
    counts = [f.num_answer_tokens for f in features]
    sums = torch.stack([piece.sum() for piece in split_rows(token_ce, counts)]).tolist()  # sync point
    return [total / count if count else 0.0 for total, count in zip(sums, counts, strict=True)]


def split_rows(tensor: Tensor, counts: Sequence[int]) -> list[Tensor]:
    """(sum(counts), ...) -> per-sample pieces."""
    return list(torch.split(tensor, list(counts), dim=0))


class Teacher(Protocol):
    """What the student side needs of a teacher. :class:`InProcessTeacher`, the gRPC client
    (:class:`genrecal.client.TeacherClient`) and the trainer's wrapper around either
    (:class:`genrecal.resilient_teacher.ResilientTeacher`) all satisfy it.

    ``encode`` returns one :class:`TeacherFeatures` per sample, in order, each with the teacher's own CE on its
    answers (``teacher_ce``); a remote teacher keeps the prediction states server-side under ``handle`` until
    ``release``. ``score`` takes per-sample answer outputs ``(La_i, D_l)`` and returns the micro-batch's
    :class:`~genrecal.head_scoring.HeadScore` and the per-sample gradients with respect to those outputs. ``score_paths`` scores several Recalibrator paths (L1 and L2) of the
    same samples at once — the same result as one ``score`` per path, in one round trip for a remote teacher.
    """

    @property
    def hidden_size(self) -> int: ...  # D_l

    @property
    def vocab_size(self) -> int: ...

    def identity(self) -> dict: ...  # JSON-able; see genrecal.identity.teacher_identity

    def encode(self, samples: Sequence[Sample], *, answer_log_probs: bool = False) -> list[TeacherFeatures]: ...

    def score(
        self,
        features: Sequence[TeacherFeatures],
        answer_outputs: Sequence[Tensor],
        *,
        normalizer: float | None = None,
        ce_weight: float = 1.0,
        kl_weight: float = 1.0,
    ) -> tuple[HeadScore, list[Tensor]]: ...

    def score_paths(
        self,
        features: Sequence[TeacherFeatures],
        outputs_by_path: Mapping[str, Sequence[Tensor]],
        *,
        normalizer: float | None = None,
        ce_weight: float = 1.0,
        kl_weight: float = 1.0,
    ) -> dict[str, tuple[HeadScore, list[Tensor]]]: ...

    def release(self, features: Sequence[TeacherFeatures]) -> object: ...

    def close(self) -> None: ...


ScoredPaths = dict[str, tuple[HeadScore, list[Tensor]]]  # path -> (score, per-sample gradients (La_i, D_l))


class InProcessTeacher:
    """A frozen teacher VLM in this process: encodes samples and scores answer outputs with its head."""

    def __init__(self, vlm: LoadedVLM, *, max_length: int | None = None, chunk_size: int = 512):
        self.vlm = vlm
        self.max_length = max_length
        self.chunk_size = chunk_size
        vlm.model.eval()
        vlm.model.requires_grad_(False)

    @property
    def hidden_size(self) -> int:
        return self.vlm.head.weight.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.vlm.head.weight.shape[0]

    def identity(self) -> dict:
        """What this teacher is, JSON-able, with the same keys and fingerprints the teacher service reports.

        A run records it and refuses to continue against another teacher, in-process or remote alike.
        """
        model = self.vlm.model
        config = model.config
        folder = Path(str(getattr(model, "name_or_path", "") or ""))
        from_folder = bool(str(folder)) and (folder / "config.json").is_file()
        tokenizer = self.vlm.processor.tokenizer
        return teacher_identity(
            model_name=folder.resolve().name if from_folder else type(model).__name__,
            revision=checkpoint_fingerprint(folder) if from_folder else None,
            architecture=(getattr(config, "architectures", None) or [type(model).__name__])[0],
            model_type=config.model_type,
            hidden_size=self.hidden_size,
            vocab_size=self.vocab_size,
            tokenizer_size=len(tokenizer),
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        )

    def release(self, features: Sequence[TeacherFeatures]) -> None:
        """Nothing to free in-process (a remote teacher drops the prediction states it keeps for ``features``)."""

    def close(self) -> None:
        """Nothing to close: the model's memory is freed when the last reference to this teacher goes."""

    def encode(self, samples: Sequence[Sample], *, answer_log_probs: bool = False) -> list[TeacherFeatures]:
        """The samples' features; with ``answer_log_probs`` also the teacher's distributions at its answer
        prediction positions (``TeacherFeatures.answer_log_probs``)."""
        model = self.vlm.model
        batch = self.vlm.encode(samples, max_length=self.max_length).to(model.device, model.dtype)
        features = extract_teacher_features(self.vlm, batch)
        for f, ce in zip(features, own_answer_ce(self.vlm.head, features, self.chunk_size), strict=True):
            f.teacher_ce = ce
        if answer_log_probs:
            from genrecal.baselines import teacher_answer_log_probs

            for f, log_probs in zip(features, teacher_answer_log_probs(self.vlm.head, features, self.chunk_size),
                                    strict=True):
                f.answer_log_probs = log_probs
        return features

    def score(
        self,
        features: Sequence[TeacherFeatures],
        answer_outputs: Sequence[Tensor],
        *,
        normalizer: float | None = None,
        ce_weight: float = 1.0,
        kl_weight: float = 1.0,
    ) -> tuple[HeadScore, list[Tensor]]:
        """Score per-sample answer outputs ``(La_i, D_l)``; return the batch score and per-sample gradients."""
        head = self.vlm.head
        for f, r in zip(features, answer_outputs, strict=True):
            if r.shape != (f.num_answer_tokens, self.hidden_size):
                raise ValueError(
                    f"sample {f.sample_id!r}: answer outputs must be ({f.num_answer_tokens}, {self.hidden_size}), "
                    f"got {tuple(r.shape)}"
                )
        inputs = torch.cat([r.detach() for r in answer_outputs]).to(head.weight.device, head.weight.dtype)
        score = score_with_head(
            head.weight,
            inputs,
            torch.cat([f.answer_token_ids for f in features]).to(head.weight.device),
            torch.cat([f.prediction_states for f in features]),
            head_bias=head.bias,
            ce_weight=ce_weight,
            kl_weight=kl_weight,
            normalizer=normalizer,
            chunk_size=self.chunk_size,
        )
        grads = split_rows(score.grad_inputs, [f.num_answer_tokens for f in features])
        return score, grads

    def score_paths(
        self,
        features: Sequence[TeacherFeatures],
        outputs_by_path: Mapping[str, Sequence[Tensor]],
        **kwargs,
    ) -> dict[str, tuple[HeadScore, list[Tensor]]]:
        """``{path: score(features, outputs, **kwargs)}``: each path scored on its own, as the service does."""
        return {path: self.score(features, outputs, **kwargs) for path, outputs in outputs_by_path.items()}
