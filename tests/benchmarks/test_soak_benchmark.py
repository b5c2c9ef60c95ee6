"""benchmarks/soak.py, shortened: good clients get single-client results while every kind of abuse runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_short_soak_passes_and_reports_rss_and_metrics(tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "soak.py"), "--duration-s", "12", "--clients", "2",
         "--abusive", "5", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["good_errors"] == [] and all(rounds > 0 for rounds in summary["rounds"])
    assert summary["max_rel_diff_vs_single_client"] <= 1e-4
    assert summary["rss_mib"]["peak"] >= summary["rss_mib"]["start"] > 0
    codes = {key for codes in summary["abuser_codes"] for key in codes}
    assert {"garbage:INVALID_ARGUMENT", "bomb:INVALID_ARGUMENT"} <= codes
    names = {line.split("{")[0].split()[0] for line in summary["metrics_midway"]}
    assert {"teacher_requests_total", "teacher_active_calls", "teacher_handle_store_bytes"} <= names
