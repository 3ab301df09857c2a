"""Do the sign-vs-linear study's layers learn, and which of their documented flags matter?

Claim checked: lowbit's reconstructions of ``bitlinear8`` (kyegomez/BitNet 0.2.5), ``mybitlinear``
and ``misborn`` train in the study's MLP. Setting: Fashion-MNIST, ``mlp`` depth 3 width 256,
ReLU, Adam with PyTorch defaults, batch 64, ``--epochs`` epochs on a fixed ``--subset`` of the
training set, full test set, ``--seeds`` seeds, one CPU thread. A sanity check of the layers and
their flags, not the study itself (that is ``lowbit study``).

Run:  python benchmarks/seed_layers.py [--epochs 3 --subset 20000 --seeds 3]
Writes docs/results/seed-layers.md (a hand-written "## Notes" section at its end is kept).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lowbit import data, models, train
from lowbit.kernels import bench

CONFIGS: list[tuple[str, dict]] = [
    ("linear", {}),
    ("sign", {}),
    ("ternary", {}),
    ("bitlinear8", {}),
    ("bitlinear8", {"bias": True}),
    ("mybitlinear", {}),
    ("mybitlinear", {"bias": True}),
    ("misborn", {}),
    ("misborn", {"mask": "weight"}),
    ("misborn", {"norm": "l2"}),
]


def _run(kind: str, opts: dict, ds, epochs: int, subset: int, seed: int) -> list[dict]:
    torch.manual_seed(seed)
    model = models.get(
        "mlp",
        depth=3,
        width=256,
        layer=kind,
        input_shape=ds.input_shape,
        classes=ds.classes,
        **opts,
    )
    cfg = train.TrainConfig(epochs=epochs, train_subset=subset, seed=seed, threads=1)
    return train.fit(model, ds, cfg).history


def _fmt(values: list[float], digits: int = 4) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--subset", type=int, default=20000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="docs/results/seed-layers.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ds = data.load("fashion-mnist")
    rows = []
    for kind, opts in CONFIGS:
        label = kind + "".join(f" {k}={v}" for k, v in opts.items())
        t0 = time.perf_counter()
        runs = [_run(kind, opts, ds, args.epochs, args.subset, s) for s in range(args.seeds)]
        final = [r[-1] for r in runs]
        rows.append(
            (
                label,
                _fmt([f["test_acc"] for f in final]),
                _fmt([f["train_acc"] for f in final]),
                f"{statistics.median(f['test_loss'] for f in final):.4g}",
                f"{max(m['test_loss'] for r in runs for m in r):.4g}",
                " ".join(
                    f"{statistics.mean(r[e]['test_acc'] for r in runs):.3f}"
                    for e in range(args.epochs)
                ),
            )
        )
        print(f"{label}: {rows[-1][1]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    lines = [
        "# Seed-study layers: do they learn? (sanity check)",
        "",
        f"- Script: `benchmarks/seed_layers.py --epochs {args.epochs} --subset {args.subset} "
        f"--seeds {args.seeds}`; commit {commit or 'unknown'}",
        f"- Machine: {bench.cpu()}, {os.cpu_count()} cores visible, 1 torch thread; "
        f"Python {sys.version.split()[0]}, torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}",
        f"- Fashion-MNIST, mlp depth 3 width 256 (ReLU), Adam defaults, batch 64, "
        f"{args.epochs} epochs on {args.subset} training images, full 10k test set, "
        f"seeds 0..{args.seeds - 1} (mean ± std).",
        "",
        "| layer | test acc | train acc | test loss (median) | max test loss seen | "
        "test acc per epoch (mean) |",
        "|---|---|---|---|---|---|",
        *(f"| {' | '.join(r)} |" for r in rows),
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines)
    if out.exists() and "\n## Notes" in out.read_text():
        text += "\n## Notes" + out.read_text().split("\n## Notes", 1)[1]
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
