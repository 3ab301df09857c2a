"""Per-call overhead of a packed layer: a PackedLinear called as a module vs ``kernels.linear``.

Claim checked: at 1024x1024 (ternary), batch 1, a packed layer called as a module costs at most
5 us more than the bare kernel call on the same prepared weight (issue 10). Hardware: whatever
runs it (the output records CPU, cores, torch, date and load). The two calls alternate
round-robin in one run (``lowbit.kernels.bench.call_overhead``, the same comparison the kernel
benchmark ends with); the figure is the difference of the medians, repeated ``--repeats``
times (fresh rounds each time) and reported as the median and range of the differences.

    python benchmarks/call_overhead.py [--repeats 5] [--threads N]

writes ``docs/results/call-overhead.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from lowbit.kernels import bench

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = bench.machine()
    runs = []
    for i in range(args.repeats):
        print(f"repeat {i + 1}/{args.repeats}", file=sys.stderr)
        rows = {r["variant"]: r for r in bench.call_overhead()}
        runs.append(rows)
    info["load after"] = bench.machine()["load"]
    lines = ["# Per-call overhead of a packed layer", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += [
        f"- threads: {torch.get_num_threads()}",
        "",
        f"A `PackedLinear` ({bench.OVERHEAD_SIZE}x{bench.OVERHEAD_SIZE}, ternary, converted from a "
        "`QuantLinear`, so it carries its source's input transform) called as a module, against "
        "`kernels.linear` on the layer's own prepared weight and bias, batch 1. The calls "
        "alternate round-robin (one call of each variant per round, the order rotated every "
        f"round), {runs[0]['module-int8']['rounds']} rounds per repeat; the overhead is the "
        "difference of the medians. The machine is shared with other jobs (see the load "
        "average): medians then measure the scheduler too; best-of is the fastest call of each "
        "variant.",
        "",
        "| activations | repeat | module median us | kernel median us | overhead us "
        "| module best-of us | kernel best-of us |",
        "|---|---|---|---|---|---|---|",
    ]
    summary = []
    for act in ("int8", "fp32"):
        diffs = []
        for i, rows in enumerate(runs):
            m, k = rows[f"module-{act}"], rows[f"kernel-{act}"]
            diff = m["median_us"] - k["median_us"]
            diffs.append(diff)
            lines.append(
                f"| {act} | {i + 1} | {m['median_us']} | {k['median_us']} | {diff:.2f} "
                f"| {m['min_us']} | {k['min_us']} |"
            )
        med = statistics.median(diffs)
        summary.append(
            f"| {act} | {med:.2f} | {min(diffs):.2f} .. {max(diffs):.2f} | "
            f"{'yes' if med <= 5 else 'no'} |"
        )
    lines += [
        "",
        "## Summary",
        "",
        "| activations | overhead us (median of repeats) | range | <= 5 us |",
        "|---|---|---|---|",
        *summary,
        "",
    ]
    out = ROOT / "docs" / "results" / "call-overhead.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines[-6:]))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
