"""Time from launch to the first optimizer step, and peak memory, of the trainer on 2,000 vs 200,000 records.

    python benchmarks/data_scale.py [--small 2000] [--large 200000] [--images 64] [--repeats 2] [--workers 2]

Writes LLaVA-style JSONL data sets of ``--small`` and ``--large`` records over ONE pool of ``--images`` JPEG files,
then runs the real trainer CLI (``python -m student_trainer --stages 3``, one process = one rank, ZeRO-3 default
config, a tiny InternVL student written to a temp folder) for one optimizer step on each, interleaved
(small, large, large, small, ...). Per run: the seconds from launching the process to the first metrics row
(written right after the first optimizer step), and the peak resident memory of the process tree (the trainer and
its DataLoader workers; psutil, sampled every 20 ms) and of the trainer process alone. Prints a table (medians
over runs) and one JSON line. Targets (issue 10): large / small time <= 1.5, large - small peak RSS <= 1 GiB.
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
import psutil
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from genrecal.tiny import write_tiny_checkpoint  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 40)}


def write_pool(folder: Path, count: int) -> list[str]:
    """``count`` 64x64 noisy solid-colour JPEGs; returns their names (relative to the data files)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(count):
        colour = list(COLOURS)[i % len(COLOURS)]
        pixels = np.clip(np.array(COLOURS[colour]) + rng.integers(-25, 25, (64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
        names.append(f"{folder.name}/{i}.jpg")
    return names


def write_jsonl(path: Path, records: int, images: list[str]) -> Path:
    colours = list(COLOURS)
    with path.open("w") as f:
        for i in range(records):
            k = i % len(images)
            f.write(json.dumps({"id": f"r{i}", "image": images[k], "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is the picture?"},
                {"from": "gpt", "value": f"it is {colours[k % len(colours)]}"}]}) + "\n")
    return path


class PeakRss:
    """Peak RSS (bytes) of a process and of its whole tree, sampled in a thread."""

    def __init__(self, pid: int, every_s: float = 0.02):
        self.process = psutil.Process(pid)
        self.every_s = every_s
        self.tree = self.own = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                own = self.process.memory_info().rss
                children = sum(c.memory_info().rss for c in self.process.children(recursive=True)
                               if c.is_running())
            except psutil.Error:
                own, children = 0, 0
            self.own, self.tree = max(self.own, own), max(self.tree, own + children)
            self._stop.wait(self.every_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_once(data: Path, student: Path, output: Path, env: dict, workers: int) -> dict:
    command = [sys.executable, "-m", "student_trainer", "--stages", "3", "--student", str(student),
               "--data", str(data), "--output", str(output), "--steps-per-stage", "1", "--grad-accum", "1",
               "--micro-batch-size", "1", "--save-every", "1000000", "--no-tensorboard", "--dtype", "float32",
               "--data-workers", str(workers)]
    start = time.time()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    rss = PeakRss(process.pid)
    metrics = output / "metrics" / "stage3.jsonl"
    first_step = None
    while process.poll() is None:
        if first_step is None and metrics.is_file() and metrics.read_text().strip():
            first_step = json.loads(metrics.read_text().splitlines()[0])["time"]
        time.sleep(0.02)
    rss.stop()
    stderr = process.stderr.read()
    if process.returncode != 0:
        raise SystemExit(f"trainer failed on {data}:\n{stderr[-4000:]}")
    if first_step is None:
        first_step = json.loads(metrics.read_text().splitlines()[0])["time"]
    return {"first_step_s": first_step - start, "peak_rss_tree": rss.tree, "peak_rss_trainer": rss.own}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=2000, help="records of the small data set (default 2000)")
    parser.add_argument("--large", type=int, default=200_000, help="records of the large data set (default 200000)")
    parser.add_argument("--images", type=int, default=64, help="JPEG files both data sets share (default 64)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per data set, interleaved (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="the trainer's --data-workers (default 2)")
    args = parser.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".pytest_cache" / "d" / "torch_extensions"))
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        student = write_tiny_checkpoint("internvl", tmp / "student", tokenizer="llama2")
        pool = write_pool(tmp / "images", args.images)
        sets = {"small": write_jsonl(tmp / "small.jsonl", args.small, pool),
                "large": write_jsonl(tmp / "large.jsonl", args.large, pool)}
        run_once(sets["small"], student, tmp / "warm-up", env, args.workers)  # caches, compiled ops, page cache
        order = [name for i in range(args.repeats) for name in (("small", "large") if i % 2 == 0 else
                                                                   ("large", "small"))]
        results: dict[str, list[dict]] = {"small": [], "large": []}
        for n, name in enumerate(order):
            result = run_once(sets[name], student, tmp / f"run{n}", env, args.workers)
            results[name].append(result)
            print(f"run {n + 1}/{len(order)} {name:>5} ({sets[name].stat().st_size / 2**20:6.1f} MiB JSONL): first "
                  f"step after {result['first_step_s']:5.1f} s, peak RSS {result['peak_rss_tree'] / 2**30:.2f} GiB "
                  f"(trainer alone {result['peak_rss_trainer'] / 2**30:.2f} GiB)", flush=True)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    time_ratio = med("large", "first_step_s") / med("small", "first_step_s")
    rss_delta = (med("large", "peak_rss_tree") - med("small", "peak_rss_tree")) / 2**30
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.workers} data workers; one rank")
    print(f"{'':34}{'small':>10}{'large':>10}{'large/small':>13}{'target':>10}")
    print(f"{'records':34}{args.small:>10}{args.large:>10}")
    print(f"{'launch -> first step (s, median)':34}{med('small', 'first_step_s'):10.1f}"
          f"{med('large', 'first_step_s'):10.1f}{time_ratio:13.2f}{'<= 1.5':>10}")
    print(f"{'peak RSS, tree (GiB, median)':34}{med('small', 'peak_rss_tree') / 2**30:10.2f}"
          f"{med('large', 'peak_rss_tree') / 2**30:10.2f}{rss_delta:+13.2f}{'<= +1':>10}")
    print(f"{'peak RSS, trainer (GiB, median)':34}{med('small', 'peak_rss_trainer') / 2**30:10.2f}"
          f"{med('large', 'peak_rss_trainer') / 2**30:10.2f}")
    print(json.dumps({
        "benchmark": "data_scale", "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "small": args.small, "large": args.large, "images": args.images, "workers": args.workers,
        "repeats": args.repeats, "time_ratio": round(time_ratio, 3), "rss_delta_gib": round(rss_delta, 3),
        "runs": {name: [{k: round(v, 3) if k == "first_step_s" else v for k, v in r.items()} for r in runs]
                 for name, runs in results.items()},
    }))


if __name__ == "__main__":
    main()
