"""Time of one stage-2 training step with the teacher as a service vs the teacher in the trainer, in ONE run.

    python benchmarks/trainer_step.py [--steps 12] [--repeats 2] [--teacher-hidden 256] [--teacher-layers 4]
                                      [--delay-ms 20]

With ``--delay-ms D`` (default 20; 0 = off) three more sides run against the same server through a delaying TCP
proxy in this process (every byte forwarded D/2 ms late in each direction: a D ms round trip, bandwidth
unchanged): with the trainer's defaults (prefetch: the next step's Encode in flight while a step computes; Score
overlap: each micro-batch's Score in flight during the next micro-batch's forward), with ``--no-score-overlap``
and with ``--prefetch-steps 0`` (Score overlap still on), to show how much of the delay each hides.

Runs the real trainer CLI (``python -m student_trainer --stages 2``, ZeRO-3 DeepSpeed config, one process) on the
same tiny models, data and seed, alternately against a ``teacher_server`` subprocess on localhost
(``--teacher-addr``) and with the teacher in the trainer process (``--teacher-model``), in the order
remote, in-process, in-process, remote, ... so that machine-load drift hits both sides alike. Without --teacher /
--student, a tiny Qwen2-VL teacher (GPT-2 tokenizer) and a tiny InternVL student (Llama-2 tokenizer) are written to
a temp folder, with solid-colour training pictures like ``examples/colours.py``.

Per run, the step time is the median of ``step_time_s`` in ``OUT/metrics/stage2.jsonl`` over the steps after the
first (differences of the ``time`` column if a row lacks it); each side's figure is the median over its runs.
Reported: remote / in-process step time (target <= 1.03); each side's ``teacher_wait_share`` (share of the step
spent inside teacher calls: the teacher's compute, plus, when remote, the RPC boundary); the extra time inside
teacher calls of the remote step, ``wait_remote * T_remote - wait_local * T_local`` (this mixes the RPC cost with
a batching difference: the trainer sends a step's micro-batches to a remote teacher in one Encode, and encodes them
one by one in process); and the RPC boundary alone, from the SAME teacher calls of a step (one encode, two scores
per micro-batch, one release) timed through the client and in this process against the same server, as a share
of the remote step. Prints a table and one JSON line.

The trainer runs with its defaults: prefetch 1 step, both Recalibrator paths in one Score call per micro-batch,
that Score overlapped with the next micro-batch's forward.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from genrecal.tiny import TinySizes, write_tiny_checkpoint  # noqa: E402
from teacher_server.launch import TeacherProcess  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 40)}
ANSWERS = ("{c}", "it is {c}", "the picture is plain {c}", "{c}, all of it")


def write_data(root: Path, count: int) -> Path:
    """Solid-colour pictures with short answers of 1-5 words, as LLaVA JSON."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(count):
        name = list(COLOURS)[i % len(COLOURS)]
        pixels = np.clip(np.array(COLOURS[name]) + rng.integers(-25, 25, (64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        records.append({"id": f"colour-{i}", "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the picture?"},
            {"from": "gpt", "value": ANSWERS[i % len(ANSWERS)].format(c=name)}]})
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return path


def step_times(output: Path) -> tuple[list[float], list[float]]:
    """Per-step seconds and teacher_wait_share of every step after the first."""
    rows = [json.loads(line) for line in (output / "metrics" / "stage2.jsonl").read_text().splitlines() if line]
    times = [r.get("step_time_s") for r in rows]
    if any(t is None for t in times):  # older metrics: differences of the wall-clock column
        times = [None] + [b["time"] - a["time"] for a, b in zip(rows, rows[1:], strict=False)]
    return times[1:], [r["teacher_wait_share"] for r in rows[1:]]


def time_teacher_calls(remote, local, samples, grad_accum: int, micro_batch_size: int, steps: int) -> dict:
    """Seconds per step inside teacher calls, client vs in-process, with the SAME calls on both sides.

    A step's calls as the trainer makes them against a remote teacher: one encode of the step's samples, one
    score of both paths (L1 and L2) per micro-batch, one release. Alternates the sides step by step.
    """
    per_step = grad_accum * micro_batch_size
    generator = torch.Generator().manual_seed(0)
    totals: dict[str, list[float]] = {"remote": [], "in-process": []}
    for k in range(steps + 1):
        group = [samples[(k * per_step + i) % len(samples)] for i in range(per_step)]
        order = (("remote", remote), ("in-process", local)) if k % 2 == 0 else (("in-process", local), ("remote", remote))
        for side, teacher in order:
            start = time.perf_counter()
            features = teacher.encode(group)
            tokens = float(sum(f.num_answer_tokens for f in features))
            for m in range(grad_accum):
                batch = features[m * micro_batch_size:(m + 1) * micro_batch_size]
                outputs = {path: [torch.randn(f.num_answer_tokens, teacher.hidden_size, generator=generator)
                                  for f in batch] for path in ("L1", "L2")}
                teacher.score_paths(batch, outputs, normalizer=tokens)
            teacher.release(features)
            if k > 0:  # the first is a warm-up
                totals[side].append(time.perf_counter() - start)
    return {side: statistics.median(times) for side, times in totals.items()}


class DelayProxy:
    """A localhost TCP proxy to ``target_port`` that forwards every chunk ``one_way_s`` late in each direction.

    Chunks keep their order; the delay is added to each chunk's arrival time (latency, not a bandwidth limit).
    Runs an asyncio loop in a daemon thread; ``port`` is where to connect.
    """

    def __init__(self, target_port: int, one_way_s: float):
        import asyncio

        self.target_port, self.one_way_s = target_port, one_way_s
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        ready.wait()

    async def _handle(self, reader, writer) -> None:
        import asyncio

        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer),
                             return_exceptions=True)

    async def _pipe(self, source, sink) -> None:
        import asyncio

        queue: asyncio.Queue = asyncio.Queue()

        async def pump() -> None:
            try:
                while data := await source.read(1 << 16):
                    queue.put_nowait((self.loop.time() + self.one_way_s, data))
            finally:
                queue.put_nowait(None)

        pumping = asyncio.ensure_future(pump())
        try:
            while (item := await queue.get()) is not None:
                due, data = item
                if due > self.loop.time():
                    await asyncio.sleep(due - self.loop.time())
                sink.write(data)
                await sink.drain()
        finally:
            pumping.cancel()
            sink.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", help="teacher checkpoint (default: a tiny Qwen2-VL written to a temp folder)")
    parser.add_argument("--student", help="student checkpoint (default: a tiny InternVL written to a temp folder)")
    parser.add_argument("--teacher-hidden", type=int, default=256, help="tiny teacher hidden size (default 256)")
    parser.add_argument("--teacher-layers", type=int, default=4, help="tiny teacher layers (default 4)")
    parser.add_argument("--student-hidden", type=int, default=128, help="tiny student hidden size (default 128)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run; the first is not timed")
    parser.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step (default 2)")
    parser.add_argument("--micro-batch-size", type=int, default=2, help="samples per micro-batch (default 2)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side, interleaved (default 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP/torch threads of the trainer and of the server (default 1: on a 2-core machine "
                             "each process gets a core of its own)")
    parser.add_argument("--batch-wait-ms", default="5", help="the server's --batch-wait-ms (default: its default, 5)")
    parser.add_argument("--delay-ms", type=float, default=20.0,
                        help="round-trip delay of the proxied sides (default 20; 0 = no proxied sides)")
    args = parser.parse_args()

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".pytest_cache" / "d" / "torch_extensions"))
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the server subprocess inherits it

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher = args.teacher or write_tiny_checkpoint(
            "qwen2_vl", tmp / "teacher", tokenizer="gpt2",
            sizes=TinySizes(hidden_size=args.teacher_hidden, num_layers=args.teacher_layers, num_heads=8,
                            num_kv_heads=4, intermediate_size=4 * args.teacher_hidden))
        student = args.student or write_tiny_checkpoint(
            "internvl", tmp / "student", tokenizer="llama2",
            sizes=TinySizes(hidden_size=args.student_hidden, intermediate_size=4 * args.student_hidden))
        data = write_data(tmp / "data", 16)
        server = TeacherProcess(teacher, "--batch-wait-ms", args.batch_wait_ms)
        common = ["--student", student, "--data", data, "--stages", "2", "--steps-per-stage", args.steps,
                  "--grad-accum", args.grad_accum, "--micro-batch-size", args.micro_batch_size, "--seed", 0,
                  "--save-every", 10**6, "--no-tensorboard", "--dtype", "float32"]
        sides = {"remote": ["--teacher-addr", server.address], "in-process": ["--teacher-model", teacher]}
        proxy = None
        if args.delay_ms > 0:
            proxy = DelayProxy(int(server.address.rsplit(":", 1)[1]), args.delay_ms / 2000)
            delayed = ["--teacher-addr", f"127.0.0.1:{proxy.port}"]
            sides.update({"delayed": delayed, "delayed, no overlap": [*delayed, "--no-score-overlap"],
                          "delayed, no prefetch": [*delayed, "--prefetch-steps", "0"]})
        names = list(sides)
        order = [side for i in range(args.repeats) for side in (names if i % 2 == 0 else names[::-1])]
        calls: dict[str, float] = {}
        results: dict[str, list[tuple[float, float]]] = {side: [] for side in sides}
        losses: dict[str, list[float]] = {}
        try:
            for n, side in enumerate(order):
                output = tmp / f"run{n}-{side}"
                command = [sys.executable, "-m", "student_trainer", *sides[side], "--output", output, *common]
                start = time.perf_counter()
                result = subprocess.run(list(map(str, command)), cwd=REPO, env=env, capture_output=True, text=True)
                if result.returncode != 0:
                    raise SystemExit(f"{side} run failed:\n{result.stderr[-4000:]}")
                times, waits = step_times(output)
                results[side].append((statistics.median(times), statistics.median(waits)))
                rows = (output / "metrics" / "stage2.jsonl").read_text().splitlines()
                losses.setdefault(side, [json.loads(r)["loss"] for r in rows])
                print(f"run {n + 1}/{len(order)} {side:>20}: median step {1000 * results[side][-1][0]:7.1f} ms, "
                      f"teacher wait share {results[side][-1][1]:.3f} ({time.perf_counter() - start:.0f} s incl. "
                      "start-up)", flush=True)
            # The boundary alone: the same teacher calls through the client and in this process.
            from genrecal.resilient_teacher import open_teacher
            from student_trainer.data import load_dataset_samples

            torch.set_num_threads(args.threads)
            remote, local = open_teacher(addr=server.address), open_teacher(model=teacher)
            calls = time_teacher_calls(remote, local, load_dataset_samples(data)[0], args.grad_accum,
                                       args.micro_batch_size, args.steps)
            remote.close()
        finally:
            if proxy is not None:
                proxy.close()
            server.kill()

    med = statistics.median
    t_remote, t_local = med(t for t, _ in results["remote"]), med(t for t, _ in results["in-process"])
    w_remote, w_local = med(w for _, w in results["remote"]), med(w for _, w in results["in-process"])
    ratio = t_remote / t_local
    boundary = (w_remote * t_remote - w_local * t_local) / t_remote
    direct_ms = 1000 * (calls["remote"] - calls["in-process"])
    same_losses = bool(np.allclose(losses["remote"], losses["in-process"], rtol=1e-4))
    overlap_same = losses["delayed"] == losses["delayed, no overlap"] if "delayed" in losses else None  # exact
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads per process {args.threads}")
    print(f"teacher: Qwen2-VL hidden {args.teacher_hidden}, {args.teacher_layers} layers; student: InternVL hidden "
          f"{args.student_hidden}; stage 2, {args.grad_accum} x {args.micro_batch_size} samples per step, "
          f"{args.steps} steps per run (first not timed), {args.repeats} runs per side")
    print(f"{'':30}{'in-process':>12}{'remote':>12}{'ratio':>8}{'target':>9}")
    print(f"{'step time (ms, median)':30}{1000 * t_local:12.1f}{1000 * t_remote:12.1f}{ratio:8.3f}{'<= 1.03':>9}")
    print(f"{'teacher_wait_share':30}{w_local:12.3f}{w_remote:12.3f}")
    delayed = {}
    for side in ("delayed", "delayed, no overlap", "delayed, no prefetch"):
        if results.get(side):
            t, w = med(t for t, _ in results[side]), med(w for _, w in results[side])
            delayed[side] = (t, w)
            print(f"{side + f' (+{args.delay_ms:g} ms RTT)':30}{'':12}{1000 * t:12.1f}{t / t_local:8.3f}"
                  f"   teacher_wait_share {w:.3f}")
    print(f"extra teacher-call time of the remote step (from the metrics): {1000 * boundary * t_remote:.1f} ms "
          f"= {boundary:.3f} of the step (remote sends a step's micro-batches in one Encode; in-process encodes "
          "them one by one)")
    print(f"same calls timed directly, per step: client {1000 * calls['remote']:.1f} ms, in-process "
          f"{1000 * calls['in-process']:.1f} ms -> RPC boundary {direct_ms:.1f} ms = "
          f"{direct_ms / (1000 * t_remote):.3f} of the remote step")
    print(f"per-run medians (ms): remote {[round(1000 * t, 1) for t, _ in results['remote']]}, "
          f"in-process {[round(1000 * t, 1) for t, _ in results['in-process']]}; same losses: {same_losses}; "
          f"overlap gives the no-overlap losses exactly: {overlap_same}")
    print(json.dumps({
        "benchmark": "trainer_step", "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "teacher_hidden": args.teacher_hidden, "teacher_layers": args.teacher_layers,
        "student_hidden": args.student_hidden, "grad_accum": args.grad_accum,
        "micro_batch_size": args.micro_batch_size, "steps": args.steps, "repeats": args.repeats,
        "threads": args.threads, "batch_wait_ms": float(args.batch_wait_ms),
        "step_ms_in_process": round(1000 * t_local, 1), "step_ms_remote": round(1000 * t_remote, 1),
        "ratio": round(ratio, 3), "teacher_wait_share_in_process": round(w_local, 3),
        "teacher_wait_share_remote": round(w_remote, 3), "extra_teacher_call_share": round(boundary, 3),
        "calls_ms_per_step_client": round(1000 * calls["remote"], 1),
        "calls_ms_per_step_in_process": round(1000 * calls["in-process"], 1),
        "rpc_boundary_ms_per_step": round(direct_ms, 1), "rpc_boundary_share": round(direct_ms / (1000 * t_remote), 3),
        "runs_remote_ms": [round(1000 * t, 1) for t, _ in results["remote"]],
        "runs_in_process_ms": [round(1000 * t, 1) for t, _ in results["in-process"]],
        "same_losses": same_losses, "overlap_same_losses": overlap_same, "delay_ms": args.delay_ms,
        "delayed": {side: {"step_ms": round(1000 * t, 1), "ratio": round(t / t_local, 3),
                           "teacher_wait_share": round(w, 3),
                           "runs_ms": [round(1000 * x, 1) for x, _ in results[side]]}
                    for side, (t, w) in delayed.items()},
    }))


if __name__ == "__main__":
    main()
