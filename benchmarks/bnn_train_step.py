"""The binary CNN's training step in the standard (NCHW) layout vs channels-last (NHWC).

``lowbit.train`` trains 4-D inputs channels-last on the CPU (``_train_epoch``); this measures
what that buys. Step = zero_grad + forward + cross-entropy + backward + Adam step of
``lowbit.models.get("binary_cnn", width=W, layer=METHOD)`` at batch 256 on 28x28x1 inputs
(random data: the values do not change the cost). For each (method, width) the two layouts are
separate models built from the same seed, timed interleaved (a fresh random order each round,
``--steps`` steps per timing, ``--repeats`` timings each after ``--warmup`` steps). The table
gives medians and the median of per-round ratios channels-last / NCHW.

One thread, timed in thread CPU time by default (what the thread computed, not the time it
waited for a core: the study machines run other trainings beside it).

    nice -n 10 .venv/bin/python benchmarks/bnn_train_step.py [--widths 8 16] [--methods bnn]

writes ``docs/results/bnn-train-step.md``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import environment  # noqa: E402
from qat_step import Stepper  # noqa: E402

from lowbit import models  # noqa: E402
from lowbit.files import atomic_write  # noqa: E402

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def stepper(method: str, width: int, layout: str, x: torch.Tensor, y: torch.Tensor) -> Stepper:
    torch.manual_seed(0)
    fmt = LAYOUTS[layout]
    model = models.get("binary_cnn", width=width, layer=method).to(memory_format=fmt)
    return Stepper(model, x.contiguous(memory_format=fmt), y)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["reactnet", "bnn", "linear"])
    p.add_argument("--widths", nargs="+", type=int, default=[8, 16])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--wall", action="store_true", help="time wall clock instead of thread CPU time")
    p.add_argument("--out", default="docs/results/bnn-train-step.md")
    p.add_argument("--notes", help="a markdown file appended to the report (findings)")
    args = p.parse_args()
    torch.set_num_threads(1)
    timer = time.perf_counter if args.wall else time.thread_time
    info = environment.describe()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)

    rows = []
    for method in args.methods:
        for width in args.widths:
            steppers = {k: stepper(method, width, k, x, y) for k in LAYOUTS}
            for s in steppers.values():
                s.time(args.warmup, timer)
            times: dict[str, list[float]] = {k: [] for k in LAYOUTS}
            ratios = []
            for r in range(args.repeats):
                order = random.Random(r).sample(list(LAYOUTS), len(LAYOUTS))
                t = {k: steppers[k].time(args.steps, timer) for k in order}
                for k, v in t.items():
                    times[k].append(v)
                ratios.append(t["channels_last"] / t["nchw"])
            med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
            rs = sorted(ratios)
            q1, q3 = rs[len(rs) // 4], rs[(3 * len(rs)) // 4]
            rows.append(
                f"| {method} | {width} | {med['nchw']:.1f} | {med['channels_last']:.1f} | "
                f"{statistics.median(rs):.3f} | {q1:.3f}–{q3:.3f} |"
            )
            print(rows[-1], flush=True)
    end_load = environment.load()

    lines = [
        "# Binary CNN training step: NCHW vs channels-last",
        "",
        f"Script: `benchmarks/bnn_train_step.py` — `binary_cnn` at batch {args.batch}, 28x28x1, "
        "step = zero_grad + forward + cross-entropy + backward + Adam step; the two layouts "
        f"timed interleaved (a fresh random order each round), {args.steps} steps per timing, "
        f"{args.repeats} timings each after {args.warmup} warm-up steps; one torch thread; "
        f"clock: {'wall' if args.wall else 'thread CPU time'}.",
        "",
        environment.markdown(info) + f"- load average at end: {end_load}",
        "",
        "| method | width | NCHW step (ms) | channels-last step (ms) | ratio (median of rounds) "
        "| IQR |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    text = "\n".join(lines) + "\n"
    if args.notes:
        text += "\n" + Path(args.notes).read_text()
    atomic_write(Path(args.out), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
