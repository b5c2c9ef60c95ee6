"""The student trainer's configuration: one validated dataclass, a config file, command-line overrides.

Precedence: the dataclass defaults < ``--config FILE`` (YAML or JSON, keys are the field names below, dashes or
underscores) < command-line flags. The resolved configuration is written to ``OUTPUT/config.json`` with every
run and into every checkpoint and stage export.

Training length is counted in **optimizer steps per stage** (``steps_per_stage``): each step consumes
``grad_accum`` micro-batches of ``micro_batch_size`` samples on every rank, so one step sees
``micro_batch_size * grad_accum * world_size`` samples; epochs wrap around with a fresh shuffle
(:class:`student_trainer.data.ShardedBatches`).
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from genrecal.distill import LossConfig
from genrecal.families.resolution import check_image_options, parse_image_options
from genrecal.stages import STAGES, TIED_POLICIES, Stage, parse_stages
from student_trainer.records import is_hub_id

CONFIGS_DIR = Path(__file__).parent / "configs"
DEFAULT_DEEPSPEED_CONFIG = CONFIGS_DIR / "zero3.json"
PRECISIONS = ("auto", "bf16", "fp32")
WIRE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # teacher_wire_dtype -> torch dtype
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")

# Fields that decide the arithmetic or the data order of a run: a resumed run must keep them.
RUN_DEFINING_FIELDS = (
    "student", "data", "image_folder", "data_limit", "stages", "lr", "lr_end", "warmup_steps", "weight_decay",
    "grad_accum", "micro_batch_size", "steps_per_stage", "alignment_steps", "alignment_lr", "rec_blocks",
    "precision", "seed", "max_length", "ce_weight", "kl_weight", "regularisation", "sft_weight", "grad_clip", "logit_distillation", "logit_distillation_weight",
    "tied_embeddings", "teacher_wire_dtype", "image_options", "teacher_image_options",
)


@dataclass
class TrainConfig:
    """Everything one training run needs. Validated on construction; each message says how to fix the value."""

    # ---- what to train, on what -------------------------------------------------------------------------
    student: str  # student checkpoint folder (HF format, a supported family); stage 1's starting point
    data: str  # training records (records.py): JSON/JSONL/parquet/arrow file, dataset folder or Hub id
    output: str  # run folder: checkpoints, stage exports, metrics, final student
    teacher_addr: str | None = None  # HOST:PORT of the teacher service (stages 1 and 2); comma-separated: replicas
    teacher_model: str | None = None  # or: a teacher checkpoint folder run in this process (single machine)
    teacher_token_file: str | None = None  # file holding this client's bearer token (else $GENRECAL_TEACHER_TOKEN)
    teacher_tls_ca: str | None = None  # PEM CA of the teacher's TLS certificate: connect over TLS
    image_folder: str | None = None  # where image names in the data resolve (default: the data file's folder)
    data_limit: int | None = None  # use only the first N records (bad ones included)
    eval_data: str | None = None  # evaluated with the final student when training ends (rank 0)
    eval_limit: int | None = None  # evaluate on at most N samples
    stages: str = "1,2,3"  # comma-separated stage numbers or names, increasing

    # ---- optimisation (paper defaults) -------------------------------------------------------------------
    deepspeed: str = str(DEFAULT_DEEPSPEED_CONFIG)  # DeepSpeed JSON (ZeRO stage, offload, communication)
    lr: float = 1e-4  # AdamW learning rate at each stage's first step
    lr_end: float = 1e-5  # ... decayed linearly to this at the stage's last step
    warmup_steps: int = 0  # per stage: linear warm-up to lr first (0 = the paper's schedule)
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    grad_accum: int = 16  # micro-batches per optimizer step, per rank
    micro_batch_size: int = 1  # samples per micro-batch, per rank
    steps_per_stage: int = 1000  # optimizer steps of every stage
    alignment_steps: int | None = None  # stage 1's own optimizer steps (None: steps_per_stage)
    alignment_lr: float | None = None  # stage 1's own peak lr (only the fresh Recalibrator trains); None: lr
    rec_blocks: int = 2  # Rec-body decoder blocks
    precision: str = "auto"  # "auto" (bf16 on GPUs that support it, else fp32), "bf16" or "fp32"
    seed: int = 0
    max_length: int | None = 8192  # skip samples longer than this many tokens (student's, or the teacher's)
    # The student's image-resolution knobs, e.g. {"max_pixels": 802816} (genrecal.families.resolution); None =
    # the checkpoint's own. Flag / config text: "k=v,k=v" or a JSON object.
    image_options: dict | None = None
    teacher_image_options: dict | None = None  # the same for an in-process teacher (--teacher-model)

    # ---- losses (genrecal.distill.LossConfig) ------------------------------------------------------------
    ce_weight: float = 1.0  # CE part of L1/L2 (L_ar)
    kl_weight: float = 1.0  # KL part of L1/L2
    regularisation: bool = True  # L2, the regularisation path
    sft_weight: float = 1.0  # L3
    logit_distillation: str | None = None  # baselines: "kd" (same tokenizer) or "uld", added to L3
    logit_distillation_weight: float = 1.0
    # A tied input embedding / LM head in a stage that trains the body but not the head (stage 2): "freeze"
    # keeps the head frozen, as the paper's stage 2 does; "train" lets L1 update it through the input side.
    tied_embeddings: str = "freeze"

    # ---- teacher connection --------------------------------------------------------------------------------
    teacher_timeout_s: float = 300.0  # per teacher call
    teacher_wire_dtype: str = "bf16"  # dtype of features, Recalibrator outputs and gradients on the wire (remote)
    teacher_retries: int = 5  # connection attempts before giving up
    chunk_size: int = 512  # head-scoring chunk of an in-process teacher
    prefetch_steps: int = 1  # steps whose inputs (data, student batches, teacher Encode) are built ahead; 0 = off
    score_overlap: bool = True  # a remote teacher's Score of micro-batch k travels during the forward of k+1
    data_workers: int = 2  # DataLoader worker processes that read and decode records; 0 = in the trainer
    validate_data: bool = False  # check every record up front (in data_workers processes) before training
    log_sample_ids: bool = False  # auditing: each metrics row lists rank 0's sample ids of the step

    # ---- bookkeeping ------------------------------------------------------------------------------------------
    save_every: int = 100  # DeepSpeed checkpoint every N optimizer steps (and at each stage's end)
    keep_checkpoints: int = 2  # DeepSpeed checkpoints kept per stage (older ones are deleted)
    log_every: int = 1  # progress-bar postfix every N steps (metrics are logged every step)
    tensorboard: bool = True
    stop_after_steps: int | None = None  # testing: stop as if killed after N optimizer steps of this invocation

    def __post_init__(self) -> None:
        for name in ("student", "data", "output"):
            if not getattr(self, name):
                raise ValueError(f"{name} is required: pass --{name.replace('_', '-')} (or set it in --config)")
        self.student, self.data, self.output = str(self.student), str(self.data), str(self.output)
        if not (Path(self.student) / "config.json").is_file():
            raise ValueError(
                f"student {self.student!r} is not a checkpoint folder (no config.json); pass the folder that holds "
                "the student's config.json and *.safetensors"
            )
        if not Path(self.data).exists() and not is_hub_id(self.data):
            raise ValueError(f"data {self.data!r} does not exist; pass a .json/.jsonl file, a .parquet/.arrow file, a "
                             "datasets save_to_disk folder or a Hugging Face Hub dataset id (owner/name[:split])")
        if self.image_folder is not None and not Path(self.image_folder).is_dir():
            raise ValueError(f"image_folder {self.image_folder!r} is not a folder")
        if self.eval_data is not None and not Path(self.eval_data).exists() and not is_hub_id(self.eval_data):
            raise ValueError(f"eval_data {self.eval_data!r} does not exist; pass an evaluation data file or drop it")

        if isinstance(self.stages, list | tuple):
            self.stages = ",".join(str(int(Stage(s))) for s in self.stages)
        self.stages = ",".join(str(int(s)) for s in parse_stages(str(self.stages)))
        if self.teacher_addr is not None and self.teacher_model is not None:
            raise ValueError(
                "give either teacher_addr (a teacher service, HOST:PORT) or teacher_model (a checkpoint run in "
                "this process), not both"
            )
        if self.tied_embeddings not in TIED_POLICIES:
            raise ValueError(f"tied_embeddings must be one of {', '.join(TIED_POLICIES)}, got {self.tied_embeddings!r}")
        if self.logit_distillation in ("", "none"):
            self.logit_distillation = None
        if self.needs_teacher and self.teacher_addr is None and self.teacher_model is None:
            why = ("--logit-distillation needs the teacher's distributions" if self.logit_distillation else
                   f"stages {self.stages} include stage 1 or 2, which need the teacher")
            raise ValueError(
                f"{why}: pass --teacher-addr HOST:PORT (a running teacher_server) or --teacher-model PATH (an "
                "in-process teacher), or run --stages 3 without it"
            )
        if self.teacher_addr is not None and not all(
            _HOST_PORT.match(part.strip()) for part in self.teacher_addr.split(",")
        ):
            raise ValueError(
                "teacher_addr must be HOST:PORT (e.g. teacher-node:50051 or [::1]:50051), or several separated by "
                f"commas for teacher replicas, got {self.teacher_addr!r}"
            )
        if self.teacher_model is not None and not (Path(self.teacher_model) / "config.json").is_file():
            raise ValueError(
                f"teacher_model {self.teacher_model!r} is not a checkpoint folder (no config.json); pass the "
                "teacher's folder or use --teacher-addr for a teacher service"
            )
        # Knob names and types are checked for each side's family now; values against its processor at load.
        self.image_options = check_image_options(self.student, self.image_options)
        self.teacher_image_options = parse_image_options(self.teacher_image_options)
        if self.teacher_image_options is not None:
            if self.teacher_model is None:
                raise ValueError(
                    "teacher_image_options apply to an in-process teacher (--teacher-model); a teacher service "
                    "sets its own resolution: start it with --image-options"
                )
            self.teacher_image_options = check_image_options(self.teacher_model, self.teacher_image_options)

        if not Path(self.deepspeed).is_file():
            raise ValueError(
                f"deepspeed config {self.deepspeed!r} does not exist; pass a DeepSpeed JSON or leave the default "
                f"({DEFAULT_DEEPSPEED_CONFIG})"
            )
        for name in ("grad_accum", "micro_batch_size", "steps_per_stage", "rec_blocks", "save_every",
                     "keep_checkpoints", "log_every", "teacher_retries", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("prefetch_steps", "data_workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0 (0 = off), got {value!r}")
        if not isinstance(self.score_overlap, bool):
            raise ValueError(f"score_overlap must be true or false, got {self.score_overlap!r}")
        for name in ("data_limit", "eval_limit", "max_length", "stop_after_steps", "alignment_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or unset, got {value!r}")
        shortest = min(self.steps_for(stage) for stage in Stage)
        if not 0 <= self.warmup_steps < shortest:
            raise ValueError(f"warmup_steps must be in [0, {shortest}) (the shortest stage's steps: "
                             f"steps_per_stage / alignment_steps), got {self.warmup_steps}")
        if self.alignment_lr is not None and not self.alignment_lr > 0:
            raise ValueError(f"alignment_lr must be > 0 (or unset: lr), got {self.alignment_lr}")
        if not 0 < self.lr_end <= self.lr:
            raise ValueError(
                f"need 0 < lr_end <= lr (the learning rate decays from lr to lr_end), got lr={self.lr}, "
                f"lr_end={self.lr_end}"
            )
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(
                f"weight_decay and grad_clip must be >= 0 (grad_clip 0 = off), got {self.weight_decay}, "
                f"{self.grad_clip}"
            )
        if self.teacher_wire_dtype not in WIRE_DTYPES:
            raise ValueError(
                f"teacher_wire_dtype must be one of {', '.join(WIRE_DTYPES)}, got {self.teacher_wire_dtype!r}"
            )
        if not self.teacher_timeout_s > 0:
            raise ValueError(f"teacher_timeout_s must be > 0 seconds, got {self.teacher_timeout_s}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        _ = self.losses  # validates the loss weights (LossConfig raises with its own message)

    # ---- derived ------------------------------------------------------------------------------------------
    @property
    def stage_list(self) -> list[Stage]:
        return parse_stages(self.stages)

    @property
    def needs_teacher(self) -> bool:
        return any(self.stage_needs_teacher(s) for s in self.stage_list)

    def stage_needs_teacher(self, stage: Stage) -> bool:
        """Stages 1 and 2 need the teacher's features; a stage with L3 needs its distributions when a
        logit-distillation baseline is on."""
        return STAGES[stage].needs_teacher or self.uses_logit_distillation(stage)

    def steps_for(self, stage: Stage) -> int:
        """Optimizer steps of ``stage``: ``alignment_steps`` for stage 1 when set, else ``steps_per_stage``."""
        if Stage(stage) == Stage.ALIGNMENT and self.alignment_steps is not None:
            return self.alignment_steps
        return self.steps_per_stage

    def lr_for(self, stage: Stage) -> tuple[float, float]:
        """(peak, end) learning rate of ``stage``: stage 1 with ``alignment_lr`` decays to ``alignment_lr x
        lr_end / lr`` (the same 10x-style ratio as every stage)."""
        if Stage(stage) == Stage.ALIGNMENT and self.alignment_lr is not None:
            return self.alignment_lr, self.alignment_lr * self.lr_end / self.lr
        return self.lr, self.lr_end

    def uses_logit_distillation(self, stage: Stage) -> bool:
        return self.logit_distillation is not None and "L3" in STAGES[stage].losses

    @property
    def losses(self) -> LossConfig:
        return LossConfig(
            ce_weight=self.ce_weight, kl_weight=self.kl_weight, regularisation=self.regularisation,
            sft_weight=self.sft_weight, logit_distillation=self.logit_distillation,
            logit_distillation_weight=self.logit_distillation_weight,
        )

    @property
    def wire_dtype(self) -> torch.dtype:
        """The dtype teacher features, Recalibrator outputs and their gradients travel in (a remote teacher)."""
        return WIRE_DTYPES[self.teacher_wire_dtype]

    @property
    def torch_dtype(self) -> torch.dtype:
        """The training dtype: ``auto`` is bf16 on a GPU that supports it and fp32 otherwise (CPU)."""
        if self.precision == "auto":
            bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            return torch.bfloat16 if bf16 else torch.float32
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def to_dict(self) -> dict:
        out = asdict(self)
        out["resolved_dtype"] = str(self.torch_dtype).removeprefix("torch.")
        return out

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)

    def run_differences(self, saved: dict) -> dict[str, tuple]:
        """``{field: (saved, now)}`` for the run-defining fields that differ from a saved config."""
        now = asdict(self)
        return {k: (saved.get(k), now[k]) for k in RUN_DEFINING_FIELDS if k in saved and saved.get(k) != now[k]}


# ---- the command line ----------------------------------------------------------------------------------------
_HELP = {
    "config": "YAML or JSON file with any of the options below (keys: option names, '_' or '-'); flags given on "
              "the command line override it",
    "student": "student checkpoint folder (HF format, a supported family): the model stage 1 starts from",
    "data": "training data: a .json/.jsonl file (LLaVA / ShareGPT or OpenAI-style messages records, mixed as you "
            "like), a .parquet/.arrow file, a datasets save_to_disk folder, or a Hugging Face Hub dataset id "
            "(owner/name or owner/name:split, through datasets; offline from its cache with HF_HUB_OFFLINE=1); docs/student_trainer.md, "
            "'Data formats'",
    "output": "run folder for checkpoints, stage exports, metrics and the final student; rerunning the same "
              "command resumes from it",
    "teacher_addr": "HOST:PORT of the teacher service (teacher_server), needed by stages 1 and 2",
    "teacher_model": "instead of --teacher-addr: a teacher checkpoint folder loaded in every training process "
                     "(single-machine runs, tests, benchmarks)",
    "teacher_token_file": "file holding the bearer token the teacher service gave this training (its "
                          "--auth-token-file); without it $GENRECAL_TEACHER_TOKEN is used, if set",
    "teacher_tls_ca": "PEM CA bundle that signed the teacher's TLS certificate: connect over TLS and verify it",
    "image_folder": "folder that image file names in the data are relative to (default: the data file's folder)",
    "data_limit": "use only the first N training records (bad ones, skipped when met, included)",
    "eval_data": "evaluation data; the final student is evaluated on it when training ends (eval.json)",
    "eval_limit": "evaluate on at most N samples",
    "stages": "stages to run, comma-separated and increasing: 1=alignment, 2=distillation, 3=sft "
              "(default %(default)s)",
    "deepspeed": "DeepSpeed JSON: ZeRO stage, offload, communication ('auto' batch/precision entries are filled "
                 "from these options; no optimizer/scheduler sections) (default: the shipped ZeRO-3 config)",
    "lr": "AdamW learning rate at the first step of each stage (default %(default)s)",
    "lr_end": "learning rate at the last step of each stage, reached linearly (default %(default)s)",
    "warmup_steps": "steps of linear learning-rate warm-up at the start of each stage, then the linear decay; 0 is "
                    "the paper's schedule (default %(default)s)",
    "weight_decay": "AdamW weight decay (default %(default)s)",
    "grad_clip": "clip the global gradient norm to this; 0 = off (default %(default)s)",
    "grad_accum": "micro-batches per optimizer step on each rank (default %(default)s)",
    "micro_batch_size": "samples per micro-batch on each rank (default %(default)s)",
    "steps_per_stage": "optimizer steps of each stage; one step = micro_batch_size x grad_accum x world size "
                       "samples (default %(default)s)",
    "alignment_steps": "optimizer steps of stage 1 (alignment) alone, where only the fresh Recalibrator trains "
                       "(default: --steps-per-stage). The Recalibrator must be aligned before stage 2: a stage 1 "
                       "that ends with its KL to the teacher above 1 nat/token logs a warning",
    "alignment_lr": "peak learning rate of stage 1 alone (decays by the same lr_end / lr ratio); a fresh "
                    "Recalibrator may take a higher rate than the pre-trained student (default: --lr)",
    "rec_blocks": "decoder blocks in the Recalibrator's body (default %(default)s)",
    "precision": "training precision: auto = bf16 on GPUs that support it, else fp32 (default %(default)s)",
    "seed": "seed for the data order and the Recalibrator's initialisation (default %(default)s)",
    "max_length": "skip (and count, as bad records) samples longer than this many tokens as the student formats "
                  "them, instead of truncating their answers or running out of memory; the teacher refuses samples "
                  "longer than this many of its own tokens. Image tokens count: lower the resolution "
                  "(--image-options) rather than raising it blindly (default %(default)s)",
    "image_options": "the student's image resolution, in its family's own processor knobs: 'KNOB=VALUE,...' or a "
                     "JSON object, e.g. 'max_pixels=802816,min_pixels=3136' (Qwen2-VL), 'max_patches=6' "
                     "(InternVL), 'do_image_splitting=false' (Idefics3/SmolVLM); an unknown knob is refused with "
                     "the family's list (docs/student_trainer.md, 'Image resolution') (default: the checkpoint's "
                     "own settings)",
    "teacher_image_options": "the same for an in-process teacher (--teacher-model); a teacher service takes "
                             "its own --image-options (default: the checkpoint's own settings)",
    "ce_weight": "weight of the CE part of L1/L2 (0 = KL-only ablation) (default %(default)s)",
    "kl_weight": "weight of the KL part of L1/L2 (0 = CE-only ablation) (default %(default)s)",
    "regularisation": "use L2, the regularisation path (--no-regularisation for its ablation) (default on)",
    "sft_weight": "weight of L3, the student's SFT loss (default %(default)s)",
    "logit_distillation": "baseline instead of GenRecal: add a logit-distillation term to L3 in every stage that "
                          "has L3 -- 'kd' (token-level KL to the teacher, same tokenizer only) or 'uld' (Universal "
                          "Logit Distillation, any tokenizers); needs an in-process teacher (--teacher-model) "
                          "(default: none)",
    "logit_distillation_weight": "weight of the --logit-distillation term (default %(default)s)",
    "tied_embeddings": "students with tied input embeddings and LM head, in stage 2 (the body trains, the head "
                       "does not): 'freeze' keeps the shared weight frozen, as the paper keeps the head; 'train' "
                       "lets L1 update it through the input side, which changes the head too (default %(default)s)",
    "teacher_timeout_s": "seconds one teacher call may take, and how long to wait for a restarted teacher to be "
                         "SERVING again before failing (default %(default)s)",
    "teacher_wire_dtype": "dtype the teacher's features, the Recalibrator's outputs and their gradients travel "
                          "in between a remote teacher and this trainer, whatever either computes in: bf16 halves "
                          "the traffic of fp32 (docs/student_trainer.md, 'Wire volume') (default %(default)s)",
    "teacher_retries": "retries of a call the teacher answers UNAVAILABLE (backoff 0.5 s doubling to 15 s) before "
                       "waiting for its health check (default %(default)s)",
    "chunk_size": "tokens per head-scoring chunk of an in-process teacher (default %(default)s)",
    "data_workers": "DataLoader worker processes that read records and decode their images off the training "
                    "thread; 0 = read in the trainer's prefetch thread (default %(default)s)",
    "validate_data": "before training, read every record once in data_workers processes and report the bad "
                     "ones (they are skipped anyway when met; this finds them up front)",
    "log_sample_ids": "auditing: every metrics row also lists the sample ids of its step (rank 0's)",
    "prefetch_steps": "optimizer steps whose inputs (data, student batches and the teacher's Encode of all their "
                      "micro-batches) are prepared in a background thread while the current step computes, so "
                      "the teacher's latency hides behind the student's compute; 0 = off (default %(default)s)",
    "score_overlap": "send each micro-batch's Score to a remote teacher without waiting and run the next "
                     "micro-batch's forward while it travels (one more micro-batch of activations in memory; same "
                     "losses and gradients); --no-score-overlap waits for each Score (default on)",
    "save_every": "write a DeepSpeed checkpoint every N optimizer steps, besides each stage's end "
                  "(default %(default)s)",
    "keep_checkpoints": "DeepSpeed checkpoints kept per stage; older ones are deleted (default %(default)s)",
    "log_every": "update the progress bar's loss display every N steps; metrics are logged every step "
                 "(default %(default)s)",
    "tensorboard": "also write TensorBoard scalars under OUTPUT/tensorboard (default on)",
    "stop_after_steps": "testing: stop abruptly after N optimizer steps of this invocation, without a "
                        "checkpoint, as a crash would (then rerun the command to resume)",
}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (``--snake-case``), with no defaults of its own: an unset flag leaves the
    config file's value, or the field default, in place."""
    parser.add_argument("--config", help=_HELP["config"])
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(f)
        text = _HELP[f.name]
        if "%(default)s" in text:
            text = text.replace("%(default)s", str(defaults[f.name]))
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=text,
                                metavar=f.name.upper() if kind is not str else None)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Field defaults < ``--config`` file < flags given on the command line."""
    values: dict = {}
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
    names = {f.name for f in fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    missing = [n for n in ("student", "data", "output") if values.get(n) in (None, "")]
    if missing:
        flags = ", ".join("--" + n for n in missing)
        raise ValueError(f"missing {flags}: give them on the command line or in the --config file")
    return TrainConfig(**values)


def load_config_file(path: str | Path) -> dict:
    """A YAML (``.yaml``/``.yml``) or JSON config as ``{field: value}``; unknown keys are an error."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); use .yaml/.yml for a YAML file") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of option names to values, got {type(data).__name__}")
    names = {f.name for f in fields(TrainConfig)}
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    data.pop("resolved_dtype", None)  # present in a saved OUTPUT/config.json
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{path}: unknown options {unknown}; known: {', '.join(sorted(names))}")
    return data


def _field_type(f) -> type:
    text = str(f.type)
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if text.startswith(name):
            return kind
    return str


__all__ = ["DEFAULT_DEEPSPEED_CONFIG", "TrainConfig", "add_train_arguments", "config_from_args"]
