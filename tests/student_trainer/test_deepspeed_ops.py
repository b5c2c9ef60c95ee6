"""DeepSpeed's just-in-time ops are loaded before training, with a progress line when they take a while."""

from __future__ import annotations

import json
import time

from student_trainer import deepspeed_ops
from student_trainer.deepspeed_ops import build_ops, build_ops_for, needed_ops


def test_needed_ops_on_cpu():
    assert needed_ops(offloaded_optimizer=False) == ["ShareMemCommBuilder"]
    assert needed_ops(offloaded_optimizer=True) == ["ShareMemCommBuilder", "CPUAdamBuilder"]


def test_a_cached_op_loads_quietly(capsys):
    build_ops(["ShareMemCommBuilder"])  # built once (the suite's install prebuilds it); later loads are fast
    started = time.perf_counter()
    build_ops(["ShareMemCommBuilder"])
    assert time.perf_counter() - started < deepspeed_ops.QUIET_S
    assert "compiling" not in capsys.readouterr().err


def test_a_slow_load_shows_a_progress_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(deepspeed_ops, "QUIET_S", 0.0)  # every load counts as slow
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    build_ops_for(ds_json)
    err = capsys.readouterr().err
    assert "compiling DeepSpeed's deepspeed_shm_comm op" in err  # the collective of gloo runs
    assert "compiling DeepSpeed's cpu_adam op" in err  # ZeRO-Offload's optimizer
