"""Interruptions and concurrency of ``lowbit study --workers 2``: two sweeps on one folder train
each cell once; Ctrl-C and then SIGKILL of the parent alone stop everything at once, and a re-run
gives exactly the uninterrupted results. Output redirected: progress lines on stderr."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowbit.study.store import Store

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")

# Enough epochs that, even on a loaded machine, the signals land while cells remain to run.
EPOCHS = 40
SPEC = f"""
[grid]
model = "mlp"
layer = ["ternary", "sign"]
levels = 4
depth = 1
width = 24
dataset = "synthetic"
epochs = {EPOCHS}
batch_size = 32
seed = [0, 1]
"""
CELLS = 4


def _study(spec: Path, out: Path, *extra: str, stdout=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lowbit", "study", str(spec), "--out", str(out)]
        + ["--workers", "2", "--threads", "1", *extra],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=stdout,
        stderr=subprocess.PIPE,
        start_new_session=True,
        # a terminal's shell starts a command with Ctrl-C at its default; a background job of a
        # non-interactive shell (``make test &``) inherits it ignored, and so would the sweep
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _query(out: Path, sql: str) -> list:
    try:
        db = sqlite3.connect(f"file:{out / 'results.sqlite'}?mode=ro", uri=True, timeout=5)
        try:
            return db.execute(sql).fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return []


def _wait_rows(proc: subprocess.Popen, out: Path, rows: int) -> None:
    deadline = time.time() + 90
    while (_query(out, "SELECT count(*) FROM epochs") or [(0,)])[0][0] < rows:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.01)


def _children(pid: int) -> list[int]:
    """The live worker processes (multiprocessing spawn children) of ``pid``."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and b"spawn_main" in cmdline:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def _snapshot(out: Path) -> tuple[dict, list, list]:
    with Store(out / "results.sqlite", readonly=True) as s:
        epochs = [{k: v for k, v in e.items() if k != "wall_s"} for e in s.epochs()]
        return s.status(), epochs, s.layers()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, tuple]:
    """Two sweeps started together on one folder (stdout to a file): each cell is claimed and
    trained exactly once, and the result is the uninterrupted reference."""
    base = tmp_path_factory.mktemp("ref")
    spec, out = base / "spec.toml", base / "out"
    spec.write_text(SPEC)
    with open(base / "a.txt", "w") as fa, open(base / "b.txt", "w") as fb:
        a, b = _study(spec, out, stdout=fa), _study(spec, out, stdout=fb)
        assert a.wait(180) == 0, a.stderr.read().decode()
        assert b.wait(180) == 0, b.stderr.read().decode()
    snap = _snapshot(out)
    assert set(snap[0].values()) == {"finished"} and len(snap[0]) == CELLS
    for run in snap[0]:
        assert [e["epoch"] for e in snap[1] if e["run_id"] == run] == list(range(1, EPOCHS + 1))
    attempts = _query(out, "SELECT attempts FROM runs")
    assert sorted(n for (n,) in attempts) == [1] * CELLS  # each cell claimed and trained once
    # redirected output: plain progress lines on stderr, the summary on stdout
    err = a.stderr.read().decode() + b.stderr.read().decode()
    assert "cells done" in err and "ETA" in err and "Traceback" not in err
    assert f"{CELLS} cells" in (base / "a.txt").read_text()
    return spec, snap


def _workers_of(proc: subprocess.Popen) -> list[int]:
    deadline = time.time() + 60
    while len(kids := _children(proc.pid)) < 2:
        assert proc.poll() is None and time.time() < deadline, "the study started no workers"
        time.sleep(0.05)
    return kids


def test_concurrent_sweeps_train_each_cell_once(reference):
    assert reference[1][0]  # the checks are the fixture's; here for the report of the run


def test_ctrl_c_then_sigkill_stop_at_once_and_rerun_matches(reference, tmp_path):
    spec, ref = reference
    out = tmp_path / "out"

    # Ctrl-C (SIGINT to the process group, as a terminal sends it)
    proc = _study(spec, out)
    workers = _workers_of(proc)
    _wait_rows(proc, out, 2)
    t_signal = time.time()
    os.killpg(proc.pid, signal.SIGINT)
    code = proc.wait(30)
    elapsed = time.time() - t_signal
    err = proc.stderr.read().decode()
    assert code == 130, err
    assert elapsed < 10 and "Traceback" not in err and "interrupted" in err
    time.sleep(0.5)
    assert not any(_alive(w) for w in workers)
    rows = _query(out, "SELECT status, started FROM runs")
    statuses = [s for s, _ in rows]
    assert "interrupted" in statuses and "failed" not in statuses and "running" not in statuses
    assert "pending" in statuses  # scheduling stopped: some cells never started
    assert all(started is None or started < t_signal + 0.2 for _, started in rows)

    # SIGKILL of the parent alone (not its process group): the workers notice and exit
    proc = _study(spec, out)
    workers = _workers_of(proc)
    rows_now = _query(out, "SELECT count(*) FROM epochs")[0][0]
    _wait_rows(proc, out, rows_now + 1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    deadline = time.time() + 5
    while any(_alive(w) for w in workers):
        assert time.time() < deadline, "a worker outlived the killed study by 5 s"
        time.sleep(0.05)
    epochs = _query(out, "SELECT count(*) FROM epochs")[0][0]
    time.sleep(1.0)  # nothing goes on writing once the workers are gone
    assert _query(out, "SELECT count(*) FROM epochs")[0][0] == epochs
    assert "running" in [s for (s,) in _query(out, "SELECT status FROM runs")]

    # the re-run takes over the dead sweep's cells at once and ends with the reference results
    again = _study(spec, out)
    assert again.wait(180) == 0, again.stderr.read().decode()
    assert _snapshot(out) == ref
