"""genrecal.wire: tensors <-> raw bytes <-> header + payload frames, and through a real gRPC server."""

from __future__ import annotations

import ctypes
import math
from concurrent import futures

import grpc
import pytest
import torch

from genrecal import wire
from genrecal.rpc import pb2, pb2_grpc

DTYPES = [torch.bfloat16, torch.float32, torch.float16, torch.int64]
_BITS = {
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float32: torch.int32,
    torch.int64: torch.int64,
}


@pytest.fixture
def gen(rng) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(2**31)))


def random_bits(shape, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Uniformly random bit patterns: NaNs (with payloads), infinities, subnormals and -0 all occur."""
    bits = _BITS[dtype]
    info = torch.iinfo(bits)
    raw = torch.randint(info.min, info.max, shape, dtype=bits, generator=gen)
    return raw.view(dtype)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(_BITS[a.dtype]), b.contiguous().view(_BITS[b.dtype]))
    )


def roundtrip(tensors, chunk_bytes=wire.DEFAULT_CHUNK_BYTES, **decode_kwargs):
    frames = list(
        wire.encode_frames(pb2.ScoreRequest(ce_weight=0.5), tensors, pb2.ScoreRequestFrame, chunk_bytes)
    )
    # through serialisation, as on the wire
    frames = [pb2.ScoreRequestFrame.FromString(f.SerializeToString()) for f in frames]
    header, out = wire.decode_frames(frames, **decode_kwargs)
    return frames, header, out


def address(buffer) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


# ---------------------------------------------------------------- single tensors


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 7), (), (0,), (4, 0, 2), (1,)], ids=str)
def test_roundtrip_is_bit_exact(dtype, shape, gen):
    t = random_bits(shape, dtype, gen)
    frames, header, (out,) = roundtrip([t])
    assert bitwise_equal(out, t)
    assert header.ce_weight == 0.5
    assert list(header.tensors) == [wire.tensor_spec(t)]
    if t.numel() == 0:
        assert len(frames) == 1  # header only


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_special_float_patterns_survive(dtype):
    bits = _BITS[dtype]
    nbits = torch.iinfo(bits).bits
    exp_bits = {torch.bfloat16: 8, torch.float16: 5, torch.float32: 8}[dtype]
    mant = nbits - 1 - exp_bits
    exp_all = ((1 << exp_bits) - 1) << mant
    sign = -(1 << (nbits - 1))  # sign bit as a signed integer
    patterns = [
        exp_all,  # +inf
        sign | exp_all,  # -inf
        exp_all | 1,  # signalling NaN, smallest payload
        exp_all | (1 << (mant - 1)),  # quiet NaN
        sign | exp_all | ((1 << mant) - 1),  # negative NaN, full payload
        sign,  # -0
        1,  # smallest subnormal
    ]
    t = torch.tensor(patterns, dtype=bits).view(dtype)
    _, _, (out,) = roundtrip([t])
    assert torch.equal(out.view(bits), t.view(bits))
    assert out.isinf().sum() == 2 and out.isnan().sum() == 3


@pytest.mark.parametrize("make", ["transpose", "step", "expand", "offset"])
def test_non_contiguous_inputs(make, gen):
    base = random_bits((6, 8), torch.bfloat16, gen)
    t = {
        "transpose": base.t(),
        "step": base[:, ::3],
        "expand": base[:1].expand(5, 8),
        "offset": base[2:, 1:],
    }[make]
    assert not t.is_contiguous()
    _, _, (out,) = roundtrip([t])
    assert bitwise_equal(out, t)


def test_requires_grad_tensor_is_sent(gen):
    t = torch.randn(4, 3, generator=gen, requires_grad=True)
    _, _, (out,) = roundtrip([t * 2])
    assert torch.equal(out, (t * 2).detach())


# ---------------------------------------------------------------- chunking and multi-tensor payloads


@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 420, 421, 1 << 20])
def test_chunking(chunk_bytes, gen):
    # 420 payload bytes: 64 divides none, 7 and 420 divide it, 421 exceeds it
    tensors = [random_bits((10, 7), torch.float32, gen), random_bits((70,), torch.bfloat16, gen)]
    total = 10 * 7 * 4 + 70 * 2
    assert total == 420
    frames, _, out = roundtrip(tensors, chunk_bytes)
    chunks = [f.payload for f in frames[1:]]
    assert all(f.WhichOneof("frame") == "payload" for f in frames[1:])
    assert len(chunks) == math.ceil(total / chunk_bytes)
    assert all(len(c) == chunk_bytes for c in chunks[:-1]) and 0 < len(chunks[-1]) <= chunk_bytes
    assert sum(map(len, chunks)) == total
    assert all(bitwise_equal(a, b) for a, b in zip(out, tensors, strict=True))


def test_multi_tensor_mixed_dtypes_and_misaligned_offsets(gen):
    tensors = [
        random_bits((3,), torch.bfloat16, gen),  # 6 bytes: what follows is misaligned for fp32 / int64
        random_bits((5,), torch.float32, gen),
        random_bits((0, 4), torch.int64, gen),
        random_bits((), torch.float16, gen),
        random_bits((2, 3), torch.int64, gen),
        random_bits((4, 1), torch.float16, gen),
    ]
    _, header, out = roundtrip(tensors, chunk_bytes=5)
    assert [tuple(s.shape) for s in header.tensors] == [tuple(t.shape) for t in tensors]
    for a, b in zip(out, tensors, strict=True):
        assert bitwise_equal(a, b)
        assert a.data_ptr() % a.element_size() == 0  # misaligned ones were cloned


def test_encode_is_lazy_and_leaves_header_alone(gen):
    header = pb2.ScoreRequest(items=[pb2.ScoreItem(handle="h", path="L1", outputs=0)])
    t = random_bits((16,), torch.float32, gen)
    frames = wire.encode_frames(header, [t], pb2.ScoreRequestFrame, chunk_bytes=16)
    first = next(frames)
    assert first.WhichOneof("frame") == "header"
    assert list(first.header.tensors) == [wire.tensor_spec(t)] and first.header.items[0].handle == "h"
    assert len(header.tensors) == 0  # the caller's message is not modified
    assert len(list(frames)) == 4


def test_prefilled_header_tensors_must_match(gen):
    t = random_bits((2, 2), torch.float16, gen)
    ok = pb2.ScoreResponse(tensors=[wire.tensor_spec(t)])
    assert len(list(wire.encode_frames(ok, [t], pb2.ScoreResponseFrame))) == 2
    bad = pb2.ScoreResponse(tensors=[pb2.TensorSpec(dtype=pb2.DTYPE_FLOAT16, shape=[4])])
    with pytest.raises(ValueError, match="header.tensors is already set"):
        list(wire.encode_frames(bad, [t], pb2.ScoreResponseFrame))


# ---------------------------------------------------------------- zero-copy


def test_decoded_tensors_are_views_into_one_buffer(gen):
    tensors = [
        random_bits((64, 3), torch.float32, gen),
        random_bits((10,), torch.int64, gen),
        random_bits((7,), torch.bfloat16, gen),
    ]
    _, _, out = roundtrip(tensors, chunk_bytes=100)
    # back to back in one allocation: each starts where the previous one ends
    for prev, nxt in zip(out[:-1], out[1:], strict=True):
        assert nxt.data_ptr() == prev.data_ptr() + prev.numel() * prev.element_size()


def test_tensor_from_bytes_shares_memory():
    buffer = bytearray(24)
    spec = pb2.TensorSpec(dtype=pb2.DTYPE_FLOAT32, shape=[2, 3])
    t = wire.tensor_from_bytes(buffer, spec)
    assert t.data_ptr() == address(buffer)
    t.fill_(1.0)
    assert bytes(buffer) == torch.ones(6).numpy().tobytes()
    del buffer  # the tensor keeps the buffer alive
    assert t.sum().item() == 6.0


def test_tensor_from_read_only_bytes_does_not_warn(recwarn):
    t = torch.arange(5, dtype=torch.int64)
    out = wire.tensor_from_bytes(t.numpy().tobytes(), wire.tensor_spec(t))
    assert torch.equal(out, t)
    assert not [w for w in recwarn if "not writable" in str(w.message)]


def test_tensor_to_bytes_views_contiguous_cpu_tensors(gen):
    t = random_bits((5, 4), torch.bfloat16, gen)
    view = wire.tensor_to_bytes(t)
    assert view.nbytes == 40 and view.format == "B"
    assert address(view) == t.data_ptr()  # no copy
    assert bytes(view) == t.view(torch.int16).numpy().tobytes()  # little-endian host order
    rows = t[2:]  # contiguous view at a storage offset: still no copy
    assert address(wire.tensor_to_bytes(rows)) == rows.data_ptr() == t.data_ptr() + 2 * 4 * 2
    strided = t.t()
    assert bytes(wire.tensor_to_bytes(strided)) == strided.contiguous().view(torch.int16).numpy().tobytes()


# ---------------------------------------------------------------- malformed streams


def _header_frame(*specs):
    return pb2.ScoreRequestFrame(header=pb2.ScoreRequest(tensors=list(specs)))


SPEC_F32_4 = pb2.TensorSpec(dtype=pb2.DTYPE_FLOAT32, shape=[4])  # 16 bytes


@pytest.mark.parametrize(
    ("frames", "error"),
    [
        ([], "empty stream"),
        ([pb2.ScoreRequestFrame(payload=b"x" * 16)], "payload frame before the header"),
        ([pb2.ScoreRequestFrame()], "first frame is not a header"),
        ([_header_frame(SPEC_F32_4), _header_frame(SPEC_F32_4)], "frame 1 is a second header"),
        (
            [_header_frame(SPEC_F32_4), pb2.ScoreRequestFrame(payload=b"x" * 16), pb2.ScoreRequestFrame()],
            "frame 2 is empty",
        ),
        (
            [_header_frame(SPEC_F32_4), pb2.ScoreRequestFrame(payload=b"x" * 10)],
            "payload too short: .* describe 16 bytes, the stream ended after 10",
        ),
        ([_header_frame(SPEC_F32_4)], "payload too short: .* describe 16 bytes, the stream ended after 0"),
        (
            [
                _header_frame(SPEC_F32_4),
                pb2.ScoreRequestFrame(payload=b"x" * 10),
                pb2.ScoreRequestFrame(payload=b"x" * 10),
            ],
            "payload too long: .* describe 16 bytes, received at least 20",
        ),
        ([_header_frame(), pb2.ScoreRequestFrame(payload=b"x")], "payload too long"),
        (
            [_header_frame(SPEC_F32_4, pb2.TensorSpec(dtype=pb2.DTYPE_UNSPECIFIED, shape=[1]))],
            "tensor 1: unknown dtype 0 \\(DTYPE_UNSPECIFIED\\)",
        ),
        (
            [_header_frame(pb2.TensorSpec(dtype=99, shape=[1]))],
            "tensor 0: unknown dtype 99 \\(not a DType\\)",
        ),
        (
            [_header_frame(SPEC_F32_4, pb2.TensorSpec(dtype=pb2.DTYPE_INT64, shape=[2, -3]))],
            "tensor 1: negative dimension in shape \\[2, -3\\]",
        ),
    ],
    ids=[
        "no-frames",
        "payload-first",
        "empty-first",
        "second-header",
        "empty-later",
        "short",
        "no-payload",
        "long",
        "long-no-specs",
        "dtype-unspecified",
        "dtype-unknown",
        "negative-dim",
    ],
)
def test_malformed_streams(frames, error):
    with pytest.raises(ValueError, match=error):
        wire.decode_frames(frames)


def test_max_bytes():
    specs = [SPEC_F32_4, pb2.TensorSpec(dtype=pb2.DTYPE_BFLOAT16, shape=[1 << 40])]  # 2 TiB: never allocated
    with pytest.raises(
        wire.PayloadTooLarge, match="payload of 2199023255568 bytes .* limit of 1000 bytes"
    ) as err:
        wire.decode_frames([_header_frame(*specs)], max_bytes=1000)
    assert isinstance(err.value, ValueError)
    header, (t,) = wire.decode_frames(
        [_header_frame(SPEC_F32_4), pb2.ScoreRequestFrame(payload=bytes(16))], max_bytes=16
    )  # exactly at the limit is fine
    assert t.shape == (4,)


def test_tensor_from_bytes_length_mismatch_names_tensor():
    spec = pb2.TensorSpec(dtype=pb2.DTYPE_BFLOAT16, shape=[3, 5])
    with pytest.raises(ValueError, match=r"tensor 7: .*needs 30 bytes, got 29"):
        wire.tensor_from_bytes(bytearray(29), spec, index=7)


def test_unsupported_dtype_refused_before_any_frame():
    frames = wire.encode_frames(
        pb2.ScoreRequest(), [torch.zeros(2, dtype=torch.float64)], pb2.ScoreRequestFrame
    )
    with pytest.raises(ValueError, match="dtype torch.float64 cannot be sent"):
        next(frames)
    with pytest.raises(ValueError, match="chunk_bytes must be positive"):
        next(wire.encode_frames(pb2.ScoreRequest(), [], pb2.ScoreRequestFrame, chunk_bytes=0))


def test_channel_options():
    opts = dict(wire.channel_options(1 << 27))
    assert opts["grpc.max_send_message_length"] == opts["grpc.max_receive_message_length"] == 1 << 27
    # the server must tolerate the pings the client sends
    assert opts["grpc.http2.min_ping_interval_without_data_ms"] <= opts["grpc.keepalive_time_ms"]
    with pytest.raises(ValueError):
        wire.channel_options(0)


# ---------------------------------------------------------------- through a real gRPC server


class EchoScoreServicer(pb2_grpc.TeacherServiceServicer):
    """Throwaway servicer: returns the request's tensors as 'gradients', one per item."""

    def Score(self, request_iterator, context):
        request, tensors = wire.decode_frames(request_iterator, max_bytes=1 << 30)
        response = pb2.ScoreResponse(
            paths=[
                pb2.PathScore(path=item.path, num_tokens=tensors[item.outputs].shape[0])
                for item in request.items
            ],
            gradients=[item.outputs for item in request.items],
        )
        yield from wire.encode_frames(response, tensors, pb2.ScoreResponseFrame, chunk_bytes=1 << 20)


@pytest.fixture
def echo_channel():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=wire.channel_options())
    pb2_grpc.add_TeacherServiceServicer_to_server(EchoScoreServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.channel_options())
    try:
        yield channel
    finally:
        channel.close()
        server.stop(None)


def test_16mb_bf16_through_grpc_is_bit_exact(echo_channel, gen):
    outputs = random_bits((1024, 8192), torch.bfloat16, gen)  # 16 MiB, (La, D_l)
    small = random_bits((3, 8192), torch.bfloat16, gen)
    header = pb2.ScoreRequest(
        items=[
            pb2.ScoreItem(handle="a", path="L1", outputs=0),
            pb2.ScoreItem(handle="b", path="L2", outputs=1),
        ]
    )
    stub = pb2_grpc.TeacherServiceStub(echo_channel)
    responses = stub.Score(wire.encode_frames(header, [outputs, small], pb2.ScoreRequestFrame), timeout=30)
    response, (grad_a, grad_b) = wire.decode_frames(responses)
    assert [p.path for p in response.paths] == ["L1", "L2"] and list(response.gradients) == [0, 1]
    assert [p.num_tokens for p in response.paths] == [1024, 3]
    assert bitwise_equal(grad_a, outputs) and bitwise_equal(grad_b, small)
