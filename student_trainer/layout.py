"""Where a run keeps its files (:class:`RunLayout`), and the run-level records that guard a resume: the resolved
config and ``manifest.json`` (world size, teacher identity).

    OUT/config.json, OUT/manifest.json            resolved config; teacher identity + world size of the run
    OUT/stage{n}/ds/step{k}/                      DeepSpeed checkpoints (model, optimizer, scheduler, client state)
    OUT/stage{n}/student/                         the stage's student: a plain checkpoint of its family
    OUT/stage{n}/recalibrator.safetensors         the stage's Recalibrator (stages 1 and 2)
    OUT/stage{n}/config.json                      the config the stage ran with
    OUT/stage{n}/loss_curves.png, DONE            the stage's loss curves; DONE is written last
    OUT/metrics/stage{n}.jsonl, OUT/tensorboard/  one row per optimizer step (student_trainer.metrics)
    OUT/final/                                    the last stage's student (no Recalibrator)
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from genrecal.resilient_teacher import TeacherMismatchError
from genrecal.stages import Stage
from student_trainer.config import TrainConfig
from student_trainer.distributed import DistContext


class RunRefusedError(ValueError):
    """The run cannot start or resume as asked (the message says why and how to fix it)."""


@dataclass(frozen=True)
class StageLayout:
    """The files of one stage under ``OUT/stage{n}``."""

    dir: Path

    @property
    def ds_dir(self) -> Path:  # DeepSpeed checkpoints, one ``step{k}`` folder each, and ``latest``
        return self.dir / "ds"

    @property
    def student(self) -> Path:
        return self.dir / "student"

    @property
    def recalibrator(self) -> Path:
        return self.dir / "recalibrator.safetensors"

    @property
    def config(self) -> Path:
        return self.dir / "config.json"

    @property
    def loss_curves(self) -> Path:
        return self.dir / "loss_curves.png"

    @property
    def done(self) -> Path:
        return self.dir / "DONE"

    @property
    def is_done(self) -> bool:
        return self.done.is_file()

    @property
    def in_progress(self) -> bool:
        """A DeepSpeed checkpoint exists but the stage has not finished."""
        return (self.ds_dir / "latest").is_file() and not self.is_done

    def checkpoint_tags(self) -> list[Path]:
        """The ``ds/step{k}`` folders, oldest first."""
        tags = (p for p in self.ds_dir.glob("step*") if p.is_dir() and p.name[4:].isdigit())
        return sorted(tags, key=lambda p: int(p.name[4:]))


@dataclass(frozen=True)
class RunLayout:
    """Every path of a run folder ``OUT`` (the module docstring shows the tree)."""

    root: Path

    @classmethod
    def of(cls, config: TrainConfig) -> RunLayout:
        return cls(Path(config.output))

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def eval_report(self) -> Path:
        return self.root / "eval.json"

    def stage(self, stage: Stage | int) -> StageLayout:
        return StageLayout(self.root / f"stage{int(stage)}")

    def any_stage_in_progress(self, stages: Iterable[Stage]) -> bool:
        return any(self.stage(s).in_progress for s in stages)


def prepare_output(config: TrainConfig, ctx: DistContext) -> RunLayout:
    """Refuse to resume with a different run-defining config or world size; save the resolved config."""
    layout = RunLayout.of(config)
    if layout.config.is_file():
        differences = config.run_differences(json.loads(layout.config.read_text()))
        if differences:
            shown = "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in differences.items())
            unset = [k for k, (a, _) in differences.items() if a is None]  # e.g. max_length before its default
            hint = (f" (a setting that was unset: put `{unset[0]}: null` in a --config file)" if unset else "")
            raise RunRefusedError(
                f"{layout.root} holds a run with other settings ({shown}); rerun with the same settings to resume "
                f"it{hint}, or pass a new --output"
            )
    if layout.manifest.is_file():
        manifest = json.loads(layout.manifest.read_text())
        if manifest.get("world_size") not in (None, ctx.world_size) and layout.any_stage_in_progress(
            config.stage_list
        ):
            raise RunRefusedError(
                f"{layout.root} was trained by {manifest['world_size']} ranks and a stage is half done; resume it "
                f"with {manifest['world_size']} processes (the data order and ZeRO partitions depend on it)"
            )
    ctx.barrier()
    if ctx.is_main:
        layout.root.mkdir(parents=True, exist_ok=True)
        config.save(layout.config)
        manifest = json.loads(layout.manifest.read_text()) if layout.manifest.is_file() else {}
        manifest["world_size"] = ctx.world_size
        write_json(layout.manifest, manifest)
    ctx.barrier()
    return layout


def _describe_teacher(identity: dict) -> str:
    return f"{identity.get('model_name')!r} (revision {identity.get('revision')})"


def check_teacher_identity(output: Path, identity: dict, ctx: DistContext, where: str) -> None:
    """Record the teacher in ``OUT/manifest.json`` at first contact; refuse a different one afterwards."""
    path = RunLayout(Path(output)).manifest
    if ctx.is_main and path.is_file():
        manifest = json.loads(path.read_text())
        if "teacher" not in manifest:
            manifest["teacher"] = identity
            write_json(path, manifest)
    elif ctx.is_main:
        write_json(path, {"teacher": identity, "world_size": ctx.world_size})
    ctx.barrier()
    recorded = json.loads(path.read_text())["teacher"]
    if recorded != identity:
        differing = sorted(k for k in set(recorded) | set(identity) if recorded.get(k) != identity.get(k))
        raise TeacherMismatchError(
            f"run {str(output)!r} was started with teacher {_describe_teacher(recorded)}, but the teacher at "
            f"{where} is {_describe_teacher(identity)} (differs in {', '.join(differing)}). Connect to the teacher "
            "the run was started with, or start a new run with another --output"
        )


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` atomically (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
