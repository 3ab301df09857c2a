"""Per-seed table of a study's CSV export: what each seed ended at, and where it plateaued.

    python benchmarks/study_seed_table.py docs/results/study/binarization [--group model,width]

Reads ``runs.csv`` and ``epochs.csv`` (``lowbit report DIR --csv``) and prints one Markdown row
per (group, variant), variants as the report names them (``linear``, ``ternary``, ``nlevel-5``,
``misborn/weight-ste``...):

    seeds, final test accuracy mean ± std (sample std over seeds) and per seed,
    epochs run per seed (of the budget; fewer = early stopping at the validation plateau),
    best-validation epoch per seed, test accuracy at the best-validation epoch (mean),
    last-quarter validation gain per seed (lowbit.study.aggregate.late_gain, points)

The report's tables give means; this one keeps the seeds apart so a reader sees the spread and
whether each run had settled. Only finished and diverged cells count.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from collections import defaultdict
from pathlib import Path

from lowbit.study.aggregate import late_gain

DEFAULT_GROUP = ("model", "depth", "width", "activation", "augment")


def _variant(row: dict[str, str]) -> str:
    name = row["layer"] + (f"-{row['levels']}" if row.get("levels") else "")
    return name + (f"/{row['reading']}" if row.get("reading") else "")


def _num(v: str) -> float:
    return float(v) if v not in ("", None) else math.nan


def table(folder: Path, group: tuple[str, ...]) -> str:
    runs = [
        r
        for r in csv.DictReader(open(folder / "runs.csv", newline=""))
        if r["status"] in ("finished", "diverged")
    ]
    curves: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for e in csv.DictReader(open(folder / "epochs.csv", newline="")):
        curves[e["run_id"]].append((int(e["epoch"]), _num(e["val_acc"]), _num(e["test_acc"])))
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        key = tuple(r.get(k, "") for k in group) + (_variant(r),)
        cells[key].append(r)
    head = [*group, "variant", "seeds", "final test acc (%)", "per seed", "epochs run (of)"]
    head += ["best-val epoch", "test acc at best val (%)", "last-quarter val gain (pt)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def order(k: tuple) -> list:  # numbers as numbers (width 16 < 256), fp32 first
        return [(len(x), x) for x in k[:-1]] + [(k[-1] != "linear", k[-1])]

    for key in sorted(cells, key=order):
        rs = sorted(cells[key], key=lambda r: int(r["seed"]))
        acc = [100 * _num(r["test_acc"]) for r in rs]
        ran, best, at_best, gain = [], [], [], []
        for r in rs:
            c = sorted(curves[r["run_id"]])
            val = [v for _, v, _ in c]
            ran.append(str(len(c)))
            finite = [i for i, v in enumerate(val) if math.isfinite(v)]
            if finite:
                i = max(finite, key=lambda i: (val[i], -i))
                best.append(str(i + 1))
                at_best.append(100 * c[i][2])
            g = late_gain(val)
            gain.append("-" if g is None else f"{g:+.2f}")
        spread = f" ± {statistics.stdev(acc):.2f}" if len(acc) > 1 else " (one seed)"
        row = [*key, str(len(rs)), f"{statistics.mean(acc):.2f}{spread}"]
        row += [", ".join(f"{a:.2f}" for a in acc), f"{', '.join(ran)} (of {rs[0]['epochs']})"]
        row += [", ".join(best) or "-", f"{statistics.mean(at_best):.2f}" if at_best else "-"]
        row += [", ".join(gain)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path, help="a folder with runs.csv and epochs.csv")
    ap.add_argument("--group", default=",".join(DEFAULT_GROUP), help="config columns of a group")
    args = ap.parse_args()
    group = tuple(k for k in args.group.split(",") if k)
    print(table(args.folder, group))


if __name__ == "__main__":
    main()
