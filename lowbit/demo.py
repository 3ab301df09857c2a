"""``make demo``: train the sign-vs-linear study's MLP (depth 3, width 256) on Fashion-MNIST in fp32
and with ternary weights (BitNet b1.58 absmean, 1.58 bits), and print both test accuracies.

Adam with PyTorch's defaults, batch 64, 5 epochs, seed 0: about a minute per model on one core.
Run directories (config, metrics, checkpoint) go to ``runs/demo/<layer>``, replaced on each run.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import torch

from lowbit import data, models, train
from lowbit.errors import LowbitError

LAYERS = ("linear", "ternary")


def main(epochs: int = 5, seed: int = 0, out: str = "runs/demo") -> int:
    try:
        dataset = data.load("fashion-mnist")
    except LowbitError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    print(f"{dataset}\n")
    config = train.TrainConfig(epochs=epochs, seed=seed, batch_size=64)
    rows = []
    for layer in LAYERS:
        torch.manual_seed(seed)
        model = models.get(
            "mlp",
            depth=3,
            width=256,
            layer=layer,
            input_shape=dataset.input_shape,
            classes=dataset.classes,
        )
        print(f"training mlp depth 3 width 256, layer {layer}, {epochs} epochs")
        t0 = time.perf_counter()

        def show(m: dict, _model: torch.nn.Module) -> None:
            loss, acc = m["train_loss"], m["test_acc"]
            print(f"  epoch {m['epoch']}: train loss {loss:.4f}  test acc {acc:.4f}", flush=True)

        run_dir = Path(out) / layer
        shutil.rmtree(run_dir, ignore_errors=True)  # always a fresh run of the current code
        result = train.fit(model, dataset, config, run_dir=run_dir, on_epoch=show)
        rows.append((layer, result, time.perf_counter() - t0))
        if result.status != "finished":
            print(f"  run {result.status}")
            return 130 if result.status == "interrupted" else 1

    bits = {"linear": "32", "ternary": "1.58"}
    print(f"\n{'layer':10s} {'bits':>5s} {'test acc':>9s} {'test loss':>10s} {'time':>7s}")
    for layer, result, wall in rows:
        print(
            f"{layer:10s} {bits[layer]:>5s} {100 * result.test_acc:8.2f}% "
            f"{result.test_loss:10.4f} {wall:6.0f}s"
        )
    gap = 100 * (rows[0][1].test_acc - rows[1][1].test_acc)
    print(f"\nternary is {gap:.2f} points below fp32 (one seed; see docs/results/ for 3 seeds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
