"""Benchmark the packed kernels against torch fp32 / bf16 (see ``lowbit.kernels.bench``).

Claim checked: ternary 4096x4096 batch 1 >= 10x fp32 F.linear and >= 5x bf16, >= 100 G ternary
MAC/s per core cache-resident, binary >= ternary speed, 5 levels >= 5x fp32, ternary batch 32
>= 2x fp32; weight-only (fp32 activations, the lookup-table kernel): ternary 4096x4096 batch 1
>= 10x fp32 and within 1.3x of int8, binary at least as fast as ternary, 5 levels >= 5x fp32,
batch 32 >= 3x fp32. Hardware: whatever runs it (the header of the output records CPU, cores,
torch, python, date and load). Each figure is the median of >= 9 interleaved rounds, the
contenders in a fresh random order each round.

    python benchmarks/kernels.py [--quick] [--shapes SHAPES.csv] [--out docs/results/kernels.md]

writes ``benchmarks/results/<cpu>-torch<version>.csv`` (next to ``--out``'s name when given)
and ``docs/results/kernels.md``.
Same as ``lowbit bench kernels --out ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lowbit.kernels import bench

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="levels 2/3/5 (and of the default shapes, a few)"
    )
    p.add_argument("--shapes", default=None, help="default: lowbit/kernels/shapes.csv")
    p.add_argument("--no-stream", action="store_true", help="skip the weights-streaming regime")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "kernels.md"))
    p.add_argument(
        "--thread-clock",
        action="store_true",
        help="time the thread's CPU time, every shape on one thread (a machine loaded beyond "
        "its cores makes wall-clock medians measure the scheduler)",
    )
    args = p.parse_args()
    info, rows = bench.run(
        args.shapes,
        quick=args.quick,
        stream=not args.no_stream,
        progress=lambda s: print(s, file=sys.stderr),
        clock="thread" if args.thread_clock else "wall",
    )
    md = Path(args.out).resolve()
    name = bench.default_csv_name(info)
    if md.stem != "kernels":
        name = name.replace(".csv", f"-{md.stem}.csv")
    csv_path = ROOT / "benchmarks" / "results" / name
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    bench.write_csv(csv_path, info, rows)
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(
        bench.markdown(info, rows) + f"\nFull results: `{csv_path.relative_to(ROOT)}`.\n"
    )
    os.replace(tmp, md)
    for claim, measured, met in bench.targets(rows):
        print(f"{claim:45s} {measured:>22s}  {'met' if met else 'NOT met'}")
    print(f"wrote {csv_path.relative_to(ROOT)} and {md.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
