"""The embedded default, end to end on the CPU: ``python -m demo.run``.

1. converts a subset of easy-VQA (installed offline from PyPI) to the project's LLaVA JSON format;
2. prepares the demo teacher (a tiny VLM SFT-trained on the training split; cached) and the base student
   (another family, another real tokenizer; a random tiny checkpoint given a short SFT warm-up on every 4th
   training question — the stand-in for the paper's pretrained students; the distillation uses the other 3/4);
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
import subprocess
import sys
import time
from pathlib import Path

from demo.easy_vqa import convert_easy_vqa
from demo.teacher import StudentRecipe, TeacherRecipe, prepare_teacher, student_init, write_training_splits
from teacher_server.launch import TeacherProcess


def _run(cmd: list[str], log: Path) -> None:
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "w") as f:
        result = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if result.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise SystemExit(f"command failed ({result.returncode}); last lines of {log}:\n{tail}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m demo.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/demo", help="where data, models, the run and plots go")
    parser.add_argument("--train-limit", type=int, default=4000, help="training questions used (default 4000)")
    parser.add_argument("--test-limit", type=int, default=300, help="test questions evaluated (default 300)")
    parser.add_argument("--teacher-steps", type=int, default=TeacherRecipe.steps,
                        help=f"SFT steps of the demo teacher (default {TeacherRecipe.steps}; cached per setting)")
    parser.add_argument("--student-warmup-steps", type=int, default=StudentRecipe.warmup_steps,
                        help="SFT steps that make the base student (\"student before\") from a random one, on every "
                             f"4th training question, which the distillation never sees (default {StudentRecipe.warmup_steps})")
    parser.add_argument("--steps-per-stage", type=int, default=30, help="trainer optimizer steps per stage")
    parser.add_argument("--grad-accum", type=int, default=2, help="trainer gradient accumulation")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="trainer micro-batch size")
    parser.add_argument("--lr", type=float, default=2e-3, help="trainer peak learning rate (decays 10x per stage)")
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
    convert_easy_vqa(work / "data", train_limit=args.train_limit, test_limit=args.test_limit, seed=args.seed)
    timings["data"] = time.perf_counter() - t
    test = work / "data" / "test.json"

    t = time.perf_counter()
    teacher = prepare_teacher(work / "cache", work / "data", recipe=TeacherRecipe(steps=args.teacher_steps))
    warmup, train = write_training_splits(work / "data")  # the student's warm-up pool and the distillation data
    student = student_init(work / "cache", warmup, recipe=StudentRecipe(warmup_steps=args.student_warmup_steps))
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
              "--data", str(test), "--limit", "24", "--out", str(work / "alignment.png")], logs / "align.log")
        timings["alignment plot"] = time.perf_counter() - t
    finally:
        server.terminate()

    from student_trainer.evaluate import evaluate

    t = time.perf_counter()
    rows = []
    for name, model in (("teacher", teacher), ("student before", student), ("student after", run / "final")):
        report = evaluate(str(model), str(test), limit=args.test_limit, batch_size=16, max_new_tokens=6)
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
