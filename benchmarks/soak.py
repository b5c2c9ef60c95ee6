"""Soak test of the teacher service: well-behaved clients and abusive ones against one real server for minutes.

    python benchmarks/soak.py [--clients 8] [--abusive 3] [--duration-s 300] [--model DIR] [--out soak.json]

The server is the real `python -m teacher_server` process on localhost with an auth token file (one token per
client), a small handle store and Prometheus metrics. Before the soak one client computes the reference
results of every good client's samples alone. Then for ``--duration-s`` seconds:

- ``--clients`` well-behaved clients loop Encode -> Score -> Release on their own samples, with fixed outputs, and
  compare each result with the single-client reference (max |diff| of CE, KL and gradients is reported; batching
  with other clients changes only padding and matmul shapes, so fp32 round-off is expected);
- ``--abusive`` abusers rotate through: a Score stream that announces 1 MiB and stalls, an Encode whose response
  is never read, a client that encodes and never releases (it fills the handle store), garbage request bytes,
  and a decompression-bomb PNG.

The server's RSS is sampled every second (start / peak / end) and ``curl localhost:METRICS_PORT/metrics`` is run
halfway; the JSON written to ``--out`` holds everything. Exit status 1 if a good client saw an error or a result
beyond tolerance.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import grpc
import numpy as np
import psutil
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genrecal.client import TeacherClient, TeacherError  # noqa: E402
from genrecal.rpc import pb2  # noqa: E402
from genrecal.sample import Sample, Turn  # noqa: E402
from genrecal.tiny import TinySizes, write_tiny_checkpoint  # noqa: E402
from genrecal.wire import channel_options  # noqa: E402
from teacher_server.launch import TeacherProcess  # noqa: E402

WORDS = ["red", "blue", "green", "circle", "square", "triangle", "small", "large", "left", "right"]
SERVICE = "/genrecal.teacher.v1.TeacherService/"
TOLERANCE = 1e-4  # relative, as the engine tests' "another batch composition"


def make_samples(n: int, seed: int) -> list[Sample]:
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        question = " ".join(rng.choice(WORDS, size=int(rng.integers(4, 12)))) + "?"
        answer = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 6))))
        samples.append(Sample(f"c{seed}-{i}", [Turn("user", "<image>\n" + question), Turn("assistant", answer)], [image]))
    return samples


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(side: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    compressor, row = zlib.compressobj(9), b"\0" * (1 + 3 * side)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def fixed_outputs(features, hidden: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(f.num_answer_tokens, hidden, generator=generator) for f in features]


def score_once(client: TeacherClient, samples, seed: int):
    features = client.encode(samples)
    outputs = fixed_outputs(features, client.hidden_size, seed)
    score, grads = client.score(features, outputs, normalizer=10.0)
    client.release(features)
    return float(score.ce), float(score.kl), grads


def max_rel_diff(got, want) -> float:
    ce, kl, grads = got
    ce0, kl0, grads0 = want
    diffs = [abs(ce - ce0) / max(abs(ce0), 1e-12), abs(kl - kl0) / max(abs(kl0), 1e-12)]
    for g, g0 in zip(grads, grads0, strict=True):
        diffs.append(float((g - g0).abs().max() / g0.abs().max().clamp_min(1e-12)))
    return max(diffs)


class Abuser:
    """Cycles through abusive behaviours until ``stop`` is set; counts the status codes it meets."""

    def __init__(self, address: str, token: str, hidden: int, stop: threading.Event, seed: int):
        self.address, self.token, self.hidden, self.stop = address, token, hidden, stop
        self.codes: dict[str, int] = {}
        self.seed = seed
        self.metadata = (("authorization", f"Bearer {token}"),)

    def count(self, kind: str, code) -> None:
        key = f"{kind}:{code.name if hasattr(code, 'name') else code}"
        self.codes[key] = self.codes.get(key, 0) + 1

    def run(self) -> None:
        behaviours = [self.stalled_score, self.unread_encode, self.never_release, self.garbage, self.bomb]
        k = self.seed
        while not self.stop.is_set():
            behaviours[k % len(behaviours)]()
            k += 1

    def stalled_score(self) -> None:
        header = pb2.ScoreRequestFrame(header=pb2.ScoreRequest(
            items=[pb2.ScoreItem(handle="h" * 32, path="L1", outputs=0)],
            tensors=[pb2.TensorSpec(dtype=pb2.DTYPE_FLOAT32, shape=[(1 << 20) // (4 * self.hidden), self.hidden])]))

        def frames():
            yield header.SerializeToString()
            yield pb2.ScoreRequestFrame(payload=b"\0" * 1024).SerializeToString()
            self.stop.wait(120)

        with grpc.insecure_channel(self.address, options=channel_options()) as channel:
            call = channel.stream_stream(SERVICE + "Score", request_serializer=None, response_deserializer=None)
            try:
                list(call(frames(), timeout=120, metadata=self.metadata))
                self.count("stalled_score", "OK")
            except grpc.RpcError as err:
                self.count("stalled_score", err.code())

    def unread_encode(self) -> None:
        request = pb2.EncodeRequest(samples=[
            pb2.Sample(sample_id=f"u{i}", turns=[pb2.Turn(role="user", text="<image>\nWhat?"),
                                                 pb2.Turn(role="assistant", text="red")],
                       images=[png(Image.new("RGB", (224, 224), (i, 0, 0)))]) for i in range(8)],
            return_question_features=True)
        with grpc.insecure_channel(self.address, options=channel_options()) as channel:
            call = channel.unary_stream(SERVICE + "Encode", request_serializer=None, response_deserializer=None)
            responses = call(request.SerializeToString(), timeout=120, metadata=self.metadata)
            self.stop.wait(20)  # never read; the channel then closes
            responses.cancel()
            self.count("unread_encode", "abandoned")

    def never_release(self) -> None:
        client = TeacherClient(self.address, token=self.token, retries=0)
        try:
            for _ in range(10):
                client.encode(make_samples(4, seed=1000 + self.seed))
            self.count("never_release", "OK")
        except TeacherError as err:
            self.count("never_release", err.code)
        finally:
            client.close()

    def garbage(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            for method in ("Info", "Encode", "Release"):
                call = channel.unary_unary(SERVICE + method, request_serializer=None, response_deserializer=None)
                try:
                    call(b"\xff\xff\xff\xff\x0f garbage", timeout=30, metadata=self.metadata)
                    self.count("garbage", "OK")
                except grpc.RpcError as err:
                    self.count("garbage", err.code())

    def bomb(self) -> None:
        request = pb2.EncodeRequest(samples=[pb2.Sample(
            sample_id="bomb", turns=[pb2.Turn(role="user", text="<image>\nq?"), pb2.Turn(role="assistant", text="a")],
            images=[BOMB])])
        with grpc.insecure_channel(self.address, options=channel_options()) as channel:
            call = channel.unary_stream(SERVICE + "Encode", request_serializer=None, response_deserializer=None)
            try:
                list(call(request.SerializeToString(), timeout=60, metadata=self.metadata))
                self.count("bomb", "OK")
            except grpc.RpcError as err:
                self.count("bomb", err.code())


BOMB = b""


def main() -> int:
    global BOMB
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="teacher checkpoint (default: a tiny Qwen2-VL written to a temp folder)")
    parser.add_argument("--clients", type=int, default=8, help="well-behaved clients (default %(default)s)")
    parser.add_argument("--abusive", type=int, default=3, help="abusive clients (default %(default)s)")
    parser.add_argument("--duration-s", type=float, default=300.0, help="soak length (default %(default)s s)")
    parser.add_argument("--samples", type=int, default=2, help="samples per Encode of a good client")
    parser.add_argument("--out", default="soak.json", help="where the JSON summary goes (default %(default)s)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="genrecal-soak-"))
    model = args.model or write_tiny_checkpoint("qwen2_vl", tmp / "teacher", sizes=TinySizes(hidden_size=96),
                                                tokenizer="gpt2")
    tokens = {f"good{i}": f"good-token-{i:03d}-0123456789abcdef" for i in range(args.clients)}
    tokens |= {f"abuser{i}": f"abuser-token-{i:03d}-0123456789abcdef" for i in range(args.abusive)}
    tokens["reference"] = "reference-token-0123456789abcdef"
    (tmp / "tokens").write_text("".join(f"{name} {token}\n" for name, token in tokens.items()))
    BOMB = bomb_png(12000)
    server = TeacherProcess(model, "--auth-token-file", str(tmp / "tokens"), "--metrics-port", "0",
                            "--stream-idle-s", "5", "--handle-store-gib", "0.0001", "--max-image-pixels", "4000000")
    proc = psutil.Process(server.proc.pid)
    rss = [proc.memory_info().rss]
    print(f"server {server.address}, metrics {server.metrics_port}, RSS {rss[0] / 2**20:.0f} MiB", flush=True)

    sample_sets = [make_samples(args.samples, seed=i) for i in range(args.clients)]
    reference_client = TeacherClient(server.address, token=tokens["reference"])
    reference = [score_once(reference_client, s, seed=i) for i, s in enumerate(sample_sets)]
    reference_client.close()

    stop = threading.Event()
    results = [{"rounds": 0, "errors": [], "max_rel_diff": 0.0, "latency_s": []} for _ in range(args.clients)]

    def good(i: int) -> None:
        client = TeacherClient(server.address, token=tokens[f"good{i}"], retries=2)
        while not stop.is_set():
            start = time.monotonic()
            try:
                got = score_once(client, sample_sets[i], seed=i)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                results[i]["errors"].append(f"{type(exc).__name__}: {exc}"[:300])
                continue
            results[i]["latency_s"].append(time.monotonic() - start)
            results[i]["rounds"] += 1
            results[i]["max_rel_diff"] = max(results[i]["max_rel_diff"], max_rel_diff(got, reference[i]))
        client.close()

    abusers = [Abuser(server.address, tokens[f"abuser{i}"], 96, stop, seed=i) for i in range(args.abusive)]
    threads = [threading.Thread(target=good, args=(i,), daemon=True) for i in range(args.clients)]
    threads += [threading.Thread(target=a.run, daemon=True) for a in abusers]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    metrics_text = ""
    while time.monotonic() - start < args.duration_s:
        time.sleep(1.0)
        rss.append(proc.memory_info().rss)
        if not metrics_text and time.monotonic() - start >= args.duration_s / 2:
            metrics_text = subprocess.run(["curl", "-s", f"localhost:{server.metrics_port}/metrics"],
                                          capture_output=True, text=True, timeout=30).stdout
    stop.set()
    for thread in threads:
        thread.join(180)
    time.sleep(2.0)
    rss.append(proc.memory_info().rss)
    server.terminate()

    latencies = sorted(x for r in results for x in r["latency_s"])
    summary = {
        "command": " ".join(sys.argv),
        "machine": f"{platform.node()} ({psutil.cpu_count()} CPUs, shared), {platform.platform()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "duration_s": args.duration_s,
        "good_clients": args.clients,
        "abusive_clients": args.abusive,
        "rounds": [r["rounds"] for r in results],
        "good_errors": [e for r in results for e in r["errors"]],
        "max_rel_diff_vs_single_client": max(r["max_rel_diff"] for r in results),
        "round_trip_s_p50": latencies[len(latencies) // 2] if latencies else None,
        "round_trip_s_p99": latencies[int(len(latencies) * 0.99)] if latencies else None,
        "abuser_codes": [a.codes for a in abusers],
        "rss_mib": {"start": rss[0] / 2**20, "peak": max(rss) / 2**20, "end": rss[-1] / 2**20},
        "metrics_midway": [line for line in metrics_text.splitlines() if line.startswith("teacher_")
                           and not line.startswith(("teacher_request_seconds_bucket",))],
    }
    Path(args.out).write_text(json.dumps(summary, indent=1))
    ok = not summary["good_errors"] and summary["max_rel_diff_vs_single_client"] <= TOLERANCE
    print(json.dumps({k: v for k, v in summary.items() if k != "metrics_midway"}, indent=1))
    print(f"{'PASS' if ok else 'FAIL'}: {sum(summary['rounds'])} good rounds, "
          f"max rel diff {summary['max_rel_diff_vs_single_client']:.2e}, RSS start/peak/end "
          f"{summary['rss_mib']['start']:.0f}/{summary['rss_mib']['peak']:.0f}/{summary['rss_mib']['end']:.0f} MiB")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
