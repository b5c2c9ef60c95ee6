"""The training losses L1, L2 (answer paths through the teacher's head) and L3 (student SFT).

- L1 (alignment, Alg. 1) and L2 (regularisation, Alg. 2) are the same function of different Recalibrator
  outputs: ``CE(head_l(r_al), gt_l) + KL(P_l || softmax(head_l(r_al)))``. They are scored by
  :func:`genrecal.head_scoring.score_with_head`, which never builds a graph through the teacher's head: it returns
  the loss values and ``dL/dr_al``. The student side turns that gradient into a *surrogate* loss,
  ``(r_al * grad.detach()).sum()``, whose gradient w.r.t. ``r_al`` is exactly the head's. This is the same
  mechanism whether the teacher runs in-process (:func:`answer_path_loss`) or behind the gRPC service (which
  returns the gradient; the trainer calls :func:`surrogate_loss`).
- L3 is the ordinary next-token SFT loss of the student on its own answer tokens (:func:`student_sft_loss`), its
  head run only at the answer prediction positions and in chunks, so no ``[tokens x vocab]`` tensor exists.

All softmaxes are fp32. Losses are sums over answer tokens divided by ``normalizer`` (default: this call's token
count), so the trainer can pass the answer-token count over gradient accumulation and ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from genrecal.head_scoring import IGNORE_INDEX, HeadScore, score_with_head

# Prediction positions of L3 per call of the student's head: each chunk's logits are (C, V_s), ~14 bytes x C x V_s
# at peak (bf16 head; 0.55 GB at C=256 with a 152k vocabulary, 0.18 GB with SmolVLM's 49k).
SFT_CHUNK_SIZE = 256


def surrogate_loss(outputs: Tensor, grad: Tensor, value: Tensor | float | None = None) -> Tensor:
    """A scalar whose gradient w.r.t. ``outputs`` is ``grad``.

    Args:
        outputs: (N, D) tensor in the autograd graph (the Recalibrator's answer outputs ``r_al``).
        grad: (N, D) ``dL/d outputs`` computed elsewhere (the teacher's head scoring); detached, and cast to
            ``outputs``' dtype and device.
        value: if given, the surrogate's forward value is shifted to equal it (the loss ``L`` the gradient belongs
            to), so logging ``surrogate.item()`` shows the real loss; the gradient is unchanged.

    Returns:
        Scalar; ``backward()`` on it accumulates exactly ``grad`` into ``outputs``.
    """
    if grad.shape != outputs.shape:
        raise ValueError(
            f"the gradient must have the shape of the outputs it belongs to: outputs {tuple(outputs.shape)}, "
            f"grad {tuple(grad.shape)}"
        )
    surrogate = (outputs * grad.detach().to(device=outputs.device, dtype=outputs.dtype)).sum()
    if value is None:
        return surrogate
    value = torch.as_tensor(value, dtype=surrogate.dtype, device=surrogate.device).detach()
    return surrogate - surrogate.detach() + value


def answer_path_loss(
    head_weight: Tensor,
    answer_outputs: Tensor,
    labels: Tensor,
    teacher_states: Tensor | None,
    *,
    head_bias: Tensor | None = None,
    ce_weight: float = 1.0,
    kl_weight: float = 1.0,
    normalizer: float | None = None,
    chunk_size: int = 512,
) -> tuple[Tensor, HeadScore]:
    """L1 or L2 for the Recalibrator's answer outputs, with the teacher head in this process.

    Args:
        head_weight: (V_l, D_l) the teacher's (frozen) LM-head weight; no gradient reaches it.
        answer_outputs: (N, D_l) Recalibrator answer outputs ``r_al`` (or ``r_al'``), in the autograd graph;
            moved to the head's device and dtype for scoring, the gradient comes back in their own.
        labels: (N,) teacher answer token ids ``gt_l``; ``-100`` rows are not scored.
        teacher_states: (N, D_l) the teacher's own hidden states at its prediction positions (they give
            ``P_l``), or None for CE only.
        head_bias: (V_l,) optional head bias.
        ce_weight, kl_weight: ``L = ce_weight * CE + kl_weight * KL`` (the L_ar / KL ablations set one to 0).
        normalizer: divide the summed losses by this (default: the number of scored tokens).
        chunk_size: tokens scored at once (memory: about 12 bytes x chunk_size x V_l).

    Returns:
        ``(surrogate, score)``: ``surrogate`` is a scalar whose value is ``L`` and whose gradient w.r.t.
        ``answer_outputs`` is ``dL/d answer_outputs``; ``score`` holds ``ce``, ``kl`` (fp32 scalars, already
        normalised), the gradient and the number of scored tokens.
    """
    scored = answer_outputs.detach().to(device=head_weight.device, dtype=head_weight.dtype)
    score = score_with_head(
        head_weight,
        scored,
        labels.to(head_weight.device),
        teacher_states,
        head_bias=head_bias,
        ce_weight=ce_weight,
        kl_weight=kl_weight,
        normalizer=normalizer,
        chunk_size=chunk_size,
        compute_grad=True,
    )
    value = ce_weight * score.ce + kl_weight * score.kl
    return surrogate_loss(answer_outputs, score.grad_inputs, value=value.to(answer_outputs.device)), score


def sft_head_calls(num_tokens: int, chunk_size: int = SFT_CHUNK_SIZE) -> int:
    """How many chunks :func:`student_sft_loss` scores ``num_tokens`` prediction positions in: at least one."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return max(1, -(-num_tokens // chunk_size))


def student_sft_loss(
    hidden_states: Tensor,
    head: nn.Module,
    labels: Tensor,
    normalizer: float | None = None,
    *,
    chunk_size: int = SFT_CHUNK_SIZE,
    head_calls: int | None = None,
) -> tuple[Tensor, int]:
    """L3: next-token CE of the student on its own answer tokens, the head run in chunks of prediction positions.

    Args:
        hidden_states: (B, L, D_s) the student body's output (after its final norm): the head's input.
        head: the student's LM head module, ``D_s -> V_s``; called as a module (``head(x)``), once per chunk, so
            DeepSpeed ZeRO-3 gathers its partitioned weight on each call as it does for any module.
        labels: (B, L) HF-convention *unshifted* labels: ``labels[:, t]`` is the token at position t, ``-100``
            where not scored (question, padding). The state at t predicts ``labels[:, t + 1]``.
        normalizer: divide the summed CE by this (default: the number of scored tokens).
        chunk_size: prediction positions per head call, C (default :data:`SFT_CHUNK_SIZE`).
        head_calls: call the head exactly this many times (the T scored positions split evenly, chunks may be
            empty). Under ZeRO-3 with several ranks every rank must call the head equally often (each call is a
            collective all-gather of its weight): pass the largest :func:`sft_head_calls` over the ranks. Default:
            ``sft_head_calls(T, chunk_size)``.

    Returns:
        ``(loss, num_tokens)``: scalar fp32 loss (0, still in the graph, when every label is masked) and the
        number of scored tokens T.

    Memory. Only the T scored prediction states are gathered, ``(T, D_s)``. Each chunk's head + fp32 CE runs under
    ``torch.utils.checkpoint`` (non-reentrant): the forward keeps no ``(C, V_s)`` tensor, the backward recomputes
    one chunk's logits at a time (one extra head GEMM per chunk), so the peak is about 14 bytes x C x V_s (the
    bf16 logits, their fp32 copy, the log-softmax and its gradient) whatever T is — never ``[T x V_s]``. The
    large tensors that remain are not L3's: the body's activations over all L positions (image tokens included)
    and, on the teacher side, its chunked scoring (``genrecal/head_scoring.py``); the logit-distillation
    baselines (``genrecal/baselines.py``, benchmarks only) still hold full ``(La, V)`` distributions.
    """
    if hidden_states.ndim != 3 or labels.shape != hidden_states.shape[:2]:
        raise ValueError(
            f"expected hidden_states (B, L, D) and labels (B, L); got {tuple(hidden_states.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if normalizer is not None and not 0 < normalizer < float("inf"):
        raise ValueError(f"normalizer must be a positive finite token count, got {normalizer}")
    targets = labels[:, 1:].to(hidden_states.device)  # (B, L-1)
    scored = targets != IGNORE_INDEX  # (B, L-1)
    predictions = hidden_states[:, :-1][scored]  # (T, D_s)
    target_ids = targets[scored].long()  # (T,)
    num_tokens = int(target_ids.numel())
    calls = sft_head_calls(num_tokens, chunk_size) if head_calls is None else head_calls
    if calls < 1:
        raise ValueError(f"head_calls must be >= 1, got {head_calls}")
    recompute = torch.is_grad_enabled()
    nll_sum = None
    for states, chunk_targets in zip(predictions.tensor_split(calls), target_ids.tensor_split(calls), strict=True):
        if recompute:
            piece = checkpoint(_head_nll_sum, head, states, chunk_targets, use_reentrant=False)
        else:
            piece = _head_nll_sum(head, states, chunk_targets)
        nll_sum = piece if nll_sum is None else nll_sum + piece
    denominator = float(normalizer) if normalizer is not None else float(max(num_tokens, 1))
    return nll_sum / denominator, num_tokens


def _head_nll_sum(head: nn.Module, states: Tensor, targets: Tensor) -> Tensor:
    """Summed CE of one chunk: ``states`` (C, D_s) through the head, fp32 log-softmax, ``targets`` (C,). 0 if C=0."""
    return F.cross_entropy(head(states).float(), targets, reduction="sum")


def kl_divergence(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """Per-row forward KL ``KL(P || Q) = sum_v p (log p - log q)`` of ``(..., V)`` logits, in fp32 -> ``(...)``."""
    log_p = F.log_softmax(p_logits.float(), dim=-1)
    log_q = F.log_softmax(q_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)
