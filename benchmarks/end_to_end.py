"""End to end at batch 1: packed models (lowbit.convert_) vs the same fp32 torch models.

Claim checked (issue 5): the packed mlp (width 1024, depth 7) and the packed cvnn2 are >= 3x
faster than the fp32 torch models at batch 1, with identical predictions on the test set.

Models (Fashion-MNIST, ternary weights, trained briefly: the claim is about speed and
agreement, not accuracy; the subset and epochs are in the output):

* ``weight-only``: QATConfig(levels=3), fp32 activations during training;
* ``absmax8``: QATConfig(levels=3, activations="absmax8"), int8 activations during training (per
  token for linear layers, per image for convolutions).

For each: the fp32 model is the same architecture with plain nn.Linear / nn.Conv2d holding the
(dequantized) trained weights and no activation quantization; the packed model is
``convert_(copy)`` with its default activation mode per layer, and once more with every layer
forced to ``activations="int8"``. Latency: median over images of one forward at batch 1, the
fp32 and packed models interleaved image by image; agreement: argmax of the packed model vs the
fake-quant model it was converted from, on the whole test set.

    python benchmarks/end_to_end.py [--quick]

writes ``docs/results/end_to_end.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from lowbit import data as lbdata
from lowbit import kernels, models
from lowbit.kernels import bench
from lowbit.nn import QATConfig, QuantConv2d, QuantLinear, quantize_
from lowbit.packed import convert_
from lowbit.train import TrainConfig, fit

ROOT = Path(__file__).resolve().parents[1]


def to_fp32(model: nn.Module) -> nn.Module:
    """The same network with plain fp32 layers holding the quantized weights, fp32 inputs."""
    model = copy.deepcopy(model)
    for fqn, m in list(model.named_modules()):
        if isinstance(m, (QuantLinear, QuantConv2d)):
            parent, _, child = fqn.rpartition(".")
            setattr(
                model.get_submodule(parent) if parent else model, child, m.to_float(quantized=True)
            )
    return model


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])


@torch.inference_mode()
def latency(
    named: dict[str, nn.Module], x: torch.Tensor, images: int, timer=time.perf_counter
) -> dict[str, float]:
    """Median seconds per batch-1 forward, the models interleaved image by image in a fresh
    random order each image (a fixed rotation biases each model by its predecessor's cache
    traffic, and whatever runs right after torch shares the cores with its spinning workers)."""
    times: dict[str, list[float]] = {k: [] for k in named}
    order = list(named.items())
    shuffle = random.Random(0).shuffle
    for i in range(images + 3):
        xi = x[i : i + 1]
        shuffle(order)
        for name, m in order:
            t = timer()
            m(xi)
            if i >= 3:  # warm-up
                times[name].append(timer() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def build(name: str, act: str | None) -> nn.Module:
    if name == "mlp":
        model = models.get("mlp", depth=7, width=1024, input_shape=(1, 28, 28), classes=10)
    else:
        model = models.get("cvnn2", input_shape=(1, 28, 28), classes=10)
    return quantize_(model, QATConfig(levels=3, quantizer="ternary", activations=act))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller training subsets, fewer images")
    p.add_argument(
        "--single-thread-only",
        action="store_true",
        help="only the one-thread latency table, appended to the existing results file",
    )
    p.add_argument(
        "--thread-clock",
        action="store_true",
        help="everything on one thread, latency in the thread's CPU time (for a machine loaded "
        "beyond its cores, where wall-clock medians measure the scheduler)",
    )
    args = p.parse_args()
    timer = time.thread_time if args.thread_clock else time.perf_counter
    if args.thread_clock:
        torch.set_num_threads(1)
    torch.manual_seed(0)
    data = lbdata.load("fashion-mnist")
    subsets = {"mlp": 6000 if args.quick else 20000, "cvnn2": 600 if args.quick else 2000}
    images = 30 if args.quick else 200
    # cvnn2 costs ~0.47 G MAC an image: --quick checks its agreement on the first 300 only
    tests = {"mlp": len(data.test_y), "cvnn2": 300 if args.quick else len(data.test_y)}
    rows = []
    for arch in ("mlp", "cvnn2") if not args.single_thread_only else ():
        test_x, test_y = data.test_x[: tests[arch]], data.test_y[: tests[arch]]
        for act in (None, "absmax8"):
            label = f"{arch} ternary {'absmax8' if act else 'weight-only'}"
            print(f"{label}: training", file=sys.stderr)
            model = build(arch, act)
            cfg = TrainConfig(epochs=1, train_subset=subsets[arch], batch_size=64, seed=0)
            res = fit(model, data, cfg, progress=False)
            model.eval()
            fp32 = to_fp32(model).eval()
            packed = convert_(copy.deepcopy(model)).eval()
            packed8 = convert_(copy.deepcopy(model), activations="int8").eval()
            modes = sorted({m.activations for m in packed.modules() if hasattr(m, "activations")})
            ref = predict(model, test_x)
            out = {"fp32": predict(fp32, test_x), "packed": predict(packed, test_x)}
            out["packed-int8"] = predict(packed8, test_x)
            named = {"fp32": fp32, "packed": packed, "packed-int8": packed8}
            lat = latency(named, test_x, images, timer)
            for variant in ("packed", "packed-int8"):
                agree = (out[variant].argmax(1) == ref.argmax(1)).float().mean().item()
                rows.append(
                    {
                        "model": label,
                        "variant": variant
                        + (f" ({'/'.join(modes)})" if variant == "packed" else ""),
                        "train": f"{subsets[arch]} imgs, 1 epoch",
                        "test imgs": tests[arch],
                        "fit test acc (10k)": f"{res.history[-1]['test_acc']:.4f}",
                        "packed acc": f"{(out[variant].argmax(1) == test_y).float().mean():.4f}",
                        "agreement": f"{agree:.4f}",
                        "mismatches": int((out[variant].argmax(1) != ref.argmax(1)).sum()),
                        "max abs dlogit": f"{(out[variant] - ref).abs().max():.3g}",
                        "fp32 ms": f"{lat['fp32'] * 1e3:.3f}",
                        "packed ms": f"{lat[variant] * 1e3:.3f}",
                        "speed-up": f"{lat['fp32'] / lat[variant]:.2f}x",
                    }
                )
                print(rows[-1], file=sys.stderr)
    head = [
        "# End to end: packed models vs fp32 torch models at batch 1",
        "",
        f"- cpu: {bench.cpu()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, python {platform.python_version()}, "
        f"kernels {kernels.backend()}",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
        f"load {' / '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"- latency: median of {images} test images, one forward each at batch 1, fp32 and packed "
        "models interleaved image by image in a fresh random order; the machine is shared "
        "(noisy); clock: "
        + (
            "the thread's CPU time, torch and the kernels on one thread"
            if args.thread_clock
            else f"wall, {torch.get_num_threads()} threads"
        )
        + ".",
        "- agreement: argmax of the packed model vs the fake-quant model it was converted from, "
        "the test images counted in the table. `packed`: convert_'s default activation mode "
        "per layer (in brackets); `packed-int8`: every layer forced to int8 activations (per "
        "token in linear layers, per image in convolutions).",
        "",
    ]
    # The same latencies on one thread: on a loaded 2-core machine torch's two OpenMP threads
    # wait on each other at every op, which inflates the fp32 figures above; one thread each
    # compares the code rather than the scheduler (untrained weights: speed only).
    torch.set_num_threads(1)
    single = []
    for arch in ("mlp", "cvnn2"):
        for act in (None, "absmax8"):
            model = build(arch, act).eval()
            named = {
                "fp32": to_fp32(model).eval(),
                "packed": convert_(copy.deepcopy(model)).eval(),
                "packed-int8": convert_(copy.deepcopy(model), activations="int8").eval(),
            }
            lat = latency(named, data.test_x, images, timer)
            single.append(
                f"| {arch} ternary {'absmax8' if act else 'weight-only'} | "
                f"{lat['fp32'] * 1e3:.3f} | {lat['packed'] * 1e3:.3f} | "
                f"{lat['fp32'] / lat['packed']:.2f}x | {lat['packed-int8'] * 1e3:.3f} | "
                f"{lat['fp32'] / lat['packed-int8']:.2f}x |"
            )
            print(single[-1], file=sys.stderr)
    md = ROOT / "docs" / "results" / "end_to_end.md"
    tmp = md.with_suffix(".md.tmp")
    single_head = [
        "",
        f"## One thread each (torch.set_num_threads(1); latency only, untrained weights; "
        f"{images} images, load {' / '.join(f'{x:.2f}' for x in os.getloadavg())})",
        "",
        "| model | fp32 ms | packed ms | speed-up | packed-int8 ms | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    if args.single_thread_only:
        text = md.read_text().split("\n## One thread each")[0].rstrip("\n") + "\n"
        tmp.write_text(text + "\n".join(single_head + single) + "\n")
        os.replace(tmp, md)
        return 0
    keys = list(rows[0])
    table = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    table += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    tmp.write_text("\n".join(head + table + single_head + single) + "\n")
    os.replace(tmp, md)
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
