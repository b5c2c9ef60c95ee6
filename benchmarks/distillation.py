"""Held-out accuracy of a distilled student: GenRecal vs SFT, its ablations and logit baselines, on equal budgets.

    python benchmarks/distillation.py --teacher DIR --data DIR [--seeds 0,1,2] [--steps-per-stage N] [--out runs/bench]

Runs everything in ONE process with :func:`genrecal.inprocess.run_stages` (plain PyTorch AdamW, teacher and
student side by side; not the DeepSpeed ``student_trainer``).

Every student starts from a *base* student, as in the paper (whose students are pretrained VLMs): per seed, a
tiny checkpoint (``genrecal.tiny.write_tiny_checkpoint`` with that seed) plus ``--warmup-steps`` of plain SFT on
a warm-up pool that is disjoint from the distillation data (every 4th record of ``train.json``; the other three
quarters are the distillation data). Without that warm-up the student's head is random until stage 3 (stages 1
and 2 never train it), which is not the setting the paper describes. Then, per seed, every variant starts from
the SAME base checkpoint with the same data-order seed and micro-batch size / accumulation:

    sft              stage 3 only, 3N steps  (equal optimizer steps)   (cross-tokenizer student)
    sft_n            stage 3 only, N steps   (GenRecal's stage 3 without stages 1-2)
    genrecal         stages 1 -> 2 -> 3, N steps each
    genrecal_no_reg  the same without the regularisation path        (LossConfig(regularisation=False))
    genrecal_kl_only the same without L_ar, KL only                  (LossConfig(ce_weight=0))
    uld              stage 3 + ULD cross-tokenizer logit loss, 3N steps
    same_tok_sft     stage 3 only, 3N steps                          (student that shares the teacher's tokenizer)
    same_tok_kd      stage 3 + token-level KD, 3N steps              (same-tokenizer student)

plus the teacher and both base students. Accuracy is exact match (``student_trainer.evaluate``, greedy) on the
same ``test.json`` subset for all. ``--data`` is a folder with LLaVA-format ``train.json`` / ``test.json``
(``demo/easy_vqa.py``'s layout); when it has no ``train.json``, easy-VQA is converted into it
(``--train-limit`` / ``--test-limit``). Without ``--teacher``, ``demo.teacher.prepare_teacher(cache_dir,
data_dir)`` is used. Writes ``OUT/results.json`` and ``OUT/results.md`` and prints both.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from demo.teacher import split_for_warmup  # noqa: E402
from genrecal.distill import LossConfig  # noqa: E402
from genrecal.inprocess import StageRunConfig, run_stages  # noqa: E402
from genrecal.tiny import TinySizes, write_tiny_checkpoint  # noqa: E402

logger = logging.getLogger("benchmarks.distillation")


@dataclass(frozen=True)
class Variant:
    student: str  # "cross" (another tokenizer than the teacher's) or "same" (the teacher's tokenizer)
    stages: tuple[int, ...]
    losses: dict = field(default_factory=dict)  # LossConfig keyword arguments
    baseline: str | None = None  # logit-distillation term added to stage 3 ("uld" or "kd")
    steps_factor: int = 1  # steps per stage = steps_factor x N


VARIANTS: dict[str, Variant] = {
    "sft": Variant("cross", (3,), steps_factor=3),
    "sft_n": Variant("cross", (3,)),
    "genrecal": Variant("cross", (1, 2, 3)),
    "genrecal_no_reg": Variant("cross", (1, 2, 3), {"regularisation": False}),
    "genrecal_kl_only": Variant("cross", (1, 2, 3), {"ce_weight": 0.0}),
    "uld": Variant("cross", (3,), baseline="uld", steps_factor=3),
    "same_tok_sft": Variant("same", (3,), steps_factor=3),
    "same_tok_kd": Variant("same", (3,), baseline="kd", steps_factor=3),
}
LABELS = {
    "teacher": "teacher",
    "base": "base student, cross-tokenizer (before distillation)",
    "sft": "SFT (stage 3 only, 3N steps)",
    "sft_n": "SFT (stage 3 only, N steps)",
    "genrecal": "GenRecal 1->2->3 (N each)",
    "genrecal_no_reg": "GenRecal w/o regularisation (L2)",
    "genrecal_kl_only": "GenRecal w/o L_ar (KL only)",
    "uld": "ULD baseline (3N steps)",
    "base_same_tok": "base student, teacher's tokenizer (before distillation)",
    "same_tok_sft": "SFT, same-tokenizer student (3N)",
    "same_tok_kd": "token-level KD, same-tokenizer student (3N)",
}


@dataclass
class BenchConfig:
    """Defaults: the configuration of the table in docs/benchmarks.md."""

    seeds: list[int]
    steps_per_stage: int = 200  # N
    warmup_steps: int = 100  # SFT steps that make the base student from the tiny random checkpoint
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-3
    lr_end: float = 2e-4
    baseline_weight: float = 1.0
    test_limit: int = 300
    eval_batch_size: int = 16
    max_new_tokens: int = 5
    student_family: str = "internvl"
    student_tokenizer: str = "llama2"
    student_hidden: int = 64
    same_family: str = "qwen2_vl"
    same_tokenizer: str = "gpt2"
    same_hidden: int = 64


def student_sizes(hidden: int) -> TinySizes:
    return TinySizes(hidden_size=hidden, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=2 * hidden,
                     vision_hidden_size=32, vision_layers=1, vision_heads=2)


def write_students(root: Path, seed: int, cfg: BenchConfig, warmup: list, kinds: set[str]) -> dict[str, Path]:
    """The base students of one seed: tiny checkpoints seeded with ``seed``, then ``cfg.warmup_steps`` of SFT on
    ``warmup`` (none when 0). Reused if already complete in ``root``."""
    specs = {"cross": (cfg.student_family, cfg.student_tokenizer, cfg.student_hidden),
             "same": (cfg.same_family, cfg.same_tokenizer, cfg.same_hidden)}
    paths = {}
    for kind in sorted(kinds):
        family, tokenizer, hidden = specs[kind]
        init = root / f"seed{seed}" / f"student_{kind}"
        if not (init / "model.safetensors").is_file():
            write_tiny_checkpoint(family, init, sizes=student_sizes(hidden), tokenizer=tokenizer, seed=seed)
        paths[kind] = init
        if cfg.warmup_steps:
            run = root / f"seed{seed}" / f"student_{kind}_warmup"
            if not (run / "stage3" / "student" / "model.safetensors").is_file():
                config = StageRunConfig(stages=[3], steps_per_stage=cfg.warmup_steps, batch_size=cfg.batch_size,
                                        grad_accum=cfg.grad_accum, lr=cfg.lr, lr_end=cfg.lr_end, seed=seed + 1000)
                run_stages(None, init, warmup, run, config)
            paths[kind] = run / "stage3" / "student"
    return paths


def stage_config(variant: str, seed: int, cfg: BenchConfig) -> StageRunConfig:
    spec = VARIANTS[variant]
    return StageRunConfig(stages=list(spec.stages), steps_per_stage=cfg.steps_per_stage * spec.steps_factor,
                          batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, lr=cfg.lr, lr_end=cfg.lr_end,
                          seed=seed, losses=LossConfig(**spec.losses), baseline=spec.baseline,
                          baseline_weight=cfg.baseline_weight)


def run_variant(variant: str, teacher: Path, student: Path, samples, out: Path, seed: int, cfg: BenchConfig) -> Path:
    """Train one variant from ``student``; return the final student checkpoint folder."""
    config = stage_config(variant, seed, cfg)
    run_stages(teacher, student, samples, out, config)
    return out / f"stage{config.stages[-1]}" / "student"


def score(model_dir: Path, test_json: Path, cfg: BenchConfig) -> dict:
    from student_trainer.evaluate import evaluate

    report = evaluate(model_dir, test_json, limit=cfg.test_limit, batch_size=cfg.eval_batch_size,
                      max_new_tokens=cfg.max_new_tokens, device="cpu")
    return {"accuracy": report.accuracy, "count": report.count,
            "per_type": {t: acc for t, (acc, _) in report.per_type.items()}}


def summarise(runs: list[dict]) -> dict:
    accs = [r["accuracy"] for r in runs]
    types = sorted({t for r in runs for t in r["per_type"]})
    return {
        "mean": statistics.fmean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "n": len(accs),
        "per_seed": accs,
        "per_type_mean": {t: statistics.fmean(r["per_type"][t] for r in runs if t in r["per_type"]) for t in types},
    }


def run_benchmark(teacher: Path, data: Path, out: Path, cfg: BenchConfig, variants: list[str] | None = None) -> dict:
    """Every variant x seed, plus teacher and base students; writes ``out/results.json`` and returns it."""
    from student_trainer.data import load_dataset_samples

    variants = variants or list(VARIANTS)
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    out.mkdir(parents=True, exist_ok=True)
    train_json, test_json = data / "train.json", data / "test.json"
    samples, _ = load_dataset_samples(train_json)
    warmup, samples = split_for_warmup(samples)
    started = time.time()
    results: dict = {"config": asdict(cfg), "teacher_path": str(teacher), "data": str(data),
                     "train_samples": len(samples), "warmup_samples": len(warmup), "variants": {}, "timing_s": {}}
    t0 = time.time()
    results["teacher"] = score(teacher, test_json, cfg)
    results["timing_s"]["teacher_eval"] = round(time.time() - t0, 1)
    kinds = {VARIANTS[v].student for v in variants}
    base_rows = {"cross": "base", "same": "base_same_tok"}
    per_variant: dict[str, list[dict]] = {v: [] for v in [*(base_rows[k] for k in sorted(kinds)), *variants]}
    for seed in cfg.seeds:
        t0 = time.time()
        students = write_students(out / "init", seed, cfg, warmup, kinds)
        results["timing_s"][f"base_students_seed{seed}"] = round(time.time() - t0, 1)
        for kind, path in students.items():
            per_variant[base_rows[kind]].append({"seed": seed, **score(path, test_json, cfg)})
        for variant in variants:
            t0 = time.time()
            final = run_variant(variant, teacher, students[VARIANTS[variant].student], samples,
                                out / "runs" / f"seed{seed}" / variant, seed, cfg)
            train_s = time.time() - t0
            result = score(final, test_json, cfg)
            result.update(seed=seed, train_s=round(train_s, 1), eval_s=round(time.time() - t0 - train_s, 1))
            per_variant[variant].append(result)
            logger.info("seed %d %-18s acc %.3f (train %.0fs)", seed, variant, result["accuracy"], train_s)
            print(f"seed {seed} {variant:<18} acc {result['accuracy']:.3f}  train {train_s:.0f}s", flush=True)
            results["variants"] = {v: {"runs": rs, **summarise(rs)} for v, rs in per_variant.items() if rs}
            (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")  # partial results survive
    results["variants"] = {v: {"runs": rs, **summarise(rs)} for v, rs in per_variant.items() if rs}
    results["timing_s"]["total"] = round(time.time() - started, 1)
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def markdown_table(results: dict) -> str:
    types = sorted(results["teacher"]["per_type"])
    lines = ["| model | accuracy (mean ± std) | " + " | ".join(types) + " | seeds |",
             "|---|---|" + "---|" * len(types) + "---|"]
    teacher = results["teacher"]
    lines.append(f"| {LABELS['teacher']} | {100 * teacher['accuracy']:.1f}% | "
                 + " | ".join(f"{100 * teacher['per_type'].get(t, math.nan):.0f}%" for t in types) + " | - |")
    for name, row in results["variants"].items():
        per_type = " | ".join(f"{100 * row['per_type_mean'].get(t, math.nan):.0f}%" for t in types)
        lines.append(f"| {LABELS.get(name, name)} | {100 * row['mean']:.1f} ± {100 * row['std']:.1f}% | {per_type} "
                     f"| {row['n']} |")
    return "\n".join(lines)


def ensure_data(data: Path, train_limit: int, test_limit: int) -> None:
    if (data / "train.json").is_file() and (data / "test.json").is_file():
        return
    from demo.easy_vqa import convert_easy_vqa

    convert_easy_vqa(data, train_limit=train_limit, test_limit=test_limit, seed=0)


def resolve_teacher(teacher: str | None, out: Path, data: Path) -> Path:
    if teacher is None:
        try:
            from demo.teacher import prepare_teacher
        except ImportError as exc:
            raise SystemExit("--teacher is required (demo.teacher.prepare_teacher is not available)") from exc
        return Path(prepare_teacher(out / "teacher_cache", data))
    source = Path(teacher)
    local = out / "teacher"
    if source.resolve() != local.resolve():  # copy: the source may be someone's scratch space
        if local.exists():
            shutil.rmtree(local)
        shutil.copytree(source, local)
    return local


def main(argv: list[str] | None = None) -> None:
    defaults = BenchConfig(seeds=[0, 1, 2])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", help="teacher checkpoint folder (copied into OUT/teacher)")
    parser.add_argument("--data", required=True, help="folder with train.json/test.json (converted from easy-VQA if absent)")
    parser.add_argument("--out", default="runs/bench", help="output folder (default runs/bench)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    parser.add_argument("--train-limit", type=int, default=2000, help="easy-VQA conversion only (default 2000)")
    for name in ("steps_per_stage", "warmup_steps", "batch_size", "grad_accum", "test_limit", "eval_batch_size",
                 "max_new_tokens", "student_hidden", "same_hidden"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name),
                            help=f"default {getattr(defaults, name)}")
    for name in ("lr", "lr_end", "baseline_weight"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name),
                            help=f"default {getattr(defaults, name)}")
    parser.add_argument("--same-tokenizer-student", default=f"{defaults.same_family}:{defaults.same_tokenizer}",
                        help="FAMILY:TOKENIZER of the student sharing the teacher's tokenizer (default qwen2_vl:gpt2)")
    parser.add_argument("--student", default=f"{defaults.student_family}:{defaults.student_tokenizer}",
                        help="FAMILY:TOKENIZER of the cross-tokenizer student (default internvl:llama2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    student_family, student_tokenizer = args.student.split(":")
    same_family, same_tokenizer = args.same_tokenizer_student.split(":")
    cfg = BenchConfig(
        seeds=[int(s) for s in args.seeds.split(",")], steps_per_stage=args.steps_per_stage,
        warmup_steps=args.warmup_steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, lr_end=args.lr_end,
        baseline_weight=args.baseline_weight, test_limit=args.test_limit, eval_batch_size=args.eval_batch_size,
        max_new_tokens=args.max_new_tokens, student_family=student_family, student_tokenizer=student_tokenizer,
        student_hidden=args.student_hidden, same_family=same_family, same_tokenizer=same_tokenizer,
        same_hidden=args.same_hidden,
    )
    out, data = Path(args.out), Path(args.data)
    ensure_data(data, args.train_limit, cfg.test_limit)
    teacher = resolve_teacher(args.teacher, out, data)
    results = run_benchmark(teacher, data, out, cfg, [v for v in args.variants.split(",") if v])
    table = markdown_table(results)
    (out / "results.md").write_text(table + "\n")
    print(table)
    print(json.dumps({k: v for k, v in results.items() if k != "variants"}
                     | {"variants": {n: {k: r[k] for k in ("mean", "std", "n", "per_seed")}
                                     for n, r in results["variants"].items()}}))


if __name__ == "__main__":
    main()
