"""Proto messages <-> domain objects for the teacher service; the server and the client both use these."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from genrecal.errors import SampleError
from genrecal.rpc import pb2
from genrecal.sample import Sample, Turn
from genrecal.teacher import TeacherFeatures
from genrecal.wire import decode_frames, encode_frames, float_dtype, proto_dtype

MAX_ID_BYTES = 256  # sample_id, handle and path: longer ones are refused (and clipped in messages and logs)
MIN_NORMALIZER = 1e-3  # an answer-token count; below it the loss overflows float32


def clip(value: str, limit: int = 64) -> str:
    """``value`` cut to ``limit`` characters for messages and logs (a client's 1 MB id stays out of them)."""
    return value if len(value) <= limit else f"{value[:limit]}...<{len(value)} characters>"


def _check_id(value: str, what: str) -> None:
    if len(value.encode()) > MAX_ID_BYTES:
        raise ValueError(f"{what} {clip(value)!r} is longer than {MAX_ID_BYTES} bytes")

# ---- samples ------------------------------------------------------------------------------------------------


def sample_to_proto(sample: Sample, image_bytes: Sequence[bytes]) -> pb2.Sample:
    return pb2.Sample(
        sample_id=sample.sample_id,
        turns=[pb2.Turn(role=t.role, text=t.text) for t in sample.turns],
        images=list(image_bytes),
    )


def sample_from_proto(message: pb2.Sample, index: int) -> Sample:
    """One request sample, images still encoded (the engine decodes them within its pixel limit)."""
    sample_id = message.sample_id or f"#{index}"
    if len(sample_id.encode()) > MAX_ID_BYTES:
        raise SampleError(clip(sample_id), f"sample_id is longer than {MAX_ID_BYTES} bytes")
    return Sample(sample_id=sample_id, turns=[Turn(t.role, t.text) for t in message.turns],
                  images=[bytes(data) for data in message.images])


def samples_from_request(request: pb2.EncodeRequest) -> list[Sample]:
    if not request.samples:
        raise SampleError("<request>", "EncodeRequest has no samples")
    samples = [sample_from_proto(message, i) for i, message in enumerate(request.samples)]
    counts = Counter(s.sample_id for s in samples)  # linear: list.count per id took minutes at 40k samples
    duplicates = sorted(i for i, n in counts.items() if n > 1)
    if duplicates:
        raise SampleError(duplicates[0], f"sample_id appears {counts[duplicates[0]]} times in one request")
    return samples


# ---- Encode response ------------------------------------------------------------------------------------------


def encode_response_frames(
    features: Sequence[TeacherFeatures], *, question_features: bool, dtype: torch.dtype | None, chunk_bytes: int
) -> Iterator[pb2.EncodeResponseFrame]:
    """One header listing every sample's tensors, then the payload (z_al and optionally z_ql per sample)."""
    header = pb2.EncodeResponse()
    tensors: list[torch.Tensor] = []
    for f in features:
        answer = torch.cat(f.answer_segments)  # (La, D_l)
        item = pb2.EncodedSample(
            sample_id=f.sample_id,
            handle=f.handle or "",
            answer_token_ids=f.answer_token_ids.tolist(),
            answer_lengths=[a.shape[0] for a in f.answer_segments],
            question_lengths=_question_lengths(f),
            answer_features=len(tensors),
            question_features=-1,
        )
        if f.teacher_ce is not None:
            item.teacher_ce = f.teacher_ce
        tensors.append(_wire(answer, dtype))
        if question_features:
            item.question_features = len(tensors)
            tensors.append(_wire(torch.cat(f.question_segments), dtype))  # (Lq, D_l)
        header.samples.append(item)
    return encode_frames(header, tensors, pb2.EncodeResponseFrame, chunk_bytes)


def _question_lengths(f: TeacherFeatures) -> list[int]:
    lengths = getattr(f, "question_lengths", None)  # the engine fills these even without question features
    return list(lengths) if lengths is not None else [q.shape[0] for q in f.question_segments]


def features_from_frames(
    frames: Iterable[pb2.EncodeResponseFrame], *, max_bytes: int | None = None
) -> list[TeacherFeatures]:
    """Client side: rebuild per-sample TeacherFeatures (handle set, prediction states stay on the server)."""
    header, tensors = decode_frames(frames, max_bytes=max_bytes)
    features = []
    for item in header.samples:
        answer = tensors[item.answer_features]
        question_lengths = list(item.question_lengths)
        if item.question_features >= 0:
            questions = list(torch.split(tensors[item.question_features], question_lengths))
        else:
            questions = []
        features.append(
            TeacherFeatures(
                sample_id=item.sample_id,
                answer_segments=list(torch.split(answer, list(item.answer_lengths))),
                question_segments=questions,
                answer_token_ids=torch.tensor(list(item.answer_token_ids), dtype=torch.long),
                prediction_states=None,
                handle=item.handle,
                teacher_ce=item.teacher_ce if item.HasField("teacher_ce") else None,
            )
        )
    return features


# ---- Score ------------------------------------------------------------------------------------------------


@dataclass
class ScoreCall:
    items: list[tuple[str, str, torch.Tensor]]  # (handle, path, outputs (La, D_l))
    ce_weight: float
    kl_weight: float
    normalizer: float | None
    grad_dtype: torch.dtype | None
    release: bool


def score_request_frames(call: ScoreCall, *, chunk_bytes: int) -> Iterator[pb2.ScoreRequestFrame]:
    header = pb2.ScoreRequest(
        items=[pb2.ScoreItem(handle=h, path=p, outputs=i) for i, (h, p, _) in enumerate(call.items)],
        ce_weight=call.ce_weight,
        kl_weight=call.kl_weight,
        normalizer=call.normalizer or 0.0,
        grad_dtype=proto_dtype(call.grad_dtype) if call.grad_dtype is not None else pb2.DTYPE_UNSPECIFIED,
        release=call.release,
    )
    return encode_frames(header, [t for _, _, t in call.items], pb2.ScoreRequestFrame, chunk_bytes)


def score_call_from_frames(
    frames: Iterable[pb2.ScoreRequestFrame], *, max_bytes: int, on_chunk: Callable[[int], None] | None = None
) -> ScoreCall:
    header, tensors = decode_frames(frames, max_bytes=max_bytes, on_chunk=on_chunk)
    if not header.items:
        raise ValueError("ScoreRequest has no items")
    items = []
    for n, item in enumerate(header.items):
        if not 0 <= item.outputs < len(tensors):
            raise ValueError(f"score item {n}: outputs index {item.outputs} is not one of the {len(tensors)} tensors sent")
        if not item.handle:
            raise ValueError(f"score item {n}: empty handle")
        _check_id(item.handle, f"score item {n}: handle")
        _check_id(item.path, f"score item {n}: path")
        items.append((item.handle, item.path or "L1", tensors[item.outputs]))
    ce, kl = float(header.ce_weight), float(header.kl_weight)
    if ce == 0 and kl == 0:
        ce, kl = 1.0, 1.0  # proto3 default: both unset
    if ce < 0 or kl < 0:
        raise ValueError(f"ce_weight and kl_weight must be >= 0, got {ce} and {kl}")
    if not (header.normalizer == 0 or MIN_NORMALIZER <= header.normalizer < float("inf")):
        raise ValueError(f"normalizer must be 0 (the path's own token count) or an answer-token count between "
                         f"{MIN_NORMALIZER} and a finite number, got {header.normalizer}")
    if not (math.isfinite(ce) and math.isfinite(kl)):
        raise ValueError(f"ce_weight and kl_weight must be finite, got {ce} and {kl}")
    grad_dtype = (float_dtype(header.grad_dtype, what="grad_dtype")
                  if header.grad_dtype != pb2.DTYPE_UNSPECIFIED else None)
    return ScoreCall(items, ce, kl, header.normalizer or None, grad_dtype, header.release)


def score_response_frames(
    path_scores: Sequence, grads: Sequence[torch.Tensor], *, dtype: torch.dtype | None, chunk_bytes: int
) -> Iterator[pb2.ScoreResponseFrame]:
    header = pb2.ScoreResponse(
        paths=[pb2.PathScore(path=s.path, ce=float(s.ce), kl=float(s.kl), num_tokens=int(s.num_tokens)) for s in path_scores],
        gradients=list(range(len(grads))),
    )
    return encode_frames(header, [_wire(g, dtype) for g in grads], pb2.ScoreResponseFrame, chunk_bytes)


def score_result_from_frames(
    frames: Iterable[pb2.ScoreResponseFrame], *, max_bytes: int | None = None
) -> tuple[list[pb2.PathScore], list[torch.Tensor]]:
    header, tensors = decode_frames(frames, max_bytes=max_bytes)
    return list(header.paths), [tensors[i] for i in header.gradients]


def _wire(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = tensor.detach()
    if dtype is not None and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    return tensor.cpu().contiguous()
