"""Binary (sign x sign) layers on the XNOR-popcount kernels vs torch fp32, at batch 1.

Claims checked (issue 13), ratios of medians measured in one run:

* binary Linear 4096x4096, batch 1: >= 30x torch fp32 ``F.linear``;
* binary 3x3 Conv2d, 128 -> 128 channels, 16x16, batch 1, padding 1: >= 8x torch fp32
  ``F.conv2d`` (the faster of its NCHW and channels-last inputs);
* the binary CNN (``lowbit.models.get("binary_cnn")``, width 64, ReActNet blocks) packed with
  ``convert_``, end to end at batch 1, on 28x28x1 (Fashion-MNIST) and 32x32x3 (CIFAR) inputs:
  >= 5x its fp32 twin (the same network built with ``layer="linear"``: fp32 convolutions,
  BatchNorm, ReLU).

The binary contenders include binarizing and bit-packing their float input every call (the
threshold compare is the kernel's first step), as a network computes them. The conv input is
channels-last, as the previous packed convolution leaves it. Every case also checks the packed
result against the reference (linear, conv) or the fake-quant model (end to end).

Timing: each round runs every contender once, in a fresh random order, for ``--calls`` calls
(the mean of those is one sample); the table gives the median over ``--rounds`` rounds, with
torch and lowbit on the same thread count (1, then 2). One thread is timed in thread CPU time
(what the thread computed, not the time it waited for a core on a shared machine), two threads
in wall time (the second thread's work is not on the calling thread's clock).

    python benchmarks/binary.py [--rounds 30] [--calls 20] [--threads 1 2]

writes ``docs/results/binary.md``.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import environment  # noqa: E402

from lowbit import models  # noqa: E402
from lowbit.files import atomic_write  # noqa: E402
from lowbit.kernels import binary, reference  # noqa: E402
from lowbit.packed import convert_  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _interleaved(contenders: dict[str, Callable[[], object]], rounds: int, calls: int, clock):  # noqa: ANN001
    """name -> median over rounds of the mean time (us, ``clock``) of ``calls`` calls; random
    order."""
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    for fn in contenders.values():  # warm-up: caches, lazy preparation, thread team
        for _ in range(3):
            fn()
    for _ in range(rounds):
        order = list(contenders)
        random.shuffle(order)
        for name in order:
            fn = contenders[name]
            t0 = clock()
            for _ in range(calls):
                fn()
            samples[name].append((clock() - t0) / calls * 1e6)
    return {k: statistics.median(v) for k, v in samples.items()}


def linear_case(isas: list[str]) -> tuple[dict, str]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4096, 4096, generator=g)
    x = torch.randn(1, 4096, generator=g)
    codes = (w >= 0).to(torch.uint8)
    scale = w.abs().mean(dim=1) * 2
    fns: dict[str, Callable[[], object]] = {"fp32 F.linear": lambda: F.linear(x, w)}
    for isa in isas:
        pw = binary.prepare(codes, scale, isa=isa)
        got = binary.linear(x, pw)
        assert torch.equal(got, reference.binary_linear(x, codes, scale)), isa
        fns[f"binary {isa}"] = lambda pw=pw: binary.linear(x, pw)
    return fns, "fp32 F.linear"


def conv_case(isas: list[str]) -> tuple[dict, str]:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(128, 128, 3, 3, generator=g)
    x = torch.randn(1, 128, 16, 16, generator=g)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    codes = (w.reshape(128, -1) >= 0).to(torch.uint8)
    scale = w.abs().mean(dim=(1, 2, 3)) * 2
    fns: dict[str, Callable[[], object]] = {
        "fp32 F.conv2d NCHW": lambda: F.conv2d(x, w, padding=1),
        "fp32 F.conv2d channels-last": lambda: F.conv2d(x_cl, w, padding=1),
    }
    geo = {"kernel_size": (3, 3), "padding": (1, 1)}
    for isa in isas:
        pw = binary.prepare(codes, scale, isa=isa, conv=(128, (3, 3)))
        got = binary.conv2d(x_cl, pw, **geo)
        assert torch.equal(got, reference.binary_conv2d(x, codes, scale, **geo)), isa
        fns[f"binary {isa}"] = lambda pw=pw: binary.conv2d(x_cl, pw, **geo)
    return fns, "fp32"


def cnn_case(shape: tuple[int, int, int]) -> tuple[dict, str, str]:
    torch.manual_seed(2)
    net = models.get("binary_cnn", layer="reactnet", width=64, input_shape=shape).eval()
    # settle the BatchNorm statistics on some inputs so the activations are not degenerate
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(64, *shape))
    net.eval()
    packed = convert_(copy.deepcopy(net)).eval()
    twin = models.get("binary_cnn", layer="linear", width=64, input_shape=shape).eval()
    x = torch.randn(1, *shape)
    check = torch.randn(256, *shape)
    with torch.no_grad():
        same = torch.equal(packed(check), net(check))
        agree = (packed(check).argmax(1) == net(check).argmax(1)).float().mean().item()
    note = f"packed outputs equal the fake-quant model's bit for bit on 256 inputs: {same} "
    note += f"(argmax agreement {100 * agree:.1f}%)"

    def run(m):  # noqa: ANN001, ANN202
        def fn():  # noqa: ANN202
            with torch.no_grad():
                return m(x)

        return fn

    return {"fp32 twin": run(twin), "binary packed": run(packed)}, "fp32 twin", note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default=str(ROOT / "docs/results/binary.md"))
    args = ap.parse_args()
    random.seed(0)
    best = binary.best_isa()
    isas = ["avx512", "avx2"] if best == "avx512" else [best]
    info = environment.describe()
    rows = []
    with torch.no_grad():
        cases = [
            ("Linear 4096x4096, batch 1", 30.0, *linear_case(isas), ""),
            ("Conv2d 3x3 128->128, 16x16, batch 1", 8.0, *conv_case(isas), ""),
            ("binary_cnn (width 64, 28x28x1) end to end, batch 1", 5.0, *cnn_case((1, 28, 28))),
            ("binary_cnn (width 64, 32x32x3) end to end, batch 1", 5.0, *cnn_case((3, 32, 32))),
        ]
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, target, fns, _, _note in cases:
            clock = time.thread_time if threads == 1 else time.perf_counter
            med = _interleaved(fns, args.rounds, args.calls, clock)
            base = min(v for k, v in med.items() if k.startswith("fp32"))
            for k, v in med.items():
                ratio = base / v
                is_bin = k.startswith("binary")
                met = ("yes" if ratio >= target else "no") if is_bin else ""
                rows.append((name, threads, k, v, f"{ratio:.1f}x" if is_bin else "1.0x", met))
            print(name, threads, {k: round(v, 1) for k, v in med.items()}, flush=True)
    info["load average at end"] = environment.load()
    lines = [
        "# Binary (XNOR-popcount) layers vs torch fp32, batch 1",
        "",
        "Produced by `python benchmarks/binary.py` (see its docstring for the method: every "
        "round runs each contender once in a fresh random order, the mean of "
        f"{args.calls} calls is one sample, medians over {args.rounds} rounds; the ratio is "
        "against the fastest fp32 contender of the same case and thread count).",
        "",
        environment.markdown(info),
        f"Binary kernel paths measured: {', '.join(isas)} (this CPU's best: {best}; avx512 = "
        "AVX-512 VPOPCNTDQ, avx2 = the pshufb nibble-table popcount).",
        "",
        "The machine is shared with other jobs (see the load averages): absolute times are "
        "noisy, the ratios come from interleaved samples of one run.",
        "",
        "Clock: thread CPU time at 1 thread, wall time at 2 threads.",
        "",
        "| case | threads | contender | median us | speed-up vs fp32 | target met |",
        "|---|---|---|---|---|---|",
    ]
    targets = {c[0]: c[1] for c in cases}
    for name, threads, k, v, ratio, met in rows:
        label = f"{name} (target {targets[name]:.0f}x)"
        lines.append(f"| {label} | {threads} | {k} | {v:.1f} | {ratio} | {met} |")
    lines += [""] + [f"End to end, {c[0].split(' end')[0]}: {c[4]}." for c in cases[2:]] + [""]
    atomic_write(args.out, "\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
