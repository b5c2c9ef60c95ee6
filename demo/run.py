"""The embedded default, end to end on the CPU: ``python -m demo.run``.

1. converts easy-VQA (installed offline from PyPI) to the project's LLaVA JSON format;
2. rebuilds the demo teacher and base student from their shipped pre-trained weights (:mod:`demo.models`: a
   Qwen2-VL with the GPT-2 tokenizer that sees, pre-trained on easy-VQA's training split with its vision tower,
   and an InternVL with the Llama-2 tokenizer pre-trained on a warm-up pool of every 4th training picture);
   the distillation data are the questions about the other pictures (:mod:`demo.splits`);
3. starts the teacher server (``python -m teacher_server``) on a free localhost port;
4. runs the student trainer (``python -m student_trainer --teacher-addr ...``) through stages 1-3 against it;
5. evaluates the teacher, the student before and the student after on the test split, prints a table, and draws
   the loss curves (per stage, by the trainer) and the paper's Fig. 7 alignment check.

Everything lands under ``--workdir`` (default ``runs/demo``); the data, the teacher and the base student are cached there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from demo.easy_vqa import convert_easy_vqa
from demo.models import prepare_models
from demo.splits import write_splits
from teacher_server.launch import TeacherProcess


def alignment_pairs(test_json: Path, out: Path) -> Path:
    """The first test question of every distinct answer (13 for easy-VQA), for the Fig. 7 check: pairs that share
    an answer have near-identical Recalibrator outputs, which would show as blocks instead of the diagonal."""
    seen: dict[str, dict] = {}
    for record in json.loads(test_json.read_text(encoding="utf-8")):
        seen.setdefault(record["conversations"][-1]["value"], record)
    out.write_text(json.dumps(list(seen.values())))
    return out


# The trainer's per-stage tqdm bars ("stage 1 (alignment):  40%|...| 40/100 [...]"): shown on the terminal.
PROGRESS_BAR = re.compile(rb"^stage \d+ \([a-z]+\): +\d+%\|")


def _run(cmd: list[str], log: Path) -> None:
    """Run ``cmd`` with its whole output in ``log``; its progress bars also go to stderr, one line per stage."""
    print("$ " + " ".join(cmd) + f"   (log: {log})", flush=True)
    shown, rest = None, b""
    with open(log, "wb") as f, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                env=dict(os.environ, HF_HUB_OFFLINE="1")) as proc:
        for chunk in iter(lambda: proc.stdout.read1(1 << 16), b""):
            f.write(chunk)
            *segments, rest = re.split(rb"[\r\n]", rest + chunk)  # tqdm redraws a line with \r
            for segment in filter(PROGRESS_BAR.match, segments):
                stage = segment.split(b":", 1)[0]
                if shown is not None and stage != shown:
                    sys.stderr.write("\n")  # the next stage's bar on a line of its own
                sys.stderr.write("\r" + segment.decode(errors="replace"))
                sys.stderr.flush()
                shown = stage
    if shown is not None:
        sys.stderr.write("\n")
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise SystemExit(f"command failed ({proc.returncode}); last lines of {log}:\n{tail}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m demo.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/demo", help="where data, models, the run and plots go")
    parser.add_argument("--test-limit", type=int, default=300, help="test questions evaluated (default 300)")
    parser.add_argument("--distill-limit", type=int, default=4000,
                        help="distillation questions used (default 4000 of 28,819)")
    parser.add_argument("--label-noise", type=float, default=0.0,
                        help="fraction of distillation answers replaced by a wrong one, the benchmark's regime "
                             "(default 0: clean labels)")
    parser.add_argument("--steps-per-stage", type=int, default=100, help="trainer optimizer steps per stage")
    parser.add_argument("--grad-accum", type=int, default=2, help="trainer gradient accumulation")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="trainer micro-batch size")
    parser.add_argument("--lr", type=float, default=1e-3, help="trainer peak learning rate (decays 10x per stage)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data subsets and training")
    parser.add_argument("--deepspeed", default="student_trainer/configs/zero2.json", help="DeepSpeed JSON")
    parser.add_argument("--fresh-run", action="store_true", help="discard a previous run (data and teacher stay cached)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    t = time.perf_counter()
    convert_easy_vqa(work / "data", test_limit=args.test_limit, seed=0)
    _, train = write_splits(work / "data", noise=args.label_noise, distill_limit=args.distill_limit)
    timings["data"] = time.perf_counter() - t
    test = work / "data" / "test.json"

    t = time.perf_counter()
    models = prepare_models(work / "cache", work / "data")
    teacher, student = models["teacher"], models["student"]
    timings["teacher and student preparation"] = time.perf_counter() - t

    run = work / "run"
    if args.fresh_run and run.exists():
        import shutil

        shutil.rmtree(run)
    t = time.perf_counter()
    server = TeacherProcess(teacher, "--batch-wait-ms", "2")
    print(f"teacher server on {server.address}", flush=True)
    try:
        _run([sys.executable, "-m", "student_trainer", "--teacher-addr", server.address, "--student", str(student),
              "--data", str(train), "--output", str(run), "--deepspeed", args.deepspeed,
              "--steps-per-stage", str(args.steps_per_stage), "--grad-accum", str(args.grad_accum),
              "--micro-batch-size", str(args.micro_batch_size), "--lr", str(args.lr), "--lr-end", str(args.lr / 10),
              "--seed", str(args.seed), "--save-every", str(args.steps_per_stage)], logs / "trainer.log")
        timings["training (stages 1-3)"] = time.perf_counter() - t
        t = time.perf_counter()
        _run([sys.executable, "-m", "student_trainer", "align", "--student", str(run / "stage2" / "student"),
              "--recalibrator", str(run / "stage2" / "recalibrator.safetensors"), "--teacher-addr", server.address,
              "--data", str(alignment_pairs(test, work / "data" / "alignment_pairs.json")),
              "--output", str(work / "alignment.png")], logs / "align.log")
        timings["alignment plot"] = time.perf_counter() - t
    finally:
        server.terminate()

    from student_trainer.evaluate import evaluate

    t = time.perf_counter()
    rows = []
    for name, model in (("teacher", teacher), ("student before", student), ("student after", run / "final")):
        report = evaluate(str(model), str(test), limit=args.test_limit, batch_size=16, max_new_tokens=6,
                          metric="exact_match")  # one-word answers
        report.write(work / f"eval_{name.replace(' ', '_')}.json")
        rows.append((name, report))
    timings["evaluation"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started

    types = sorted({t for _, r in rows for t in r.per_type})
    header = f"{'model':16}{'accuracy':>10}" + "".join(f"{t:>10}" for t in types) + f"{'n':>6}"
    print("\n" + header + "\n" + "-" * len(header))
    for name, r in rows:
        per = "".join(f"{r.per_type[t][0]:10.1%}" if t in r.per_type else f"{'-':>10}" for t in types)
        print(f"{name:16}{r.accuracy:10.1%}{per}{r.count:6d}")
    print("\ntimings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print(f"loss curves: {run}/stage{{1,2,3}}/loss_curves.png; alignment: {work / 'alignment.png'}")
    (work / "results.json").write_text(json.dumps({
        "accuracy": {name: r.accuracy for name, r in rows},
        "per_type": {name: {t: v[0] for t, v in r.per_type.items()} for name, r in rows},
        "timings_s": timings, "args": vars(args)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
