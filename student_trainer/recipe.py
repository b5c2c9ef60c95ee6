"""The GenRecal stages under DeepSpeed: one :class:`StageRecipe` per stage, chained by :func:`run_training`.

A stage trains ONE module, :class:`DistillationModule` (the student VLM and, in stages 1 and 2, the Recalibrator),
with a client ``torch.optim.AdamW`` over the stage's trainable parameters (:func:`genrecal.stages.set_trainable`)
and a linear ``lr -> lr_end`` schedule; the DeepSpeed JSON decides ZeRO 0-3, offload and communication. Stages
hand off through checkpoints only, exactly as :mod:`genrecal.inprocess` (the plain-PyTorch reference loop):

    OUT/config.json, OUT/manifest.json            resolved config; teacher identity + world size of the run
    OUT/stage{n}/ds/step{k}/                      DeepSpeed checkpoints (model, optimizer, scheduler, client state)
    OUT/stage{n}/student/                         the stage's student: a plain checkpoint of its family
    OUT/stage{n}/recalibrator.safetensors         the stage's Recalibrator (stages 1 and 2)
    OUT/stage{n}/loss_curves.png, DONE            the stage's loss curves; DONE is written last
    OUT/metrics/stage{n}.jsonl, OUT/tensorboard/  one row per optimizer step
    OUT/final/                                    the last stage's student (no Recalibrator)

**Loss normalisation.** An optimizer step is ``grad_accum`` micro-batches on each of ``W`` ranks and must equal
one big batch's mean loss. Before its micro-batches run, a rank counts the student and teacher answer tokens of
all of them; one ``all_reduce(SUM)`` gives the global counts ``N_s`` and ``N_t``, passed as ``student_tokens`` /
``teacher_tokens`` so each micro-batch's loss is its *sum* over answer tokens divided by the global count. The sum
of those over micro-batches and ranks is the big batch's mean. DeepSpeed would scale that twice: ``backward``
divides the loss by ``grad_accum`` (undone with ``engine.backward(loss, scale_wrt_gas=False)``) and the gradient
reduction *averages* over the ``W`` data-parallel ranks (undone by back-propagating ``W * loss``; ZeRO 0-3 all
divide by the data-parallel world size). ``tests/student_trainer/test_recipe.py`` checks the result against a
single-process big-batch gradient.

**Resume.** A finished stage has its export and a ``DONE`` marker and is skipped. An unfinished stage restarts
from its latest DeepSpeed checkpoint: module, optimizer and scheduler states, and the client state (optimizer
step, data position = the next micro-batch index of :class:`student_trainer.data.ShardedBatches`, every rank's
RNG states). Metric rows of steps after that checkpoint are dropped and logged again (:class:`MetricsLogger`).

**Teacher restarts.** A remote teacher that restarts mid-step costs a wait, not the run: calls are retried until
it serves again, and samples whose server-side states were lost are re-encoded and checked against the features
the step already holds (:class:`TimedTeacher`), so the step goes on with unchanged mathematics and is neither
lost nor repeated.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import random
import shutil
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from genrecal.client import HandleLost, TeacherClient, TeacherError, TeacherUnavailable
from genrecal.distill import LossConfig, genrecal_objective
from genrecal.families import EncodedBatch, LoadedVLM, load_vlm
from genrecal.inprocess import linear_decay
from genrecal.recalibrator import Recalibrator
from genrecal.sample import Sample
from genrecal.stages import STAGES, Stage, set_trainable
from genrecal.teacher import InProcessTeacher, TeacherFeatures
from student_trainer.config import TrainConfig
from student_trainer.data import ShardedBatches, load_dataset_samples
from student_trainer.metrics import MetricsLogger, plot_loss_curves

logger = logging.getLogger(__name__)

# Loss parts summed over micro-batches and ranks (each is already divided by the global token count).
LOSS_PARTS = ("L1_ce", "L1_kl", "L2_ce", "L2_kl", "L3")
STUDENT_PREFIX = "student."
RECALIBRATOR_PREFIX = "recalibrator."


class RunRefusedError(ValueError):
    """The run cannot start or resume as asked (the message says why and how to fix it)."""


class TeacherMismatchError(RunRefusedError):
    """The teacher differs from the one the run (its manifest) was started with."""


class StopRequested(Exception):
    """``--stop-after-steps`` was reached: the run stops as if killed (no checkpoint, no export)."""


# ---- distributed context ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks (a sync point)."""
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device)
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.cpu().tolist()

    def all_gather_object(self, obj) -> list:
        if not dist.is_initialized() or self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    @property
    def _comm_device(self) -> torch.device:
        backend = dist.get_backend() if dist.is_initialized() else "gloo"
        return self.device if backend == "nccl" else torch.device("cpu")


def set_single_process_env() -> None:
    """Without a launcher, describe a world of one process so DeepSpeed can initialise (free port)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def init_distributed() -> DistContext:
    """Join the process group (the launcher's, or a world of one) and pick this rank's device."""
    import deepspeed

    set_single_process_env()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    deepspeed.init_distributed()
    return DistContext(dist.get_rank(), local_rank, dist.get_world_size(), device)


def log_rank0(ctx: DistContext, message: str, *args) -> None:
    if ctx.is_main:
        logger.info(message, *args)


# ---- DeepSpeed configuration -----------------------------------------------------------------------------------
def resolve_deepspeed_config(config: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed JSON with its ``"auto"`` entries filled from ``config``; conflicting explicit values refused."""
    path = Path(config.deepspeed)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON ({exc})") from exc
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ValueError(
                f"DeepSpeed config {path} declares an {section!r}; the trainer uses its own AdamW and linear "
                "schedule (--lr, --lr-end, --weight-decay): remove that section"
            )
    if ds.get("fp16", {}).get("enabled") is True:
        raise ValueError(f"DeepSpeed config {path} enables fp16; use bf16 (--precision bf16) or fp32")
    bf16 = config.torch_dtype == torch.bfloat16
    wanted = {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "train_batch_size": config.micro_batch_size * config.grad_accum * world_size,
        "gradient_clipping": float(config.grad_clip),
    }
    for key, value in wanted.items():
        current = ds.get(key, "auto")
        if current == "auto":
            ds[key] = value
        elif current != value:
            flag = {"train_micro_batch_size_per_gpu": "--micro-batch-size", "gradient_accumulation_steps":
                    "--grad-accum", "gradient_clipping": "--grad-clip"}.get(key, "--micro-batch-size/--grad-accum")
            raise ValueError(
                f"DeepSpeed config {path} sets {key}={current!r} but the trainer's options give {value!r}; set it "
                f"to \"auto\" in the JSON (it is then filled from {flag}) or make them agree"
            )
    section = ds.setdefault("bf16", {})
    if section.get("enabled", "auto") == "auto":
        section["enabled"] = bf16
    elif bool(section["enabled"]) != bf16:
        raise ValueError(
            f"DeepSpeed config {path} sets bf16.enabled={section['enabled']} but the precision is "
            f"{config.precision!r} ({config.torch_dtype}); set it to \"auto\" or pass a matching --precision"
        )
    ds.pop("fp16", None)
    ds.setdefault("zero_force_ds_cpu_optimizer", False)  # the client AdamW also drives ZeRO-Offload
    ds.setdefault("steps_per_print", 10**9)
    return ds


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


# ---- the teacher ------------------------------------------------------------------------------------------------
class TimedTeacher:
    """Wraps a teacher (in-process or remote: same methods), adds up the seconds spent waiting on it, and rides out
    a restart of a remote teacher without losing or repeating a step.

    **Teacher restarts.** A remote teacher keeps each sample's prediction states under a handle between
    ``encode`` and ``score``; a restarted (or memory-pressed) teacher has lost them and ``score`` raises
    :class:`~genrecal.client.HandleLost`. The wrapper remembers the sample behind every handle it encoded, so it
    then re-encodes the score call's samples, checks that the new features have the originals' sample ids,
    answer token ids and feature shapes (a different teacher cannot answer at all: the client sends the run's
    ``expect_revision``, which such a server refuses), moves the new handles into the *existing* feature objects
    and retries the score once. The student keeps the features it already has, and a deterministic teacher
    recomputes the same prediction states, so the step's mathematics is unchanged. Each recovery logs a warning
    and counts in ``recoveries``.

    Waiting for the teacher to come back is bounded in two layers: the client retries UNAVAILABLE with
    exponential backoff (0.5 s doubling, capped at 15 s, ``retries`` times: about 15 s for 5 retries, 60 s for
    8, plus 15 s per further retry); when those are spent, the wrapper waits up to ``restart_wait_s`` seconds for
    the teacher's health to turn SERVING (a big teacher takes minutes to load) and then repeats the call once, so
    one call waits at most about ``2 x client backoff + restart_wait_s``. An in-process teacher has no handles
    and never becomes unavailable: the wrapper only times it.
    """

    def __init__(self, teacher, *, restart_wait_s: float | None = None, one_request_per_step: bool = False,
                 **encode_kwargs):
        self.teacher = teacher
        self.encode_kwargs = encode_kwargs  # e.g. the remote client's max_length
        self.restart_wait_s = restart_wait_s  # None: give up when the client's own retries are spent
        self.one_request_per_step = one_request_per_step  # encode_step: all micro-batches in one encode call
        self.wait_s = 0.0
        self.recoveries = 0  # re-encodes after a lost handle (teacher restarted or evicted our states)
        self._samples: dict[str, Sample] = {}  # handle -> the sample encoded under it (remote teachers only)

    def _timed(self, fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.wait_s += time.perf_counter() - start

    def _patient(self, method: str, fn):
        """``fn()``; when the client's UNAVAILABLE retries are spent, wait for the teacher to serve, then once more."""
        try:
            return fn()
        except TeacherUnavailable as exc:
            if not self.restart_wait_s:
                raise
            logger.warning(
                "teacher unavailable for %s after the client's retries (%s); waiting up to %.0f s for it to serve "
                "again (restarting?)", method, exc.details, self.restart_wait_s,
            )
            self.teacher.wait_until_serving(self.restart_wait_s)
            return fn()

    def _encode(self, samples: Sequence[Sample]) -> list[TeacherFeatures]:
        features = self._patient("encode", lambda: self.teacher.encode(samples, **self.encode_kwargs))
        if len(features) != len(samples):
            raise RuntimeError(f"the teacher returned {len(features)} features for {len(samples)} samples")
        return features

    def encode(self, samples: Sequence[Sample]) -> list[TeacherFeatures]:
        samples = list(samples)
        features = self._timed(self._encode, samples)
        for sample, f in zip(samples, features, strict=True):
            if f.handle:
                self._samples[f.handle] = sample
        return features

    def encode_step(self, groups: Sequence[Sequence[Sample]]) -> list[list[TeacherFeatures]]:
        """The features of one optimizer step's micro-batches (``groups``), per micro-batch.

        A remote teacher gets them in ONE request (``one_request_per_step``): one round trip and one batching wait
        instead of ``grad_accum``, and the server splits its forwards by its own ``max_batch_tokens``. An
        in-process teacher encodes micro-batch by micro-batch, so its forward never exceeds a micro-batch.
        """
        if not self.one_request_per_step:
            return [self.encode(group) for group in groups]
        flat = self.encode([sample for group in groups for sample in group])
        bounds = np.cumsum([0, *map(len, groups)]).tolist()
        return [flat[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]

    def score(self, features: Sequence[TeacherFeatures], *args, **kwargs):
        return self._timed(self._score, features, *args, **kwargs)

    def _score(self, features: Sequence[TeacherFeatures], *args, **kwargs):
        def call():
            return self._patient("score", lambda: self.teacher.score(features, *args, **kwargs))

        try:
            return call()
        except HandleLost as lost:
            self._reencode(features, lost)
        return call()  # once: the handles are fresh

    def _reencode(self, features: Sequence[TeacherFeatures], lost: HandleLost) -> None:
        """Re-encode ``features``' samples and move the new handles into ``features`` (in place)."""
        unknown = [f.sample_id for f in features if f.handle not in self._samples]
        if unknown:
            raise RuntimeError(
                f"the teacher lost the handles of samples {unknown}, which were not encoded through this wrapper, "
                "so they cannot be re-encoded"
            ) from lost
        samples = [self._samples[f.handle] for f in features]
        logger.warning(
            "teacher lost the states of %d sample(s) (%s): restarted or evicted them; re-encoding and retrying the "
            "score", len(features), lost.details,
        )
        fresh = self._encode(samples)
        for old, new in zip(features, fresh, strict=True):
            problem = _feature_difference(old, new)
            if problem:
                raise TeacherMismatchError(
                    f"after a teacher restart, sample {old.sample_id!r} re-encodes differently ({problem}): the "
                    f"teacher at {getattr(self.teacher, 'address', '?')} is not the one this step started with. "
                    "Restart it with the run's teacher checkpoint and rerun the command to resume"
                )
        stale = [replace(f) for f in features]  # the old handles, for a best-effort release
        for old, new, sample in zip(features, fresh, samples, strict=True):
            del self._samples[old.handle]
            old.handle = new.handle
            self._samples[new.handle] = sample
        try:  # frees what an eviction left behind; after a restart there is nothing left and this is a no-op
            self.teacher.release(stale)
        except TeacherError as exc:
            logger.debug("releasing stale handles failed (ignored): %s", exc)
        self.recoveries += 1
        logger.warning("teacher recovered: %d sample(s) re-encoded with identical answers (recovery %d)",
                       len(features), self.recoveries)

    def release(self, features: Sequence[TeacherFeatures]) -> None:
        for f in features:
            if f.handle:
                self._samples.pop(f.handle, None)
        self._timed(self._patient, "release", lambda: self.teacher.release(features))

    def __getattr__(self, name):  # hidden_size, identity(), close(), ...
        return getattr(self.teacher, name)


def _feature_difference(old: TeacherFeatures, new: TeacherFeatures) -> str | None:
    """What differs between a sample's original and re-encoded teacher features (ids and shapes), or None."""
    if old.sample_id != new.sample_id:
        return f"sample id {new.sample_id!r}"
    if not torch.equal(old.answer_token_ids.cpu(), new.answer_token_ids.cpu()):
        return f"answer token ids {new.answer_token_ids.tolist()} instead of {old.answer_token_ids.tolist()}"
    for name in ("answer_segments", "question_segments"):
        before = [tuple(t.shape) for t in getattr(old, name)]
        after = [tuple(t.shape) for t in getattr(new, name)]
        if before != after:
            return f"{name} shapes {after} instead of {before}"
    return None


def open_teacher(
    *,
    addr: str | None = None,
    model: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    max_length: int | None = None,
    chunk_size: int = 512,
    timeout_s: float = 300.0,
    retries: int = 5,
    token_file: str | None = None,
    tls_ca: str | None = None,
) -> TimedTeacher:
    """A teacher: a connection to the service at ``addr``, or the checkpoint ``model`` loaded in this process.

    Remote: every call has the deadline ``timeout_s``; UNAVAILABLE is retried ``retries`` times with backoff
    (0.5 s doubling, capped at 15 s), and after that the wrapper waits up to ``timeout_s`` more for the teacher to
    serve again (a restart) before it gives up (:class:`TimedTeacher`).
    """
    if (addr is None) == (model is None):
        raise ValueError("pass exactly one of a teacher address (--teacher-addr) and a teacher model (--teacher-model)")
    if addr is not None:
        client = TeacherClient(addr, timeout_s=timeout_s, retries=retries, backoff_s=0.5, max_backoff_s=15.0,
                               token_file=token_file, tls_ca=tls_ca)
        client.wait_until_serving(timeout_s)
        return TimedTeacher(client, restart_wait_s=timeout_s, one_request_per_step=True, max_length=max_length)
    vlm = load_vlm(model, dtype=dtype)
    vlm.model.to(device)
    return TimedTeacher(InProcessTeacher(vlm, max_length=max_length, chunk_size=chunk_size))


def connect_teacher(config: TrainConfig, ctx: DistContext) -> TimedTeacher:
    """This rank's own teacher (each rank has its own connection, or its own in-process copy)."""
    return open_teacher(
        addr=config.teacher_addr, model=config.teacher_model, device=ctx.device, dtype=config.torch_dtype,
        max_length=config.max_length, chunk_size=config.chunk_size, timeout_s=config.teacher_timeout_s,
        retries=config.teacher_retries, token_file=config.teacher_token_file, tls_ca=config.teacher_tls_ca,
    )


def _describe_teacher(identity: dict) -> str:
    return f"{identity.get('model_name')!r} (revision {identity.get('revision')})"


def check_teacher_identity(output: Path, identity: dict, ctx: DistContext, where: str) -> None:
    """Record the teacher in ``OUT/manifest.json`` at first contact; refuse a different one afterwards."""
    path = output / "manifest.json"
    if ctx.is_main and path.is_file():
        manifest = json.loads(path.read_text())
        if "teacher" not in manifest:
            manifest["teacher"] = identity
            _write_json(path, manifest)
    elif ctx.is_main:
        _write_json(path, {"teacher": identity, "world_size": ctx.world_size})
    ctx.barrier()
    recorded = json.loads(path.read_text())["teacher"]
    if recorded != identity:
        differing = sorted(k for k in set(recorded) | set(identity) if recorded.get(k) != identity.get(k))
        raise TeacherMismatchError(
            f"run {str(output)!r} was started with teacher {_describe_teacher(recorded)}, but the teacher at "
            f"{where} is {_describe_teacher(identity)} (differs in {', '.join(differing)}). Connect to the teacher "
            "the run was started with, or start a new run with another --output"
        )


# ---- the trained module -----------------------------------------------------------------------------------------
class DistillationModule(nn.Module):
    """The student VLM and the Recalibrator as ONE module, so DeepSpeed shards, steps and checkpoints them together.

    ``state_dict`` keys are ``student.<the HF model's keys>`` and ``recalibrator.<Recalibrator keys>``.
    """

    def __init__(self, student: LoadedVLM, recalibrator: Recalibrator | None):
        super().__init__()
        self.student = student.model
        self.recalibrator = recalibrator
        self._student = student  # the adapter and processor around self.student (not a submodule)

    def forward(
        self,
        stage: Stage,
        batch: EncodedBatch,
        *,
        teacher=None,
        features: Sequence[TeacherFeatures] | None = None,
        teacher_tokens: float | None = None,
        student_tokens: float | None = None,
        losses: LossConfig,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The micro-batch's loss (a tensor: DeepSpeed hooks its backward on it) and its metrics."""
        objective = genrecal_objective(
            stage, self._student, batch, recalibrator=self.recalibrator, teacher=teacher, features=features,
            teacher_tokens=teacher_tokens, student_tokens=student_tokens, losses=losses,
        )
        return objective.loss, objective.metrics


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
        samples: Sequence[Sample],
        teacher: TimedTeacher | None,
        student_path: str | Path,
        recalibrator_path: str | Path | None,
        budget: StepBudget | None = None,
    ):
        self.config = config
        self.stage = Stage(stage)
        self.spec = STAGES[self.stage]
        self.ctx = ctx
        self.samples = samples
        self.teacher = teacher if self.spec.needs_teacher else None
        if self.spec.needs_teacher and teacher is None:
            raise ValueError(f"stage {int(stage)} needs the teacher")
        self.student_path = Path(student_path)
        self.recalibrator_path = Path(recalibrator_path) if recalibrator_path is not None else None
        self.budget = budget or StepBudget(None)
        self.output = Path(config.output)
        self.stage_dir = self.output / f"stage{int(self.stage)}"
        self.ds_dir = self.stage_dir / "ds"
        self.step = 0  # optimizer steps done
        self.engine = None
        self.metrics: MetricsLogger | None = None
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
        self.student = load_vlm(self.student_path, dtype=dtype)
        recalibrator = None
        if self.spec.needs_teacher:
            _seed_everything(config.seed + int(self.stage))  # the same fresh Recalibrator on every rank
            recalibrator = Recalibrator(
                self.student.adapter.recalibrator_spec(self.student.model), self.teacher.hidden_size,
                num_blocks=config.rec_blocks,
            )
            if self.recalibrator_path is not None:
                recalibrator.load_state_dict(load_file(self.recalibrator_path), strict=True)
            recalibrator.to(dtype)  # built outside zero.Init: cast like the student
        self.recalibrator_keys = list(recalibrator.state_dict()) if recalibrator is not None else []
        self.student.model.train()
        params = set_trainable(self.stage, self.student.adapter.parameter_groups(self.student.model), recalibrator)
        module = DistillationModule(self.student, recalibrator)
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        scheduler = linear_decay(optimizer, config.steps_per_stage, config.lr, config.lr_end)
        self.engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=False,
        )
        self.dp_world_size = int(getattr(self.engine, "dp_world_size", ctx.world_size))
        self.batches = ShardedBatches(
            len(self.samples), config.micro_batch_size, config.seed + int(self.stage), ctx.rank, ctx.world_size
        )
        _seed_everything(config.seed + 1000 * int(self.stage) + ctx.rank)  # per-rank randomness (dropout)
        resumed = self._load_latest_checkpoint()
        self.metrics = MetricsLogger(
            self.output, stage=int(self.stage), rank=ctx.rank, tensorboard=config.tensorboard,
            resume_step=self.step,  # rows of steps after the checkpoint are logged again
        )
        log_rank0(
            ctx, "stage %d (%s): %s %d/%d steps; %d trainable parameters; ZeRO-%d, %s, world %d",
            int(self.stage), self.stage.name.lower(), "resuming at step" if resumed else "starting,",
            self.step, config.steps_per_stage, sum(getattr(p, "ds_numel", p.numel()) for p in params),
            zero_stage(self.ds_config),
            str(dtype).removeprefix("torch."), ctx.world_size,
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
        _set_rng_state(client_state["rng_states"][self.ctx.rank])
        return True

    # ---- training ----------------------------------------------------------------------------------------
    def train(self) -> bool:
        """Run the remaining optimizer steps; False when ``--stop-after-steps`` cut the stage short."""
        from tqdm.auto import tqdm

        config, ctx = self.config, self.ctx
        progress = tqdm(
            total=config.steps_per_stage, initial=self.step, disable=not ctx.is_main,
            desc=f"stage {int(self.stage)} ({self.stage.name.lower()})", unit="step", dynamic_ncols=True,
        )
        try:
            while self.step < config.steps_per_stage:
                if self.budget.exhausted:
                    log_rank0(ctx, "stopping at stage %d step %d (--stop-after-steps)", int(self.stage), self.step)
                    return False
                start = time.perf_counter()
                lr = self.engine.lr_scheduler.get_last_lr()[0]  # the rate this step uses
                row = self.accumulate_gradients(self.step)
                self.engine.step()  # the accumulation boundary: reduce, clip, AdamW, schedule
                step_time = time.perf_counter() - start
                row.update(lr=lr, step_time_s=step_time, tokens_per_s=row.pop("sequence_tokens") / step_time)
                wait = ctx.all_reduce_sum([row.pop("teacher_wait_s") / step_time])[0] / ctx.world_size
                if self.spec.needs_teacher:
                    row["teacher_wait_share"] = wait  # mean over ranks
                self.metrics.log(self.step, row)
                self.step += 1
                self.budget.take()
                progress.update(1)
                if self.step % config.log_every == 0:
                    progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}")
                if self.step % config.save_every == 0 or self.step == config.steps_per_stage:
                    self.save_checkpoint()
        finally:
            progress.close()
        return True

    def accumulate_gradients(self, step: int) -> dict:
        """Forward and backward of optimizer step ``step``'s micro-batches; gradients end reduced over ranks.

        Returns the step's metrics as global values: loss parts (big-batch means), token counts, samples.
        """
        config, ctx, engine = self.config, self.ctx, self.engine
        first = step * config.grad_accum  # data position: ShardedBatches micro-batch index
        groups = [[self.samples[i] for i in self.batches.batch(first + m)] for m in range(config.grad_accum)]
        wait_before = self.teacher.wait_s if self.teacher is not None else 0.0
        student_batches = [self.student.encode(group, max_length=config.max_length) for group in groups]
        features = self.teacher.encode_step(groups) if self.teacher else [None] * len(groups)

        # Global answer-token counts of the whole step (all micro-batches, all ranks): the normalisers.
        local = [
            sum(int((b.labels()[:, 1:] != -100).sum()) for b in student_batches),
            sum(f.num_answer_tokens for fs in features if fs for f in fs),
            sum(int(b.inputs["attention_mask"].sum()) for b in student_batches),
        ]
        student_tokens, teacher_tokens, sequence_tokens = ctx.all_reduce_sum(local)  # sync point
        totals = dict.fromkeys((*LOSS_PARTS, "loss"), 0.0)
        for m, (batch, feats) in enumerate(zip(student_batches, features, strict=True)):
            batch = batch.to(ctx.device, self.config.torch_dtype)
            loss, metrics = engine(
                self.stage, batch, teacher=self.teacher, features=feats,
                teacher_tokens=teacher_tokens if self.teacher else None, student_tokens=student_tokens,
                losses=config.losses,
            )
            # The loss is already this micro-batch's share of the big-batch mean: no 1/grad_accum, and
            # x dp_world_size against the gradient averaging over ranks.
            engine.backward(loss * self.dp_world_size, scale_wrt_gas=False)
            if m < len(student_batches) - 1:
                engine.step()  # not a boundary: only counts the micro-step
            for key in LOSS_PARTS:
                totals[key] += metrics.get(key, 0.0)
            totals["loss"] += float(loss.detach())
        if self.teacher is not None:
            self.teacher.release([f for feats in features for f in feats])  # one call per step
        summed = dict(zip(totals, ctx.all_reduce_sum(list(totals.values())), strict=True))
        row = {k: v for k, v in summed.items() if k == "loss" or self._has_part(k)}
        row.update(
            student_answer_tokens=int(student_tokens), samples=config.micro_batch_size * config.grad_accum *
            ctx.world_size, data_position=first + config.grad_accum, sequence_tokens=sequence_tokens,
            teacher_wait_s=(self.teacher.wait_s - wait_before) if self.teacher is not None else 0.0,
        )
        if self.teacher is not None:
            row["teacher_answer_tokens"] = int(teacher_tokens)
        return row

    def _has_part(self, key: str) -> bool:
        name = key.split("_")[0]
        return name in self.spec.losses and (name != "L2" or self.config.regularisation)

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
            "rng_states": ctx.all_gather_object(_get_rng_state()),
        }
        tag = f"step{self.step}"
        self.engine.save_checkpoint(str(self.ds_dir), tag=tag, client_state=client_state)
        if ctx.is_main:
            self.config.save(self.ds_dir / tag / "train_config.json")
            tags = sorted(
                (p for p in self.ds_dir.glob("step*") if p.is_dir() and p.name[4:].isdigit()),
                key=lambda p: int(p.name[4:]),
            )
            for old in tags[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        ctx.barrier()

    def export(self) -> None:
        """``stage{n}/student`` (plain checkpoint of the family), ``recalibrator.safetensors``, then ``DONE``."""
        ctx = self.ctx
        state = self._full_state_dict()  # every rank takes part (ZeRO-3 gathers); a dict on rank 0
        if ctx.is_main:
            student_state = {k[len(STUDENT_PREFIX):]: v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}
            target = self.stage_dir / "student"
            tmp = self.stage_dir / "student.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            self.student.model.save_pretrained(tmp, state_dict=student_state, safe_serialization=True)
            self.student.processor.save_pretrained(tmp)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
            if self.recalibrator_keys:
                recalibrator_state = {
                    k: state[RECALIBRATOR_PREFIX + k].contiguous() for k in self.recalibrator_keys
                }
                save_file(recalibrator_state, self.stage_dir / "recalibrator.safetensors")
            self.config.save(self.stage_dir / "config.json")
            jsonl = self.metrics.path
            if jsonl.is_file():
                try:
                    plot_loss_curves(jsonl, self.stage_dir / "loss_curves.png",
                                     title=f"Stage {int(self.stage)} ({self.stage.name.lower()}) losses")
                except ValueError as exc:  # no loss column (cannot happen in practice); the run goes on
                    logger.warning("no loss curves for stage %d: %s", int(self.stage), exc)
            _write_json(self.stage_dir / "DONE", {"steps": self.step, "time": time.time()})
        ctx.barrier()

    def _full_state_dict(self) -> dict | None:
        if zero_stage(self.ds_config) == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.engine.module.state_dict() if self.ctx.is_main else None
        if state is None:
            return None
        return {k: v.detach().cpu() for k, v in state.items()}

    def cleanup(self) -> None:
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


# ---- the whole run ------------------------------------------------------------------------------------------------
def prepare_output(config: TrainConfig, ctx: DistContext) -> None:
    """Refuse to resume with a different run-defining config or world size; save the resolved config."""
    output = Path(config.output)
    saved_path, manifest_path = output / "config.json", output / "manifest.json"
    if saved_path.is_file():
        differences = config.run_differences(json.loads(saved_path.read_text()))
        if differences:
            shown = "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in differences.items())
            raise RunRefusedError(
                f"{output} holds a run with other settings ({shown}); rerun with the same settings to resume it, "
                "or pass a new --output"
            )
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("world_size") not in (None, ctx.world_size) and _stage_in_progress(config):
            raise RunRefusedError(
                f"{output} was trained by {manifest['world_size']} ranks and a stage is half done; resume it with "
                f"{manifest['world_size']} processes (the data order and ZeRO partitions depend on it)"
            )
    ctx.barrier()
    if ctx.is_main:
        output.mkdir(parents=True, exist_ok=True)
        config.save(saved_path)
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        manifest["world_size"] = ctx.world_size
        _write_json(manifest_path, manifest)
    ctx.barrier()


def _stage_in_progress(config: TrainConfig) -> bool:
    output = Path(config.output)
    return any(
        (output / f"stage{int(s)}" / "ds" / "latest").is_file() and not (output / f"stage{int(s)}" / "DONE").is_file()
        for s in config.stage_list
    )


def run_training(config: TrainConfig, ctx: DistContext) -> Path | None:
    """Run (or resume) the configured stages; return ``OUT/final``, or None when stopped early."""
    output = Path(config.output)
    prepare_output(config, ctx)
    samples, report = load_dataset_samples(config.data, image_folder=config.image_folder, limit=config.data_limit)
    log_rank0(ctx, "training data: %d samples (%s)", len(samples), report)
    teacher: TimedTeacher | None = None
    budget = StepBudget(config.stop_after_steps)
    student_path: Path = Path(config.student)
    recalibrator_path: Path | None = None
    try:
        stages = config.stage_list
        for index, stage in enumerate(stages):
            stage_dir = output / f"stage{int(stage)}"
            if teacher is not None and not any(STAGES[s].needs_teacher for s in stages[index:]):
                _close_teacher(teacher)  # free the in-process teacher's memory for the stages without it
                teacher = None
            if (stage_dir / "DONE").is_file():
                log_rank0(ctx, "stage %d is done (%s): skipping", int(stage), stage_dir / "DONE")
            else:
                if budget.exhausted:
                    raise StopRequested(f"stopped before stage {int(stage)}")
                if STAGES[stage].needs_teacher and teacher is None:
                    teacher = connect_teacher(config, ctx)
                    where = config.teacher_addr or config.teacher_model
                    identity = teacher.identity()
                    check_teacher_identity(output, identity, ctx, where)
                    if hasattr(teacher.teacher, "expect_revision") and identity.get("revision"):
                        # The service then refuses every call should another model be swapped in mid-run.
                        teacher.teacher.expect_revision = identity["revision"]
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
            student_path = stage_dir / "student"
            if (stage_dir / "recalibrator.safetensors").is_file():
                recalibrator_path = stage_dir / "recalibrator.safetensors"
    except StopRequested as stop:
        log_rank0(ctx, "%s (--stop-after-steps); rerun the same command to resume", stop)
        return None
    finally:
        if teacher is not None:
            _close_teacher(teacher)
    final = output / "final"
    if ctx.is_main and not (final / "config.json").is_file():
        tmp = output / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(student_path, tmp)
        tmp.rename(final)
    ctx.barrier()
    log_rank0(ctx, "final student: %s", final)
    if config.eval_data is not None and ctx.is_main:
        from student_trainer.evaluate import evaluate

        report = evaluate(final, config.eval_data, image_folder=config.image_folder, limit=config.eval_limit)
        report.write(output / "eval.json")
        logger.info("evaluation on %s:\n%s", config.eval_data, report.table())
    return final  # no barrier after the evaluation: the other ranks may leave (no collective timeout)


def _close_teacher(teacher: TimedTeacher) -> None:
    close = getattr(teacher.teacher, "close", None)
    if close is not None:
        close()
    teacher.teacher = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- small helpers ----------------------------------------------------------------------------------------------
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _get_rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
