"""Paired-by-seed gain between two arms of study exports, where the arms differ in more than the
layer (e.g. a method at its own learning rate), which ``lowbit.study.claims`` does not pair.

    python benchmarks/paired_gain.py \\
        "docs/results/study/binarization-cnn40-lr3e-2:layer=reactnet" \\
        "docs/results/study/binarization-cnn40-bireal-lr1e-1:layer=bireal"

An arm is ``EXPORT_DIR:key=value,key=value``: the finished cells of ``EXPORT_DIR/runs.csv`` whose
columns match, one per seed. Prints ``A - B`` of the final test accuracy in points: the mean of
the per-seed differences with its 95% Student t interval (``lowbit.study.claims.t_interval``,
the interval the claims use), and the per-seed differences.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from lowbit.study.claims import t_interval


def fail(message: str) -> None:
    """Bad input: one line on stderr, exit status 2 (the project's convention)."""
    print(f"paired_gain: {message}", file=sys.stderr)
    sys.exit(2)


def arm(spec: str) -> dict[str, float]:
    """seed -> final test accuracy (points) of the cells ``spec`` names."""
    folder, _, filters = spec.partition(":")
    want = dict(f.split("=", 1) for f in filters.split(",") if f)
    path = Path(folder) / "runs.csv"
    if not path.is_file():
        fail(f"{path}: no such export; make one with `lowbit report DIR --csv`")
    out: dict[str, float] = {}
    with open(path, newline="") as f:
        rows = csv.DictReader(f)
        if unknown := sorted(set(want) - set(rows.fieldnames or ())):
            fail(f"{spec}: {path} has no column {', '.join(unknown)}")
        for row in rows:
            if row["status"] == "finished" and all(row[k] == v for k, v in want.items()):
                if row["seed"] in out:
                    fail(f"{spec}: two cells for seed {row['seed']}; add a filter")
                out[row["seed"]] = 100 * float(row["test_acc"])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("a", help="EXPORT_DIR:key=value,...")
    p.add_argument("b", help="EXPORT_DIR:key=value,...")
    args = p.parse_args()
    a, b = arm(args.a), arm(args.b)
    seeds = sorted(set(a) & set(b), key=int)
    if not seeds:
        fail("the two arms share no seed")
    diffs = [a[s] - b[s] for s in seeds]
    m, lo, hi = t_interval(diffs)
    per_seed = ", ".join(f"{d:+.2f}" for d in diffs)
    print(f"A - B: {m:+.2f} [{lo:+.2f}, {hi:+.2f}] points, seeds {', '.join(seeds)}: {per_seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
