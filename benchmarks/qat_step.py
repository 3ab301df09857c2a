"""Claim: a quantization-aware training step of lowbit's ternary MLP costs <= 1.15x the step of
the same MLP built from ``nn.Linear`` (PERF.md; naive eager fake-quant costs 1.2-2x).

Step = zero_grad + forward + cross-entropy + backward + Adam step; MLP depth 3, width 1024
(784 -> 1024 -> 1024 -> 1024 -> 10, every layer of the same kind), batch 256, Fashion-MNIST
shapes (random data: the values do not change the cost). Variants, timed interleaved in one run
(a fresh random order each round, ``--steps`` steps per timing, ``--repeats`` timings each),
medians reported:

* ``linear``: ``nn.Linear`` everywhere (the baseline),
* ``ternary``: ``lowbit.QuantLinear(weight_quantizer="ternary")``,
* ``nlevel5``: 5-level weights,
* ``bitlinear8``: lowbit's BitLinear8 (kyegomez/BitNet 0.2.5 numerics + input norm/absmax8),
* ``kyegomez``: an eager re-statement of kyegomez/BitNet 0.2.5's BitLinear forward, STE written
  as ``x + (q(x) - x).detach()`` the way that package does (for context, not a lowbit layer).

    nice -n 10 .venv/bin/python benchmarks/qat_step.py [--threads 1] [--repeats 15]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import environment  # noqa: E402

from lowbit import models  # noqa: E402

VARIANTS = ("linear", "ternary", "nlevel5", "bitlinear8", "kyegomez")


class KyegomezBitLinear(nn.Linear):
    """kyegomez/BitNet 0.2.5 BitLinear.forward, re-stated (eager ops, detach-style STE)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        x_norm = F.normalize(x, dim=-1) * x.shape[-1] ** -0.5  # zeta SimpleRMSNorm
        scale = 127.0 / x_norm.abs().max(dim=-1, keepdim=True).values.clamp_(min=1e-5)
        x_quant = x_norm + ((x_norm * scale).round().clamp_(-128, 127) / scale - x_norm).detach()
        w_scale = w.abs().mean()
        w_quant = w + ((w - w.mean()).sign() * w_scale - w).detach()
        return F.linear(x_quant, w_quant)  # 0.2.5 drops the bias


def build(variant: str, width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    if variant == "kyegomez":
        sizes = [784, *([width] * depth), 10]
        layers: list[nn.Module] = [nn.Flatten()]
        for i in range(len(sizes) - 1):
            layers.append(KyegomezBitLinear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)
    layer, levels = ("nlevel", 5) if variant == "nlevel5" else (variant, None)
    return models.get("mlp", depth=depth, width=width, layer=layer, levels=levels)


class Stepper:
    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        self.model, self.x, self.y = model, x, y
        self.opt = torch.optim.Adam(model.parameters())

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()

    def time(self, steps: int, timer=time.perf_counter) -> float:
        t0 = timer()
        for _ in range(steps):
            self.step()
        return (timer() - t0) / steps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--thread-clock",
        action="store_true",
        help="time the thread's CPU time (one thread; for a machine loaded beyond its cores)",
    )
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="docs/results/qat-step.md")
    p.add_argument("--notes", help="a markdown file appended to the report (findings)")
    args = p.parse_args()
    if args.thread_clock and args.threads != 1:
        p.error("--thread-clock times one thread: use --threads 1")
    timer = time.thread_time if args.thread_clock else time.perf_counter
    torch.set_num_threads(args.threads)
    info = environment.describe()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    steppers = {v: Stepper(build(v, args.width, args.depth), x, y) for v in args.variants}
    for s in steppers.values():
        for _ in range(args.warmup):
            s.step()
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    ratios: dict[str, list[float]] = {v: [] for v in args.variants}
    for r in range(args.repeats):
        order = random.Random(r).sample(args.variants, len(args.variants))  # fresh each round
        round_times = {v: steppers[v].time(args.steps, timer) for v in order}
        for v, t in round_times.items():
            times[v].append(t)
            if "linear" in round_times:
                ratios[v].append(t / round_times["linear"])
    end_load = environment.load()

    lines = [
        "# QAT training step: quantized MLP vs nn.Linear MLP",
        "",
        f"Script: `benchmarks/qat_step.py` — MLP depth {args.depth} width {args.width} "
        f"(784 -> {args.width} x{args.depth} -> 10), batch {args.batch}, step = zero_grad + "
        "forward + cross-entropy + backward + Adam step. Variants timed interleaved "
        f"(a fresh random order each round), {args.steps} steps per timing, "
        f"{args.repeats} timings each after {args.warmup} warm-up steps; torch threads = "
        f"{args.threads}; clock: {'thread CPU time' if args.thread_clock else 'wall'}.",
        "",
        environment.markdown(info) + f"- load average at end: {end_load}",
        "",
        "The machine is shared (2 cores, several engineers' jobs running): absolute times are "
        "noisy; the ratio column is the median of per-round ratios to the nn.Linear step timed "
        "in the same round, which cancels most of the contention.",
        "",
        "| variant | median step (ms) | min (ms) | ratio to linear (median of rounds) | IQR |",
        "|---|---|---|---|---|",
    ]
    for v in args.variants:
        ts = sorted(times[v])
        rs = sorted(ratios[v]) or [float("nan")]
        q1, q3 = rs[len(rs) // 4], rs[(3 * len(rs)) // 4]
        lines.append(
            f"| {v} | {1e3 * statistics.median(ts):.1f} | {1e3 * ts[0]:.1f} | "
            f"{statistics.median(rs):.3f} | {q1:.3f}–{q3:.3f} |"
        )
    text = "\n".join(lines) + "\n"
    if args.notes:
        text += "\n" + Path(args.notes).read_text()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
