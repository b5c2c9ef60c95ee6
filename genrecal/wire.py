"""Tensors on the wire: raw little-endian bytes described by ``TensorSpec`` (dtype, shape), sent as frames.

A tensor-carrying stream of the teacher service (``protos/genrecal/teacher/v1/teacher.proto``) is one header frame
followed by payload frames. The header message (``EncodeResponse``, ``ScoreRequest``, ``ScoreResponse``) lists
every tensor in its ``tensors`` field; the payload frames' bytes, concatenated, are those tensors' bytes back to
back, in that order (row-major, little-endian, ``prod(shape) * itemsize`` bytes each). Nothing is pickled.

Copies, per direction:
    send     ``tensor_to_bytes`` views a contiguous CPU tensor's memory (no copy); each payload frame copies at
             most ``chunk_bytes`` of it into the ``bytes`` protobuf needs (protobuf rejects memoryviews).
             Non-contiguous or GPU tensors are first copied to a contiguous CPU tensor.
    receive  ``decode_frames`` appends each chunk to ONE bytearray that grows as data arrives (never sized from
             the header: a header announcing 256 MiB costs nothing until the bytes come, so a stalled stream
             holds only what it sent); growing reallocates now and then, so the peak while receiving can reach
             twice the payload for an instant. The returned tensors are ``torch.frombuffer`` views into it (no
             further copy). A tensor whose byte offset is not a multiple of its itemsize (only after odd-sized
             tensors of a narrower dtype) is cloned so that no kernel ever sees a misaligned pointer.

gRPC's default 4 MiB message limit is smaller than one default payload frame (4 MiB of data plus ~6 bytes of
framing): servers and channels must be built with ``channel_options``.
"""

from __future__ import annotations

import math
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from genrecal.rpc import pb2

DEFAULT_CHUNK_BYTES = 4 << 20  # payload bytes per frame
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20  # gRPC send/receive limit per message (one frame, or one unary message)
MAX_DIM = 1 << 40  # largest dimension a TensorSpec may announce
MAX_TENSOR_BYTES = 1 << 62  # largest tensor a TensorSpec may announce (prod(shape) * itemsize)
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what features, outputs and gradients travel in

_TORCH_TO_PROTO: dict[torch.dtype, int] = {
    torch.bfloat16: pb2.DTYPE_BFLOAT16,
    torch.float32: pb2.DTYPE_FLOAT32,
    torch.float16: pb2.DTYPE_FLOAT16,
    torch.int64: pb2.DTYPE_INT64,
}
_PROTO_TO_TORCH: dict[int, torch.dtype] = {v: k for k, v in _TORCH_TO_PROTO.items()}
_READONLY_WARNING = "The given buffer is not writable"


class PayloadTooLarge(ValueError):
    """A header announces more payload bytes than the receiver accepts (the server answers RESOURCE_EXHAUSTED)."""


class WireTraffic:
    """Bytes a client sent and received, per teacher method: ``{"Encode": (sent, received), "Score": ...}``.

    Counted as serialized protobuf frames (headers, tensor payload, images), i.e. what gRPC carries before its own
    framing (9 bytes per HTTP/2 frame, a few per message). Thread-safe: the trainer encodes in its prefetch thread
    while Score calls run in another. Several clients may share one counter (teacher replicas).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._bytes: dict[tuple[str, str], int] = {}

    def add(self, method: str, direction: str, nbytes: int) -> None:
        with self._lock:
            key = (method, direction)
            self._bytes[key] = self._bytes.get(key, 0) + nbytes

    def counted(self, frames: Iterable[Any], method: str, direction: str) -> Iterator[Any]:
        """Yield ``frames`` unchanged, counting each one's serialized size."""
        for frame in frames:
            self.add(method, direction, frame.ByteSize())
            yield frame

    def snapshot(self) -> dict[str, int]:
        """``{"Encode_sent": bytes, "Encode_received": ..., "Score_sent": ..., "Score_received": ...}`` so far."""
        with self._lock:
            return {f"{method}_{direction}": n for (method, direction), n in sorted(self._bytes.items())}


def _require_little_endian() -> None:
    if sys.byteorder != "little":
        raise NotImplementedError(
            "genrecal.wire supports little-endian hosts only (the wire format is little-endian)"
        )


def _where(index: int | None) -> str:
    return "" if index is None else f"tensor {index}: "


def proto_dtype(dtype: torch.dtype) -> int:
    """``torch.dtype`` -> ``pb2.DType`` value; ValueError for dtypes the wire does not carry."""
    try:
        return _TORCH_TO_PROTO[dtype]
    except KeyError:
        supported = ", ".join(str(d) for d in _TORCH_TO_PROTO)
        raise ValueError(f"dtype {dtype} cannot be sent; convert the tensor to one of: {supported}") from None


def torch_dtype(value: int, *, index: int | None = None) -> torch.dtype:
    """``pb2.DType`` value -> ``torch.dtype``; ValueError for DTYPE_UNSPECIFIED and unknown values."""
    try:
        return _PROTO_TO_TORCH[value]
    except KeyError:
        name = pb2.DType.Name(value) if value in pb2.DType.values() else "not a DType"
        known = ", ".join(pb2.DType.Name(v) for v in _PROTO_TO_TORCH)
        raise ValueError(f"{_where(index)}unknown dtype {value} ({name}); expected one of {known}") from None


def tensor_spec(t: torch.Tensor) -> pb2.TensorSpec:
    """The ``TensorSpec`` (dtype, shape) describing ``t`` on the wire."""
    return pb2.TensorSpec(dtype=proto_dtype(t.dtype), shape=list(t.shape))


def float_dtype(value: int, *, what: str) -> torch.dtype:
    """``pb2.DType`` value -> a floating-point ``torch.dtype``; ValueError naming ``what`` otherwise."""
    dtype = torch_dtype(value)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{what} must be a floating-point dtype (BFLOAT16, FLOAT16 or FLOAT32), got "
                         f"{pb2.DType.Name(value)}")
    return dtype


def spec_nbytes(spec: pb2.TensorSpec, *, index: int | None = None) -> int:
    """Payload bytes of one spec, ``prod(shape) * itemsize``; ValueError for an unknown dtype, a negative
    dimension, one above ``MAX_DIM`` or a size above ``MAX_TENSOR_BYTES`` (even when another dimension is 0)."""
    dtype = torch_dtype(spec.dtype, index=index)
    shape = list(spec.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"{_where(index)}negative dimension in shape {_short(shape)}")
    if len(shape) > 8 or any(d > MAX_DIM for d in shape):
        raise ValueError(f"{_where(index)}shape {_short(shape)} is not a tensor this service sends: at most 8 "
                         f"dimensions of at most 2^40 each")
    if math.prod(d for d in shape if d) * dtype.itemsize > MAX_TENSOR_BYTES:
        raise ValueError(f"{_where(index)}shape {_short(shape)} x {dtype} describes more than 2^62 bytes")
    return math.prod(shape) * dtype.itemsize


def _short(shape: list[int]) -> str:
    return str(shape) if len(shape) <= 8 else f"{shape[:8]}... ({len(shape)} dimensions)"


def tensor_to_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes as a flat read-write ``memoryview`` (format ``'B'``) in wire order.

    A contiguous CPU tensor is viewed, not copied: the view aliases ``t`` (keep it unchanged while it is sent).
    Only non-contiguous or non-CPU tensors are copied (to a contiguous CPU tensor) first.
    """
    _require_little_endian()
    proto_dtype(t.dtype)  # refuse unsupported dtypes before any copy
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()  # copy (sync point on CUDA)
    if not t.is_contiguous():
        t = t.contiguous()  # copy
    # uint8 reinterpretation works for every dtype (bf16 included: numpy never sees a bf16 array); .numpy() shares
    # memory and keeps the tensor alive, and memoryview keeps the array alive.
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def tensor_from_bytes(buffer: Any, spec: pb2.TensorSpec, *, index: int | None = None) -> torch.Tensor:
    """The tensor described by ``spec`` over ``buffer`` (any buffer-protocol object holding exactly its bytes).

    Zero-copy (``torch.frombuffer``) unless the buffer's address is misaligned for the dtype (then cloned) or the
    tensor is empty (then a fresh empty tensor). The result keeps ``buffer`` alive and writes through to it.
    Pass a writable buffer (``decode_frames`` uses a bytearray); a read-only one (``bytes``) works too, but then
    the tensor must not be written, and torch's "not writable" warning is silenced here with
    ``warnings.catch_warnings``, which is not thread-safe — keep read-only buffers off concurrent paths.
    """
    _require_little_endian()
    dtype = torch_dtype(spec.dtype, index=index)
    expected = spec_nbytes(spec, index=index)
    shape = list(spec.shape)
    view = memoryview(buffer).cast("B")
    if view.nbytes != expected:
        raise ValueError(
            f"{_where(index)}byte length does not match its spec: shape {shape} x {dtype} "
            f"({dtype.itemsize} bytes per element) needs {expected} bytes, got {view.nbytes}"
        )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    if view.readonly:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_READONLY_WARNING, category=UserWarning)
            flat = torch.frombuffer(view, dtype=dtype)
    else:
        flat = torch.frombuffer(view, dtype=dtype)
    if flat.data_ptr() % dtype.itemsize:
        flat = flat.clone()  # misaligned: copy once rather than hand kernels an unaligned pointer
    return flat.view(shape)


def encode_frames(
    header: Any,
    tensors: Sequence[torch.Tensor],
    frame_cls: type,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[Any]:
    """Yield ``frame_cls(header=...)`` then ``frame_cls(payload=chunk)`` frames carrying ``tensors``.

    ``header`` is the header message (e.g. ``pb2.ScoreRequest``); the yielded header is a copy whose ``tensors``
    field lists the tensors' specs (``header`` itself is not modified; if its ``tensors`` is already filled it must
    equal those specs). Payload chunks hold at most ``chunk_bytes`` bytes and may span tensor boundaries; an
    all-empty payload yields the header frame alone. Lazy: one chunk (plus one tensor's device->CPU copy, if any)
    is materialised at a time.
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    tensors = list(tensors)  # iterated twice (specs, then bytes)
    specs = [tensor_spec(t) for t in tensors]  # validates dtypes before anything is sent
    first = frame_cls()
    first.header.CopyFrom(header)
    if len(first.header.tensors) and list(first.header.tensors) != specs:
        raise ValueError(
            "header.tensors is already set and disagrees with the tensors passed; leave it empty "
            "(encode_frames fills it)"
        )
    del first.header.tensors[:]
    first.header.tensors.extend(specs)
    yield first

    pending: list[memoryview] = []  # pieces of the next chunk
    pending_bytes = 0
    for t in tensors:
        data = tensor_to_bytes(t)
        pos = 0
        while pos < data.nbytes:
            take = min(chunk_bytes - pending_bytes, data.nbytes - pos)
            pending.append(data[pos : pos + take])
            pending_bytes += take
            pos += take
            if pending_bytes == chunk_bytes:
                yield frame_cls(payload=_join(pending))
                pending, pending_bytes = [], 0
    if pending:
        yield frame_cls(payload=_join(pending))


def _join(pieces: list[memoryview]) -> bytes:
    return bytes(pieces[0]) if len(pieces) == 1 else b"".join(pieces)  # the one copy per chunk


def decode_frames(
    frames: Iterable[Any], *, max_bytes: int | None = None, on_chunk: Callable[[int], None] | None = None
) -> tuple[Any, list[torch.Tensor]]:
    """Read a header frame and its payload frames; return ``(header, tensors)`` in the header's spec order.

    The payload is received into one bytearray that grows as chunks arrive, and the tensors are zero-copy views
    into it (see the module docstring). ``max_bytes`` caps the size the specs announce: a larger announcement
    raises ``PayloadTooLarge`` before anything is received. ``on_chunk(nbytes)`` is called before each chunk is
    kept (the server counts the bytes against its in-flight budget there; it may raise to stop the stream). A
    malformed stream raises ``ValueError``: no frames, a payload frame or an empty frame first, a second header,
    a payload longer or shorter than the specs say, an unknown dtype, a bad shape.
    """
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise ValueError("empty stream: expected a header frame first, got no frames")
    kind = first.WhichOneof("frame")
    if kind == "payload":
        raise ValueError("payload frame before the header: the first frame of a stream must carry the header")
    if kind != "header":
        raise ValueError("first frame is not a header (its 'frame' oneof is unset)")
    header = first.header
    specs = list(header.tensors)
    sizes = [spec_nbytes(spec, index=i) for i, spec in enumerate(specs)]
    total = sum(sizes)
    if max_bytes is not None and total > max_bytes:
        raise PayloadTooLarge(
            f"payload of {total} bytes ({len(specs)} tensors) exceeds the limit of {max_bytes} bytes; "
            "send fewer or smaller tensors per request"
        )

    buffer = bytearray()
    received = 0
    for n, frame in enumerate(it, start=1):
        kind = frame.WhichOneof("frame")
        if kind == "header":
            raise ValueError(f"frame {n} is a second header; a stream carries exactly one header, first")
        if kind != "payload":
            raise ValueError(f"frame {n} is empty (its 'frame' oneof is unset); expected a payload frame")
        chunk = frame.payload
        end = received + len(chunk)
        if end > total:
            raise ValueError(
                f"payload too long: the header's {len(specs)} tensor specs describe {total} bytes, "
                f"received at least {end} (frame {n})"
            )
        if on_chunk is not None:
            on_chunk(len(chunk))
        buffer += chunk
        received = end
    if received != total:
        raise ValueError(
            f"payload too short: the header's {len(specs)} tensor specs describe {total} bytes, "
            f"the stream ended after {received}"
        )

    view = memoryview(buffer)  # the buffer no longer grows: views into it stay valid
    tensors = []
    offset = 0
    for i, (spec, size) in enumerate(zip(specs, sizes, strict=True)):
        tensors.append(tensor_from_bytes(view[offset : offset + size], spec, index=i))
        offset += size
    return header, tensors


def message_limit(max_request_bytes: int) -> int:
    """The gRPC per-message limit for a service accepting requests of ``max_request_bytes``: an EncodeRequest
    (images included) of that size must fit in one message, plus room for its framing and fields."""
    return max(max_request_bytes, DEFAULT_CHUNK_BYTES) + (1 << 20)


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """gRPC options for ``grpc.server(options=...)`` and ``grpc.insecure_channel(options=...)`` alike.

    ``max_message_bytes`` bounds one message in each direction: it must exceed the payload chunk size by a few
    bytes of framing and fit the largest header or unary message (e.g. an EncodeRequest with its images).
    Keepalive: both ends ping an idle connection every 60 s and drop it after 20 s without an answer, so a dead
    student or teacher is noticed during long training steps; the server accepts such pings (every >= 30 s,
    also with no call in flight) instead of closing the connection with "too_many_pings". Options that only
    apply to one side are ignored by the other.
    """
    if max_message_bytes <= 0:
        raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging a connection idle between steps
        ("grpc.http2.min_ping_interval_without_data_ms", 30_000),  # server side: < the peers' keepalive_time
    ]
