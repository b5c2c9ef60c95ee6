"""Encode and Score throughput through the gRPC teacher service vs calling the engine in-process, in ONE run.

    python benchmarks/teacher_service.py [--model DIR] [--batch 8] [--requests 10] [--hidden 256] [--layers 4]

Without --model a tiny Qwen2-VL teacher of the given size (GPT-2 tokenizer) is written to a temp folder. The
server runs as a subprocess (`python -m teacher_server`) on a free localhost port; the in-process baseline is a
`TeacherEngine` on the same checkpoint in this process. Both see the same samples. Prints samples/s (Encode),
answer tokens/s (Score), the service/in-process ratios (targets: >= 0.9 Encode, >= 0.8 Score) and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genrecal.client import TeacherClient  # noqa: E402
from genrecal.sample import Sample, Turn  # noqa: E402
from genrecal.tiny import TinySizes, write_tiny_checkpoint  # noqa: E402
from teacher_server.config import EngineConfig  # noqa: E402
from teacher_server.engine import TeacherEngine  # noqa: E402
from teacher_server.launch import TeacherProcess  # noqa: E402

WORDS = ["red", "blue", "green", "circle", "square", "triangle", "small", "large", "left", "right"]


def make_samples(n: int, seed: int) -> list[Sample]:
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        question = " ".join(rng.choice(WORDS, size=12)) + "?"
        answer = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 8))))
        samples.append(Sample(f"b{seed}-{i}", [Turn("user", "<image>\n" + question), Turn("assistant", answer)], [image]))
    return samples


def timed_pairs(local_fn, remote_fn, repeats: int) -> tuple[list[float], list[float]]:
    """Alternate the two sides call by call, so machine-load drift hits both alike (this machine is noisy)."""
    local, remote = [], []
    for i in range(repeats):
        for fn, times in ((local_fn, local), (remote_fn, remote)) if i % 2 == 0 else ((remote_fn, remote), (local_fn, local)):
            start = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - start)
    return local, remote


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="teacher checkpoint (default: a tiny Qwen2-VL written to a temp folder)")
    parser.add_argument("--hidden", type=int, default=256, help="tiny teacher hidden size (default 256)")
    parser.add_argument("--layers", type=int, default=4, help="tiny teacher layers (default 4)")
    parser.add_argument("--batch", type=int, default=8, help="samples per Encode request (default 8)")
    parser.add_argument("--requests", type=int, default=10, help="timed requests per method and side (default 10)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or write_tiny_checkpoint(
            "qwen2_vl", Path(tmp) / "teacher", tokenizer="gpt2",
            sizes=TinySizes(hidden_size=args.hidden, num_layers=args.layers, num_heads=8, num_kv_heads=4,
                            intermediate_size=4 * args.hidden))
        batches = [make_samples(args.batch, seed) for seed in range(args.requests)]
        engine = TeacherEngine(EngineConfig(model_path=model, batch_wait_ms=0.0))
        server = TeacherProcess(model, "--batch-wait-ms", "0")
        client = TeacherClient(server.address)
        try:
            # warm-up both sides
            engine.encode(batches[0], return_question_features=True)
            client.encode(batches[0])
            local_encode, remote_encode = timed_pairs(
                lambda i: engine.encode(batches[i % len(batches)], return_question_features=True),
                lambda i: client.encode(batches[i % len(batches)]),
                args.requests,
            )

            local_feats = engine.encode(batches[0], return_question_features=True)
            remote_feats = client.encode(batches[0])
            outputs = [torch.randn(f.num_answer_tokens, client.hidden_size) for f in remote_feats]
            items = [(f.handle, "L1", o) for f, o in zip(local_feats, outputs, strict=True)]
            tokens = sum(o.shape[0] for o in outputs)
            engine.score(items)
            client.score(remote_feats, outputs)
            local_score, remote_score = timed_pairs(
                lambda i: engine.score(items), lambda i: client.score(remote_feats, outputs), args.requests
            )
        finally:
            client.close()
            server.kill()
            engine.close()

    med = statistics.median
    enc_local, enc_remote = args.batch / med(local_encode), args.batch / med(remote_encode)
    sc_local, sc_remote = tokens / med(local_score), tokens / med(remote_score)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"teacher: hidden {args.hidden}, layers {args.layers}; {args.batch} samples/request, {args.requests} requests")
    print(f"{'':24}{'in-process':>14}{'service':>14}{'ratio':>10}{'target':>10}")
    print(f"{'Encode (samples/s)':24}{enc_local:14.1f}{enc_remote:14.1f}{enc_remote / enc_local:10.2f}{'>= 0.9':>10}")
    print(f"{'Score (tokens/s)':24}{sc_local:14.1f}{sc_remote:14.1f}{sc_remote / sc_local:10.2f}{'>= 0.8':>10}")
    print(json.dumps({"benchmark": "teacher_service", "hidden": args.hidden, "layers": args.layers,
                      "batch": args.batch, "requests": args.requests,
                      "encode_local_samples_per_s": round(enc_local, 2), "encode_service_samples_per_s": round(enc_remote, 2),
                      "encode_ratio": round(enc_remote / enc_local, 3),
                      "score_local_tokens_per_s": round(sc_local, 1), "score_service_tokens_per_s": round(sc_remote, 1),
                      "score_ratio": round(sc_remote / sc_local, 3)}))


if __name__ == "__main__":
    main()
