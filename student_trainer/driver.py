"""The whole run: stages 1-3 one after another (:func:`run_training`), each a :class:`StageRecipe`, handing off
through their exports only; finished stages are skipped, an unfinished one resumes from its latest checkpoint.

The teacher is opened once, for the first stage that needs it, checked against the run's manifest (the same
teacher must serve every stage and every resume) and closed before a stage that does not need it, so that an
in-process teacher's memory is free for stage 3.
"""

from __future__ import annotations

import gc
import logging
import shutil
from pathlib import Path

import torch

from genrecal.resilient_teacher import ResilientTeacher, open_teacher
from genrecal.stages import STAGES, Stage
from student_trainer.config import TrainConfig
from student_trainer.dataset import BadRecord, LazySamples, ValidationReport, validate_records
from student_trainer.distributed import DistContext, log_rank0
from student_trainer.layout import check_teacher_identity, prepare_output
from student_trainer.recipe import StageRecipe, StepBudget, StopRequested

logger = logging.getLogger(__name__)


def connect_teacher(config: TrainConfig, ctx: DistContext) -> ResilientTeacher:
    """This rank's own teacher (each rank has its own connection, or its own in-process copy)."""
    return open_teacher(
        addr=config.teacher_addr, model=config.teacher_model, device=ctx.device, dtype=config.torch_dtype,
        max_length=config.max_length, chunk_size=config.chunk_size, timeout_s=config.teacher_timeout_s,
        retries=config.teacher_retries, token_file=config.teacher_token_file, tls_ca=config.teacher_tls_ca,
        wire_dtype=config.wire_dtype, question_features=config.regularisation,
        image_options=config.teacher_image_options,
    )


def run_training(config: TrainConfig, ctx: DistContext) -> Path | None:
    """Run (or resume) the configured stages; return ``OUT/final``, or None when stopped early."""
    layout = prepare_output(config, ctx)
    samples = LazySamples(config.data, image_folder=config.image_folder, split=config.data_split,
                          config_name=config.data_config, limit=config.data_limit)
    log_rank0(ctx, "training data: %d records in %s (read lazily, %d worker processes per rank)", len(samples),
              config.data, config.data_workers)
    if config.validate_data:  # each rank checks every world_size-th record
        parts = ctx.all_gather_object(validate_records(samples, workers=config.data_workers, rank=ctx.rank,
                                                       world_size=ctx.world_size))
        report = ValidationReport(sum(p.total for p in parts), sorted((b for p in parts for b in p.bad),
                                                                      key=lambda b: b.index))
        log_rank0(ctx, "data validation of %s: %s", config.data, report)
    teacher: ResilientTeacher | None = None
    budget = StepBudget(config.stop_after_steps)
    bad: dict[int, BadRecord] = {}  # skipped records met by this rank, all stages
    student_path: Path = Path(config.student)
    recalibrator_path: Path | None = None
    try:
        stages = config.stage_list
        for index, stage in enumerate(stages):
            files = layout.stage(stage)
            if teacher is not None and not any(config.stage_needs_teacher(s) for s in stages[index:]):
                _close_teacher(teacher)  # free the in-process teacher's memory for the stages without it
                teacher = None
            if files.is_done:
                log_rank0(ctx, "stage %d is done (%s): skipping", int(stage), files.done)
            else:
                if budget.exhausted:
                    raise StopRequested(f"stopped before stage {int(stage)}")
                if config.stage_needs_teacher(stage) and teacher is None:
                    teacher = connect_teacher(config, ctx)
                    identity = teacher.identity()
                    check_teacher_identity(layout.root, identity, ctx, config.teacher_addr or config.teacher_model)
                    if identity.get("revision"):
                        teacher.pin_revision(identity["revision"])
                if STAGES[stage].needs_teacher and recalibrator_path is None and stage != Stage.ALIGNMENT:
                    log_rank0(ctx, "stage %d starts with a fresh Recalibrator (no stage-1 export)", int(stage))
                recipe = StageRecipe(config, stage, ctx, samples, teacher, student_path, recalibrator_path, budget)
                try:
                    recipe.setup()
                    if not recipe.train():
                        raise StopRequested(f"stopped in stage {int(stage)} at step {recipe.step}")
                    recipe.export()
                finally:
                    recipe.cleanup()
                bad.update(recipe.bad_records)
            student_path = files.student
            if files.recalibrator.is_file():
                recalibrator_path = files.recalibrator
    except StopRequested as stop:
        log_rank0(ctx, "%s (--stop-after-steps); rerun the same command to resume", stop)
        return None
    finally:
        if teacher is not None:
            _close_teacher(teacher)
    final = layout.final
    if ctx.is_main and not (final / "config.json").is_file():
        tmp = final.with_name("final.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(student_path, tmp)
        tmp.rename(final)
    ctx.barrier()
    log_rank0(ctx, "final student: %s", final)
    log_bad_records(ctx, bad)
    if config.eval_data is not None and ctx.is_main:
        from student_trainer.evaluate import evaluate

        report = evaluate(final, config.eval_data, image_folder=config.image_folder, limit=config.eval_limit)
        report.write(layout.eval_report)
        logger.info("evaluation on %s:\n%s", config.eval_data, report.table())
    return final  # no barrier after the evaluation: the other ranks may leave (no collective timeout)


def log_bad_records(ctx: DistContext, bad: dict[int, BadRecord]) -> None:
    """The run's final report of skipped records (all ranks; the first few with their reasons)."""
    every = {}
    for part in ctx.all_gather_object(bad):
        every.update(part)
    if every:
        shown = "; ".join(f"{b.sample_id!r}: {b.reason}" for b in list(every.values())[:5])
        log_rank0(ctx, "skipped %d bad record(s) during training (first %d: %s)", len(every),
                  min(len(every), 5), shown)
    else:
        log_rank0(ctx, "no bad records met during training")


def _close_teacher(teacher: ResilientTeacher) -> None:
    teacher.close()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
