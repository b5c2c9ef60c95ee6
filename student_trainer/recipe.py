"""One GenRecal stage under DeepSpeed: :class:`StageRecipe` (``setup / train / save_checkpoint / export /
cleanup``); :func:`student_trainer.driver.run_training` chains the stages.

A stage trains ONE module, :class:`DistillationModule` (the student VLM and, in stages 1 and 2, the Recalibrator),
with a client ``torch.optim.AdamW`` over the stage's trainable parameters (:func:`genrecal.stages.set_trainable`)
and a linear ``lr -> lr_end`` schedule (:func:`linear_schedule`); the DeepSpeed JSON decides ZeRO 0-3, offload and
communication. Stages hand off through checkpoints only (:class:`student_trainer.layout.RunLayout`), exactly as
:mod:`genrecal.inprocess` (the plain-PyTorch reference loop).

**One optimizer step** (forward to the Recalibrator outputs, the Score, loss normalisation over accumulation and
ranks, backward, the optimizer step, the metrics): :class:`student_trainer.step.TrainStep`.

**Resume.** A finished stage has its export and a ``DONE`` marker and is skipped. An unfinished stage restarts
from its latest DeepSpeed checkpoint: module, optimizer and scheduler states, and the client state (optimizer
step, data position = the next micro-batch index of :class:`student_trainer.data.ShardedBatches`, every rank's
RNG states). Metric rows of steps after that checkpoint are dropped and logged again (:class:`MetricsLogger`).

**Teacher restarts.** A remote teacher that restarts mid-step costs a wait, not the run
(:class:`genrecal.resilient_teacher.ResilientTeacher`).
"""

from __future__ import annotations

import gc
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from genrecal.distill import LossParts
from genrecal.families import load_vlm
from genrecal.recalibrator import Recalibrator
from genrecal.recalibrator_file import load_recalibrator, save_recalibrator
from genrecal.resilient_teacher import ResilientTeacher
from genrecal.sample import Sample
from genrecal.stages import STAGES, Stage, frozen_modules_to_eval, set_trainable
from student_trainer.config import TrainConfig
from student_trainer.data import ShardedBatches
from student_trainer.dataset import BadRecord, MicroBatchLoader
from student_trainer.deepspeed_config import offloaded_optimizer, resolve_deepspeed_config, zero_stage
from student_trainer.distributed import (
    DistContext,
    get_rng_state,
    log_rank0,
    seed_everything,
    set_rng_state,
)
from student_trainer.layout import RunLayout, RunRefusedError, write_json
from student_trainer.metrics import MetricsLogger, plot_loss_curves
from student_trainer.module import DistillationModule, full_state_dict, split_state_dict
from student_trainer.prefetch import StepPrefetcher
from student_trainer.step import StepMetrics, TrainStep
from student_trainer.step_inputs import StepBuilder

logger = logging.getLogger(__name__)

class StopRequested(Exception):
    """``--stop-after-steps`` was reached: the run stops as if killed (no checkpoint, no export)."""


def make_optimizer(params, config: TrainConfig, ds_config: dict, lr: float) -> torch.optim.Optimizer:
    """AdamW over ``params`` at peak rate ``lr``; DeepSpeed's vectorised CPU Adam (in AdamW mode, the same update) when the DeepSpeed
    config offloads the optimizer (ZeRO-Offload), where torch's AdamW would step the CPU copy several times slower.
    """
    if offloaded_optimizer(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # JIT-compiles its C++ op on first use (~1 min)

        return DeepSpeedCPUAdam(params, lr=lr, weight_decay=config.weight_decay, adamw_mode=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)


def linear_schedule(optimizer: torch.optim.Optimizer, steps: int, lr: float, lr_end: float, warmup_steps: int = 0):
    """LR from ``lr`` at the first step to ``lr_end`` at the last (step ``steps - 1``), linearly: the paper's
    per-stage schedule. With ``warmup_steps`` > 0 it first rises linearly from ``lr / (warmup_steps + 1)`` to
    ``lr`` over that many steps, then decays over the rest. The optimizer's learning rate must be ``lr``."""
    decay = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0, end_factor=lr_end / lr, total_iters=max(steps - 1 - warmup_steps, 1)
    )
    if warmup_steps <= 0:
        return decay
    warmup = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0 / (warmup_steps + 1), end_factor=1.0, total_iters=warmup_steps
    )
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, decay], milestones=[warmup_steps])


# KL of a Recalibrator path to the teacher (nats per answer token) above which stage 1 has not aligned it: an
# aligned one sits at ~0.1-0.2 in the distillation benchmark, an unaligned one (predicting the end of turn
# everywhere) at 3-6 (docs/notes/recalibrator-alignment.md).
ALIGNED_KL = 1.0


def check_alignment(ctx: DistContext, parts: LossParts) -> None:
    """At the end of stage 1: warn when a Recalibrator path's KL to the teacher (``parts``: the last step's) is
    still above ``ALIGNED_KL``, i.e. stage 2 would train the student through a mapping that does not yet carry the
    teacher's predictions."""
    kls = {path: kl for path, kl in (("L1", parts.l1_kl), ("L2", parts.l2_kl)) if kl is not None}
    if not kls or not ctx.is_main:
        return
    shown = ", ".join(f"{path} {kl:.2f}" for path, kl in kls.items())
    if max(kls.values()) > ALIGNED_KL:
        logger.warning(
            "stage 1 ended with the Recalibrator NOT aligned: KL to the teacher %s nats/token (aligned: < %.1f); "
            "stage 2 would train the student through it. Give stage 1 more steps (--alignment-steps) or a higher "
            "learning rate (--alignment-lr)", shown, ALIGNED_KL)
    else:
        log_rank0(ctx, "stage 1: Recalibrator aligned (KL to the teacher %s nats/token)", shown)


class StepBudget:
    """``--stop-after-steps``: how many optimizer steps this invocation may still take (None = unlimited)."""

    def __init__(self, limit: int | None):
        self.left = limit

    def take(self) -> None:
        if self.left is not None:
            self.left -= 1

    @property
    def exhausted(self) -> bool:
        return self.left is not None and self.left <= 0


# ---- one stage ------------------------------------------------------------------------------------------------------
class StageRecipe:
    """One stage: ``setup()`` (model, optimizer, DeepSpeed, resume), ``train()``, ``save_checkpoint()``,
    ``export()`` (student + Recalibrator + DONE), ``cleanup()``."""

    def __init__(
        self,
        config: TrainConfig,
        stage: Stage,
        ctx: DistContext,
        samples: Sequence[Sample | BadRecord],
        teacher: ResilientTeacher | None,
        student_path: str | Path,
        recalibrator_path: str | Path | None,
        budget: StepBudget | None = None,
    ):
        self.config = config
        self.stage = Stage(stage)
        self.spec = STAGES[self.stage]
        self.ctx = ctx
        self.samples = samples  # a LazySamples data set (or any sequence of samples)
        self.bad_records: dict[int, BadRecord] = {}  # record index -> why it was skipped (this rank, this stage)
        self.builder: StepBuilder | None = None
        self.teacher = teacher if config.stage_needs_teacher(self.stage) else None
        if config.stage_needs_teacher(self.stage) and teacher is None:
            raise ValueError(f"stage {int(stage)} needs the teacher")
        self.student_path = Path(student_path)
        self.recalibrator_path = Path(recalibrator_path) if recalibrator_path is not None else None
        self.budget = budget or StepBudget(None)
        self.layout = RunLayout.of(config)
        self.files = self.layout.stage(self.stage)
        self.ds_dir = self.files.ds_dir
        self.step = 0  # optimizer steps done
        self.steps = config.steps_for(self.stage)  # this stage's optimizer steps
        self.lr, self.lr_end = config.lr_for(self.stage)
        self.engine = None
        self.recalibrator: Recalibrator | None = None
        self.metrics: MetricsLogger | None = None
        self.inputs: StepPrefetcher | None = None
        self.train_step: TrainStep | None = None
        self._hf_ds_config = None

    # ---- setup ---------------------------------------------------------------------------------------------
    def setup(self) -> None:
        import deepspeed

        config, ctx = self.config, self.ctx
        dtype = config.torch_dtype
        self.ds_config = resolve_deepspeed_config(config, ctx.world_size)
        if zero_stage(self.ds_config) == 3:
            # from_pretrained under zero.Init: every rank loads only its shard of the student.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        self.student = load_vlm(self.student_path, dtype=dtype, image_options=config.image_options)
        recalibrator = None
        if self.spec.needs_teacher:
            spec = self.student.adapter.recalibrator_spec(self.student.model)
            if self.recalibrator_path is None:
                seed_everything(config.seed + int(self.stage))  # the same fresh Recalibrator on every rank
                recalibrator = Recalibrator(spec, self.teacher.hidden_size, num_blocks=config.rec_blocks)
            else:  # the previous stage's, checked against this student, teacher and block count
                recalibrator = load_recalibrator(self.recalibrator_path, spec, self.teacher.hidden_size,
                                                 num_blocks=config.rec_blocks)
            recalibrator.to(dtype)  # built outside zero.Init: cast like the student
        self.recalibrator = recalibrator
        self.student.model.train()
        params = set_trainable(self.stage, self.student.adapter.parameter_groups(self.student.model), recalibrator,
                               tied=config.tied_embeddings)
        frozen_modules_to_eval(self.student.model)  # e.g. the vision encoder: no dropout in what never trains
        module = DistillationModule(self.student, recalibrator)
        optimizer = make_optimizer(params, config, self.ds_config, lr=self.lr)
        scheduler = linear_schedule(optimizer, self.steps, self.lr, self.lr_end, config.warmup_steps)
        self.engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=False,
        )
        self.dp_world_size = int(getattr(self.engine, "dp_world_size", ctx.world_size))
        self.batches = ShardedBatches(
            len(self.samples), config.micro_batch_size, config.seed + int(self.stage), ctx.rank, ctx.world_size
        )
        seed_everything(config.seed + 1000 * int(self.stage) + ctx.rank)  # per-rank randomness (dropout)
        resumed = self._load_latest_checkpoint()
        loader = MicroBatchLoader(
            self.samples, self.batches, start=self.step * config.grad_accum,
            stop=self.steps * config.grad_accum, workers=config.data_workers,
        )
        self.builder = StepBuilder(self.samples, loader, self.student, self.teacher, config, self.bad_records,
                                   encode_options=self._encode_options())
        self.inputs = StepPrefetcher(self.builder.build, self.builder.release, start=self.step,
                                     stop=self.steps, depth=config.prefetch_steps)
        self.train_step = TrainStep(self.engine, ctx, config, self.stage, self.teacher, self.inputs, self.builder,
                                    self.bad_records, self.dp_world_size)
        self.metrics = MetricsLogger(
            self.layout.root, stage=int(self.stage), rank=ctx.rank, report_to=config.report_to,
            tensorboard=config.tensorboard, run_config=config.to_dict(),
            resume_step=self.step,  # rows of steps after the checkpoint are logged again
        )
        log_rank0(
            ctx, "stage %d (%s): %s %d/%d steps; %d trainable parameters; ZeRO-%d, %s, %s, world %d%s",
            int(self.stage), self.stage.name.lower(), "resuming at step" if resumed else "starting,",
            self.step, self.steps, sum(getattr(p, "ds_numel", p.numel()) for p in params),
            zero_stage(self.ds_config), type(optimizer).__name__, str(dtype).removeprefix("torch."), ctx.world_size,
            "; each Score overlaps the next micro-batch's forward" if self.train_step.overlap else "",
        )

    def _load_latest_checkpoint(self) -> bool:
        if not (self.ds_dir / "latest").is_file():
            return False
        load_path, client_state = self.engine.load_checkpoint(str(self.ds_dir))
        if load_path is None:
            raise RuntimeError(f"could not load the DeepSpeed checkpoint named by {self.ds_dir / 'latest'}")
        if client_state.get("stage") != int(self.stage):
            raise RuntimeError(f"{load_path} belongs to stage {client_state.get('stage')}, not {int(self.stage)}")
        if client_state.get("world_size") != self.ctx.world_size:
            raise RunRefusedError(
                f"{load_path} was written by {client_state.get('world_size')} ranks, this run has "
                f"{self.ctx.world_size}; resume with the same number of processes (the data order depends on it)"
            )
        if client_state.get("zero_stage") != zero_stage(self.ds_config):
            raise RunRefusedError(
                f"{load_path} was written under ZeRO-{client_state.get('zero_stage')}, the DeepSpeed config "
                f"{self.config.deepspeed} is ZeRO-{zero_stage(self.ds_config)}; resume with the original --deepspeed"
            )
        self.step = int(client_state["step"])
        expected = self.step * self.config.grad_accum
        if int(client_state["data_position"]) != expected:
            raise RuntimeError(f"{load_path}: data position {client_state['data_position']} != step x grad_accum")
        set_rng_state(client_state["rng_states"][self.ctx.rank])
        return True

    # ---- training ----------------------------------------------------------------------------------------
    def train(self) -> bool:
        """Run the remaining optimizer steps; False when ``--stop-after-steps`` cut the stage short."""
        from tqdm.auto import tqdm

        config, ctx = self.config, self.ctx
        progress = tqdm(
            total=self.steps, initial=self.step, disable=not ctx.is_main,
            desc=f"stage {int(self.stage)} ({self.stage.name.lower()})", unit="step", dynamic_ncols=True,
        )
        last: StepMetrics | None = None  # the alignment check reads the last step's
        try:
            while self.step < self.steps:
                if self.budget.exhausted:
                    log_rank0(ctx, "stopping at stage %d step %d (--stop-after-steps)", int(self.stage), self.step)
                    return False
                last = self.train_step.run(self.step)
                self.metrics.log(self.step, last.to_row())
                self.step += 1
                self.budget.take()
                progress.update(1)
                if self.step % config.log_every == 0:
                    progress.set_postfix(loss=f"{last.loss:.4f}", lr=f"{last.lr:.2e}")
                if self.step % config.save_every == 0 or self.step == self.steps:
                    self.save_checkpoint()
        finally:
            progress.close()
        if self.stage == Stage.ALIGNMENT and last is not None:
            check_alignment(ctx, last.parts)
        return True

    def _encode_options(self) -> dict:
        return {"answer_log_probs": True} if self.config.uses_logit_distillation(self.stage) else {}

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """DeepSpeed checkpoint ``ds/step{k}`` with the client state needed to continue exactly here."""
        ctx = self.ctx
        client_state = {
            "stage": int(self.stage),
            "step": self.step,
            "data_position": self.step * self.config.grad_accum,
            "world_size": ctx.world_size,
            "zero_stage": zero_stage(self.ds_config),
            "rng_states": ctx.all_gather_object(get_rng_state()),
        }
        tag = f"step{self.step}"
        self.engine.save_checkpoint(str(self.ds_dir), tag=tag, client_state=client_state)
        if ctx.is_main:
            self.config.save(self.ds_dir / tag / "train_config.json")
            for old in self.files.checkpoint_tags()[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        ctx.barrier()

    def export(self) -> None:
        """``stage{n}/student`` (plain checkpoint of the family), ``recalibrator.safetensors``, then ``DONE``."""
        ctx = self.ctx
        state = full_state_dict(self.engine.module, is_main=ctx.is_main)  # every rank takes part (ZeRO-3 gathers)
        if ctx.is_main:
            student_state, recalibrator_state = split_state_dict(state)
            target = self.files.student
            tmp = target.with_name("student.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            self.student.model.save_pretrained(tmp, state_dict=student_state, safe_serialization=True)
            self.student.processor.save_pretrained(tmp)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
            if self.recalibrator is not None:
                save_recalibrator(self.files.recalibrator, self.recalibrator, state_dict=recalibrator_state)
            self.config.save(self.files.config)
            jsonl = self.metrics.path
            if jsonl.is_file():
                try:
                    plot_loss_curves(jsonl, self.files.loss_curves,
                                     title=f"Stage {int(self.stage)} ({self.stage.name.lower()}) losses")
                except ValueError as exc:  # no loss column (cannot happen in practice); the run goes on
                    logger.warning("no loss curves for stage %d: %s", int(self.stage), exc)
            write_json(self.files.done, {"steps": self.step, "time": time.time()})
        ctx.barrier()

    def cleanup(self) -> None:
        if self.inputs is not None:
            self.inputs.close()  # releases the teacher handles of prefetched steps never trained on
            self.inputs = None
        if self.builder is not None:
            self.builder.close()
            self.builder = None
        if self.metrics is not None:
            self.metrics.close()
        if self.engine is not None:
            destroy = getattr(self.engine, "destroy", None)
            if destroy is not None:
                destroy()
        self.engine = None
        self.student = None
        if self._hf_ds_config is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            self._hf_ds_config = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
