"""The three training stages (docs/method.md, "Stages"): which losses run, what trains, whether a teacher is needed.

| stage          | losses       | trainable                          | teacher |
|----------------|--------------|------------------------------------|---------|
| 1 alignment    | L1 + L2      | Recalibrator                       | yes     |
| 2 distillation | L1 + L2 + L3 | Recalibrator + student body        | yes     |
| 3 SFT          | L3           | student projector + body + head    | no      |

The vision encoder never trains. A student model's parameters come from its family adapter as groups
``STUDENT_GROUPS``; :func:`set_trainable` applies a stage to them and to the Recalibrator.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from types import MappingProxyType

from torch import nn

# Parameter groups of a student VLM, as a family adapter names them.
STUDENT_GROUPS = ("vision_encoder", "projector", "body", "head")
RECALIBRATOR_GROUP = "recalibrator"
LOSS_NAMES = ("L1", "L2", "L3")


class Stage(enum.IntEnum):
    ALIGNMENT = 1
    DISTILLATION = 2
    SFT = 3


@dataclass(frozen=True)
class StageSpec:
    """What one stage does.

    Attributes:
        losses: subset of ``{"L1", "L2", "L3"}`` (L1 = student path through the Recalibrator and the teacher's
            head, L2 = regularisation path, L3 = student SFT).
        trainable: the groups that train: ``"recalibrator"`` and/or names from ``STUDENT_GROUPS``.
        needs_teacher: whether the stage talks to the teacher (only L1/L2 do).
    """

    losses: frozenset[str]
    trainable: frozenset[str]
    needs_teacher: bool

    def __post_init__(self) -> None:
        unknown_losses = self.losses - set(LOSS_NAMES)
        unknown_groups = self.trainable - {RECALIBRATOR_GROUP, *STUDENT_GROUPS}
        if unknown_losses or unknown_groups:
            raise ValueError(f"unknown losses {sorted(unknown_losses)} or groups {sorted(unknown_groups)}")
        if self.needs_teacher != bool(self.losses & {"L1", "L2"}):
            raise ValueError("needs_teacher must be True exactly when the stage computes L1 or L2")


STAGES: MappingProxyType[Stage, StageSpec] = MappingProxyType(
    {
        Stage.ALIGNMENT: StageSpec(
            losses=frozenset({"L1", "L2"}), trainable=frozenset({RECALIBRATOR_GROUP}), needs_teacher=True
        ),
        Stage.DISTILLATION: StageSpec(
            losses=frozenset({"L1", "L2", "L3"}),
            trainable=frozenset({RECALIBRATOR_GROUP, "body"}),
            needs_teacher=True,
        ),
        Stage.SFT: StageSpec(
            losses=frozenset({"L3"}), trainable=frozenset({"projector", "body", "head"}), needs_teacher=False
        ),
    }
)


def parse_stages(text: str) -> list[Stage]:
    """``"1,2,3"`` -> ``[Stage.ALIGNMENT, Stage.DISTILLATION, Stage.SFT]``.

    Items are stage numbers or names (``alignment``, ``distillation``, ``sft``; any case), comma-separated, each
    at most once and in increasing order (stages hand off through checkpoints, so e.g. ``"2,3"`` is fine).
    """
    choices = ", ".join(f"{stage.value}={stage.name.lower()}" for stage in Stage)
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise ValueError(
            f"stages must be a comma-separated list such as '1,2,3' (choices: {choices}), got {text!r}"
        )
    stages = []
    for item in items:
        if item.isdigit() and int(item) in {stage.value for stage in Stage}:
            stages.append(Stage(int(item)))
        elif item.upper() in Stage.__members__:
            stages.append(Stage[item.upper()])
        else:
            raise ValueError(f"unknown stage {item!r} in {text!r}; choices: {choices}")
    if any(later <= earlier for earlier, later in itertools.pairwise(stages)):
        raise ValueError(
            f"stages must be distinct and in increasing order (each starts from the previous one's checkpoint), "
            f"got {text!r}"
        )
    return stages


TIED_POLICIES = ("train", "freeze")


def set_trainable(
    stage: Stage, student_groups: dict[str, list[nn.Parameter]], recalibrator: nn.Module | None,
    *, tied: str = "freeze",
) -> list[nn.Parameter]:
    """Set ``requires_grad`` for ``stage`` on the student's groups and the Recalibrator; return what trains.

    Args:
        stage: the stage to run.
        student_groups: every name of ``STUDENT_GROUPS`` -> that group's parameters (a group may be empty).
        recalibrator: the Recalibrator, required by stages that train it; in stage 3 it is frozen if given.
        tied: what a parameter shared by a training group and a frozen one does: ``"train"`` (it trains if
            **any** group holding it trains) or ``"freeze"`` (it trains only if **every** group holding it trains).

    Returns:
        The trainable parameters, each once, in group order (student groups, then the Recalibrator).

    A parameter that belongs to several groups (tied embeddings: the head weight *is* the input embedding in
    ``"body"``) is decided by identity, by ``tied``. With tied embeddings and ``"train"``, stage 2 (body trains,
    head does not) also updates the head through the shared weight; with ``"freeze"`` the shared weight keeps
    stage 2's frozen head frozen (the paper trains the body only; its input embeddings then stay as they are).
    """
    if tied not in TIED_POLICIES:
        raise ValueError(f"tied must be one of {TIED_POLICIES}, got {tied!r}")
    stage = Stage(stage)
    spec = STAGES[stage]
    if set(student_groups) != set(STUDENT_GROUPS):
        raise ValueError(
            f"student_groups must have exactly the groups {list(STUDENT_GROUPS)} (use an empty list for a group "
            f"the family does not have); got {sorted(student_groups)}"
        )
    if recalibrator is None and RECALIBRATOR_GROUP in spec.trainable:
        raise ValueError(f"stage {stage.value} ({stage.name.lower()}) trains the Recalibrator: pass it")

    groups: dict[str, Iterable[nn.Parameter]] = dict(student_groups)
    groups[RECALIBRATOR_GROUP] = recalibrator.parameters() if recalibrator is not None else []
    ordered: dict[int, nn.Parameter] = {}  # id -> parameter, first occurrence order
    trainable_ids: set[int] = set()
    frozen_ids: set[int] = set()
    for name in (*STUDENT_GROUPS, RECALIBRATOR_GROUP):
        for parameter in groups[name]:
            ordered.setdefault(id(parameter), parameter)
            (trainable_ids if name in spec.trainable else frozen_ids).add(id(parameter))
    if tied == "freeze":
        trainable_ids -= frozen_ids
    for key, parameter in ordered.items():
        parameter.requires_grad_(key in trainable_ids)
    return [parameter for key, parameter in ordered.items() if key in trainable_ids]


def frozen_modules_to_eval(model: nn.Module) -> int:
    """Put every submodule whose parameters all stay frozen into ``eval()`` mode; return how many.

    A frozen part must compute the same function at every step (a real checkpoint's vision tower may hold
    dropout or drop-path, which ``train()`` would switch on). Call after :func:`set_trainable` and after any
    ``model.train()``; modules with a trainable parameter keep their mode.
    """
    count = 0
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params) and module.training:
            module.eval()
            count += 1
    return count
