"""A Recalibrator on disk: ``stage{n}/recalibrator.safetensors`` holds its weights and, in the file's metadata, the
arguments that rebuild it (block count, teacher and student hidden sizes, format version), checked on load."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from genrecal.recalibrator import Recalibrator, RecalibratorSpec

logger = logging.getLogger(__name__)

RECALIBRATOR_FORMAT = "genrecal.recalibrator"  # metadata key: its value is the format version below
RECALIBRATOR_FORMAT_VERSION = "1"


def save_recalibrator(
    path: str | Path, recalibrator: Recalibrator, *, state_dict: Mapping[str, Tensor] | None = None
) -> Path:
    """Write ``recalibrator`` to one safetensors file, its construction arguments in the file's metadata.

    Args:
        path: the ``.safetensors`` file to write (its folder is created).
        recalibrator: the module; its ``num_blocks``, ``D_l`` and ``D_s`` go into the metadata (strings).
        state_dict: the tensors to write instead of ``recalibrator.state_dict()``, e.g. a ZeRO-3 run's gathered
            full state (the module's own parameters are then empty shards). Its keys must be the module's.
    """
    state = recalibrator.state_dict() if state_dict is None else state_dict
    if sorted(state) != sorted(recalibrator.state_dict()):
        raise ValueError(
            "state_dict must hold exactly the Recalibrator's keys (proj_pre, rec_body, norm, proj_post); got "
            f"{sorted(set(state) ^ set(recalibrator.state_dict()))} differing"
        )
    metadata = {
        "format": "pt",
        RECALIBRATOR_FORMAT: RECALIBRATOR_FORMAT_VERSION,
        "num_blocks": str(len(recalibrator.rec_body)),
        "teacher_hidden_size": str(recalibrator.teacher_hidden_size),
        "student_hidden_size": str(recalibrator.student_hidden_size),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, path, metadata=metadata)
    return path


def load_recalibrator(
    path: str | Path,
    spec: RecalibratorSpec,
    teacher_hidden_size: int,
    *,
    num_blocks: int | None = None,
    attn_implementation: str = "sdpa",
) -> Recalibrator:
    """A Recalibrator rebuilt from a :func:`save_recalibrator` file (on the CPU, default dtype: ``.to`` it after).

    The file's metadata says how it was built; it must fit the student (``spec``: its text hidden size) and the
    teacher (``teacher_hidden_size``), and ``num_blocks`` when given (e.g. a run's ``--rec-blocks``): a mismatch is
    a ValueError naming both values. A file written before the metadata existed (no format key) is read by
    counting its ``rec_body`` blocks, with a warning. The weights load strictly.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no Recalibrator file at {str(path)!r}; pass the run's stage{{n}}/recalibrator.safetensors")
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
    state = load_file(path)
    version = metadata.get(RECALIBRATOR_FORMAT)
    if version is None:
        stored_blocks = len({key.split(".")[1] for key in state if key.startswith("rec_body.")})
        logger.warning(
            "%s has no Recalibrator metadata (written before genrecal stored it): taking num_blocks=%d from its "
            "rec_body keys; save it again with genrecal.recalibrator_file.save_recalibrator to record it",
            path, stored_blocks,
        )
        stored = {"num_blocks": stored_blocks}
    elif version != RECALIBRATOR_FORMAT_VERSION:
        raise ValueError(
            f"{path} holds Recalibrator format {version!r}; this genrecal reads format {RECALIBRATOR_FORMAT_VERSION!r}: "
            "load it with the genrecal version that wrote it"
        )
    else:
        try:
            stored = {name: int(metadata[name])
                      for name in ("num_blocks", "teacher_hidden_size", "student_hidden_size")}
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{path} has incomplete Recalibrator metadata {metadata}; save it again") from exc
    student_hidden_size = int(spec.text_config.hidden_size)
    wanted = {"num_blocks": num_blocks, "teacher_hidden_size": int(teacher_hidden_size),
              "student_hidden_size": student_hidden_size}
    for name, value in wanted.items():
        if value is not None and name in stored and stored[name] != value:
            raise ValueError(
                f"{path} holds a Recalibrator with {name}={stored[name]}, but {value} was asked for "
                f"({_MISMATCH_FIX[name]})"
            )
    recalibrator = Recalibrator(spec, teacher_hidden_size, num_blocks=stored["num_blocks"],
                                attn_implementation=attn_implementation)
    recalibrator.load_state_dict(state, strict=True)
    return recalibrator


_MISMATCH_FIX = {
    "num_blocks": "set the run's Recalibrator block count (--rec-blocks) to the file's, or start a fresh Recalibrator",
    "teacher_hidden_size": "it was trained against another teacher: use that teacher, or train a new Recalibrator",
    "student_hidden_size": "it was trained with another student: pass that student (the stage's student folder)",
}
