"""The demo's default models: a teacher that has learnt easy-VQA on the CPU, and a smaller base student.

- Teacher (:func:`prepare_teacher`): a tiny Qwen2-VL (GPT-2 tokenizer, hidden size 128, a 256-wide one-layer
  ViT) built with :func:`genrecal.tiny.write_tiny_checkpoint`, its processor set to scale 64x64 pictures up to
  112x112 (8x8 patches, merged 2x2: 16 image tokens), then supervised-fine-tuned on a type-balanced part of
  easy-VQA's training split with :func:`genrecal.inprocess.run_stages` stage 3 alone (plain SFT of the patch
  merger, language model and head; the random ViT stays frozen, as in every GenRecal stage).
- Student (:func:`student_init`): a tiny InternVL (InternViT, Llama-2 tokenizer, hidden size 64) — another family,
  tokenizer and chat template than the teacher's, as GenRecal is about — given 100 SFT steps on a warm-up pool
  (every 4th training question, which the distillation never sees) to stand in for the paper's pretrained
  students; the random vision tower stays frozen.

Both are cached under ``cache_dir/{teacher,student}``: a ``DONE`` file records the options a folder was built with,
and a later call with the same options returns the folder at once. ``docs/demo.md`` ("Demo models") records the
sizes tried, the timings and the accuracies.

    python -m demo.teacher --cache runs/demo/cache --data runs/demo/data [--evaluate 300]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from genrecal.tiny import TinySizes, write_tiny_checkpoint

logger = logging.getLogger(__name__)

DONE = "DONE"
MODEL = "model"  # the finished checkpoint folder inside cache_dir/{teacher,student}
FORMAT_VERSION = 1  # bump when the build changes in a way the options do not show
DYNAMIC_RESOLUTION = ("qwen2_vl", "qwen2_5_vl")  # families whose processor takes min/max pixel counts


def _teacher_sizes() -> TinySizes:
    return TinySizes(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256,
                     vision_hidden_size=256, vision_layers=1, vision_heads=4)


def _student_sizes() -> TinySizes:
    return TinySizes(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                     vision_hidden_size=32, vision_layers=1, vision_heads=2)


@dataclass(frozen=True)
class TeacherRecipe:
    """How the demo teacher is built and trained (defaults: see docs/demo.md, "Demo models")."""

    family: str = "qwen2_vl"
    tokenizer: str = "gpt2"
    sizes: TinySizes = field(default_factory=_teacher_sizes)
    # Dynamic-resolution families (Qwen2-VL / Qwen2.5-VL) only: scale pictures up to at least side x side pixels.
    # None keeps the tiny recipe's 56x56 (4 image tokens); fixed-resolution families use sizes.image_size.
    image_side: int | None = 112
    questions_per_type: int = 2000  # training questions drawn per type (shape, colour, yes_no) from train.json
    steps: int = 900  # optimizer steps
    batch_size: int = 16
    lr: float = 2e-3  # AdamW, linear decay to lr_end
    lr_end: float = 2e-4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.image_side is not None and self.family not in DYNAMIC_RESOLUTION:
            raise ValueError(
                f"TeacherRecipe.image_side applies to {DYNAMIC_RESOLUTION} only; for {self.family!r} set "
                "sizes.image_size instead and image_side=None"
            )
        if self.image_side is not None and self.image_side % 28:
            raise ValueError(f"TeacherRecipe.image_side must be a multiple of 28 (14-px patches merged 2x2), "
                             f"got {self.image_side}")
        for name in ("questions_per_type", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TeacherRecipe.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr_end <= self.lr:
            raise ValueError(f"TeacherRecipe needs 0 < lr_end <= lr, got lr={self.lr}, lr_end={self.lr_end}")


@dataclass(frozen=True)
class StudentRecipe:
    """The demo student: a smaller model of another family and tokenizer than the teacher.

    The paper distils into *pretrained* students; a random one cannot use stages 1-2 (they never train its head).
    So the demo's "student before" is a base student: the random tiny checkpoint plus ``warmup_steps`` of plain
    SFT on a warm-up pool that the distillation never sees (:func:`split_for_warmup`). ``warmup_steps=0`` keeps
    it random.
    """

    family: str = "internvl"
    tokenizer: str = "llama2"
    sizes: TinySizes = field(default_factory=_student_sizes)
    seed: int = 0
    warmup_steps: int = 100
    warmup_batch_size: int = 8
    warmup_lr: float = 2e-3  # AdamW, linear decay to a tenth

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or self.warmup_batch_size < 1 or self.warmup_lr <= 0:
            raise ValueError("StudentRecipe needs warmup_steps >= 0, warmup_batch_size >= 1 and warmup_lr > 0, got "
                             f"{self.warmup_steps}, {self.warmup_batch_size}, {self.warmup_lr}")


def split_for_warmup(records: list) -> tuple[list, list]:
    """(warm-up pool, distillation data): every 4th training record, and the rest; disjoint and deterministic."""
    return records[::4], [r for i, r in enumerate(records) if i % 4]


def write_training_splits(data_dir: str | Path) -> tuple[Path, Path]:
    """Write ``train_warmup.json`` and ``train_distill.json`` (:func:`split_for_warmup` of ``train.json``) next to
    it, so their image paths stay valid; return both paths."""
    data_dir = Path(data_dir)
    warmup, distill = split_for_warmup(json.loads((data_dir / "train.json").read_text(encoding="utf-8")))
    paths = data_dir / "train_warmup.json", data_dir / "train_distill.json"
    for path, records in zip(paths, (warmup, distill), strict=True):
        path.write_text(json.dumps(records))
    return paths


def _cached(root: Path, options: dict) -> Path | None:
    """``root/model`` when ``root/DONE`` records exactly ``options``, else None."""
    done = root / DONE
    if not done.is_file() or not (root / MODEL / "config.json").is_file():
        return None
    try:
        recorded = json.loads(done.read_text())
    except json.JSONDecodeError:
        return None
    return root / MODEL if recorded.get("options") == options else None


def _fresh(root: Path) -> None:
    """Empty ``root`` (a cache folder this module owns) and make sure no stale DONE survives a failed build."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)


def set_min_image_side(checkpoint: Path, side: int) -> None:
    """Make a Qwen2-VL-style processor scale pictures up to at least ``side`` x ``side`` pixels (saved in place).

    Its ``size`` is a pixel-count range (``shortest_edge`` = min_pixels, ``longest_edge`` = max_pixels); a 64x64
    picture then becomes ``side / 14`` x ``side / 14`` patches, ``(side / 28)^2`` image tokens after the 2x2 merge.
    """
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    image_processor = processor.image_processor
    pixels = side * side
    image_processor.size = {"shortest_edge": pixels, "longest_edge": max(pixels, image_processor.size["longest_edge"])}
    processor.save_pretrained(checkpoint)


def _data_signature(data_dir: Path) -> dict:
    """What identifies the training data: the converter's manifest options, else the file's size and mtime."""
    manifest = data_dir / "manifest.json"
    if manifest.is_file():
        return {"manifest": json.loads(manifest.read_text()).get("options")}
    stat = (data_dir / "train.json").stat()
    return {"train_json": {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}}


def balanced_training_records(train_json: Path, per_type: int, seed: int) -> list[dict]:
    """Up to ``per_type`` seeded-random records of each question type (records without a type form one group).

    easy-VQA's training split is 74% yes/no questions, which a blind model answers 82% right from the wording
    alone; balancing gives the colour and shape questions — no such shortcut — a third of the steps each.
    """
    records = json.loads(train_json.read_text(encoding="utf-8"))
    by_type: dict[str, list[dict]] = {}
    for record in records:
        by_type.setdefault(str(record.get("type")), []).append(record)
    rng = random.Random(f"demo-teacher/{seed}")
    chosen = []
    for question_type in sorted(by_type):
        group = by_type[question_type]
        chosen += rng.sample(group, min(per_type, len(group)))
    return chosen


def prepare_teacher(cache_dir: str | Path, data_dir: str | Path, *, recipe: TeacherRecipe | None = None) -> Path:
    """Build and SFT-train the demo teacher on ``data_dir/train.json``; return its checkpoint folder.

    ``data_dir`` is an easy-VQA conversion (:func:`demo.easy_vqa.convert_easy_vqa`) or any LLaVA JSON folder
    with a ``train.json`` whose records carry a ``type``. The result is ``cache_dir/teacher/model``; when
    ``cache_dir/teacher/DONE`` records the same recipe and data, it is returned without training.
    """
    from genrecal.inprocess import StageRunConfig, run_stages
    from student_trainer.data import load_dataset_samples

    recipe = recipe or TeacherRecipe()
    data_dir = Path(data_dir)
    train_json = data_dir / "train.json"
    if not train_json.is_file():
        raise ValueError(f"{train_json} does not exist; convert the data first: python -m demo.easy_vqa --out {data_dir}")
    root = Path(cache_dir) / "teacher"
    options = {"recipe": asdict(recipe), "data": _data_signature(data_dir), "format": FORMAT_VERSION}
    cached = _cached(root, options)
    if cached is not None:
        logger.info("demo teacher: cached at %s", cached)
        return cached

    started = time.perf_counter()
    _fresh(root)
    init = write_tiny_checkpoint(recipe.family, root / "init", sizes=recipe.sizes, tokenizer=recipe.tokenizer,
                                 seed=recipe.seed)
    if recipe.image_side is not None:
        set_min_image_side(init, recipe.image_side)
    subset = root / "train_subset.json"  # what the teacher was trained on (image names relative to data_dir)
    subset.write_text(json.dumps(balanced_training_records(train_json, recipe.questions_per_type, recipe.seed)))
    samples, _ = load_dataset_samples(subset, image_folder=data_dir)
    logger.info("demo teacher: SFT of a tiny %s (%s tokenizer) on %d questions, %d steps of %d",
                recipe.family, recipe.tokenizer, len(samples), recipe.steps, recipe.batch_size)
    config = StageRunConfig(stages=[3], steps_per_stage=recipe.steps, batch_size=recipe.batch_size, grad_accum=1,
                            lr=recipe.lr, lr_end=recipe.lr_end, seed=recipe.seed)
    history = run_stages(None, init, samples, root / "sft", config)[3]
    (root / "sft" / "stage3" / "student").rename(root / MODEL)
    shutil.rmtree(init)
    seconds = time.perf_counter() - started
    first, last = history[0]["L3"], sum(row["L3"] for row in history[-20:]) / len(history[-20:])
    done = {"options": options, "seconds": round(seconds, 1), "samples": len(samples),
            "L3_first": first, "L3_last20_mean": last}
    (root / DONE).write_text(json.dumps(done, indent=2) + "\n")  # written last: marks the folder complete
    logger.info("demo teacher: trained in %.0f s (L3 %.3f -> %.3f): %s", seconds, first, last, root / MODEL)
    return root / MODEL


def student_init(cache_dir: str | Path, warmup_json: str | Path | None = None, *,
                 recipe: StudentRecipe | None = None) -> Path:
    """Write the demo's base student (random tiny checkpoint + ``recipe.warmup_steps`` of SFT on the LLaVA JSON
    ``warmup_json``; cached like the teacher); return its folder."""
    from genrecal.inprocess import StageRunConfig, run_stages
    from student_trainer.data import load_dataset_samples

    recipe = recipe or StudentRecipe()
    if recipe.warmup_steps and (warmup_json is None or not Path(warmup_json).is_file()):
        raise ValueError(f"the demo student's warm-up needs a LLaVA JSON of warm-up questions, got {warmup_json!r}; "
                         "write one with demo.teacher.write_training_splits(data_dir), or set warmup_steps=0")
    root = Path(cache_dir) / "student"
    options = {"recipe": asdict(recipe), "format": FORMAT_VERSION}
    if recipe.warmup_steps:
        options["warmup_data_sha256"] = hashlib.sha256(Path(warmup_json).read_bytes()).hexdigest()
    cached = _cached(root, options)
    if cached is not None:
        return cached
    _fresh(root)
    if not recipe.warmup_steps:
        write_tiny_checkpoint(recipe.family, root / MODEL, sizes=recipe.sizes, tokenizer=recipe.tokenizer,
                              seed=recipe.seed)
        (root / DONE).write_text(json.dumps({"options": options}, indent=2) + "\n")
        return root / MODEL
    init = write_tiny_checkpoint(recipe.family, root / "init", sizes=recipe.sizes, tokenizer=recipe.tokenizer,
                                 seed=recipe.seed)
    samples, _ = load_dataset_samples(warmup_json)
    config = StageRunConfig(stages=[3], steps_per_stage=recipe.warmup_steps, batch_size=recipe.warmup_batch_size,
                            grad_accum=1, lr=recipe.warmup_lr, lr_end=recipe.warmup_lr / 10, seed=recipe.seed)
    history = run_stages(None, init, samples, root / "warmup", config)[3]
    (root / "warmup" / "stage3" / "student").rename(root / MODEL)
    shutil.rmtree(init)
    done = {"options": options, "samples": len(samples), "L3_first": history[0]["L3"], "L3_last": history[-1]["L3"]}
    (root / DONE).write_text(json.dumps(done, indent=2) + "\n")  # written last: marks the folder complete
    logger.info("demo student: %d warm-up SFT steps (L3 %.3f -> %.3f): %s", recipe.warmup_steps,
                history[0]["L3"], history[-1]["L3"], root / MODEL)
    return root / MODEL


def main(argv: list[str] | None = None) -> None:
    import os

    parser = argparse.ArgumentParser(prog="python -m demo.teacher", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", required=True, help="cache folder: teacher/ and student/ are written here")
    parser.add_argument("--data", required=True, help="easy-VQA folder from python -m demo.easy_vqa (train.json)")
    parser.add_argument("--evaluate", type=int, default=0, metavar="N",
                        help="then evaluate teacher and student on the first N questions of DATA/test.json")
    defaults = TeacherRecipe()
    for name in ("questions_per_type", "steps", "batch_size", "seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name),
                            help=f"teacher recipe (default {getattr(defaults, name)})")
    for name in ("lr", "lr_end"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name),
                            help=f"teacher recipe (default {getattr(defaults, name)})")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    recipe = TeacherRecipe(questions_per_type=args.questions_per_type, steps=args.steps, batch_size=args.batch_size,
                           seed=args.seed, lr=args.lr, lr_end=args.lr_end)
    teacher = prepare_teacher(args.cache, args.data, recipe=recipe)
    student = student_init(args.cache, write_training_splits(args.data)[0])
    print(f"teacher: {teacher}\nstudent: {student}")
    if args.evaluate:
        from student_trainer.evaluate import evaluate

        for name, path in (("teacher", teacher), ("base student", student)):
            started = time.perf_counter()
            report = evaluate(path, Path(args.data) / "test.json", limit=args.evaluate, batch_size=32, max_new_tokens=8)
            print(f"\n{name} ({time.perf_counter() - started:.0f} s):\n{report.table()}")


if __name__ == "__main__":
    main()
