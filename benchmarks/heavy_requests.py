"""A good client's latency while one other client sends heavy but legal requests, against the real server.

    python benchmarks/heavy_requests.py [--phase-s 15] [--model DIR] [--out heavy.json]

The server is the real ``python -m teacher_server`` process on localhost (tiny Qwen2-VL teacher unless
``--model``), default limits. A good client loops Encode (2 image samples) -> Score -> Release and records each
round trip. Phases of ``--phase-s`` seconds each: ``baseline`` (alone), then with a second client repeating one
heavy-but-legal request for the whole phase:

- ``long_score``: one Score of 8 paths x 4 samples of ~1500 answer tokens (~48k rows of head scoring; the
  server slices it into blocks of ``--chunk-size`` rows and runs other clients' jobs between blocks);
- ``max_text_encode``: an Encode of 8 samples of 64 KiB of text each (``--max-text-bytes``, ~13k tokens each);
- ``many_samples_encode``: an Encode of 256 short samples (``--max-encode-samples``).

Prints one line per phase (good client's round trips, p50, p99, max in seconds) and writes them to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genrecal.client import TeacherClient  # noqa: E402
from genrecal.sample import Sample, Turn  # noqa: E402
from genrecal.tiny import TinySizes, write_tiny_checkpoint  # noqa: E402
from teacher_server.launch import TeacherProcess  # noqa: E402


def image_samples(n: int, prefix: str, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    return [Sample(f"{prefix}{i}", [Turn("user", "<image>\nWhat is shown?"), Turn("assistant", "a red circle")],
                   [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))]) for i in range(n)]


def text_samples(n: int, prefix: str, question: str, answer: str) -> list[Sample]:
    return [Sample(f"{prefix}{i}", [Turn("user", question), Turn("assistant", answer)]) for i in range(n)]


def heavy_phases(address: str, hidden: int):
    """name -> setup(client) -> a function that sends one heavy request with that client."""
    long_answer = " ".join(f"w{i % 97}" for i in range(1500))

    def long_score(client):
        feats = client.encode(text_samples(4, "long", "q?", long_answer))
        outputs = {f"L{p}": [torch.randn(f.num_answer_tokens, hidden) for f in feats] for p in range(8)}
        return lambda: client.score_paths(feats, outputs)

    def max_text_encode(client):
        return lambda: client.release(client.encode(text_samples(8, "text", "word " * (65536 // 5 - 2), "a")))

    def many_samples_encode(client):
        return lambda: client.release(client.encode(text_samples(256, "many", "What colour is it?", "red")))

    return {"long_score": long_score, "max_text_encode": max_text_encode, "many_samples_encode": many_samples_encode}


def measure(good: TeacherClient, batch: list[Sample], seconds: float, hidden: int, setup=None) -> dict:
    """The good client's round trips for ``seconds``, while (with ``setup``) another client repeats a heavy
    request; that client's channel is closed at the end, which cancels its request in flight (the server drops
    it)."""
    stop = threading.Event()
    heavy_seconds: list[float] = []
    abuser = TeacherClient(good.address, retries=0, timeout_s=600) if setup else None
    heavy = setup(abuser) if setup else None

    def abuse():
        while not stop.is_set():
            start = time.monotonic()
            try:
                heavy()
            except Exception:  # noqa: BLE001 - cancelled by closing the channel at the end of the phase
                return
            heavy_seconds.append(time.monotonic() - start)

    thread = threading.Thread(target=abuse, daemon=True) if heavy else None
    if thread:
        thread.start()
        time.sleep(1.0)  # let the heavy request get going
    latencies = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.monotonic()
        feats = good.encode(batch)
        good.score(feats, [torch.randn(f.num_answer_tokens, hidden) for f in feats], release=True)
        latencies.append(time.monotonic() - start)
    stop.set()
    if abuser:
        abuser.close()
        thread.join(30)
        time.sleep(1.0)  # the server drops the cancelled request
    values = np.array(latencies)
    return {"round_trips": len(values), "p50_s": float(np.percentile(values, 50)),
            "p99_s": float(np.percentile(values, 99)), "max_s": float(values.max()),
            "heavy_requests_completed": len(heavy_seconds), "heavy_request_s": [round(s, 2) for s in heavy_seconds]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase-s", type=float, default=15.0, help="seconds per phase (default %(default)s)")
    parser.add_argument("--model", help="teacher checkpoint (default: a tiny Qwen2-VL with a GPT-2 tokenizer)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    model = args.model or write_tiny_checkpoint("qwen2_vl", Path(tempfile.mkdtemp()) / "teacher",
                                                sizes=TinySizes(hidden_size=96), tokenizer="gpt2")
    server = TeacherProcess(model)
    try:
        good = TeacherClient(server.address, retries=0)
        hidden = good.hidden_size
        batch = image_samples(2, "good")
        measure(good, batch, 2.0, hidden)  # warm-up
        results = {"baseline": measure(good, batch, args.phase_s, hidden)}
        for name, setup in heavy_phases(server.address, hidden).items():
            results[name] = measure(good, batch, args.phase_s, hidden, setup)
        for name, r in results.items():
            print(f"{name:20s} good round trips {r['round_trips']:4d}  p50 {r['p50_s']:.3f} s  p99 {r['p99_s']:.3f} s  "
                  f"max {r['max_s']:.3f} s  (heavy requests completed: {r['heavy_requests_completed']}, "
                  f"{r['heavy_request_s']} s)", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"machine": platform.node(), "results": results}, indent=2) + "\n")
    finally:
        server.kill()


if __name__ == "__main__":
    main()
