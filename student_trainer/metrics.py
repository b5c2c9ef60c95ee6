"""Per-step training metrics: a JSONL file per stage, TensorBoard scalars, and the paper's loss-curve plot.

Rows are one JSON object per optimizer step: whatever the trainer measured (``lr``, ``L1_ce``, ``L1_kl``,
``L2_ce``, ``L2_kl``, ``L3``, ``teacher_ce`` (the teacher's own CE on its answers, in the stages that use the
teacher), ``tokens_per_s``, ``teacher_wait_share``, ...) plus ``stage``, ``step`` and ``time`` (Unix seconds). Only
rank 0 writes; other ranks' loggers do nothing.

Resuming: a step that is not after the last one already in the file (a run resumed from an earlier checkpoint)
first drops every row with ``step >=`` it, so no step appears twice; TensorBoard gets the same cut through
``SummaryWriter(purge_step=...)``.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import time
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

# The paper's Appendix D curves: the Recalibrator's CE on both paths against the student's CE on its own answers
# and the teacher's CE on its own answers (logged in the stages that use the teacher).
LOSS_CURVES = {
    "L1_ce": "Recalib(q_s, a_l) CE (L1)",
    "L2_ce": "Recalib(q_l, a_l) CE (L2)",
    "L3": "student CE on its own answers (L3)",
    "teacher_ce": "teacher CE on its own answers",
}


class MetricsLogger:
    """Writes ``output_dir/metrics/stage{n}.jsonl`` and TensorBoard scalars under ``output_dir/tensorboard``.

    Args:
        output_dir: the run's output folder.
        stage: the training stage (1, 2 or 3); names the JSONL file and prefixes the TensorBoard tags.
        rank: the process's global rank; only rank 0 writes anything.
        tensorboard: also write TensorBoard event files.
        resume_step: the first step this run will log, when resuming; rows with ``step >= resume_step`` are
            dropped at once (the same happens anyway on the first :meth:`log` of an earlier-or-equal step).
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        stage: int,
        rank: int = 0,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ):
        self.stage = int(stage)
        self.enabled = rank == 0
        self.path = Path(output_dir) / "metrics" / f"stage{self.stage}.jsonl"
        self.tensorboard_dir = Path(output_dir) / "tensorboard"
        self._tensorboard = tensorboard
        self._writer = None
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
        writer = self._tensorboard_writer()
        if writer is not None:
            for key, value in row.items():
                if key not in ("stage", "step", "time") and _is_number(value):
                    writer.add_scalar(f"stage{self.stage}/{key}", value, global_step=step)
            writer.flush()
        return row

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

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

    def _tensorboard_writer(self):
        if not self._tensorboard:
            return None
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the older event files' points from that step on (a resumed run).
            self._writer = SummaryWriter(log_dir=str(self.tensorboard_dir), purge_step=self._purge_step)
        elif self._purge_step is not None:
            # A rewind after the writer started: a fresh writer purges from there (a new event file).
            self._writer.close()
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.tensorboard_dir), purge_step=self._purge_step)
        self._purge_step = None
        return self._writer


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
