"""Score requests: the items checked in the caller's thread, then scored with the teacher's head on the device
thread (``genrecal.head_scoring``), a block of rows at a time so that a caller that is gone is dropped within a
block, and the gradients checked finite in the dtype they go on the wire in.

Refusals (all InvalidRequest -> INVALID_ARGUMENT unless said): a malformed item, a handle twice on one path,
outputs of the wrong shape or with NaN/Inf, weights or a normalizer out of range; a loss or gradient that is not
finite in the teacher's dtype; a gradient that overflows its wire dtype (float16: use bfloat16/float32 or smaller
weights). Limits on items and paths per request: ``teacher_server.request_limits``. Handles of another client:
NOT_FOUND (``teacher_server.handles``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from genrecal.head_scoring import IGNORE_INDEX, HeadScore, score_with_head
from genrecal.rpc.convert import MIN_NORMALIZER, clip
from genrecal.teacher import split_rows
from teacher_server.errors import Cancelled, InvalidRequest
from teacher_server.handles import KeptSample

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PathScore:
    """Loss values of one Recalibrator path (e.g. "L1", "L2") over the items of one score request."""

    path: str
    ce: float  # summed token CE / normalizer
    kl: float  # summed token KL(P_l || Q) / normalizer
    num_tokens: int


def check_score_arguments(ce_weight: float, kl_weight: float, normalizer: float | None) -> None:
    for name, value in (("ce_weight", ce_weight), ("kl_weight", kl_weight)):
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise InvalidRequest(f"{name} must be a finite number >= 0, got {value!r}")
    if normalizer is not None and (
        not isinstance(normalizer, int | float) or not math.isfinite(normalizer) or normalizer < MIN_NORMALIZER
    ):
        raise InvalidRequest(
            f"normalizer must be a positive finite number (an answer-token count, >= {MIN_NORMALIZER}) or None, "
            f"got {normalizer!r}"
        )


def checked_items(items: Sequence, *, kept_for: Callable[[str, int], KeptSample], hidden_size: int,
                  ) -> tuple[list[Tensor], list[KeptSample], list[str]]:
    """(outputs, kept states, paths) of ``(handle, path, outputs (La, D_l))`` items; ``kept_for(handle, i)`` looks a
    handle up (NOT_FOUND if the caller does not own it). Linear in the number of items."""
    outputs, kept, paths, seen = [], [], [], set()
    for i, item in enumerate(items):
        handle, path, tensor = _checked_item(i, item)
        if (handle, path) in seen:
            raise InvalidRequest(f"score item {i}: handle {clip(handle)!r} appears twice on path {path!r}")
        seen.add((handle, path))
        kept.append(kept_for(handle, i))
        expected = (kept[-1].num_answer_tokens, hidden_size)
        if tuple(tensor.shape) != expected:
            raise InvalidRequest(
                f"score item {i} (handle {clip(handle)!r}, path {path!r}): outputs must have shape (La, D_l) = "
                f"{expected} (La = that sample's teacher answer tokens, D_l = the teacher's hidden size), "
                f"got {tuple(tensor.shape)}"
            )
        finite = torch.isfinite(tensor).all(dim=1)
        if not bool(finite.all()):
            rows = (~finite).nonzero().squeeze(1)[:10].tolist()
            raise InvalidRequest(
                f"score item {i} (handle {clip(handle)!r}, path {path!r}): outputs contain NaN or Inf at rows {rows}"
            )
        outputs.append(tensor)
        paths.append(path)
    return outputs, kept, paths


def _checked_item(i: int, item) -> tuple[str, str, Tensor]:
    try:
        handle, path, tensor = item
    except (TypeError, ValueError):
        raise InvalidRequest(f"score item {i} must be a (handle, path, outputs) tuple") from None
    if not isinstance(handle, str) or not handle:
        raise InvalidRequest(f"score item {i}: handle must be a non-empty string, got {clip(handle)!r}")
    if not isinstance(path, str) or not path:
        raise InvalidRequest(f"score item {i} (handle {clip(handle)!r}): path must be a non-empty string like 'L1'")
    if not isinstance(tensor, Tensor):
        raise InvalidRequest(f"score item {i} (handle {clip(handle)!r}): outputs must be a tensor, got {type(tensor)}")
    if not tensor.is_floating_point():
        raise InvalidRequest(
            f"score item {i} (handle {clip(handle)!r}, path {path!r}): outputs must be floating point "
            f"(bfloat16, float16 or float32), got {tensor.dtype}"
        )
    return handle, path, tensor


def score_on_device(
    head: nn.Linear, outputs: list[Tensor], kept: list[KeptSample], paths: list[str], *,
    ce_weight: float, kl_weight: float, normalizer: float | None, grad_dtype: torch.dtype | None,
    chunk_size: int, stopped: Callable[[], bool] = lambda: False,
) -> Generator[None, None, tuple[list[PathScore], list[Tensor]]]:
    """Per path (first-seen order) the path's CE and KL over its items together, and per item ``dL/d outputs``
    on CPU in ``grad_dtype`` (None: the outputs' dtype). Runs on the device thread, as a generator of slices
    (one block of ``chunk_size`` rows each) whose return value is the result: between slices the device thread
    runs other clients' waiting jobs (``teacher_server.batcher``), so a Score of many rows delays them by one
    block, not by its whole duration."""
    weight = head.weight  # (V, D_l)
    by_path: dict[str, list[int]] = {}
    for i, path in enumerate(paths):
        by_path.setdefault(path, []).append(i)
    scores, grads = [], [None] * len(paths)
    for path, items in by_path.items():
        inputs = torch.cat([outputs[i].detach().to(weight.device, weight.dtype) for i in items])  # (N, D_l)
        labels = torch.cat([kept[i].answer_token_ids for i in items])  # (N,)
        states = torch.cat([kept[i].prediction_states for i in items]).to(weight.dtype)  # (N, D_l)
        score = yield from score_in_blocks(
            weight, inputs, labels, states,
            head_bias=head.bias,
            ce_weight=ce_weight,
            kl_weight=kl_weight,
            normalizer=normalizer,
            chunk_size=chunk_size,
            stopped=stopped,
        )
        del inputs, states
        if not (math.isfinite(float(score.ce)) and math.isfinite(float(score.kl))
                and bool(torch.isfinite(score.grad_inputs).all())):
            raise InvalidRequest(
                f"path {path!r}: the loss or its gradient is not finite (CE={float(score.ce)}, "
                f"KL={float(score.kl)}) in the teacher's {weight.dtype}: the outputs are too large for its head; "
                "check the Recalibrator's outputs (their scale) before scoring them"
            )
        scores.append(PathScore(path, float(score.ce), float(score.kl), score.num_tokens))
        counts = [kept[i].num_answer_tokens for i in items]
        for i, grad in zip(items, split_rows(score.grad_inputs, counts), strict=True):
            grads[i] = grad.to("cpu", grad_dtype or outputs[i].dtype, copy=True)  # (La_i, D_l), the wire dtype
        check_wire_gradients(path, [grads[i] for i in items], score.grad_inputs)
    logger.debug("device thread: scored %d items on %d path(s)", len(paths), len(scores))
    return scores, grads


def score_in_blocks(weight: Tensor, inputs: Tensor, labels: Tensor, states: Tensor, *, head_bias: Tensor | None,
                    ce_weight: float, kl_weight: float, normalizer: float | None, chunk_size: int,
                    stopped: Callable[[], bool]) -> Generator[None, None, HeadScore]:
    """``score_with_head`` over ``chunk_size`` rows at a time, yielding after and checking ``stopped()`` before
    each block (a generator whose return value is the path's score).

    A Score of many rows can hold the device thread for seconds; a caller that is gone (``stopped``) is dropped
    within one block's time (Cancelled). Exact: every token's loss and gradient depend on its own row and the
    normalizer only, so the blocks use the whole path's normalizer (its token count unless given) and their
    sums are the path's loss."""
    rows = inputs.shape[0]  # inputs (N, D_l), labels (N,), states (N, D_l)
    if rows <= chunk_size:  # one block: exactly score_with_head
        if stopped():
            raise Cancelled("the caller is gone; its Score was stopped")
        score = score_with_head(weight, inputs, labels, states, head_bias=head_bias, ce_weight=ce_weight,
                                kl_weight=kl_weight, normalizer=normalizer, chunk_size=chunk_size)
        yield
        return score
    if normalizer is None:
        normalizer = float(max(int((labels != IGNORE_INDEX).sum()), 1))  # an all-ignored path stays 0
    ce = kl = 0.0
    grads, num_tokens = [], 0
    for start in range(0, rows, chunk_size):
        if stopped():
            raise Cancelled("the caller is gone; its Score was stopped")
        end = start + chunk_size
        part = score_with_head(weight, inputs[start:end], labels[start:end], states[start:end], head_bias=head_bias,
                               ce_weight=ce_weight, kl_weight=kl_weight, normalizer=normalizer,
                               chunk_size=chunk_size)
        ce, kl = ce + part.ce, kl + part.kl
        grads.append(part.grad_inputs)  # (rows of the block, D_l)
        num_tokens += part.num_tokens
        yield
    return HeadScore(ce=torch.as_tensor(ce), kl=torch.as_tensor(kl), grad_inputs=torch.cat(grads),
                     num_tokens=num_tokens)


def check_wire_gradients(path: str, grads: list[Tensor], computed: Tensor) -> None:
    """InvalidRequest unless every gradient is finite in the dtype it goes on the wire in.

    The head computes in the teacher's dtype; a gradient that is finite there can overflow when cast to the
    wire dtype the client asked for (float16 tops out at 65504), and Inf would reach the client's weights."""
    for grad in grads:
        if not bool(torch.isfinite(grad).all()):
            raise InvalidRequest(
                f"path {path!r}: the gradient is out of range of its wire dtype "
                f"{str(grad.dtype).removeprefix('torch.')} (largest magnitude {float(computed.abs().max()):.3g} in "
                f"the teacher's {str(computed.dtype).removeprefix('torch.')}): ask for "
                "bfloat16 or float32 gradients (the client's wire_dtype / grad_dtype), or use smaller loss weights "
                "(ce_weight, kl_weight) or a larger normalizer"
            )
