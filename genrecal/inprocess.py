"""GenRecal's three stages in one process (teacher and student side by side, plain PyTorch AdamW).

This is the reference loop: the DeepSpeed trainer (``student_trainer``) runs the same objective
(:func:`genrecal.distill.genrecal_objective`) against a remote teacher. Stages hand off through checkpoints
only: stage ``n`` writes ``OUT/stage{n}/student`` (a plain checkpoint of the student's family) and
``OUT/stage{n}/recalibrator.safetensors``; stage ``n+1`` starts from those files. The final student is the last
stage's ``student`` folder, with no Recalibrator in it.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from genrecal.distill import LossConfig, genrecal_objective
from genrecal.families import LoadedVLM, load_vlm
from genrecal.recalibrator import Recalibrator
from genrecal.recalibrator_file import load_recalibrator, save_recalibrator
from genrecal.sample import Sample
from genrecal.stages import STAGES, Stage, frozen_modules_to_eval, set_trainable
from genrecal.teacher import InProcessTeacher

logger = logging.getLogger(__name__)


@dataclass
class StageRunConfig:
    """Optimisation settings; defaults are the paper's (AdamW, 1e-4 -> 1e-5 linear per stage, accumulation 16)."""

    stages: list[int] = field(default_factory=lambda: [1, 2, 3])
    steps_per_stage: int = 10  # optimizer steps
    batch_size: int = 2  # samples per micro-batch
    grad_accum: int = 16
    lr: float = 1e-4
    lr_end: float = 1e-5
    weight_decay: float = 0.0
    rec_blocks: int = 2
    max_length: int | None = None
    chunk_size: int = 512
    seed: int = 0
    losses: LossConfig = field(default_factory=LossConfig)  # logit_distillation: the KD / ULD baselines

    def __post_init__(self) -> None:
        self.stages = [int(Stage(s)) for s in self.stages]
        for name in ("steps_per_stage", "batch_size", "grad_accum", "rec_blocks", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"StageRunConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr_end <= self.lr:
            raise ValueError(f"need 0 < lr_end <= lr, got lr={self.lr}, lr_end={self.lr_end}")


def linear_decay(optimizer: torch.optim.Optimizer, steps: int, lr: float, lr_end: float):
    """LR from ``lr`` at the first step to ``lr_end`` at the last, linearly (the paper's per-stage schedule)."""
    span = max(steps - 1, 1)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (lr + (lr_end - lr) * min(step, span) / span) / lr
    )


def micro_batches(samples: Sequence[Sample], batch_size: int, seed: int):
    """Endless micro-batches; each epoch is a fresh seeded shuffle."""
    rng = random.Random(seed)
    order = list(range(len(samples)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield [samples[i] for i in order[start : start + batch_size]]


def save_stage(out: Path, student: LoadedVLM, recalibrator: Recalibrator | None, history: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    student.model.save_pretrained(out / "student", safe_serialization=True)
    student.processor.save_pretrained(out / "student")
    if recalibrator is not None:
        save_recalibrator(out / "recalibrator.safetensors", recalibrator)
    with open(out / "metrics.jsonl", "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")


def run_stages(
    teacher_path: str | Path | None,
    student_path: str | Path,
    samples: Sequence[Sample],
    output_dir: str | Path,
    config: StageRunConfig | None = None,
) -> dict[int, list[dict]]:
    """Run the configured stages; return per-stage metric histories (one dict per optimizer step)."""
    config = config or StageRunConfig()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    needs_teacher = any(_stage_needs_teacher(Stage(s), config) for s in config.stages)
    if needs_teacher and teacher_path is None:
        raise ValueError("stages 1 and 2 need a teacher checkpoint")
    teacher = InProcessTeacher(load_vlm(teacher_path), max_length=config.max_length, chunk_size=config.chunk_size) if needs_teacher else None

    histories: dict[int, list[dict]] = {}
    current_student, current_recalibrator = Path(student_path), None
    for stage_number in config.stages:
        stage = Stage(stage_number)
        torch.manual_seed(config.seed + stage_number)
        student = load_vlm(current_student)
        recalibrator = None
        if STAGES[stage].needs_teacher:
            spec = student.adapter.recalibrator_spec(student.model)
            if current_recalibrator is None:
                recalibrator = Recalibrator(spec, teacher.hidden_size, num_blocks=config.rec_blocks)
            else:  # the previous stage's, checked against this student, teacher and block count
                recalibrator = load_recalibrator(current_recalibrator, spec, teacher.hidden_size,
                                                 num_blocks=config.rec_blocks)
        student.model.train()
        params = set_trainable(stage, student.adapter.parameter_groups(student.model), recalibrator)
        frozen_modules_to_eval(student.model)
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        scheduler = linear_decay(optimizer, config.steps_per_stage, config.lr, config.lr_end)
        batches = micro_batches(samples, config.batch_size, config.seed + stage_number)
        history = []
        for step in range(config.steps_per_stage):
            group = [next(batches) for _ in range(config.grad_accum)]
            row = _optimizer_step(stage, student, recalibrator, teacher, group, config)
            row.update(stage=stage_number, step=step, lr=scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            history.append(row)
            logger.info("stage %d step %d %s", stage_number, step, row)
        student.model.eval()
        out = output_dir / f"stage{stage_number}"
        save_stage(out, student, recalibrator, history)
        histories[stage_number] = history
        current_student = out / "student"
        current_recalibrator = out / "recalibrator.safetensors" if recalibrator is not None else current_recalibrator
    return histories


def _optimizer_step(stage, student, recalibrator, teacher, group, config) -> dict:
    """Accumulate one optimizer step's gradients over its micro-batches; return summed metrics."""
    student_batches = [student.encode(samples, max_length=config.max_length) for samples in group]
    logits = config.losses.logit_distillation is not None and "L3" in STAGES[stage].losses
    features = ([teacher.encode(samples, answer_log_probs=logits) for samples in group]
                if _stage_needs_teacher(stage, config) else [None] * len(group))
    # Normalise by the answer-token count of the whole step, so accumulation equals one large batch.
    student_tokens = sum(int((b.labels()[:, 1:] != -100).sum()) for b in student_batches)
    teacher_tokens = sum(f.num_answer_tokens for fs in features if fs for f in fs) or None
    totals: dict[str, float] = {}
    for batch, feats in zip(student_batches, features, strict=True):
        objective = genrecal_objective(
            stage, student, batch, recalibrator=recalibrator, teacher=teacher, features=feats,
            teacher_tokens=teacher_tokens, student_tokens=student_tokens, losses=config.losses,
        )
        objective.loss.backward()
        for key, value in objective.metrics.items():
            totals[key] = totals.get(key, 0.0) + value
    if teacher_tokens:  # the teacher's own CE on its answers, token-weighted over the step (as the trainer logs it)
        totals["teacher_ce"] = sum(f.teacher_ce * f.num_answer_tokens for fs in features for f in fs) / teacher_tokens
    return totals


def _stage_needs_teacher(stage: Stage, config: StageRunConfig) -> bool:
    return STAGES[stage].needs_teacher or (config.losses.logit_distillation is not None and "L3" in STAGES[stage].losses)


def main(argv: list[str] | None = None) -> None:
    """``python -m genrecal.inprocess``: the three stages in one process, on data in any format the trainer reads."""
    import argparse

    # The trainer's loader (every record format and source, bad records skipped): this entry point only, so the
    # library itself keeps not depending on the trainer.
    from student_trainer.data import load_dataset_samples

    parser = argparse.ArgumentParser(prog="python -m genrecal.inprocess", description=main.__doc__)
    parser.add_argument("--teacher", help="teacher checkpoint folder (needed for stages 1 and 2)")
    parser.add_argument("--student", required=True, help="student checkpoint folder")
    parser.add_argument("--data", required=True, help="training data, any format of student_trainer/records.py: "
                        "LLaVA / ShareGPT or OpenAI-messages JSON/JSONL, parquet/arrow, a dataset folder or a Hub id")
    parser.add_argument("--image-folder", help="folder the records' image paths are relative to (default: the data "
                        "file's)")
    parser.add_argument("--output", required=True, help="run folder: stage{n}/student, recalibrator, metrics")
    parser.add_argument("--stages", default="1,2,3", help="comma-separated stages to run (default 1,2,3)")
    defaults = StageRunConfig()
    for name in ("steps_per_stage", "batch_size", "grad_accum", "rec_blocks", "seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name),
                            help=f"default {getattr(defaults, name)}")
    for name in ("lr", "lr_end"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name),
                            help=f"default {getattr(defaults, name)}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from genrecal.stages import parse_stages

    samples, _ = load_dataset_samples(args.data, image_folder=args.image_folder)
    config = StageRunConfig(
        stages=[int(s) for s in parse_stages(args.stages)], steps_per_stage=args.steps_per_stage,
        batch_size=args.batch_size, grad_accum=args.grad_accum, rec_blocks=args.rec_blocks, seed=args.seed,
        lr=args.lr, lr_end=args.lr_end,
    )
    histories = run_stages(args.teacher, args.student, samples, args.output, config)
    for stage, rows in histories.items():
        losses = {k: (round(rows[0][k], 4), round(rows[-1][k], 4)) for k in ("L1_ce", "L2_ce", "L3") if k in rows[0]}
        print(f"stage {stage}: first -> last {losses}")
    print(f"final student: {Path(args.output) / f'stage{config.stages[-1]}' / 'student'}")


if __name__ == "__main__":
    main()
