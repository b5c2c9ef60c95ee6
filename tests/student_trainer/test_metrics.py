"""Metrics JSONL + TensorBoard, resume truncation, and the loss-curve PNG (checked from the drawn lines)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from student_trainer.metrics import LOSS_CURVES, MetricsLogger, plot_loss_curves, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def scalar_events(folder):
    """{tag: [(step, value), ...]} over every TensorBoard event file in ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_rows_and_tensorboard_scalars(tmp_path):
    with MetricsLogger(tmp_path, stage=2) as metrics:
        for step in range(3):
            row = metrics.log(step, {"lr": 1e-4, "L1_ce": torch.tensor(3.0 - step), "L3": 2.5, "note": "warm"})
    assert row["stage"] == 2 and row["step"] == 2 and isinstance(row["time"], float)
    rows = read_metrics(tmp_path / "metrics" / "stage2.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert [r["L1_ce"] for r in rows] == [3.0, 2.0, 1.0] and rows[0]["note"] == "warm"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    events = scalar_events(tmp_path / "tensorboard")
    assert events["stage2/L1_ce"] == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert "stage2/note" not in events and "stage2/time" not in events


def test_other_ranks_write_nothing(tmp_path):
    metrics = MetricsLogger(tmp_path, stage=1, rank=3)
    assert metrics.log(0, {"L1_ce": 1.0}) is None
    metrics.close()
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "tensorboard").exists()


@pytest.mark.parametrize("explicit", [True, False])
def test_resume_drops_rows_from_the_resume_step_on(tmp_path, explicit):
    with MetricsLogger(tmp_path, stage=1, tensorboard=False) as metrics:
        for step in range(6):
            metrics.log(step, {"L1_ce": float(step)})
    # The checkpoint was taken after step 3: the resumed run logs steps 4, 5, 6, ... again.
    kwargs = {"resume_step": 4} if explicit else {}
    with MetricsLogger(tmp_path, stage=1, tensorboard=False, **kwargs) as metrics:
        if explicit:
            assert [r["step"] for r in read_metrics(metrics.path)] == [0, 1, 2, 3]
        for step in range(4, 8):
            metrics.log(step, {"L1_ce": 10.0 + step})
    rows = read_metrics(tmp_path / "metrics" / "stage1.jsonl")
    assert [r["step"] for r in rows] == list(range(8))
    assert [r["L1_ce"] for r in rows] == [0.0, 1.0, 2.0, 3.0, 14.0, 15.0, 16.0, 17.0]


def test_resume_purges_tensorboard_points(tmp_path):
    with MetricsLogger(tmp_path, stage=1) as metrics:
        for step in range(4):
            metrics.log(step, {"L3": float(step)})
    with MetricsLogger(tmp_path, stage=1, resume_step=2) as metrics:
        for step in range(2, 4):
            metrics.log(step, {"L3": 10.0 + step})
    assert scalar_events(tmp_path / "tensorboard")["stage1/L3"] == [(0, 0.0), (1, 1.0), (2, 12.0), (3, 13.0)]


@pytest.fixture
def saved_figures(monkeypatch) -> list:
    """Every matplotlib Figure saved during the test, as it was saved (the real ``savefig`` still writes)."""
    from matplotlib.figure import Figure

    figures, savefig = [], Figure.savefig

    def record(figure, *args, **kwargs):
        figures.append(figure)
        return savefig(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return figures


def plotted_lines(figure) -> dict[str, tuple[list, list]]:
    """{legend label: (steps, values)} of the figure's one axes; the legend must list exactly these lines."""
    (axes,) = figure.axes
    lines = {line.get_label(): ([float(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()])
             for line in axes.get_lines()}
    assert [text.get_text() for text in axes.get_legend().get_texts()] == list(lines)
    return lines


@pytest.mark.parametrize("with_teacher", [False, True])
def test_loss_curve_png(tmp_path, with_teacher, saved_figures):
    jsonl = tmp_path / "metrics" / "stage2.jsonl"
    with MetricsLogger(tmp_path, stage=2, tensorboard=False) as metrics:
        for step in range(5):
            row = {"L1_ce": 4.0 - step * 0.5, "L2_ce": 3.0 - step * 0.4, "L3": 5 - step, "lr": 1e-4}
            if with_teacher:  # what the trainer logs in stages 1 and 2: the teacher's own CE on its answers
                row["teacher_ce"] = 0.8 + 0.01 * step
            metrics.log(step, row)
    png = plot_loss_curves(jsonl, tmp_path / "plots" / "stage2.png")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (700, 450)  # figsize (7, 4.5) at 100 dpi
    # One line per loss column the rows carry, drawn from the rows' values (the teacher's exactly when logged).
    steps = [0.0, 1.0, 2.0, 3.0, 4.0]
    want = {
        LOSS_CURVES["L1_ce"]: (steps, [4.0, 3.5, 3.0, 2.5, 2.0]),
        LOSS_CURVES["L2_ce"]: (steps, pytest.approx([3.0, 2.6, 2.2, 1.8, 1.4])),
        LOSS_CURVES["L3"]: (steps, [5.0, 4.0, 3.0, 2.0, 1.0]),
    }
    if with_teacher:
        want[LOSS_CURVES["teacher_ce"]] = (steps, pytest.approx([0.8, 0.81, 0.82, 0.83, 0.84]))
    (figure,) = saved_figures
    assert plotted_lines(figure) == want
    assert figure.axes[0].get_title() == "Stage 2 losses"

    # A stage-1 file with only L1/L2 and the teacher's CE, steps out of order: plotted in step order.
    stage1 = tmp_path / "stage1.jsonl"
    stage1.write_text("".join(json.dumps({"step": s, "L1_ce": 3.0 - s, "L2_ce": 2.5 - s, "teacher_ce": 0.9}) + "\n"
                              for s in (2, 0, 1)))
    plot_loss_curves(stage1, tmp_path / "stage1.png", title="Stage 1 (alignment) losses")
    assert (tmp_path / "stage1.png").read_bytes().startswith(PNG_SIGNATURE)
    assert plotted_lines(saved_figures[-1]) == {
        LOSS_CURVES["L1_ce"]: ([0.0, 1.0, 2.0], [3.0, 2.0, 1.0]),
        LOSS_CURVES["L2_ce"]: ([0.0, 1.0, 2.0], [2.5, 1.5, 0.5]),
        LOSS_CURVES["teacher_ce"]: ([0.0, 1.0, 2.0], [0.9, 0.9, 0.9]),
    }
    assert saved_figures[-1].axes[0].get_title() == "Stage 1 (alignment) losses"

    (tmp_path / "no_losses.jsonl").write_text(json.dumps({"step": 0, "lr": 1e-4}) + "\n")
    with pytest.raises(ValueError, match="no loss columns"):
        plot_loss_curves(tmp_path / "no_losses.jsonl", tmp_path / "x.png")
