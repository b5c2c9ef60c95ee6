"""The Recalibrator: the trained bridge from the student's features to the teacher's LM head.

``R([x_q; x_a]) = Proj-post(Norm(RecBody([x_q; Proj-pre(x_a)])))`` (docs/method.md, "The Recalibrator").

- ``proj_pre``: ``Linear(D_l -> D_s)``; applied to every teacher feature (the answer features ``z_al`` always,
  the question features too on the regularisation path).
- ``rec_body``: ``num_blocks`` (default 2) decoder layers of the *student's own* class and config, freshly
  initialised.
- ``rotary_emb``: NPE, the Recalibrator's own rotary embedding; position ids are re-assigned ``0..N-1`` over the
  concatenated sequence it receives (the models' own position schemes do not carry over).
- ``norm``: the student's norm class on Rec-body's output, then ``proj_post``: ``Linear(D_s -> D_l)``.

The outputs that matter are the *answer outputs* ``r_al``: one ``D_l``-wide row per teacher answer token, taken
at that token's prediction position (the position just before it), i.e. the exact inputs the teacher's head
scores against ``labels = teacher answer token ids``. The first answer token is predicted from the last question
position, which is how the student's question features ``z_qs`` receive their gradient.

The Recalibrator is used only during training and is removed afterwards; it is a plain ``nn.Module`` whose
``state_dict`` holds ``proj_pre``, ``rec_body``, ``norm`` and ``proj_post`` (rotary buffers are not persistent).
:func:`save_recalibrator` writes it as one safetensors file whose metadata holds the construction arguments
(``num_blocks``, both hidden sizes, a format version); :func:`load_recalibrator` rebuilds it from them and refuses
a file that does not fit the student and teacher at hand.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PretrainedConfig
from transformers.masking_utils import create_causal_mask

logger = logging.getLogger(__name__)

SUPPORTED_ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


def identity_position_ids(position_ids: Tensor) -> Tensor:
    """Rotary position ids as they are: ``(B, N) -> (B, N)`` (Qwen2, Llama, ...)."""
    return position_ids


def mrope_position_ids(position_ids: Tensor) -> Tensor:
    """Text-only M-RoPE ids: ``(B, N) -> (3, B, N)``, the same position on the temporal, height and width axes.

    For Qwen2-VL-style rotary embeddings; the Recalibrator's sequence has no image grid of its own (NPE).
    """
    return position_ids.unsqueeze(0).expand(3, -1, -1)


@dataclass(frozen=True)
class RecalibratorSpec:
    """What a family adapter hands over so the Recalibrator is built from the student's own decoder layers.

    Attributes:
        decoder_layer_cls: the student's decoder-layer class, constructed as ``cls(config, layer_idx=i)``, e.g.
            ``Qwen2DecoderLayer``, ``LlamaDecoderLayer``, ``Qwen2VLDecoderLayer``. Its forward must accept
            ``(hidden_states, attention_mask=..., position_embeddings=(cos, sin), position_ids=..., use_cache=...)``.
        text_config: the student's text config (hidden size, heads, FFN, norm eps, rope parameters).
        rotary_embedding_cls: constructed as ``cls(config=text_config)``; called as ``rotary(x, position_ids)``.
        norm_cls: constructed as ``cls(hidden_size, eps=...)`` with the config's ``rms_norm_eps`` (or
            ``layer_norm_eps``).
        rotary_position_ids: maps ``(B, N)`` ids ``0..N-1`` to what the rotary embedding takes, e.g.
            :func:`mrope_position_ids` for Qwen2-VL's M-RoPE.
    """

    decoder_layer_cls: type[nn.Module]
    text_config: PretrainedConfig
    rotary_embedding_cls: type[nn.Module]
    norm_cls: type[nn.Module]
    rotary_position_ids: Callable[[Tensor], Tensor] = identity_position_ids

    def __post_init__(self) -> None:
        for name in ("decoder_layer_cls", "rotary_embedding_cls", "norm_cls"):
            value = getattr(self, name)
            if not (isinstance(value, type) and issubclass(value, nn.Module)):
                raise ValueError(f"RecalibratorSpec.{name} must be an nn.Module subclass, got {value!r}")
        if not isinstance(self.text_config, PretrainedConfig):
            raise ValueError(
                "RecalibratorSpec.text_config must be the student's text PretrainedConfig (for a VLM, its "
                f"text_config), got {type(self.text_config).__name__}"
            )
        if not callable(self.rotary_position_ids):
            raise ValueError(
                "RecalibratorSpec.rotary_position_ids must be callable: (B, N) ids -> rotary ids"
            )


@dataclass
class RecalibratorInput:
    """One sample. The concatenated sequence is ``q_0, a_0, q_1, a_1, ...``; every assistant turn is an answer span.

    Attributes:
        question_segments: k-th is ``(Lq_k, D_q)``, the features of the non-answer tokens before answer k;
            ``D_q = D_s`` on the student path (``z_qs``), ``D_q = D_l`` on the regularisation path (``z_ql``).
        answer_segments: k-th is ``(La_k, D_l)``, the teacher's answer features ``z_al`` of answer k.
    """

    question_segments: list[Tensor]
    answer_segments: list[Tensor]

    @property
    def num_answer_tokens(self) -> int:
        """``sum_k La_k``: the number of rows of this sample's answer outputs."""
        return sum(int(a.shape[0]) for a in self.answer_segments)


def _recalibrator_config(
    text_config: PretrainedConfig, num_blocks: int, attn_implementation: str
) -> PretrainedConfig:
    """A copy of the student's text config for ``num_blocks`` full-causal blocks with a fixed attention backend.

    The Recalibrator does not inherit the student's attention backend (flash attention would need packed
    inputs) nor its sliding windows (docs/method.md, "The Recalibrator": a plain causal mask); no KV cache is used.
    """
    config = copy.deepcopy(text_config)
    config._attn_implementation = attn_implementation
    config.num_hidden_layers = num_blocks
    config.use_cache = False
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = ["full_attention"] * num_blocks
    if getattr(config, "use_sliding_window", None):
        config.use_sliding_window = False
    if getattr(config, "sliding_window", None) is not None:
        config.sliding_window = None
    return config


def _norm_eps(config: PretrainedConfig) -> float:
    for name in ("rms_norm_eps", "layer_norm_eps"):
        eps = getattr(config, name, None)
        if eps is not None:
            return float(eps)
    raise ValueError(
        f"{type(config).__name__} has neither rms_norm_eps nor layer_norm_eps; the Recalibrator's norm needs one"
    )


class Recalibrator(nn.Module):
    """Proj-pre -> Rec-body (student decoder layers, NPE) -> Norm -> Proj-post; see the module docstring."""

    def __init__(
        self,
        spec: RecalibratorSpec,
        teacher_hidden_size: int,
        num_blocks: int = 2,
        attn_implementation: str = "sdpa",
    ) -> None:
        super().__init__()
        if teacher_hidden_size <= 0:
            raise ValueError(
                f"teacher_hidden_size must be positive (the teacher's D_l), got {teacher_hidden_size}"
            )
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1 (the paper uses 2), got {num_blocks}")
        if attn_implementation not in SUPPORTED_ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation must be one of {SUPPORTED_ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}"
            )
        self.config = _recalibrator_config(spec.text_config, num_blocks, attn_implementation)
        self.student_hidden_size = int(self.config.hidden_size)  # D_s
        self.teacher_hidden_size = int(teacher_hidden_size)  # D_l
        self._rotary_position_ids = spec.rotary_position_ids

        self.proj_pre = nn.Linear(self.teacher_hidden_size, self.student_hidden_size)
        self.rec_body = nn.ModuleList(
            spec.decoder_layer_cls(self.config, layer_idx=i) for i in range(num_blocks)
        )
        self.rotary_emb = spec.rotary_embedding_cls(config=self.config)
        self.norm = spec.norm_cls(self.student_hidden_size, eps=_norm_eps(self.config))
        self.proj_post = nn.Linear(self.student_hidden_size, self.teacher_hidden_size)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Fresh initialisation as transformers initialises a new model of the student's family.

        Every linear layer (projectors and the blocks' attention/MLP) gets ``N(0, initializer_range)`` weights
        and zero biases; norm weights keep their construction-time ones.
        """
        std = float(getattr(self.config, "initializer_range", 0.02))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(mean=0.0, std=std)
                if module.bias is not None:
                    module.bias.zero_()

    def forward(self, batch: Sequence[RecalibratorInput], question_from_teacher: bool) -> list[Tensor]:
        """Answer outputs ``r_al`` for each sample of the batch.

        Args:
            batch: B samples (ragged lengths, any number of answer spans each).
            question_from_teacher: False on the student path (Alg. 1: question features are ``z_qs``, width
                ``D_s``, used as they are); True on the regularisation path (Alg. 2: question features are
                ``z_ql``, width ``D_l``, and go through ``proj_pre`` like the answers).

        Returns:
            Per sample, ``(sum_k La_k, D_l)``: for answer k starting at concatenated position ``c_k``, the outputs
            at positions ``c_k - 1 .. c_k + La_k - 2`` (one row per teacher answer token, in order), in the
            Recalibrator's parameter dtype.
        """
        if not isinstance(question_from_teacher, bool):
            raise ValueError(f"question_from_teacher must be a bool, got {question_from_teacher!r}")
        if len(batch) == 0:
            raise ValueError("the Recalibrator got an empty batch; pass at least one RecalibratorInput")
        question_width = self.teacher_hidden_size if question_from_teacher else self.student_hidden_size
        for index, sample in enumerate(batch):
            self._validate_sample(index, sample, question_width, question_from_teacher)

        weight = self.proj_pre.weight
        device, dtype = weight.device, weight.dtype

        # Teacher features of the whole batch through Proj-pre in one matmul each, then split back.
        answer_lengths = [int(a.shape[0]) for s in batch for a in s.answer_segments]
        answers = self.proj_pre(torch.cat([a for s in batch for a in s.answer_segments]).to(device, dtype))
        answer_parts = iter(answers.split(answer_lengths))  # each (La_k, D_s)
        if question_from_teacher:
            question_lengths = [int(q.shape[0]) for s in batch for q in s.question_segments]
            questions = self.proj_pre(
                torch.cat([q for s in batch for q in s.question_segments]).to(device, dtype)
            )
            question_parts = iter(questions.split(question_lengths))
        else:
            question_parts = iter(q.to(device, dtype) for s in batch for q in s.question_segments)

        sequences: list[Tensor] = []
        batch_index: list[int] = []
        prediction_positions: list[int] = []
        for index, sample in enumerate(batch):
            parts: list[Tensor] = []
            offset = 0
            for _ in range(len(sample.answer_segments)):
                question, answer = next(question_parts), next(answer_parts)
                parts += [question, answer]
                offset += question.shape[0]  # c_k: where answer k starts
                prediction_positions += range(offset - 1, offset + answer.shape[0] - 1)
                batch_index += [index] * answer.shape[0]
                offset += answer.shape[0]
            sequences.append(torch.cat(parts))  # (N_i, D_s)

        lengths = torch.tensor([s.shape[0] for s in sequences], device=device)
        hidden = nn.utils.rnn.pad_sequence(sequences, batch_first=True)  # (B, N, D_s), right-padded
        num_samples, max_length = hidden.shape[:2]
        positions = torch.arange(max_length, device=device)
        padding_mask = positions.unsqueeze(0) < lengths.unsqueeze(1)  # (B, N), True = real token
        # NPE: 0..N_i-1 per sample; padding continues counting and is never attended by a real token.
        position_ids = positions.unsqueeze(0).expand(num_samples, -1)  # (B, N)
        position_embeddings = self.rotary_emb(hidden, self._rotary_position_ids(position_ids))
        attention_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=padding_mask,
            past_key_values=None,
        )
        for layer in self.rec_body:
            hidden = layer(
                hidden,
                attention_mask=attention_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                use_cache=False,
            )
            if isinstance(hidden, tuple):  # layer classes that still return (hidden_states, ...)
                hidden = hidden[0]

        # Norm and Proj-post act per token: apply them to the prediction positions only.
        selected = hidden[
            torch.tensor(batch_index, device=device), torch.tensor(prediction_positions, device=device)
        ]  # (sum_i sum_k La_k, D_s)
        outputs = self.proj_post(self.norm(selected))  # (sum_i sum_k La_k, D_l)
        return list(outputs.split([s.num_answer_tokens for s in batch]))

    def mean_pooled_outputs(self, batch: Sequence[RecalibratorInput], question_from_teacher: bool) -> Tensor:
        """Answer outputs mean-pooled per sample: ``(B, D_l)`` (paper Fig. 7; see :func:`alignment_similarity`)."""
        return mean_pool(self(batch, question_from_teacher))

    def _validate_sample(
        self, index: int, sample: RecalibratorInput, question_width: int, question_from_teacher: bool
    ) -> None:
        questions, answers = sample.question_segments, sample.answer_segments
        if len(answers) == 0:
            raise ValueError(
                f"sample {index} has no answer segments; every sample needs at least one answer span"
            )
        if len(questions) != len(answers):
            raise ValueError(
                f"sample {index} has {len(questions)} question segments but {len(answers)} answer segments; the "
                "sequence is q_0, a_0, q_1, a_1, ... so they must pair up (tokens after the last answer cannot "
                "change any answer output: drop them)"
            )
        path = "regularisation path (z_ql, D_l)" if question_from_teacher else "student path (z_qs, D_s)"
        for k, (question, answer) in enumerate(zip(questions, answers, strict=True)):
            if question.ndim != 2 or question.shape[1] != question_width:
                raise ValueError(
                    f"sample {index}, question segment {k}: expected shape (Lq, {question_width}) on the {path}, "
                    f"got {tuple(question.shape)}; check question_from_teacher"
                )
            if answer.ndim != 2 or answer.shape[1] != self.teacher_hidden_size:
                raise ValueError(
                    f"sample {index}, answer segment {k}: expected teacher answer features of shape "
                    f"(La, {self.teacher_hidden_size}), got {tuple(answer.shape)}"
                )
            if answer.shape[0] == 0:
                raise ValueError(
                    f"sample {index}, answer segment {k} is empty; an answer has at least its end-of-turn token "
                    "(drop samples whose answer was truncated away)"
                )
        if questions[0].shape[0] == 0:
            raise ValueError(
                f"sample {index}: the question segment before the first answer is empty, so the first answer "
                "token would have no prediction position; the question part includes at least the assistant header"
            )


def mean_pool(outputs: Sequence[Tensor]) -> Tensor:
    """Mean over each sample's answer outputs: B tensors ``(La_i, D)`` -> ``(B, D)``."""
    if len(outputs) == 0:
        raise ValueError("mean_pool got no samples")
    return torch.stack([sample_outputs.mean(dim=0) for sample_outputs in outputs])


def alignment_similarity(
    student_path_outputs: Tensor | Sequence[Tensor], regularisation_path_outputs: Tensor | Sequence[Tensor]
) -> Tensor:
    """The paper's Fig. 7 alignment check: ``(N, N)`` cosine similarities, in fp32.

    Entry ``[i, j]`` compares the student-path output of pair i with the regularisation-path output of pair j.
    Each argument is either already pooled, ``(N, D_l)`` (e.g. :meth:`Recalibrator.mean_pooled_outputs`), or the
    N per-sample answer outputs ``(La_i, D_l)``, which are mean-pooled here. Once aligned the diagonal is clearly
    higher than the off-diagonal entries.
    """
    student = (
        student_path_outputs if isinstance(student_path_outputs, Tensor) else mean_pool(student_path_outputs)
    )
    regularisation = (
        regularisation_path_outputs
        if isinstance(regularisation_path_outputs, Tensor)
        else mean_pool(regularisation_path_outputs)
    )
    if student.ndim != 2 or student.shape != regularisation.shape:
        raise ValueError(
            "alignment_similarity needs the same N pairs on both paths, pooled to (N, D_l); got "
            f"{tuple(student.shape)} and {tuple(regularisation.shape)}"
        )
    student = F.normalize(student.float(), dim=-1)
    regularisation = F.normalize(regularisation.float(), dim=-1)
    return student @ regularisation.T
