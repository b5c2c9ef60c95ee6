"""``report_to``: TensorBoard and W&B through accelerate's trackers, read back from what they wrote."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from student_trainer.metrics import MetricsLogger, flatten_config, read_metrics, resolve_report_to

REPO = Path(__file__).resolve().parents[2]
RUN_CONFIG = {"lr": 0.001, "stages": "1,2", "score_overlap": True, "teacher_addr": None,
              "image_options": {"max_pixels": 1024}, "extra_layers": [2, 3]}
HPARAMS = {"lr": 0.001, "stages": "1,2", "score_overlap": True, "teacher_addr": None,
           "image_options.max_pixels": 1024, "extra_layers": "[2, 3]"}


def tensorboard_run(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return accumulator


def scalar_events(folder):
    """{tag: [(step, value), ...]} over the TensorBoard event files directly in ``folder``."""
    accumulator = tensorboard_run(folder)
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def stored_hparams(tensorboard_dir):
    """{run folder: {name: value}} of every hparams session TensorBoard holds under ``tensorboard_dir``."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    found = {}
    for folder in sorted(p for p in Path(tensorboard_dir).iterdir() if p.is_dir()):
        try:
            content = tensorboard_run(folder).PluginTagToContent("hparams")
        except KeyError:  # accelerate's hparams.yml folder: no events
            continue
        if "_hparams_/session_start_info" in content:
            data = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
            found[folder.name] = {
                name: getattr(value, value.WhichOneof("kind"))
                for name, value in data.session_start_info.hparams.items()
            }
    return found


def test_tensorboard_scalars_and_hparams_read_back(tmp_path):
    values = [3.0, 2.5, 0.125]  # exact in float32 (TensorBoard's scalar type)
    with MetricsLogger(tmp_path, stage=2, report_to=["tensorboard"], run_config=RUN_CONFIG) as metrics:
        for step, value in enumerate(values):
            metrics.log(step, {"L2_ce": value, "lr": 0.5, "note": "text", "tokens": step * 10})
    events = scalar_events(tmp_path / "tensorboard")  # the folder docs/student_trainer.md names
    assert events["stage2/L2_ce"] == list(enumerate(values))
    assert events["stage2/tokens"] == [(0, 0.0), (1, 10.0), (2, 20.0)]
    assert set(events) == {"stage2/L2_ce", "stage2/lr", "stage2/tokens"}  # no text, no step / time columns
    [hparams] = stored_hparams(tmp_path / "tensorboard").values()
    assert hparams == {
        "lr": pytest.approx(0.001), "stages": "1,2", "score_overlap": 1.0,  # a bool is a number to TensorBoard
        "image_options.max_pixels": 1024.0, "extra_layers": "[2, 3]",  # None is left out
    }
    [hparams_file] = (tmp_path / "tensorboard").glob("*/hparams.yml")
    assert yaml.safe_load(hparams_file.read_text()) == HPARAMS

    # The next stage of the same run: its own tags, the configuration not stored twice.
    with MetricsLogger(tmp_path, stage=3, run_config=RUN_CONFIG) as metrics:
        metrics.log(0, {"L3": 1.0})
    assert scalar_events(tmp_path / "tensorboard")["stage3/L3"] == [(0, 1.0)]
    assert len(stored_hparams(tmp_path / "tensorboard")) == 1
    assert len(list((tmp_path / "tensorboard").glob("*/hparams.yml"))) == 1

    # A changed configuration (a new run in the same folder) is stored again.
    with MetricsLogger(tmp_path, stage=3, run_config={**RUN_CONFIG, "lr": 0.002}, resume_step=0) as metrics:
        metrics.log(0, {"L3": 2.0})
    assert sorted(h["lr"] for h in stored_hparams(tmp_path / "tensorboard").values()) == [
        pytest.approx(0.001), pytest.approx(0.002)]


def test_tensorboard_rewind_within_a_run_and_on_resume(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    # Event files of one second sort by a per-process writer counter compared as text: bring the counter to just
    # before 9 -> 10 (or 99 -> 100), where the logger's rewind writer would sort before the one it purges.
    while True:
        writer = SummaryWriter(tmp_path / "elsewhere")
        uid = int(Path(writer.file_writer.event_writer._file_name).name.rsplit(".", 1)[1])
        writer.close()
        if str(uid + 2) == "1" + "0" * (len(str(uid + 2)) - 1):  # the next writer is 9 (99, ...), then 10
            break
    with MetricsLogger(tmp_path, stage=1) as metrics:
        for step in range(3):
            metrics.log(step, {"L3": float(step)})
        metrics.log(1, {"L3": 11.0})  # a rewind mid-run: a fresh writer purges steps >= 1
        metrics.log(2, {"L3": 12.0})
    with MetricsLogger(tmp_path, stage=1, resume_step=2) as metrics:  # resumed from the step-2 checkpoint
        metrics.log(2, {"L3": 22.0})
    assert scalar_events(tmp_path / "tensorboard")["stage1/L3"] == [(0, 0.0), (1, 11.0), (2, 22.0)]
    assert [(r["step"], r["L3"]) for r in read_metrics(tmp_path / "metrics" / "stage1.jsonl")] == [
        (0, 0.0), (1, 11.0), (2, 22.0)]


@pytest.mark.parametrize("report_to", ["none", ["none"]])
def test_none_writes_the_jsonl_only(tmp_path, report_to):
    with MetricsLogger(tmp_path, stage=1, report_to=report_to, run_config=RUN_CONFIG) as metrics:
        assert metrics.report_to == ()
        for step in range(2):
            metrics.log(step, {"L3": 1.0})
    assert [r["step"] for r in read_metrics(tmp_path / "metrics" / "stage1.jsonl")] == [0, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics"]  # no tensorboard/, no wandb/
    assert not list(tmp_path.rglob("events.out.tfevents.*"))


def test_tensorboard_false_drops_tensorboard_only(tmp_path):
    assert MetricsLogger(tmp_path, stage=1, rank=1, tensorboard=False).report_to == ()
    with MetricsLogger(tmp_path, stage=1, tensorboard=False) as metrics:
        metrics.log(0, {"L3": 1.0})
    assert not (tmp_path / "tensorboard").exists()


def test_resolve_report_to():
    assert resolve_report_to("tensorboard") == ("tensorboard",)
    assert resolve_report_to(["tensorboard", "tensorboard"]) == ("tensorboard",)
    assert resolve_report_to(("none",)) == ()
    with pytest.raises(ValueError, match=r"unknown \['tensorbord'\]; choose among tensorboard, wandb, none"):
        resolve_report_to(["tensorbord"])
    with pytest.raises(ValueError, match="'none' means no tracker; pass it alone"):
        resolve_report_to(["none", "tensorboard"])
    with pytest.raises(ValueError, match="report_to is empty: pass 'none'"):
        resolve_report_to([])
    with pytest.raises(ValueError, match="unknown"):
        MetricsLogger("unused", stage=1, rank=1, report_to="mlflow")  # every rank checks, not only rank 0


def test_wandb_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets where it is not installed
    with pytest.raises(ValueError, match=r"the wandb package is not installed: pip install wandb"):
        resolve_report_to(["tensorboard", "wandb"])
    with pytest.raises(ValueError, match="pip install wandb"):
        MetricsLogger(tmp_path, stage=1, rank=1, report_to="wandb")
    assert not (tmp_path / "metrics").exists()


def test_flatten_config():
    assert flatten_config(RUN_CONFIG) == HPARAMS
    assert flatten_config({"out": Path("/a/b"), "nested": {"deeper": {"x": (1, "y")}}}) == {
        "out": "/a/b", "nested.deeper.x": '[1, "y"]'}


# ---- W&B offline ----------------------------------------------------------------------------------------------
WANDB_RUN = """
import sys
from student_trainer.metrics import MetricsLogger

out, config = sys.argv[1], {"lr": 0.001, "stages": "1,2", "image_options": {"max_pixels": 1024}}
with MetricsLogger(out, stage=1, report_to=["wandb"], run_config=config) as metrics:
    for step in range(3):
        metrics.log(step, {"L3": 2.0 - step / 2, "lr": 0.001, "note": "text"})
with MetricsLogger(out, stage=1, report_to=["wandb"], run_config=config, resume_step=1) as metrics:
    metrics.log(1, {"L3": 9.0})
"""


def wandb_records(path):
    """The protobuf records of an offline run's ``.wandb`` file (LevelDB log format: 32 KiB blocks of chunks)."""
    from wandb.proto import wandb_internal_pb2

    data, block, chunk_header = Path(path).read_bytes(), 32768, 7
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, pending = 7, b""  # after the file header
    while position + chunk_header <= len(data):
        if block - position % block < chunk_header:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + chunk_header])
        if kind == 0:
            break
        pending += data[position + chunk_header:position + chunk_header + length]
        position += chunk_header + length
        if kind in (1, 4):  # FULL or LAST: a record ends here
            yield wandb_internal_pb2.Record.FromString(pending)
            pending = b""


def read_wandb_run(path):
    """(run record, {config key: value}, [{history key: value} per logged step]) of an offline run file."""

    def items(entries):  # a key is in `key`, or split into `nested_key` (W&B's nested dicts, joined by ".")
        return {entry.key or ".".join(entry.nested_key): json.loads(entry.value_json) for entry in entries}

    run, config, history = None, {}, []
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "config":
            config.update(items(record.config.update))
        elif kind == "history":
            history.append(items(record.history.item))
    return run, config, history


def test_wandb_offline_run_files(tmp_path):
    pytest.importorskip("wandb")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_PROJECT": "genrecal-test",
           "WANDB_CONFIG_DIR": str(tmp_path / "config"), "WANDB_CACHE_DIR": str(tmp_path / "cache"),
           "WANDB_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(REPO)}
    env.pop("WANDB_API_KEY", None)
    out = tmp_path / "run1"
    subprocess.run([sys.executable, "-c", WANDB_RUN, str(out)], env=env, cwd=tmp_path, check=True, timeout=300)

    runs = [read_wandb_run(path) for path in sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))]
    assert len(runs) == 2  # the resumed attempt is a new run: a W&B run takes only increasing steps
    for run, config, _ in runs:
        assert (run.project, run.display_name, run.run_group, run.job_type) == (
            "genrecal-test", "run1-stage1", "run1", "stage1")
        assert {key: config[key] for key in ("lr", "stages", "image_options.max_pixels")} == {
            "lr": 0.001, "stages": "1,2", "image_options.max_pixels": 1024}
    logged = sorted(
        [(row["_step"], {k: v for k, v in row.items() if k.startswith("stage")}) for row in history]
        for _, _, history in runs
    )
    assert logged == [
        [(0, {"stage1/L3": 2.0, "stage1/lr": 0.001}), (1, {"stage1/L3": 1.5, "stage1/lr": 0.001}),
         (2, {"stage1/L3": 1.0, "stage1/lr": 0.001})],
        [(1, {"stage1/L3": 9.0})],
    ]
    assert [r["step"] for r in read_metrics(out / "metrics" / "stage1.jsonl")] == [0, 1]
