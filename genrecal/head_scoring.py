"""Teacher-head scoring: CE + KL of Recalibrator outputs under the teacher's frozen LM head, with the gradient.

The teacher service runs this for L1 and L2 (see docs/method.md, "Losses"): the student sends the Recalibrator's
answer outputs ``r_al`` (N, D); the teacher scores them with its head ``W`` (V, D) against the ground-truth
answer ids and against its own next-token distribution ``P = softmax(head(teacher_states))`` and returns the
loss values and ``dL/dr_al``. With V ~ 152k, the full ``[N x V]`` fp32 logits (and autograd's copies of them)
are the whole memory bill, so ``score_with_head`` walks the tokens in chunks and writes the gradient
analytically, holding at most three ``[chunk_size x V]`` fp32 buffers at a time (about 12 bytes x chunk_size x V
at peak, eager) instead of the full logits.

Plain tensors in and out (no ``nn.Module``), so the gRPC engine and the tests call the same function.
``reference_head_loss`` is the unchunked autograd version: ground truth for tests, baseline for the benchmark.

**bf16 / fp16 heads on a CPU.** Each chunk needs three products with the head ``W`` (V, D): the logits of the
inputs and of the teacher states (``rows @ W.T``) and the gradient ``dlogits @ W``. On a GPU, and on a CPU where
oneDNN runs bf16 GEMMs (AVX-512: ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``), they run in the head's own
dtype, as autograd would (bf16 there is as fast as fp32 or faster: ``benchmarks/head_scoring.py``). Elsewhere — a
CPU without AVX-512 (e.g. AVX2-only EPYC / Xeon VMs), fp16 on most CPUs, or oneDNN switched off — PyTorch falls
back to a reference kernel for reduced-precision GEMMs: ``dlogits @ W`` took 69 s for 16 rows at V=151,936,
D=1,536 where fp32 took 0.32 s, and even the dot-product layout (``F.linear``) is 4-8x slower than fp32 at 512
rows. There every product runs in fp32 instead, on the head upcast one block of rows at a time
(:data:`UPCAST_BLOCK_BYTES`, 16 MiB of fp32: 2,730 rows at D=1,536), so bf16 costs about what fp32 costs and
no copy of the head is kept: a cached fp32 head would cost 4 x V x D bytes (0.93 GB at V=151,936, D=1,536; 5 GB
for a 72B model's head) beside the bf16 one, and a cached transposed bf16 head (2 x V x D bytes) helps only the
gradient and only at a few rows. Products there are exact fp32 sums of the bf16 values (the logits and
``dlogits`` are not rounded to bf16 first), so CPU results differ from a GPU's by bf16 rounding, no more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# fp32 bytes of the head block upcast at a time where reduced-precision GEMMs are slow (see the module docstring).
UPCAST_BLOCK_BYTES = 16 * 2**20


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
        native = native_head_gemm(head_weight)

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
                native,
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
    native: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Summed (not normalised) CE and KL of one chunk, and the chunk's normalised gradient (C, D).

    Buffers are reused in place and dropped early: the peak is three fp32 (C, V) tensors (log q, the teacher's
    fp32 logits and log p; later log q, log p and p), i.e. about 12 bytes x C x V. ``native``: the head's products
    run in its own dtype (else in fp32 on upcast blocks of it: :func:`native_head_gemm`).
    """
    # Both fp32 logits first (one pass over the head), then each log_softmax frees its logits: still three
    # (C, V) buffers at most. Upcasting before log_softmax (not via `dtype=`) frees the bf16 logits early.
    rows = (inputs,) if teacher_states is None else (inputs, teacher_states)
    logits = head_logits(head_weight, head_bias, *rows, native=native)  # each (C, V) fp32
    log_q = F.log_softmax(logits.pop(0), dim=-1)  # (C, V)
    ce_sum = -log_q.gather(1, labels[:, None]).sum()
    if teacher_states is None:
        kl_sum = log_q.new_zeros(())
        p = None
    else:
        log_p = F.log_softmax(logits.pop(0), dim=-1)  # (C, V)
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
    grad_inputs = grad_through_head(dlogits, head_weight, native=native)  # (C, D)
    return ce_sum, kl_sum, grad_inputs


def native_head_gemm(head_weight: torch.Tensor) -> bool:
    """Whether products with ``head_weight`` run fast in its own dtype on its device, in every layout scoring uses.

    True for fp32 / fp64 (MKL, cuBLAS), for any non-CPU device, and for a bf16 (fp16) head on a CPU where oneDNN
    runs bf16 (fp16) GEMMs. False where PyTorch would use its reference kernel for a reduced-precision GEMM (no
    AVX-512, fp16 without AVX512-FP16 / AMX, or ``torch.backends.mkldnn`` disabled): scoring then computes in fp32
    on upcast blocks of the head (see the module docstring).
    """
    dtype = head_weight.dtype
    if head_weight.device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return True
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # a build without these private ops: the fp32 route is always right
        return False


def head_logits(
    head_weight: torch.Tensor, head_bias: torch.Tensor | None, *row_sets: torch.Tensor, native: bool
) -> list[torch.Tensor]:
    """``rows @ W.T + b`` as fp32 (fp64 for fp64) ``(C, V)`` for each ``rows`` (C, D) in the head's dtype.

    ``native``: one GEMM in the head's dtype per row set, then upcast (autograd's numerics). Otherwise fp32
    products of the same bf16 values (not rounded to bf16 in between), the head upcast
    :data:`UPCAST_BLOCK_BYTES` at a time and each block used for every row set before the next is made.
    """
    if native:
        return [_upcast(F.linear(rows, head_weight, head_bias)) for rows in row_sets]
    vocab = head_weight.shape[0]
    rows32 = [rows.float() for rows in row_sets]  # each (C, D)
    logits = [rows.new_empty((rows.shape[0], vocab)) for rows in rows32]  # each (C, V)
    for start, block in _upcast_blocks(head_weight):  # block: (Vb, D) fp32
        for rows, out in zip(rows32, logits, strict=True):
            torch.mm(rows, block.T, out=out[:, start : start + block.shape[0]])
    if head_bias is not None:
        bias32 = head_bias.float()
        for out in logits:
            out.add_(bias32)
    return logits


def grad_through_head(dlogits: torch.Tensor, head_weight: torch.Tensor, *, native: bool) -> torch.Tensor:
    """``dlogits @ W`` -> ``(C, D)`` in the head's dtype, for ``dlogits`` (C, V) fp32 (fp64 for an fp64 head).

    ``native``: ``dlogits`` is cast to the head's dtype first, as autograd does under bf16. Otherwise fp32
    products of the fp32 ``dlogits`` with upcast blocks of the head, summed in fp32 and rounded once.
    """
    if native:
        return dlogits.to(head_weight.dtype) @ head_weight
    grad = dlogits.new_zeros((dlogits.shape[0], head_weight.shape[1]))  # (C, D) fp32
    for start, block in _upcast_blocks(head_weight):  # block: (Vb, D) fp32
        grad.addmm_(dlogits[:, start : start + block.shape[0]], block)
    return grad.to(head_weight.dtype)


def _upcast_blocks(head_weight: torch.Tensor):
    """Yield ``(first row, fp32 copy of the next block of rows)`` of ``head_weight``, one reused buffer."""
    vocab, hidden = head_weight.shape
    rows = max(1, min(vocab, UPCAST_BLOCK_BYTES // (4 * hidden)))
    buffer = torch.empty((rows, hidden), dtype=torch.float32, device=head_weight.device)  # reused: no page faults
    for start in range(0, vocab, rows):
        block = head_weight[start : start + rows]
        yield start, buffer[: block.shape[0]].copy_(block)


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
    states this is the teacher's CE on its own answers (the paper's reference curve, docs/method.md, "Diagnostics").
    """
    if states.dim() != 2 or labels.shape != states.shape[:1]:
        raise ValueError(f"states must be (N, D) and labels (N,), got {tuple(states.shape)} and {tuple(labels.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    pieces = []
    native = native_head_gemm(head_weight)
    for chunk, chunk_labels in zip(states.split(chunk_size), labels.split(chunk_size), strict=True):
        log_p = F.log_softmax(head_logits(head_weight, head_bias, chunk, native=native).pop(), dim=-1)  # (C, V)
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
