"""Weight-only models end to end at batch 1 on the lookup-table kernels (issue 12).

Claim checked: a weight-only ternary cvnn2 (fp32 activations) packed by ``convert_`` is >= 3x
faster than the same fp32 torch model at batch 1 (mlp width 1024 depth 7: >= 6x), with the
fake-quant model's predictions on the whole Fashion-MNIST test set (max |delta logit| stated).

A lighter cousin of ``end_to_end.py`` for a loaded machine: everything on one thread, latency in
the thread's CPU time, the models trained briefly (``--train`` images, one epoch; the claim is
about speed and agreement, not accuracy), agreement of the packed model with the fake-quant
model it was converted from on ``--test`` images (default all 10,000); the fp32 / packed /
packed-int8 forwards interleaved image by image in a fresh random order. Where the time goes:
each layer of the three (sequential) models timed on its own, the same interleaving, medians.

    python benchmarks/weight_only_e2e.py [--models cvnn2 mlp] [--train 600] [--test 10000]

writes ``docs/results/end_to_end-weight-only.md``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from lowbit.files import atomic_write

sys.path.insert(0, str(Path(__file__).parent))
import environment  # noqa: E402
from end_to_end import build, latency, predict, to_fp32  # noqa: E402

from lowbit import data as lbdata  # noqa: E402
from lowbit.packed import convert_  # noqa: E402
from lowbit.train import TrainConfig, fit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@torch.inference_mode()
def layer_times(named: dict[str, nn.Sequential], x: torch.Tensor, images: int) -> list[list]:
    """Median thread CPU seconds of each layer of each (sequential) model at batch 1, the models
    interleaved image by image in a fresh random order, as ``latency`` does: rows of (layer
    index, layer kind, one time per model)."""
    times: dict[str, list[list[float]]] = {k: [[] for _ in m] for k, m in named.items()}
    order = list(named.items())
    shuffle = random.Random(1).shuffle
    for i in range(images + 3):
        shuffle(order)
        for name, model in order:
            h = x[i : i + 1]
            for j, layer in enumerate(model):
                t = time.thread_time()
                h = layer(h)
                if i >= 3:  # warm-up
                    times[name][j].append(time.thread_time() - t)
    first = next(iter(named.values()))
    return [
        [j, type(layer).__name__.removeprefix("Packed")]
        + [statistics.median(times[k][j]) for k in named]
        for j, layer in enumerate(first)
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["cvnn2", "mlp"], choices=["cvnn2", "mlp"])
    p.add_argument("--train", type=int, default=600, help="training images (one epoch)")
    p.add_argument("--test", type=int, default=None, help="agreement images (default: all)")
    p.add_argument("--images", type=int, default=100, help="latency: batch-1 forwards each")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "end_to_end-weight-only.md"))
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    info = environment.describe()
    data = lbdata.load("fashion-mnist")
    n_test = args.test or len(data.test_y)
    rows, profiles = [], []
    for arch in args.models:
        model = build(arch, None)
        # fit's own test evaluation on 300 images: the agreement below covers the test set
        small = dataclasses.replace(data, test_x=data.test_x[:300], test_y=data.test_y[:300])
        fit(model, small, TrainConfig(epochs=1, train_subset=args.train, seed=0), progress=False)
        model.eval()
        fp32 = to_fp32(model).eval()
        packed = convert_(copy.deepcopy(model)).eval()
        packed8 = convert_(copy.deepcopy(model), activations="int8").eval()
        modes = sorted({m.activations for m in packed.modules() if hasattr(m, "activations")})
        x, y = data.test_x[:n_test], data.test_y[:n_test]
        ref, out = predict(model, x), predict(packed, x)
        named = {"fp32": fp32, "packed": packed, "packed-int8": packed8}
        lat = latency(named, data.test_x, args.images, time.thread_time)
        rows.append(
            f"| {arch} ternary weight-only | {'/'.join(modes)} | {args.train} | {n_test} | "
            f"{(ref.argmax(1) == y).float().mean():.4f} | "
            f"{int((out.argmax(1) != ref.argmax(1)).sum())} | {(out - ref).abs().max():.3g} | "
            f"{lat['fp32'] * 1e3:.3f} | {lat['packed'] * 1e3:.3f} | "
            f"{lat['fp32'] / lat['packed']:.2f}x | {lat['packed-int8'] * 1e3:.3f} | "
            f"{lat['fp32'] / lat['packed-int8']:.2f}x |"
        )
        print(rows[-1], file=sys.stderr)
        per_layer = layer_times(named, data.test_x, args.images)
        profiles += [
            "",
            f"### {arch}: per layer (median us at batch 1; packed conv/linear layers include "
            "their Python call)",
            "",
            "| # | layer | fp32 | packed | packed-int8 |",
            "|---|---|---|---|---|",
            *(
                f"| {j} | {kind} | " + " | ".join(f"{t * 1e6:.1f}" for t in ts) + " |"
                for j, kind, *ts in per_layer
            ),
            "| | sum | "
            + " | ".join(f"{sum(r[2 + c] for r in per_layer) * 1e6:.1f}" for c in range(3))
            + " |",
        ]
    lines = [
        "# Weight-only models end to end at batch 1 (lookup-table kernels), one thread",
        "",
        environment.markdown(info) + f"- load average at end: {environment.load()}",
        f"- script: `benchmarks/weight_only_e2e.py --models {' '.join(args.models)} --train "
        f"{args.train}`; latency: median of {args.images} test images, one forward each at "
        "batch 1, torch and the kernels on one thread, timed in the thread's CPU time, the "
        "three models interleaved in a fresh random order image by image.",
        "- agreement: argmax of the packed model (convert_'s default mode, in brackets) vs the "
        "fake-quant model it was converted from; max |delta logit| over the same images.",
        "",
        "| model | packed mode | train imgs | test imgs | fake-quant acc | mismatches | max abs "
        "dlogit | fp32 ms | packed ms | speed-up | packed-int8 ms | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "## Where the time goes",
        *profiles,
    ]
    out = Path(args.out)
    atomic_write(out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
