"""What one alignment check needs (``python -m student_trainer align``, :func:`student_trainer.alignment.run_alignment`):
:class:`AlignConfig`, validated on construction, importable without torch (its flags are generated from the
fields, as the trainer's)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from genrecal.cli import option
from student_trainer.config import (
    DATA,
    MODEL,
    OLD_DTYPE_NAMES,
    OUTPUT,
    RESOLUTION_HELP,
    Dtype,
    _check_choice,
    resolve_dtype,
)

if TYPE_CHECKING:
    import torch


@dataclass(kw_only=True)
class AlignConfig:
    """``python -m student_trainer align``: the paper's alignment check (Fig. 7), :func:`alignment.run_alignment`."""

    student: str = option(group=MODEL, metavar="PATH", help="student checkpoint folder, e.g. OUTPUT/stage1/student")
    recalibrator: str = option(group=MODEL, metavar="FILE", help="the Recalibrator trained with it, e.g. "
                               "OUTPUT/stage1/recalibrator.safetensors")
    teacher_addr: str | None = option(None, group=MODEL, metavar="HOST:PORT", help="the teacher service; several "
                                      "comma-separated (or a name resolving to several) spread Encode over teacher "
                                      "replicas")
    teacher_model: str | None = option(None, group=MODEL, metavar="PATH", help="instead of --teacher-addr: a "
                                       "teacher checkpoint folder, run in this process")
    teacher_token_file: str | None = option(None, group=MODEL, metavar="FILE", help="file holding the bearer "
                                            "token for the teacher service (else $GENRECAL_TEACHER_TOKEN, if set)")
    teacher_tls_ca: str | None = option(None, group=MODEL, metavar="PEM", help="CA bundle of the teacher's TLS "
                                        "certificate: connect over TLS")
    teacher_timeout_s: float = option(300.0, group=MODEL, help="seconds one teacher call may take")
    dtype: Dtype = option("auto", group=MODEL, old_names=("precision",), old_values=OLD_DTYPE_NAMES,
                          help="auto = bfloat16 on GPUs that support it, else float32")
    image_options: dict | None = option(None, group=MODEL, metavar="OPTIONS", help="the student's image "
                                        f"resolution: {RESOLUTION_HELP} (default: the checkpoint's own)")
    teacher_image_options: dict | None = option(None, group=MODEL, metavar="OPTIONS", help="the same for an "
                                                "in-process teacher (--teacher-model); a teacher service uses its "
                                                "own --image-options")
    data: str = option(group=DATA, help="question-answer pairs (same formats as training data)")
    image_folder: str | None = option(None, group=DATA, metavar="PATH", help="folder image names are relative to "
                                      "(default: the data's folder)")
    limit: int = option(32, group=DATA, help="number of pairs N")
    batch_size: int = option(8, group=DATA, help="samples per forward pass")
    centre: bool = option(True, group=OUTPUT, help="subtract each path's mean pooled output over the N pairs "
                          "before the cosine, so the matrix shows what tells pairs apart")
    output: str = option(group=OUTPUT, metavar="PNG", old_names=("out",), help="PNG file for the similarity matrix")

    def __post_init__(self) -> None:
        if (self.teacher_addr is None) == (self.teacher_model is None):
            raise ValueError("pass exactly one of --teacher-addr HOST:PORT (a teacher service) and --teacher-model "
                             "PATH (a teacher checkpoint run in this process)")
        for name in ("student", "teacher_model"):
            path = getattr(self, name)
            if path is not None and not (Path(path) / "config.json").is_file():
                raise ValueError(f"{name} {path!r} is not a checkpoint folder (no config.json)")
        if not Path(self.recalibrator).is_file():
            raise ValueError(f"recalibrator {self.recalibrator!r} does not exist; pass a run's "
                             "stage{1,2}/recalibrator.safetensors")
        if self.teacher_image_options and self.teacher_model is None:
            raise ValueError("teacher_image_options apply to an in-process teacher (--teacher-model); a teacher "
                             "service sets its own resolution")
        for name in ("limit", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.teacher_timeout_s > 0:
            raise ValueError(f"teacher_timeout_s must be > 0 seconds, got {self.teacher_timeout_s}")
        _check_choice("dtype", self.dtype, Dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype)
