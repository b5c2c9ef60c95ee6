"""GPU check of the vLLM backend: both backends in bf16 on one random-weight checkpoint of a ~1.5B shape.

    python benchmarks/vllm_gpu_check.py --out $OUT [--samples 64] [--repeats 3] [--skip-head-scoring]

Prepared for the lent GPU machine (one H100/H200); NOT run yet (no GPU in the session that wrote it). Needs vLLM
(CUDA build) and this project importable. It writes a random Qwen2-VL checkpoint (hidden 1536, 28 layers, 12 heads,
2 KV heads, intermediate 8960: the text shape of Qwen2-VL-2B; GPT-2 tokenizer) under --out, then runs the
transformers engine and the vLLM engine (separately, one after the other, freeing the GPU in between) on the same
samples, and reports: the features' agreement (max |diff| relative to the features' max |value|, answer token
ids equal) and Encode tokens/s of each. Then, unless --skip-head-scoring, it runs
`benchmarks/head_scoring.py` at full size (vocab 152,064 x hidden 8,192 x 2,048 tokens; H200 target >= 85k
tokens/s with <= 1.5 GiB extra). A short table is printed last; details go to --out/vllm_gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genrecal.sample import Sample, Turn  # noqa: E402
from genrecal.tiny import TinySizes, write_tiny_checkpoint  # noqa: E402
from teacher_server.config import EngineConfig, VllmOptions  # noqa: E402
from teacher_server.engine import TeacherEngine  # noqa: E402

SHAPE = TinySizes(hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2, intermediate_size=8960,
                  vision_hidden_size=1280, vision_layers=4, vision_heads=16, image_size=448)


def make_samples(n: int, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "green", "circle", "square", "small", "large", "left", "right"]
    return [Sample(f"s{i}", [Turn("user", "<image>\n" + " ".join(rng.choice(words, 12)) + "?"),
                             Turn("assistant", " ".join(rng.choice(words, int(rng.integers(8, 32)))))],
                   [Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8))]) for i in range(n)]


def run_backend(path: Path, backend: str, samples: list[Sample], repeats: int) -> tuple[list, float, int]:
    config = EngineConfig(path, dtype="bfloat16", backend=backend, encode_cache_bytes=0, max_batch_tokens=65536,
                          vllm=VllmOptions(gpu_memory_utilization=0.6, max_model_len=4096) if backend == "vllm" else None)
    engine = TeacherEngine(config)
    try:
        features = engine.encode(samples, return_question_features=True)  # warm-up, and the compared features
        engine.release([f.handle for f in features])
        tokens = sum(sum(s.shape[0] for s in f.answer_segments + f.question_segments) for f in features)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            engine.release([f.handle for f in engine.encode(samples)])
        seconds = time.perf_counter() - start
    finally:
        engine.close()
        torch.cuda.empty_cache()
    return features, tokens * repeats / seconds, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the checkpoint and the JSON report")
    parser.add_argument("--samples", type=int, default=64, help="samples per Encode")
    parser.add_argument("--repeats", type=int, default=3, help="timed Encodes per backend")
    parser.add_argument("--skip-head-scoring", action="store_true", help="do not run benchmarks/head_scoring.py")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = write_tiny_checkpoint("qwen2_vl", out / "qwen2vl-1.5b-random", sizes=SHAPE)
    samples = make_samples(args.samples)
    results = {}
    for backend in ("transformers", "vllm"):
        features, tokens_per_s, tokens = run_backend(path, backend, samples, args.repeats)
        results[backend] = dict(features=features, tokens_per_s=tokens_per_s, tokens=tokens)
    reference, got = results["transformers"]["features"], results["vllm"]["features"]
    ids_equal = all(torch.equal(a.answer_token_ids, b.answer_token_ids) for a, b in zip(reference, got, strict=True))
    worst = 0.0
    for a, b in zip(reference, got, strict=True):
        for x, y in zip(a.answer_segments + a.question_segments, b.answer_segments + b.question_segments, strict=True):
            worst = max(worst, ((x.float() - y.float()).abs().max() / x.float().abs().max().clamp_min(1e-6)).item())
    report = {
        "device": torch.cuda.get_device_name(0), "shape": vars(SHAPE), "samples": args.samples,
        "answer_token_ids_equal": ids_equal, "max_rel_feature_diff": worst,
        "encode_tokens_per_s": {k: v["tokens_per_s"] for k, v in results.items()},
    }
    if not args.skip_head_scoring:
        head = subprocess.run([sys.executable, str(Path(__file__).parent / "head_scoring.py")], capture_output=True,
                              text=True)
        report["head_scoring"] = {"returncode": head.returncode, "stdout_tail": head.stdout[-4000:],
                                  "stderr_tail": head.stderr[-2000:]}
    (out / "vllm_gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'check':36s} value")
    print(f"{'answer token ids equal':36s} {ids_equal}")
    print(f"{'max |diff| / max |feature| (bf16)':36s} {worst:.3g}")
    for backend, value in report["encode_tokens_per_s"].items():
        print(f"{'Encode tokens/s ' + backend:36s} {value:,.0f}")
    if "head_scoring" in report:
        print(f"{'head_scoring.py exit code':36s} {report['head_scoring']['returncode']}")


if __name__ == "__main__":
    main()
