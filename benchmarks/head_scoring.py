"""Benchmark teacher-head scoring (CE + KL + dL/dinputs): chunked ``score_with_head`` vs plain autograd.

    python benchmarks/head_scoring.py                      # CUDA if available (Qwen2.5-72B head size), else CPU
    python benchmarks/head_scoring.py --device cpu         # scaled-down size that runs in well under a minute
    python benchmarks/head_scoring.py --chunk-size 512 --compile

Reports tokens/s and extra peak memory over the inputs for ``reference_head_loss`` (full logits, autograd),
``score_with_head`` and, for context, three bare GEMMs (student logits, teacher logits, gradient) — the floor
any implementation pays. Ends with a table and one JSON line.

Then the bf16 / fp32 ratio line: ``score_with_head`` (CE + KL + gradient) in bf16 against fp32 at Qwen2-VL-2B's
head (V=151,936, D=1,536) for 16, 128 and 512 rows (``--ratio-rows``; "" skips it), timed alternately in one
process (the minimum of ``--repeats``). On a CPU it is printed twice: with the GEMMs this CPU runs for bf16
(oneDNN, where the CPU has AVX-512) and with oneDNN switched off, which is what a CPU without AVX-512 runs
(PyTorch's reference kernel for bf16 GEMMs; scoring then upcasts blocks of the head, see
``genrecal/head_scoring.py``). Both ratios also go into the JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from genrecal.head_scoring import native_head_gemm, reference_head_loss, score_with_head

# Qwen2.5-72B's LM head and a typical answer-token batch.
FULL_SIZE = {"vocab": 152064, "hidden": 8192, "tokens": 2048, "chunk_size": 1024}
# CPU default: vocab and hidden / 8, tokens / 4, chunk / 8 (4 chunks).
CPU_SIZE = {"vocab": 152064 // 8, "hidden": 8192 // 8, "tokens": 512, "chunk_size": 128}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# The bf16 / fp32 ratio line: Qwen2-VL-2B's head (the real-width teacher).
RATIO_SIZE = {"vocab": 151936, "hidden": 1536}
GIB = 1024**3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where to run (default: cuda if available)",
    )
    parser.add_argument("--vocab", type=int, help="head rows V (default: 152064 on cuda, 19008 on cpu)")
    parser.add_argument("--hidden", type=int, help="head width D (default: 8192 on cuda, 1024 on cpu)")
    parser.add_argument(
        "--tokens", type=int, help="answer tokens N scored per call (default: 2048 cuda, 512 cpu)"
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="bf16", help="head/input dtype (default bf16)"
    )
    parser.add_argument(
        "--chunk-size", type=int, help="score_with_head chunk size (default: 1024 cuda, 128 cpu)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed calls per method; the median is reported"
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile score_with_head's per-chunk kernel"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the random head and inputs")
    parser.add_argument(
        "--ratio-rows",
        default="16,128,512",
        help="comma-separated row counts for the bf16 / fp32 ratio line at V=151936, D=1536 ('' skips it)",
    )
    return parser.parse_args()


def make_inputs(vocab: int, hidden: int, tokens: int, dtype: torch.dtype, device: str, seed: int) -> dict:
    """Random head with logits of a few units' spread; teacher states near the inputs so KL is moderate."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    inputs = 3 * randn(tokens, hidden)
    return {
        "head_weight": (randn(vocab, hidden) / hidden**0.5).to(dtype),
        "inputs": inputs.to(dtype),
        "labels": torch.randint(0, vocab, (tokens,), generator=gen, device=device),
        "teacher_states": (inputs + randn(tokens, hidden)).to(dtype),
    }


def three_matmuls(head_weight, inputs, labels, teacher_states, chunk_size):
    """The GEMMs every implementation needs: student logits, teacher logits, dlogits @ W."""
    for start in range(0, inputs.shape[0], chunk_size):
        logits = inputs[start : start + chunk_size] @ head_weight.T  # (C, V)
        teacher_logits = teacher_states[start : start + chunk_size] @ head_weight.T  # (C, V)
        logits @ head_weight  # (C, D); the student logits stand in for dlogits
        del logits, teacher_logits


def dtype_ratios(device: str, rows_list: list[int], repeats: int, seed: int) -> dict[int, float]:
    """``{rows: bf16 seconds / fp32 seconds}`` of ``score_with_head`` at :data:`RATIO_SIZE`, chunk 512.

    The two dtypes are timed alternately (each the minimum over ``repeats`` calls), so load from other processes
    hits both alike.
    """
    vocab, hidden = RATIO_SIZE["vocab"], RATIO_SIZE["hidden"]
    ratios = {}
    for rows in rows_list:
        cases = {name: make_inputs(vocab, hidden, rows, dtype, device, seed) for name, dtype in DTYPES.items()}
        best = {name: float("inf") for name in cases}
        for case in cases.values():  # warm-up
            score_with_head(**case, chunk_size=512)
        for _ in range(repeats):
            for name, case in cases.items():
                sync(device)
                start = time.perf_counter()
                score_with_head(**case, chunk_size=512)
                sync(device)
                best[name] = min(best[name], time.perf_counter() - start)
        ratios[rows] = best["bf16"] / best["fp32"]
        del cases
    return ratios


def ratio_line(label: str, ratios: dict[int, float]) -> str:
    cells = ", ".join(f"{rows} rows {ratio:.2f}x" for rows, ratio in ratios.items())
    return f"bf16 / fp32 seconds, V={RATIO_SIZE['vocab']} D={RATIO_SIZE['hidden']}, {label}: {cells}"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device: str, repeats: int) -> float:
    fn()  # warm-up (and compilation, with --compile)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_extra_bytes(fn, device: str) -> int:
    """Peak bytes allocated by ``fn`` above what was live before it (inputs excluded, its outputs included).

    CUDA: ``torch.cuda.max_memory_allocated`` delta. CPU: replay of the torch profiler's allocation trace
    (every +alloc/-free of torch's CPU allocator in time order) — torch tensors only, not RSS.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocations = []

    def walk(node):
        if node.tag == torch._C._profiler._EventType.Allocation:
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    live = peak = 0
    for _, size in sorted(allocations):
        live += size
        peak = max(peak, live)
    return peak


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "cpu"
    return f"{model}, {os.cpu_count()} cores"


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    defaults = FULL_SIZE if args.device == "cuda" else CPU_SIZE
    vocab = args.vocab or defaults["vocab"]
    hidden = args.hidden or defaults["hidden"]
    tokens = args.tokens or defaults["tokens"]
    chunk_size = args.chunk_size or defaults["chunk_size"]
    dtype = DTYPES[args.dtype]
    full_size = (vocab, hidden, tokens) == (FULL_SIZE["vocab"], FULL_SIZE["hidden"], FULL_SIZE["tokens"])

    machine = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    print(f"device: {args.device} ({machine}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"size: vocab {vocab}, hidden {hidden}, tokens {tokens}, {args.dtype}, chunk_size {chunk_size}")
    if not full_size:
        print(
            f"NOTE: scaled down from Qwen2.5-72B's head (vocab {FULL_SIZE['vocab']}, hidden {FULL_SIZE['hidden']}, "
            f"{FULL_SIZE['tokens']} tokens); numbers are not comparable with the GPU targets"
        )
    memory_method = (
        "torch.cuda.max_memory_allocated delta" if args.device == "cuda" else "torch profiler trace"
    )
    print(f"memory: extra peak over the inputs, {memory_method}")

    case = make_inputs(vocab, hidden, tokens, dtype, args.device, args.seed)
    methods = {
        "reference_head_loss": lambda: reference_head_loss(**case),
        "score_with_head": lambda: score_with_head(**case, chunk_size=chunk_size, compile=args.compile),
        "three matmuls (floor)": lambda: three_matmuls(**case, chunk_size=chunk_size),
    }
    results = {}
    for name, fn in methods.items():
        seconds = median_seconds(fn, args.device, args.repeats)
        extra = peak_extra_bytes(fn, args.device) if name != "three matmuls (floor)" else None
        results[name] = {"seconds": seconds, "tokens_per_s": tokens / seconds, "extra_bytes": extra}

    want, got = reference_head_loss(**case), methods["score_with_head"]()
    grad_diff = (got.grad_inputs.float() - want.grad_inputs.float()).abs().max().item()
    grad_scale = want.grad_inputs.float().abs().max().item()
    ce_diff, kl_diff = (got.ce - want.ce).abs().item(), (got.kl - want.kl).abs().item()

    ref, chunked = results["reference_head_loss"], results["score_with_head"]
    speed_ratio = chunked["tokens_per_s"] / ref["tokens_per_s"]
    memory_ratio = chunked["extra_bytes"] / ref["extra_bytes"]
    print()
    print(f"{'method':<24}{'ms/call':>10}{'tokens/s':>12}{'extra peak':>14}")
    for name, row in results.items():
        extra = "-" if row["extra_bytes"] is None else f"{row['extra_bytes'] / GIB:.3f} GiB"
        print(f"{name:<24}{row['seconds'] * 1e3:>10.1f}{row['tokens_per_s']:>12.0f}{extra:>14}")
    print(f"{'chunked / reference':<24}{'':>10}{speed_ratio:>11.2f}x{memory_ratio:>13.3f}x")
    print(
        f"agreement: ce {want.ce.item():.4f} (|diff| {ce_diff:.2e}), kl {want.kl.item():.4f} (|diff| {kl_diff:.2e}), "
        f"max |grad diff| {grad_diff:.2e} (max |grad| {grad_scale:.2e})"
    )
    ratio_rows = [int(r) for r in args.ratio_rows.split(",") if r.strip()]
    ratios = {}
    if ratio_rows:
        probe = torch.empty(0, dtype=torch.bfloat16, device=args.device)
        routes = {"native": f"the GEMMs this {args.device} runs (bf16 GEMMs native: {native_head_gemm(probe)})"}
        if args.device == "cpu":
            routes["no_onednn"] = "oneDNN off, as on a CPU without AVX-512 (bf16 scored on upcast blocks)"
        for route, label in routes.items():
            with torch.backends.mkldnn.flags(enabled=route != "no_onednn"):
                ratios[route] = dtype_ratios(args.device, ratio_rows, args.repeats, args.seed)
            print(ratio_line(label, ratios[route]))
    print(
        json.dumps(
            {
                "benchmark": "head_scoring",
                "device": args.device,
                "machine": machine,
                "vocab": vocab,
                "hidden": hidden,
                "tokens": tokens,
                "dtype": args.dtype,
                "chunk_size": chunk_size,
                "compile": args.compile,
                "repeats": args.repeats,
                "memory_method": memory_method,
                "reference_tokens_per_s": round(ref["tokens_per_s"], 1),
                "chunked_tokens_per_s": round(chunked["tokens_per_s"], 1),
                "floor_tokens_per_s": round(results["three matmuls (floor)"]["tokens_per_s"], 1),
                "speed_ratio": round(speed_ratio, 3),
                "reference_extra_gib": round(ref["extra_bytes"] / GIB, 4),
                "chunked_extra_gib": round(chunked["extra_bytes"] / GIB, 4),
                "memory_ratio": round(memory_ratio, 4),
                "max_abs_grad_diff": grad_diff,
                "max_abs_grad": grad_scale,
                "ce_abs_diff": ce_diff,
                "kl_abs_diff": kl_diff,
                "bf16_over_fp32_seconds": {
                    route: {str(rows): round(ratio, 3) for rows, ratio in by_rows.items()}
                    for route, by_rows in ratios.items()
                },
            }
        )
    )


if __name__ == "__main__":
    main()
