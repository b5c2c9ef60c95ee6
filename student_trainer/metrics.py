"""Per-step training metrics: a JSONL file per stage, experiment trackers, and the paper's loss-curve plot.

Rows are one JSON object per optimizer step: whatever the trainer measured (``lr``, ``L1_ce``, ``L1_kl``,
``L2_ce``, ``L2_kl``, ``L3``, ``teacher_ce`` (the teacher's own CE on its answers, in the stages that use the
teacher), ``tokens_per_s``, ``teacher_wait_share``, ...) plus ``stage``, ``step`` and ``time`` (Unix seconds). Only
rank 0 writes; other ranks' loggers do nothing.

Trackers (``report_to``): the numeric columns also go, as ``stage{n}/<column>``, to TensorBoard
(``output_dir/tensorboard``) and / or Weights & Biases, through accelerate's maintained tracker classes
(``accelerate.tracking``); ``none`` keeps the JSONL only. The run's resolved configuration is stored with each
tracker as hyperparameters.

Resuming: a step that is not after the last one already in the file (a run resumed from an earlier checkpoint)
first drops every row with ``step >=`` it, so no step appears twice. The trackers restart from there: TensorBoard
through ``SummaryWriter(purge_step=...)`` (the older points from that step on are hidden), W&B as a new run in the
same group (a W&B run only accepts increasing steps).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import numbers
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

# What ``report_to`` accepts; ``none`` alone means the JSONL file only.
TRACKERS = ("tensorboard", "wandb")
REPORT_TO_CHOICES = (*TRACKERS, "none")

# The paper's Appendix D curves: the Recalibrator's CE on both paths against the student's CE on its own answers
# and the teacher's CE on its own answers (logged in the stages that use the teacher).
LOSS_CURVES = {
    "L1_ce": "Recalib(q_s, a_l) CE (L1)",
    "L2_ce": "Recalib(q_l, a_l) CE (L2)",
    "L3": "student CE on its own answers (L3)",
    "teacher_ce": "teacher CE on its own answers",
}


class MetricsLogger:
    """Writes ``output_dir/metrics/stage{n}.jsonl`` and reports the numeric columns to experiment trackers.

    Args:
        output_dir: the run's output folder.
        stage: the training stage (1, 2 or 3); names the JSONL file and prefixes the tracker tags.
        rank: the process's global rank; only rank 0 writes anything.
        report_to: trackers among ``tensorboard`` (event files under ``output_dir/tensorboard``), ``wandb``
            (Weights & Biases: ``pip install wandb``; its local files under ``output_dir/wandb``; the project is
            ``$WANDB_PROJECT``, default ``genrecal``; ``WANDB_MODE=offline`` works without a network), or
            ``none`` alone (the JSONL only). Checked on every rank (:func:`resolve_report_to`).
        tensorboard: False drops ``tensorboard`` from ``report_to`` (the ``--no-tensorboard`` flag).
        run_config: the run's resolved configuration, stored with each tracker as hyperparameters (nested
            mappings flattened to ``a.b`` keys, lists as JSON text); TensorBoard keeps one copy per output folder.
        resume_step: the first step this run will log, when resuming; rows with ``step >= resume_step`` are
            dropped at once (the same happens anyway on the first :meth:`log` of an earlier-or-equal step).
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        stage: int,
        rank: int = 0,
        report_to: str | Sequence[str] = ("tensorboard",),
        tensorboard: bool = True,
        run_config: Mapping[str, object] | None = None,
        resume_step: int | None = None,
    ):
        self.stage = int(stage)
        self.enabled = rank == 0
        self.report_to = tuple(name for name in resolve_report_to(report_to) if tensorboard or name != "tensorboard")
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / "metrics" / f"stage{self.stage}.jsonl"
        self.tensorboard_dir = self.output_dir / "tensorboard"
        self._hparams = flatten_config(run_config) if run_config is not None else None
        self._trackers: list = []  # accelerate GeneralTrackers, started at the first log
        self._file = None
        self._last_step: int | None = None
        self._purge_step: int | None = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = read_metrics(self.path) if self.path.exists() else []
        self._last_step = max((int(r["step"]) for r in rows), default=None)
        if resume_step is not None:
            self._truncate(resume_step)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, step: int, metrics: Mapping[str, object]) -> dict | None:
        """Record one optimizer step; returns the row written (None on ranks other than 0)."""
        if not self.enabled:
            return None
        if self._file is None:
            raise ValueError(f"MetricsLogger for {self.path} is closed")
        step = int(step)
        if self._last_step is not None and step <= self._last_step:
            self._truncate(step)
        row = {"stage": self.stage, "step": step, "time": time.time()}
        row.update({key: _plain(value) for key, value in metrics.items() if key not in ("stage", "step")})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        self._last_step = step
        scalars = {
            f"stage{self.stage}/{key}": value
            for key, value in row.items()
            if key not in ("stage", "step", "time") and _is_number(value)
        }
        for tracker in self._started_trackers():
            tracker.log(scalars, step=step)  # TensorBoard flushes after each call
        return row

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._finish_trackers()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _truncate(self, step: int) -> None:
        """Drop rows with ``step >=`` the given one (a resumed run re-logs them)."""
        rows = read_metrics(self.path) if self.path.exists() else []
        kept = [r for r in rows if int(r["step"]) < step]
        if len(kept) != len(rows):
            logger.info("%s: dropping %d rows from step %d on (resumed run)", self.path, len(rows) - len(kept), step)
            reopen = self._file is not None
            if reopen:
                self._file.close()
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
            tmp.replace(self.path)
            if reopen:
                self._file = self.path.open("a", encoding="utf-8")
            self._purge_step = step if self._purge_step is None else min(self._purge_step, step)
        self._last_step = max((int(r["step"]) for r in kept), default=None)

    def _started_trackers(self) -> list:
        """The trackers, started at the first log and restarted after a rewind (``_purge_step`` set)."""
        if self._purge_step is not None:
            self._finish_trackers()
        if not self._trackers and self.report_to:
            # accelerate's trackers log through accelerate's logger, which needs its process state. With the
            # process group already up (DeepSpeed) it only reads rank and world size; this logger is rank 0's.
            from accelerate import PartialState

            PartialState()
            self._trackers = [self._start_tracker(name) for name in self.report_to]
        self._purge_step = None
        return self._trackers

    def _start_tracker(self, name: str):
        from accelerate.tracking import TensorBoardTracker, WandBTracker

        if name == "tensorboard":
            # Writes to logging_dir/run_name = output_dir/tensorboard. purge_step hides the older event files'
            # points from that step on (a resumed run).
            if self._purge_step is not None:
                self._wait_past_event_files()
            tracker = TensorBoardTracker("tensorboard", self.output_dir, purge_step=self._purge_step)
        else:
            # One W&B run per stage (and per restart: a W&B run only accepts increasing steps), grouped by output.
            run = self.output_dir.resolve().name
            tracker = WandBTracker(os.environ.get("WANDB_PROJECT", "genrecal"), name=f"{run}-stage{self.stage}",
                                   group=run, job_type=f"stage{self.stage}", dir=str(self.output_dir))
        tracker.main_process_only = False  # only rank 0's logger gets here: no need to ask accelerate's state
        tracker.start()
        if self._hparams is not None and not (name == "tensorboard" and self._tensorboard_has_hparams()):
            tracker.store_init_configuration(self._hparams)
        return tracker

    def _wait_past_event_files(self) -> None:
        """TensorBoard reads a folder's event files in name order: the second a file was opened, then host, pid and
        a per-process counter compared as text (``...10`` sorts before ``...9``). A purging writer must come after
        the files it purges, so it opens in a later second than any of them (a wait under a second, on a rewind)."""
        stamps = [int(p.name.split(".")[3]) for p in self.tensorboard_dir.glob("events.out.tfevents.*")
                  if p.name.split(".")[3].isdigit()]
        delay = max(stamps, default=0) + 1 - time.time()
        if delay > 0:
            time.sleep(delay)

    def _tensorboard_has_hparams(self) -> bool:
        """Whether an earlier stage or attempt of this run stored the same configuration already."""
        import yaml

        for path in self.tensorboard_dir.glob("*/hparams.yml"):
            try:
                if yaml.safe_load(path.read_text(encoding="utf-8")) == self._hparams:
                    return True
            except (OSError, yaml.YAMLError):
                continue
        return False

    def _finish_trackers(self) -> None:
        trackers, self._trackers = self._trackers, []
        for tracker in trackers:
            tracker.finish()


def resolve_report_to(report_to: str | Sequence[str]) -> tuple[str, ...]:
    """The trackers ``report_to`` names, in a fixed order (``()`` for ``none``); a clear error for bad input.

    Raises ValueError for an unknown name, ``none`` beside a tracker, an empty list, or ``wandb`` when the
    ``wandb`` package is not installed.
    """
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    unknown = [n for n in names if n not in REPORT_TO_CHOICES]
    if unknown:
        raise ValueError(
            f"report_to: unknown {unknown}; choose among {', '.join(REPORT_TO_CHOICES)} "
            "(e.g. --report-to tensorboard wandb)"
        )
    if not names:
        raise ValueError("report_to is empty: pass 'none' for the metrics JSONL only")
    if "none" in names:
        if len(set(names)) > 1:
            raise ValueError(f"report_to {names}: 'none' means no tracker; pass it alone or leave it out")
        return ()
    if "wandb" in names and importlib.util.find_spec("wandb") is None:
        raise ValueError(
            "report_to includes 'wandb' but the wandb package is not installed: pip install wandb "
            "(or pip install 'genrecal[wandb]'), or drop wandb from --report-to"
        )
    return tuple(name for name in TRACKERS if name in names)


def flatten_config(config: Mapping[str, object], prefix: str = "") -> dict[str, bool | int | float | str | None]:
    """Hyperparameters from a (nested) config: ``a.b`` keys; lists, paths and other values as text.

    TensorBoard's hparams take only numbers, strings and booleans (None is skipped); W&B takes the same.
    """
    flat: dict[str, bool | int | float | str | None] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        value = _plain(value)
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, prefix=f"{name}."))
        elif value is None or isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=str) if isinstance(value, list | tuple) else str(value)
    return flat


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics JSONL file (a partly written last line, from a crash, is ignored)."""
    rows = []
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s: ignoring an unreadable line (interrupted write?)", path)
    return rows


def plot_loss_curves(jsonl_path: str | Path, png_path: str | Path, *, title: str | None = None) -> Path:
    """Draw the stage's loss curves (paper Appendix D) from its metrics JSONL into a PNG.

    Plots, against the optimizer step, whichever of ``L1_ce`` (Recalib(q_s, a_l)), ``L2_ce`` (Recalib(q_l, a_l)),
    ``L3`` (the student's CE on its own answers) and ``teacher_ce`` the rows carry.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(jsonl_path)
    present = [key for key in LOSS_CURVES if any(_is_scalar(r.get(key)) for r in rows)]
    if not present:
        raise ValueError(f"{jsonl_path} has no loss columns to plot (looked for {', '.join(LOSS_CURVES)})")
    figure = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(figure)  # a canvas of its own: no pyplot, no global backend
    axes = figure.add_subplot()
    for key in present:
        points = sorted((int(r["step"]), r[key]) for r in rows if _is_scalar(r.get(key)))
        steps, values = zip(*points, strict=True)
        axes.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=LOSS_CURVES[key])
    stages = sorted({r.get("stage") for r in rows if r.get("stage") is not None})
    axes.set_title(title or ("Stage " + ", ".join(str(s) for s in stages) + " losses" if stages else "Losses"))
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy (nats / answer token)")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path, format="png")
    return png_path


def _plain(value: object) -> object:
    """JSON-friendly: tensors / numpy scalars -> Python numbers; everything else as it is."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return value


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_scalar(value: object) -> bool:
    """A finite number (what a curve can show)."""
    return _is_number(value) and math.isfinite(value)
