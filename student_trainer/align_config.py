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
    OLD_DTYPE_NAMES,
    OUTPUT,
    RESOLUTION_HELP,
    Dtype,
    _check_choice,
    resolve_dtype,
)
from student_trainer.teacher_options import MODEL, TeacherOptions

if TYPE_CHECKING:
    import torch


@dataclass(kw_only=True)
class AlignConfig(TeacherOptions):
    """``python -m student_trainer align``: the paper's alignment check (Fig. 7), :func:`alignment.run_alignment`."""

    student: str = option(group=MODEL, metavar="PATH", help="student checkpoint folder, e.g. OUTPUT/stage1/student")
    recalibrator: str = option(group=MODEL, metavar="FILE", help="the Recalibrator trained with it, e.g. "
                               "OUTPUT/stage1/recalibrator.safetensors")
    dtype: Dtype = option("auto", group=MODEL, old_names=("precision",), old_values=OLD_DTYPE_NAMES,
                          help="auto = bfloat16 on GPUs that support it, else float32")
    image_options: dict | None = option(None, group=MODEL, metavar="OPTIONS", help="the student's image "
                                        f"resolution: {RESOLUTION_HELP} (default: the checkpoint's own)")
    data: str = option(group=DATA, help="question-answer pairs (same formats as training data)")
    image_folder: str | None = option(None, group=DATA, metavar="PATH", help="folder image names are relative to "
                                      "(default: the data's folder)")
    limit: int = option(32, group=DATA, help="number of pairs N")
    batch_size: int = option(8, group=DATA, help="samples per forward pass")
    centre: bool = option(True, group=OUTPUT, help="subtract each path's mean pooled output over the N pairs "
                          "before the cosine, so the matrix shows what tells pairs apart")
    output: str = option(group=OUTPUT, metavar="PNG", old_names=("out",), help="PNG file for the similarity matrix")

    def __post_init__(self) -> None:
        self.check_teacher(required="the alignment check runs the teacher on the pairs")
        if not (Path(self.student) / "config.json").is_file():
            raise ValueError(f"student {self.student!r} is not a checkpoint folder (no config.json)")
        if not Path(self.recalibrator).is_file():
            raise ValueError(f"recalibrator {self.recalibrator!r} does not exist; pass a run's "
                             "stage{1,2}/recalibrator.safetensors")
        for name in ("limit", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        _check_choice("dtype", self.dtype, Dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype)
