"""The student trainer's configuration: one validated dataclass per command, and their command lines.

Every field is also a flag of ``python -m student_trainer`` / ``genrecal-train`` (:mod:`genrecal.cli`: the help
sits on the field, flags are listed by group). Precedence: the field defaults < ``--config FILE`` (YAML or JSON,
keys are the field names, dashes or underscores) < command-line flags. The resolved configuration is written to
``OUTPUT/config.json`` with every run and into every checkpoint and stage export.

Training length is counted in **optimizer steps per stage** (``steps_per_stage``): each step consumes
``grad_accum`` micro-batches of ``micro_batch_size`` samples on every rank, so one step sees
``micro_batch_size * grad_accum * world_size`` samples; epochs wrap around with a fresh shuffle
(:class:`student_trainer.data.ShardedBatches`).

This module imports no torch at import time (``--help`` answers at once); validation and the dtype properties
import what they need when a config is built.
"""

from __future__ import annotations

import json
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from genrecal.cli import option, upgrade_old_names
from student_trainer.metrics import resolve_report_to
from student_trainer.teacher_options import MODEL, TeacherOptions

if TYPE_CHECKING:
    import torch

    from genrecal.distill import LossConfig
    from genrecal.stages import Stage

CONFIGS_DIR = Path(__file__).parent / "configs"
DEFAULT_DEEPSPEED_CONFIG = CONFIGS_DIR / "zero3.json"
# torch / transformers / vLLM names. Earlier spellings (bf16, fp32; the key `precision`) are still read from a
# --config file or a saved run config.json, so old run folders resume.
Dtype = Literal["auto", "bfloat16", "float32"]
WireDtype = Literal["bfloat16", "float32"]
Tracker = Literal["tensorboard", "wandb", "none"]
OLD_DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32"}

# Fields that decide the arithmetic or the data order of a run: a resumed run must keep them.
RUN_DEFINING_FIELDS = (
    "student", "data", "data_split", "data_config", "image_folder", "data_limit", "stages", "lr", "lr_end",
    "warmup_steps", "weight_decay", "grad_accum", "micro_batch_size", "steps_per_stage", "alignment_steps",
    "alignment_lr", "rec_blocks", "dtype", "seed", "max_length", "ce_weight", "kl_weight", "regularisation",
    "sft_weight", "grad_clip", "logit_distillation", "logit_distillation_weight", "tied_embeddings",
    "teacher_wire_dtype", "image_options", "teacher_image_options",
)
DATA = "data"
SCHEDULE = "stages and schedule"
LOSSES = "losses (docs/method.md)"
MEMORY = "precision and memory"
OUTPUT = "output and logging"
RESOLUTION_HELP = ("'KNOB=VALUE,...' or a JSON object in the family's own processor knobs, e.g. "
                   "'max_pixels=802816,min_pixels=3136' (Qwen2-VL), 'max_patches=6' (InternVL), "
                   "'do_image_splitting=false' (Idefics3/SmolVLM); an unknown knob is refused with the family's list "
                   "(docs/student_trainer.md, 'Image resolution')")


@dataclass(kw_only=True)
class TrainConfig(TeacherOptions):
    """Everything one training run needs. Validated on construction; each message says how to fix the value."""

    # ---- model and teacher -----------------------------------------------------------------------------------
    student: str = option(group=MODEL, metavar="PATH", help="student checkpoint folder (HF format, a supported "
                          "family): the model stage 1 starts from")
    # ---- data ------------------------------------------------------------------------------------------------
    data: str = option(group=DATA, help="training data: a .json/.jsonl file (LLaVA / ShareGPT or OpenAI-style "
                       "messages records, mixed as you like), a .parquet/.arrow file, a datasets save_to_disk folder, "
                       "or a Hugging Face Hub dataset id (owner/name or owner/name:split, through datasets; offline "
                       "from its cache with HF_HUB_OFFLINE=1); docs/student_trainer.md, 'Data formats'")
    data_split: str = option("train", group=DATA, metavar="SPLIT", help="split of a datasets save_to_disk folder "
                             "or a Hub dataset (a Hub id's ':SPLIT' wins)")
    data_config: str | None = option(None, group=DATA, metavar="NAME", help="configuration (subset) of a Hub "
                                     "dataset that has several, e.g. one of lmms-lab/LLaVA-OneVision-Data's "
                                     "(datasets.load_dataset's name)")
    image_folder: str | None = option(None, group=DATA, metavar="PATH", help="folder that image file names in "
                                      "the data are relative to (default: the data file's folder)")
    data_limit: int | None = option(None, group=DATA, metavar="N", help="use only the first N training records "
                                    "(bad ones, skipped when met, included)")
    max_length: int | None = option(8192, group=DATA, metavar="TOKENS", help="skip (and count, as bad records) "
                                    "samples longer than this many tokens as the student formats them, instead of "
                                    "truncating their answers or running out of memory; the teacher refuses samples "
                                    "longer than this many of its own tokens; 'none' = no limit. Image tokens "
                                    "count: lower the resolution (--image-options) rather than raising this")
    image_options: dict | None = option(None, group=DATA, metavar="OPTIONS", help="the student's image "
                                        f"resolution: {RESOLUTION_HELP} (default: the checkpoint's own settings)")
    eval_data: str | None = option(None, group=DATA, metavar="DATA", help="evaluation data; the final student "
                                   "is evaluated on it when training ends (OUTPUT/eval.json)")
    eval_limit: int | None = option(None, group=DATA, metavar="N", help="evaluate on at most N samples")
    data_workers: int = option(2, group=DATA, help="DataLoader worker processes that read records and decode "
                               "their images off the training thread; 0 = read in the trainer's prefetch thread")
    validate_data: bool = option(False, group=DATA, help="before training, read every record once in "
                                 "data_workers processes and report the bad ones (they are skipped anyway when "
                                 "met; this finds them up front)")
    # ---- stages and schedule (paper defaults) ------------------------------------------------------------------
    stages: str = option("1,2,3", group=SCHEDULE, help="stages to run, comma-separated and increasing: "
                         "1=alignment, 2=distillation, 3=sft")
    steps_per_stage: int = option(1000, group=SCHEDULE, help="optimizer steps of each stage; one step = "
                                  "micro_batch_size x grad_accum x world size samples")
    alignment_steps: int | None = option(None, group=SCHEDULE, metavar="STEPS", help="optimizer steps of stage 1 "
                                         "(alignment) alone, where only the fresh Recalibrator trains (default: "
                                         "--steps-per-stage). The Recalibrator must be aligned before stage 2: a "
                                         "stage 1 that ends with its KL to the teacher above 1 nat/token logs a "
                                         "warning")
    lr: float = option(1e-4, group=SCHEDULE, help="AdamW learning rate at the first step of each stage")
    lr_end: float = option(1e-5, group=SCHEDULE, help="learning rate at the last step of each stage, reached "
                           "linearly")
    alignment_lr: float | None = option(None, group=SCHEDULE, metavar="LR", help="peak learning rate of stage 1 "
                                        "alone (decays by the same lr_end / lr ratio); a fresh Recalibrator may "
                                        "take a higher rate than the pre-trained student (default: --lr)")
    warmup_steps: int = option(0, group=SCHEDULE, help="steps of linear learning-rate warm-up at the start of "
                               "each stage, then the linear decay; 0 is the paper's schedule")
    weight_decay: float = option(0.0, group=SCHEDULE, help="AdamW weight decay")
    grad_clip: float = option(1.0, group=SCHEDULE, help="clip the global gradient norm to this; 0 = off")
    grad_accum: int = option(16, group=SCHEDULE, help="micro-batches per optimizer step on each rank")
    micro_batch_size: int = option(1, group=SCHEDULE, help="samples per micro-batch on each rank")
    rec_blocks: int = option(2, group=SCHEDULE, help="decoder blocks in the Recalibrator's body")
    seed: int = option(0, group=SCHEDULE, help="seed for the data order and the Recalibrator's initialisation")
    # ---- losses (genrecal.distill.LossConfig) ------------------------------------------------------------------
    ce_weight: float = option(1.0, group=LOSSES, help="weight of the CE part of L1/L2 (0 = KL-only ablation)")
    kl_weight: float = option(1.0, group=LOSSES, help="weight of the KL part of L1/L2 (0 = CE-only ablation)")
    regularisation: bool = option(True, group=LOSSES, help="use L2, the regularisation path "
                                  "(--no-regularisation for its ablation)")
    sft_weight: float = option(1.0, group=LOSSES, help="weight of L3, the student's SFT loss")
    logit_distillation: str | None = option(None, group=LOSSES, metavar="{kd,uld}", help="baseline instead of "
                                            "GenRecal: add a logit-distillation term to L3 in every stage that has "
                                            "L3: 'kd' (token-level KL to the teacher, same tokenizer only) or 'uld' "
                                            "(Universal Logit Distillation, any tokenizers); needs an in-process "
                                            "teacher (--teacher-model) (default: none)")
    logit_distillation_weight: float = option(1.0, group=LOSSES, help="weight of the --logit-distillation term")
    tied_embeddings: str = option("freeze", group=LOSSES, metavar="{freeze,train}", help="students with tied "
                                  "input embeddings and LM head, in stage 2 (the body trains, the head does not): "
                                  "'freeze' keeps the shared weight frozen, as the paper keeps the head; 'train' "
                                  "lets L1 update it through the input side, which changes the head too")
    # ---- precision and memory ------------------------------------------------------------------------------------
    dtype: Dtype = option("auto", group=MEMORY, old_names=("precision",), old_values=OLD_DTYPE_NAMES,
                          help="training dtype: auto = bfloat16 on GPUs that support it, else float32")
    teacher_wire_dtype: WireDtype = option("bfloat16", group=MEMORY, old_values=OLD_DTYPE_NAMES, help="dtype "
                                           "the teacher's features, the Recalibrator's outputs and their gradients "
                                           "travel in between a remote teacher and this trainer, whatever either "
                                           "computes in: bfloat16 halves the traffic of float32 "
                                           "(docs/student_trainer.md, 'Wire volume')")
    deepspeed: str = option(str(DEFAULT_DEEPSPEED_CONFIG), group=MEMORY, metavar="JSON",
                            default_text="student_trainer/configs/zero3.json", help="DeepSpeed JSON: ZeRO stage, "
                            "offload, communication ('auto' batch/precision entries are filled from these options; "
                            "no optimizer/scheduler sections)")
    chunk_size: int = option(512, group=MEMORY, help="tokens per head-scoring chunk of an in-process teacher")
    prefetch_steps: int = option(1, group=MEMORY, help="optimizer steps whose inputs (data, student batches and "
                                 "the teacher's Encode of all their micro-batches) are prepared in a background "
                                 "thread while the current step computes, so the teacher's latency hides behind "
                                 "the student's compute; 0 = off")
    score_overlap: bool = option(True, group=MEMORY, help="send each micro-batch's Score to a remote teacher "
                                 "without waiting and run the next micro-batch's forward while it travels (one "
                                 "more micro-batch of activations in memory; same losses and gradients)")
    # ---- output and logging --------------------------------------------------------------------------------------
    output: str = option(group=OUTPUT, metavar="PATH", help="run folder for checkpoints, stage exports, metrics "
                         "and the final student; rerunning the same command resumes from it")
    save_every: int = option(100, group=OUTPUT, help="write a DeepSpeed checkpoint every N optimizer steps, "
                             "besides each stage's end")
    keep_checkpoints: int = option(2, group=OUTPUT, help="DeepSpeed checkpoints kept per stage; older ones are "
                                   "deleted")
    log_every: int = option(1, group=OUTPUT, help="update the progress bar's loss display every N steps; metrics "
                            "are logged every step")
    report_to: list[Tracker] = option(group=OUTPUT, default_factory=lambda: ["tensorboard"], help="where metrics "
                                      "go besides metrics.jsonl: tensorboard, wandb (offline with "
                                      "WANDB_MODE=offline), none")
    log_sample_ids: bool = option(False, group=OUTPUT, help="auditing: every metrics row also lists the sample ids "
                                  "of its step (rank 0's)")
    tensorboard: bool = option(True, group=OUTPUT, hidden=True, help="the older switch: --no-tensorboard drops "
                               "tensorboard from --report-to")
    stop_after_steps: int | None = option(None, group=OUTPUT, hidden=True, help="testing: stop abruptly after N "
                                          "optimizer steps of this invocation, without a checkpoint, as a crash "
                                          "would (then rerun the command to resume)")

    saved_only_keys = ("resolved_dtype",)  # written by to_dict beside the fields; ignored when read back

    def __post_init__(self) -> None:
        from genrecal.families.resolution import check_image_options
        from genrecal.stages import TIED_POLICIES, Stage, parse_stages
        from student_trainer.sources import is_hub_id

        self.student, self.data, self.output = str(self.student), str(self.data), str(self.output)
        if not (Path(self.student) / "config.json").is_file():
            raise ValueError(
                f"student {self.student!r} is not a checkpoint folder (no config.json); pass the folder that holds "
                "the student's config.json and *.safetensors"
            )
        if not Path(self.data).exists() and not is_hub_id(self.data):
            raise ValueError(f"data {self.data!r} does not exist; pass a .json/.jsonl file, a .parquet/.arrow file, a "
                             "datasets save_to_disk folder or a Hugging Face Hub dataset id (owner/name[:split])")
        if not self.data_split or self.data_config == "":
            raise ValueError("data_split must name a split (default train) and data_config a configuration or be "
                             "left out")
        if self.image_folder is not None and not Path(self.image_folder).is_dir():
            raise ValueError(f"image_folder {self.image_folder!r} is not a folder")
        if self.eval_data is not None and not Path(self.eval_data).exists() and not is_hub_id(self.eval_data):
            raise ValueError(f"eval_data {self.eval_data!r} does not exist; pass an evaluation data file or drop it")

        if isinstance(self.stages, list | tuple):
            self.stages = ",".join(str(int(Stage(s))) for s in self.stages)
        self.stages = ",".join(str(int(s)) for s in parse_stages(str(self.stages)))
        if self.tied_embeddings not in TIED_POLICIES:
            raise ValueError(f"tied_embeddings must be one of {', '.join(TIED_POLICIES)}, got {self.tied_embeddings!r}")
        if self.logit_distillation in ("", "none"):
            self.logit_distillation = None
        why = None
        if self.needs_teacher:
            why = ("--logit-distillation needs the teacher's distributions" if self.logit_distillation else
                   f"stages {self.stages} include stage 1 or 2, which need the teacher")
        self.check_teacher(required=why, otherwise=", or run --stages 3 without it")
        # Knob names and types are checked for the student's family now; values against its processor at load.
        self.image_options = check_image_options(self.student, self.image_options)

        if not Path(self.deepspeed).is_file():
            raise ValueError(
                f"deepspeed config {self.deepspeed!r} does not exist; pass a DeepSpeed JSON or leave the default "
                f"({DEFAULT_DEEPSPEED_CONFIG})"
            )
        for name in ("grad_accum", "micro_batch_size", "steps_per_stage", "rec_blocks", "save_every",
                     "keep_checkpoints", "log_every", "chunk_size"):
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
        _check_choice("teacher_wire_dtype", self.teacher_wire_dtype, WireDtype)
        _check_choice("dtype", self.dtype, Dtype)
        self.report_to = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        resolve_report_to(self.report_to)  # a missing wandb stops the run here, before any model loads
        _ = self.losses  # validates the loss weights (LossConfig raises with its own message)

    # ---- derived ------------------------------------------------------------------------------------------
    @property
    def stage_list(self) -> list[Stage]:
        from genrecal.stages import parse_stages

        return parse_stages(self.stages)

    @property
    def needs_teacher(self) -> bool:
        return any(self.stage_needs_teacher(s) for s in self.stage_list)

    def stage_needs_teacher(self, stage: Stage) -> bool:
        """Stages 1 and 2 need the teacher's features; a stage with L3 needs its distributions when a
        logit-distillation baseline is on."""
        from genrecal.stages import STAGES

        return STAGES[stage].needs_teacher or self.uses_logit_distillation(stage)

    def steps_for(self, stage: Stage) -> int:
        """Optimizer steps of ``stage``: ``alignment_steps`` for stage 1 when set, else ``steps_per_stage``."""
        from genrecal.stages import Stage

        if Stage(stage) == Stage.ALIGNMENT and self.alignment_steps is not None:
            return self.alignment_steps
        return self.steps_per_stage

    def lr_for(self, stage: Stage) -> tuple[float, float]:
        """(peak, end) learning rate of ``stage``: stage 1 with ``alignment_lr`` decays to ``alignment_lr x
        lr_end / lr`` (the same 10x-style ratio as every stage)."""
        from genrecal.stages import Stage

        if Stage(stage) == Stage.ALIGNMENT and self.alignment_lr is not None:
            return self.alignment_lr, self.alignment_lr * self.lr_end / self.lr
        return self.lr, self.lr_end

    def uses_logit_distillation(self, stage: Stage) -> bool:
        from genrecal.stages import STAGES

        return self.logit_distillation is not None and "L3" in STAGES[stage].losses

    @property
    def losses(self) -> LossConfig:
        from genrecal.distill import LossConfig

        return LossConfig(
            ce_weight=self.ce_weight, kl_weight=self.kl_weight, regularisation=self.regularisation,
            sft_weight=self.sft_weight, logit_distillation=self.logit_distillation,
            logit_distillation_weight=self.logit_distillation_weight,
        )

    @property
    def wire_dtype(self) -> torch.dtype:
        """The torch dtype teacher features, Recalibrator outputs and their gradients travel in (remote teacher)."""
        import torch

        return getattr(torch, self.teacher_wire_dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The training dtype: ``auto`` is bfloat16 on a GPU that supports it and float32 otherwise (CPU)."""
        return resolve_dtype(self.dtype)

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
        """``{field: (saved, now)}`` for the run-defining fields that differ from a saved config (one written by an
        earlier version too: ``precision: bf16`` is ``dtype: bfloat16``)."""
        saved = upgrade_old_names(TrainConfig, saved)
        if "teacher_wire_dtype" not in saved and "resolved_dtype" in saved:
            # Written before --teacher-wire-dtype existed: Score's tensors travelled in the training dtype.
            saved["teacher_wire_dtype"] = saved["resolved_dtype"]
        now = asdict(self)
        return {k: (saved.get(k), now[k]) for k in RUN_DEFINING_FIELDS if k in saved and saved.get(k) != now[k]}


def resolve_dtype(name: str) -> torch.dtype:
    """``auto`` -> torch.bfloat16 on a GPU that supports it, else torch.float32; other names as torch's."""
    import torch

    if name == "auto":
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return getattr(torch, name)


def _check_choice(name: str, value, choices) -> None:
    allowed = typing.get_args(choices)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


__all__ = ["DEFAULT_DEEPSPEED_CONFIG", "RUN_DEFINING_FIELDS", "TrainConfig", "resolve_dtype"]
