"""Teacher-head scoring: CE + KL of Recalibrator outputs under the teacher's frozen LM head, with the gradient.

The teacher service runs this for L1 and L2 (see GENRECAL.md, "Losses"): the student sends the Recalibrator's
answer outputs ``r_al`` (N, D); the teacher scores them with its head ``W`` (V, D) against the ground-truth
answer ids and against its own next-token distribution ``P = softmax(head(teacher_states))`` and returns the
loss values and ``dL/dr_al``. With V ~ 152k, the full ``[N x V]`` fp32 logits (and autograd's copies of them)
are the whole memory bill, so ``score_with_head`` walks the tokens in chunks and writes the gradient
analytically, holding at most three ``[chunk_size x V]`` fp32 buffers at a time (about 12 bytes x chunk_size x V
at peak, eager) instead of the full logits.

Plain tensors in and out (no ``nn.Module``), so the gRPC engine and the tests call the same function.
``reference_head_loss`` is the unchunked autograd version: ground truth for tests, baseline for the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class HeadScore:
    """Loss values and gradient of ``ce_weight * ce + kl_weight * kl`` w.r.t. the scored inputs."""

    ce: torch.Tensor  # scalar fp32 (fp64 for fp64 inputs): sum of per-token CE / normalizer
    kl: torch.Tensor  # scalar fp32: sum of per-token KL(P_teacher || Q) / normalizer
    grad_inputs: torch.Tensor | None  # (N, D), dtype/device of inputs; None if compute_grad=False
    num_tokens: int  # tokens with label != ignore_index


def score_with_head(
    head_weight: torch.Tensor,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    teacher_states: torch.Tensor | None,
    *,
    head_bias: torch.Tensor | None = None,
    ce_weight: float = 1.0,
    kl_weight: float = 1.0,
    normalizer: float | None = None,
    chunk_size: int = 512,
    compute_grad: bool = True,
    ignore_index: int = IGNORE_INDEX,
    compile: bool = False,
) -> HeadScore:
    """Chunked CE + KL of ``head(inputs)`` and its analytic gradient w.r.t. ``inputs``.

    Args:
        head_weight: (V, D) the teacher's LM-head weight.
        inputs: (N, D) Recalibrator answer outputs ``r_al``; same dtype as ``head_weight``.
        labels: (N,) integer ground-truth teacher answer ids; ``ignore_index`` rows are skipped (zero gradient).
        teacher_states: (N, D) the teacher's own hidden states at its prediction positions, or None (no KL).
        head_bias: (V,) optional head bias.
        ce_weight, kl_weight: weights of the two terms in the loss whose gradient is returned.
        normalizer: divide the summed losses by this (default: the number of non-ignored tokens), e.g. the
            global answer-token count across gradient accumulation and ranks.
        chunk_size: tokens scored at once; peak extra memory is about 12 bytes x chunk_size x V
            (V=152064: ~1.7 GiB at 1024, ~0.9 GiB at 512).
        compute_grad: if False, ``grad_inputs`` is None and the third matmul is skipped.
        compile: ``torch.compile`` the per-chunk kernel (fuses the elementwise passes; useful on GPU only).

    Softmaxes are in fp32 (fp64 if the inputs are fp64); KL is forward KL ``sum p (log p - log q)`` at
    temperature 1, on the same rows as CE.
    """
    _validate(head_weight, inputs, labels, teacher_states, head_bias, ignore_index)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    with torch.no_grad():
        rows = (labels != ignore_index).nonzero().squeeze(1)  # (M,) rows that are scored
        num_tokens = rows.numel()
        norm = _resolve_normalizer(normalizer, num_tokens)
        kernel = _compiled_score_chunk() if compile else _score_chunk

        ce_sum = torch.zeros((), dtype=_upcast(inputs).dtype, device=inputs.device)
        kl_sum = torch.zeros_like(ce_sum)
        inv_norm = torch.full_like(ce_sum, 1.0 / norm)  # a tensor, so a compiled kernel is not re-specialised
        grad_inputs = torch.zeros_like(inputs) if compute_grad else None  # (N, D)
        for start in range(0, num_tokens, chunk_size):
            chunk_rows = rows[start : start + chunk_size]  # (C,)
            teacher_chunk = None if teacher_states is None else teacher_states[chunk_rows]  # (C, D)
            ce_chunk, kl_chunk, grad_chunk = kernel(
                head_weight,
                head_bias,
                inputs[chunk_rows],
                labels[chunk_rows].long(),
                teacher_chunk,
                ce_weight,
                kl_weight,
                inv_norm,
                compute_grad,
            )
            ce_sum += ce_chunk
            kl_sum += kl_chunk
            if grad_inputs is not None:
                grad_inputs.index_copy_(0, chunk_rows, grad_chunk)
    return HeadScore(ce=ce_sum / norm, kl=kl_sum / norm, grad_inputs=grad_inputs, num_tokens=num_tokens)


def _score_chunk(
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    teacher_states: torch.Tensor | None,
    ce_weight: float,
    kl_weight: float,
    inv_norm: torch.Tensor,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Summed (not normalised) CE and KL of one chunk, and the chunk's normalised gradient (C, D).

    Buffers are reused in place and dropped early: the peak is three fp32 (C, V) tensors (log q, the teacher's
    fp32 logits and log p; later log q, log p and p), i.e. about 12 bytes x C x V.
    """
    # Upcasting before the call (not via `dtype=`) frees the bf16 logits before log_softmax allocates its output.
    log_q = F.log_softmax(_upcast(F.linear(inputs, head_weight, head_bias)), dim=-1)  # (C, V)
    ce_sum = -log_q.gather(1, labels[:, None]).sum()
    if teacher_states is None:
        kl_sum = log_q.new_zeros(())
        p = None
    else:
        log_p = F.log_softmax(_upcast(F.linear(teacher_states, head_weight, head_bias)), dim=-1)  # (C, V)
        p = log_p.exp()  # (C, V)
        kl_sum = torch.dot(p.flatten(), log_p.sub_(log_q).flatten())  # sum p (log p - log q); no (C, V) temp
        del log_p
    if not compute_grad:
        return ce_sum, kl_sum, None

    # dL/dlogits = ce_w (q - onehot) + kl_w (q - p), all / norm; built in the log_q buffer.
    dlogits = log_q.exp_()  # (C, V) q
    if p is None:
        dlogits.mul_(ce_weight)
    else:
        dlogits.mul_(ce_weight + kl_weight).sub_(p, alpha=kl_weight)
        del p
    dlogits.scatter_add_(1, labels[:, None], dlogits.new_full((labels.numel(), 1), -ce_weight))
    dlogits.mul_(inv_norm)
    # Cast to the head's dtype for the matmul, as autograd does under bf16.
    grad_inputs = dlogits.to(head_weight.dtype) @ head_weight  # (C, D)
    return ce_sum, kl_sum, grad_inputs


@torch.no_grad()
def token_ce_with_head(
    head_weight: torch.Tensor,
    states: torch.Tensor,
    labels: torch.Tensor,
    *,
    head_bias: torch.Tensor | None = None,
    chunk_size: int = 512,
) -> torch.Tensor:
    """Per-token CE ``-log softmax(head(states))[labels]`` -> ``(N,)`` fp32 (fp64 for fp64 states), no gradient.

    ``states`` (N, D) in the head's dtype, ``labels`` (N,) integer ids. Scored in chunks of ``chunk_size`` rows,
    so at most two fp32 ``[chunk_size x V]`` buffers exist at a time. With the teacher's own prediction-position
    states this is the teacher's CE on its own answers (the paper's reference curve, GENRECAL.md "Diagnostics").
    """
    if states.dim() != 2 or labels.shape != states.shape[:1]:
        raise ValueError(f"states must be (N, D) and labels (N,), got {tuple(states.shape)} and {tuple(labels.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    pieces = []
    for chunk, chunk_labels in zip(states.split(chunk_size), labels.split(chunk_size), strict=True):
        log_p = F.log_softmax(_upcast(F.linear(chunk, head_weight, head_bias)), dim=-1)  # (C, V)
        pieces.append(-log_p.gather(1, chunk_labels.long()[:, None]).squeeze(1))  # (C,)
        del log_p
    if not pieces:
        return states.new_zeros((0,), dtype=_upcast(states).dtype)
    return torch.cat(pieces)


_COMPILED_SCORE_CHUNK = None


def _compiled_score_chunk():
    global _COMPILED_SCORE_CHUNK
    if _COMPILED_SCORE_CHUNK is None:
        _COMPILED_SCORE_CHUNK = torch.compile(_score_chunk)  # the tail chunk's size triggers dynamic shapes
    return _COMPILED_SCORE_CHUNK


def reference_head_loss(
    head_weight: torch.Tensor,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    teacher_states: torch.Tensor | None,
    *,
    head_bias: torch.Tensor | None = None,
    ce_weight: float = 1.0,
    kl_weight: float = 1.0,
    normalizer: float | None = None,
    compute_grad: bool = True,
    ignore_index: int = IGNORE_INDEX,
) -> HeadScore:
    """Same result as ``score_with_head``, computed the plain way: full (N, V) logits and autograd."""
    _validate(head_weight, inputs, labels, teacher_states, head_bias, ignore_index)
    mask = labels != ignore_index  # (N,)
    num_tokens = int(mask.sum())
    norm = _resolve_normalizer(normalizer, num_tokens)
    with torch.enable_grad():
        x = inputs.detach().requires_grad_(compute_grad)
        log_q = F.log_softmax(_upcast(F.linear(x, head_weight, head_bias)), dim=-1)  # (N, V)
        ce = F.nll_loss(log_q, labels.long(), ignore_index=ignore_index, reduction="sum") / norm
        if teacher_states is None:
            kl = log_q.new_zeros(())
        else:
            with torch.no_grad():
                teacher_logits = _upcast(F.linear(teacher_states, head_weight, head_bias))  # (N, V)
                log_p = F.log_softmax(teacher_logits, dim=-1)  # (N, V)
            kl_rows = (log_p.exp() * (log_p - log_q)).sum(-1)  # (N,)
            kl = kl_rows[mask].sum() / norm
        grad_inputs = None
        if compute_grad:
            (grad_inputs,) = torch.autograd.grad(ce_weight * ce + kl_weight * kl, x)
    return HeadScore(ce=ce.detach(), kl=kl.detach(), grad_inputs=grad_inputs, num_tokens=num_tokens)


def _upcast(tensor: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32 for softmax; fp32 and fp64 are kept."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _resolve_normalizer(normalizer: float | None, num_tokens: int) -> float:
    if normalizer is None:
        return float(max(num_tokens, 1))  # all-masked batch: sums are 0, so 0 / 1 = 0 rather than NaN
    if not normalizer > 0 or normalizer == float("inf"):
        raise ValueError(
            f"normalizer must be a positive finite number (an answer-token count), got {normalizer}"
        )
    return float(normalizer)


def _validate(
    head_weight: torch.Tensor,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    teacher_states: torch.Tensor | None,
    head_bias: torch.Tensor | None,
    ignore_index: int,
) -> None:
    """Raise ValueError naming the bad argument; the gRPC engine maps these to INVALID_ARGUMENT."""
    if head_weight.dim() != 2 or not head_weight.is_floating_point():
        raise ValueError(
            f"head_weight must be a floating-point (V, D) matrix, got shape {tuple(head_weight.shape)} "
            f"dtype {head_weight.dtype}"
        )
    vocab, hidden = head_weight.shape
    if inputs.dim() != 2 or inputs.shape[1] != hidden:
        raise ValueError(
            f"inputs must have shape (N, D) with D = head_weight.shape[1] = {hidden}, "
            f"got {tuple(inputs.shape)}; inputs are the Recalibrator's D_l-wide answer outputs"
        )
    n = inputs.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape (N,) = ({n},) to match inputs, got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer (long) tensor of token ids, got dtype {labels.dtype}")
    named = {"inputs": inputs, "labels": labels, "teacher_states": teacher_states, "head_bias": head_bias}
    for name, tensor in named.items():
        if tensor is not None and tensor.device != head_weight.device:
            raise ValueError(
                f"{name} is on {tensor.device} but head_weight is on {head_weight.device}; move it there first"
            )
    if teacher_states is not None and teacher_states.shape != inputs.shape:
        raise ValueError(
            f"teacher_states must have the same shape as inputs, expected {tuple(inputs.shape)}, "
            f"got {tuple(teacher_states.shape)}"
        )
    if head_bias is not None and head_bias.shape != (vocab,):
        raise ValueError(f"head_bias must have shape (V,) = ({vocab},), got {tuple(head_bias.shape)}")
    for name in ("inputs", "teacher_states", "head_bias"):
        tensor = named[name]
        if tensor is not None and tensor.dtype != head_weight.dtype:
            raise ValueError(
                f"{name} dtype {tensor.dtype} does not match head_weight dtype {head_weight.dtype}; "
                f"cast it with .to({head_weight.dtype})"
            )
    valid = labels != ignore_index
    out_of_range = valid & ((labels < 0) | (labels >= vocab))
    if out_of_range.any():
        bad_rows = _first_rows(out_of_range)
        raise ValueError(
            f"labels out of range [0, {vocab}) at rows {bad_rows} (values {labels[bad_rows].tolist()}); "
            f"use ignore_index={ignore_index} for rows that must not be scored"
        )
    for name in ("inputs", "teacher_states"):
        tensor = named[name]
        if tensor is not None:
            non_finite = ~torch.isfinite(tensor).all(dim=1)  # (N,)
            if non_finite.any():
                raise ValueError(f"{name} contain NaN or Inf at rows {_first_rows(non_finite)}")


def _first_rows(row_mask: torch.Tensor, limit: int = 10) -> list[int]:
    return row_mask.nonzero().squeeze(1)[:limit].tolist()
