"""Crash safety: SIGKILL a running study twice, re-run it, and compare with an uninterrupted run."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from lowbit.study.store import Store

SPEC = """
[grid]
model = "mlp"
layer = ["ternary", "nlevel"]
levels = 4
depth = 2
width = 32
dataset = "synthetic"
epochs = 4
batch_size = 32
seed = [0, 1]
"""
CELLS, EPOCHS = 4, 4


def _study(spec: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lowbit",
            "study",
            str(spec),
            "--out",
            str(out),
            "--workers",
            "1",
            "--threads",
            "1",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _epoch_rows(out: Path) -> int:
    try:
        db = sqlite3.connect(f"file:{out / 'results.sqlite'}?mode=ro", uri=True, timeout=5)
        try:
            return db.execute("SELECT count(*) FROM epochs").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        return 0


def _kill_after(spec: Path, out: Path, rows: int) -> int:
    """Start the study, SIGKILL it (whole process group) once ``rows`` epoch rows exist."""
    proc = _study(spec, out)
    deadline = time.time() + 60
    while _epoch_rows(out) < rows:
        assert proc.poll() is None, "the study finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return _epoch_rows(out)


def _snapshot(out: Path) -> tuple[dict, list, list]:
    with Store(out / "results.sqlite", readonly=True) as s:
        status = s.status()
        epochs = [{k: v for k, v in e.items() if k != "wall_s"} for e in s.epochs()]
        layers = s.layers()
    return status, epochs, layers


def test_sigkill_then_rerun_loses_and_duplicates_nothing(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC)
    ref, crash = tmp_path / "ref", tmp_path / "crash"

    reference = _study(spec, ref)
    # two kills at different points: early in the first cell, then in a later cell
    first = _kill_after(spec, crash, 2)
    assert 2 <= first < CELLS * EPOCHS
    second = _kill_after(spec, crash, first + 3)
    assert first + 3 <= second < CELLS * EPOCHS
    status_mid, _, _ = _snapshot(crash)
    assert "running" in status_mid.values()  # killed mid-cell: left as running, not finished

    done = _study(spec, crash)
    assert done.wait(120) == 0, done.stdout.read().decode()
    assert reference.wait(120) == 0, reference.stdout.read().decode()

    status, epochs, layers = _snapshot(crash)
    assert set(status.values()) == {"finished"} and len(status) == CELLS
    for run in status:
        got = [e["epoch"] for e in epochs if e["run_id"] == run]
        assert got == list(range(1, EPOCHS + 1))  # no gap, no duplicate
    with Store(crash / "results.sqlite", readonly=True) as s:
        attempts = [r["attempts"] for r in s.runs()]
    assert max(attempts) >= 2  # some cell really was restarted

    # same numbers as the uninterrupted run: metrics and per-layer diagnostics (flip ratios too)
    ref_status, ref_epochs, ref_layers = _snapshot(ref)
    assert ref_status == status
    assert epochs == ref_epochs
    assert layers == ref_layers
    assert all(r["flip_ratio"] is not None for r in layers)

    # a third run skips everything
    again = _study(spec, crash)
    assert again.wait(120) == 0
    assert b"(4 already done)" in again.stdout.read()
