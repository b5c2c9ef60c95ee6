"""One teacher shared by several students on the same data (Encode cache), and two replicas vs one.

    python benchmarks/shared_teacher.py [--students 4] [--steps 6] [--batch 4] [--hidden 96]

A tiny Qwen2-VL teacher (GPT-2 tokenizer) is written to a temp folder and served by real gRPC servers
(``create_server`` with an in-process ``TeacherEngine``, so that its forward counter can be read). Students are
threads with their own ``TeacherClient``, in lockstep (a barrier per step), each encoding one step's batch and
releasing it.

1. Shared data: ``--students`` students encode the SAME batches; with the Encode cache off the teacher runs one
   forward per student and step, with it on about 1/students of that. Reports forwards and aggregate samples/s,
   and one student alone for reference.
2. Replicas: the same students on DIFFERENT data (cache off) against one server, then against two (one engine
   each, ``genrecal.replicas.ReplicatedTeacher``): aggregate Encode samples/s. On a CPU-only machine the two
   engines share the same cores, so this measures the overhead of the replica client, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genrecal.client import TeacherClient  # noqa: E402
from genrecal.replicas import ReplicatedTeacher  # noqa: E402
from genrecal.sample import Sample, Turn  # noqa: E402
from genrecal.tiny import TinySizes, write_tiny_checkpoint  # noqa: E402
from teacher_server.config import EngineConfig  # noqa: E402
from teacher_server.engine import TeacherEngine  # noqa: E402
from teacher_server.server import create_server  # noqa: E402

WORDS = ["red", "blue", "green", "circle", "square", "small", "large"]


def batches(seed: int, steps: int, batch: int) -> list[list[Sample]]:
    rng = np.random.default_rng(seed)
    return [[Sample(f"{seed}-{t}-{i}", [Turn("user", "<image>\nWhat is shown?"),
                                        Turn("assistant", " ".join(rng.choice(WORDS, int(rng.integers(1, 4)))))],
                    [Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8))]) for i in range(batch)]
            for t in range(steps)]


class Served:
    """``TeacherEngine`` instances behind real gRPC servers on free localhost ports."""

    def __init__(self, model: Path, replicas: int, *, cache_bytes: int):
        self.engines = [TeacherEngine(EngineConfig(model, encode_cache_bytes=cache_bytes)) for _ in range(replicas)]
        self.servers = [create_server("127.0.0.1", 0, engine=e) for e in self.engines]
        self.addresses = [f"127.0.0.1:{s.port}" for s in self.servers]

    @property
    def forwards(self) -> int:
        return sum(e.stats.forwards for e in self.engines)

    @property
    def samples_forwarded(self) -> int:
        """Samples that went through the teacher body (the batcher merges concurrent requests into forwards)."""
        return sum(sum(e.stats.samples_per_forward) for e in self.engines)

    def close(self) -> None:
        for server in self.servers:
            server.shutdown(1.0)


def clients(addresses: list[str]):
    """A factory of one student's client: plain for one address, ``ReplicatedTeacher`` for several."""
    if len(addresses) == 1:
        return lambda: TeacherClient(addresses[0])
    return lambda: ReplicatedTeacher(addresses, retries=1)


def lockstep(make_client, data: list[list[list[Sample]]], on_held=None) -> float:
    """Students (one per entry of ``data``) encode their batches step by step; returns wall seconds.

    With ``on_held``, every step also waits until all students hold their handles and calls ``on_held()`` once
    (in one thread) before they release them."""
    barrier = threading.Barrier(len(data))
    held = threading.Barrier(len(data), action=on_held) if on_held is not None else None
    errors = []

    def student(batches_):
        client = make_client()
        try:
            for batch in batches_:
                barrier.wait()
                features = client.encode(batch)
                if held is not None:
                    held.wait()
                client.release(features)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            barrier.abort()
            if held is not None:
                held.abort()
        finally:
            client.close()

    threads = [threading.Thread(target=student, args=(d,)) for d in data]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", type=int, default=4, help="concurrent students (default %(default)s)")
    parser.add_argument("--steps", type=int, default=6, help="lockstep steps per student (default %(default)s)")
    parser.add_argument("--batch", type=int, default=4, help="samples per step and student (default %(default)s)")
    parser.add_argument("--hidden", type=int, default=96, help="teacher hidden size (default %(default)s)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = write_tiny_checkpoint("qwen2_vl", Path(tempfile.mkdtemp()) / "teacher",
                                  sizes=TinySizes(hidden_size=args.hidden, intermediate_size=2 * args.hidden))
    shared = batches(0, args.steps, args.batch)
    samples_per_student = args.steps * args.batch
    report = {"machine": f"{platform.node()} ({os.cpu_count()} cores)", "date": time.strftime("%Y-%m-%d"),
              "args": vars(args)}

    for name, cache_bytes in (("cache_off", 0), ("cache_on", 1 << 30)):
        served = Served(model, 1, cache_bytes=cache_bytes)
        try:
            make_client = clients(served.addresses)
            lockstep(make_client, [batches(99, 1, args.batch)])  # warm-up
            base, base_samples = served.forwards, served.samples_forwarded
            seconds = lockstep(make_client, [shared] * args.students)
            report[name] = {"forwards": served.forwards - base, "samples_forwarded": served.samples_forwarded - base_samples,
                            "seconds": seconds,
                            "aggregate_samples_per_s": args.students * samples_per_student / seconds}
            # Untimed: the handle store while every student holds one step (memory held vs charged to clients).
            peak = {"held": 0, "charged": 0}

            def observe(engine=served.engines[0], peak=peak):
                stats = engine.stats
                peak["held"] = max(peak["held"], stats.handle_bytes)
                peak["charged"] = max(peak["charged"], stats.handle_charged_bytes)

            lockstep(make_client, [shared] * args.students, on_held=observe)
            report[name].update(handle_bytes_held=peak["held"], handle_bytes_charged=peak["charged"])
            if name == "cache_off":
                one = lockstep(make_client, [batches(1, args.steps, args.batch)])
                report["one_student_samples_per_s"] = samples_per_student / one
        finally:
            served.close()

    distinct = [batches(10 + k, args.steps, args.batch) for k in range(args.students)]
    for replicas in (1, 2):
        served = Served(model, replicas, cache_bytes=0)
        try:
            make_client = clients(served.addresses)
            lockstep(make_client, [batches(98, 1, args.batch)] * args.students)  # warm-up
            seconds = lockstep(make_client, distinct)
            report[f"replicas_{replicas}"] = {"seconds": seconds, "forwards": served.forwards,
                                              "aggregate_samples_per_s": args.students * samples_per_student / seconds}
        finally:
            served.close()

    off, on = report["cache_off"], report["cache_on"]
    print(f"{args.students} students x {args.steps} steps x {args.batch} samples, same data:")
    print(f"  teacher forwards  cache off {off['forwards']:4d}   cache on {on['forwards']:4d}   "
          f"(ratio {on['forwards'] / off['forwards']:.2f})")
    print(f"  samples through the body  cache off {off['samples_forwarded']:4d}   cache on {on['samples_forwarded']:4d}   "
          f"(ratio {on['samples_forwarded'] / off['samples_forwarded']:.2f}, ideal {1 / args.students:.2f})")
    print(f"  handle store while all hold a step: memory held  cache off {off['handle_bytes_held']:,} B   cache on "
          f"{on['handle_bytes_held']:,} B (ratio {on['handle_bytes_held'] / off['handle_bytes_held']:.2f}); charged "
          f"to the clients {off['handle_bytes_charged']:,} / {on['handle_bytes_charged']:,} B")
    print(f"  aggregate samples/s  cache off {off['aggregate_samples_per_s']:.1f}   cache on "
          f"{on['aggregate_samples_per_s']:.1f}   one student alone {report['one_student_samples_per_s']:.1f}")
    r1, r2 = report["replicas_1"], report["replicas_2"]
    print(f"different data, cache off: aggregate Encode samples/s  1 replica {r1['aggregate_samples_per_s']:.1f}   "
          f"2 replicas {r2['aggregate_samples_per_s']:.1f}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
