"""Loopback bandwidth of one bf16 payload (64 MiB by default), student -> teacher, over gRPC.

    python benchmarks/wire_bandwidth.py                       # 64 MiB; unary, then streamed 1/4/16 MiB chunks
    python benchmarks/wire_bandwidth.py --mb 16 --repeats 3

The server runs in a child process (as the teacher does), bound to 127.0.0.1 on port 0, built with
``genrecal.wire.channel_options``. Each timed call starts from a bf16 tensor on the client and ends when the
server has it as a tensor and has acknowledged it (one direction; the acknowledgement is a few bytes):

    unary     one bytes message via a generic unary-unary handler: client ``bytes(tensor_to_bytes(t))``, server
              ``tensor_from_bytes`` over the received bytes.
    stream    the real ``TeacherService.Score`` client-streaming method: client ``encode_frames(ScoreRequest,
              [t], chunk_bytes)``, server ``decode_frames`` (a throwaway servicer that answers a header-only
              ScoreResponse).

One warm-up call per mode also checks the bytes (crc32) and is not timed. Reports GB/s (1e9 bytes/s, median of
``--repeats``) per mode, then one JSON line. For each chunk size it also times the framing alone, in this process
with no gRPC: client ``encode_frames`` + ``SerializeToString`` of every frame, server ``FromString`` of every
frame + ``decode_frames`` (CPU work that loopback timings on a shared machine hide in their noise).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import struct
import time
import zlib
from concurrent import futures

import grpc
import torch

from genrecal import wire
from genrecal.rpc import pb2, pb2_grpc

MIB = 1 << 20
UNARY_SERVICE = "genrecal.bench.Wire"
CHUNKS_MB = (1, 4, 16)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=int, default=64, help="payload size in MiB of bf16 (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per mode; the median is reported")
    parser.add_argument(
        "--chunks-mb",
        type=int,
        nargs="+",
        default=list(CHUNKS_MB),
        help="streamed chunk sizes in MiB (default: 1 4 16)",
    )
    return parser.parse_args()


# ---------------------------------------------------------------- server (child process)


def _ack(nbytes: int, crc: int) -> bytes:
    return struct.pack("<qI", nbytes, crc)


def _unary_put(request: bytes, context) -> bytes:
    spec = pb2.TensorSpec(dtype=pb2.DTYPE_BFLOAT16, shape=[len(request) // 2])
    t = wire.tensor_from_bytes(request, spec)
    return _ack(t.numel() * t.element_size(), 0)


def _unary_put_checked(request: bytes, context) -> bytes:
    return _ack(len(request), zlib.crc32(request))


class _SinkServicer(pb2_grpc.TeacherServiceServicer):
    """Score: decode the stream, answer how many bytes arrived (and their crc32 when ``release`` is set)."""

    def Score(self, request_iterator, context):
        header, tensors = wire.decode_frames(request_iterator, max_bytes=1 << 34)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        crc = 0
        if header.release:  # the warm-up call: verify the content once
            for t in tensors:
                crc = zlib.crc32(wire.tensor_to_bytes(t), crc)
        yield pb2.ScoreResponseFrame(
            header=pb2.ScoreResponse(paths=[pb2.PathScore(path="bytes", num_tokens=nbytes, ce=float(crc))])
        )


def _serve(max_message_bytes: int, port_queue, stop_event) -> None:
    torch.set_num_threads(1)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), options=wire.channel_options(max_message_bytes)
    )
    pb2_grpc.add_TeacherServiceServicer_to_server(_SinkServicer(), server)
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                UNARY_SERVICE,
                {
                    # no (de)serializers: the message is the raw bytes
                    "Put": grpc.unary_unary_rpc_method_handler(_unary_put),
                    "PutChecked": grpc.unary_unary_rpc_method_handler(_unary_put_checked),
                },
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port_queue.put(port)
    stop_event.wait()
    server.stop(None)


# ---------------------------------------------------------------- client


def _unary_call(channel: grpc.Channel, payload: torch.Tensor, checked: bool) -> tuple[int, int]:
    method = channel.unary_unary(f"/{UNARY_SERVICE}/{'PutChecked' if checked else 'Put'}")
    return struct.unpack("<qI", method(bytes(wire.tensor_to_bytes(payload)), timeout=120))


def _stream_call(stub, payload: torch.Tensor, chunk_bytes: int, checked: bool) -> tuple[int, int]:
    frames = wire.encode_frames(
        pb2.ScoreRequest(release=checked), [payload], pb2.ScoreRequestFrame, chunk_bytes
    )
    header, _ = wire.decode_frames(stub.Score(frames, timeout=120))
    return header.paths[0].num_tokens, int(header.paths[0].ce)


def _measure(call, nbytes: int, expected_crc: int, repeats: int) -> dict:
    got_bytes, got_crc = call(True)  # warm-up, checked
    if (got_bytes, got_crc) != (nbytes, expected_crc):
        raise RuntimeError(
            f"payload mismatch: sent {nbytes} bytes crc {expected_crc}, got {got_bytes} crc {got_crc}"
        )
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        got_bytes, _ = call(False)
        seconds.append(time.perf_counter() - start)
        assert got_bytes == nbytes
    median = statistics.median(seconds)
    return {
        "gb_per_s": round(nbytes / median / 1e9, 3),
        "median_ms": round(median * 1e3, 1),
        "min_ms": round(min(seconds) * 1e3, 1),
        "max_ms": round(max(seconds) * 1e3, 1),
    }


def _framing_ms(payload: torch.Tensor, chunk_bytes: int, repeats: int) -> tuple[float, float]:
    """Median ms of (encode + serialize, parse + decode) for the whole payload, no network."""
    encode_s, decode_s = [], []
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        wire_frames = [
            f.SerializeToString()
            for f in wire.encode_frames(pb2.ScoreRequest(), [payload], pb2.ScoreRequestFrame, chunk_bytes)
        ]
        mid = time.perf_counter()
        _, (out,) = wire.decode_frames(pb2.ScoreRequestFrame.FromString(b) for b in wire_frames)
        end = time.perf_counter()
        encode_s.append(mid - start)
        decode_s.append(end - mid)
        assert out.shape == payload.shape
        del wire_frames, out
    return statistics.median(encode_s[1:]) * 1e3, statistics.median(decode_s[1:]) * 1e3


def main() -> None:
    args = parse_args()
    nbytes = args.mb * MIB
    payload = torch.randn(nbytes // 2, dtype=torch.float32).to(torch.bfloat16).view(-1, 8192)  # (rows, D_l)
    expected_crc = zlib.crc32(wire.tensor_to_bytes(payload))
    max_message_bytes = (
        max(nbytes, max(args.chunks_mb) * MIB) + MIB
    )  # the unary message and a frame's framing

    ctx = mp.get_context("spawn")
    port_queue, stop_event = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_serve, args=(max_message_bytes, port_queue, stop_event), daemon=True)
    server.start()
    results: dict[str, dict] = {}
    try:
        port = port_queue.get(timeout=60)
        with grpc.insecure_channel(
            f"127.0.0.1:{port}", options=wire.channel_options(max_message_bytes)
        ) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            stub = pb2_grpc.TeacherServiceStub(channel)
            results["unary"] = _measure(
                lambda checked: _unary_call(channel, payload, checked), nbytes, expected_crc, args.repeats
            )
            for mb in args.chunks_mb:
                results[f"stream_{mb}mb"] = _measure(
                    lambda checked, mb=mb: _stream_call(stub, payload, mb * MIB, checked),
                    nbytes,
                    expected_crc,
                    args.repeats,
                )
    finally:
        stop_event.set()
        server.join(timeout=30)
    framing = {mb: _framing_ms(payload, mb * MIB, args.repeats) for mb in args.chunks_mb}

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"machine: {machine}; torch {torch.__version__}, grpcio {grpc.__version__}")
    print(f"payload: {args.mb} MiB bf16 {tuple(payload.shape)}, loopback 127.0.0.1, client -> server process")
    print(f"{'mode':<16}{'GB/s':>8}{'median ms':>12}{'min ms':>10}{'max ms':>10}")
    for mode, r in results.items():
        print(
            f"{mode:<16}{r['gb_per_s']:>8.3f}{r['median_ms']:>12.1f}{r['min_ms']:>10.1f}{r['max_ms']:>10.1f}"
        )
    print("framing alone, no gRPC (ms for the whole payload, median):")
    for mb, (enc, dec) in framing.items():
        print(f"  {mb:>3} MiB chunks: encode+serialize {enc:7.1f}   parse+decode {dec:7.1f}")
    print(
        json.dumps(
            {
                "benchmark": "wire_bandwidth",
                "machine": machine,
                "grpcio": grpc.__version__,
                "payload_bytes": nbytes,
                "dtype": "bf16",
                "repeats": args.repeats,
                **{f"{mode}_gb_per_s": r["gb_per_s"] for mode, r in results.items()},
                **{f"framing_{mb}mb_encode_ms": round(enc, 1) for mb, (enc, _) in framing.items()},
                **{f"framing_{mb}mb_decode_ms": round(dec, 1) for mb, (_, dec) in framing.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
