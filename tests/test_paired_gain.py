"""``benchmarks/paired_gain.py``: the paired-by-seed gain across two exports, and its bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paired_gain.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def _export(folder: Path, rows: list[tuple[str, str, float]]) -> Path:
    folder.mkdir()
    lines = ["layer,seed,status,test_acc"] + [f"{lay},{s},finished,{acc}" for lay, s, acc in rows]
    (folder / "runs.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_gain_is_the_mean_of_per_seed_differences(tmp_path):
    a = _export(tmp_path / "a", [("x", "0", 0.80), ("x", "1", 0.82), ("x", "2", 0.81)])
    b = _export(
        tmp_path / "b", [("y", "0", 0.78), ("y", "1", 0.80), ("y", "2", 0.77), ("z", "0", 0.5)]
    )
    r = _run(f"{a}:layer=x", f"{b}:layer=y")
    assert r.returncode == 0, r.stderr
    # differences +2, +2, +4 points: mean +2.67, t(0.975, 2) = 4.303, sd 1.155 -> half 2.87
    assert r.stdout.startswith(
        "A - B: +2.67 [-0.20, +5.54] points, seeds 0, 1, 2: +2.00, +2.00, +4.00"
    )


def test_bad_input_exits_2_with_one_line(tmp_path):
    b = _export(tmp_path / "b", [("y", "0", 0.78), ("z", "0", 0.5)])
    for args, says in (
        ((f"{tmp_path / 'missing'}:layer=y", f"{b}:layer=y"), "no such export"),
        ((f"{b}:lyr=y", f"{b}:layer=y"), "has no column lyr"),
        ((f"{b}", f"{b}:layer=y"), "two cells for seed 0"),
    ):
        r = _run(*args)
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1
