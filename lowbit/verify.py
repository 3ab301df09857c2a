"""``lowbit verify``: check a packed model against its codes' level sets and its trained model.

Checks, in order:

1. every packed layer's codes lie in 0..N-1 and have the layer's shape (the loader has already
   checked the payload hashes and the codec's canonical form);
2. with a dataset: the packed model's test accuracy;
3. with ``against`` (the run directory or checkpoint it was packed from): the fake-quant model's
   logits on the same test set, the number of test images whose predicted class differs, and the
   largest absolute logit difference.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit import checkpoint, fileformat
from lowbit.packed import PackedConv2d, PackedLayer


def _logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def check_codes(model: nn.Module) -> list[str]:
    """Problems found in the packed layers' codes (empty when all are in their level sets)."""
    problems = []
    for name, layer in model.named_modules():
        if not isinstance(layer, PackedLayer):
            continue
        codes = layer.codes
        shape = (layer.out_features_, layer.k)
        if tuple(codes.shape) != shape or codes.dtype != torch.uint8:
            problems.append(f"{name}: codes {tuple(codes.shape)} {codes.dtype}, expected {shape}")
        elif codes.numel() and int(codes.max()) >= layer.levels:
            problems.append(f"{name}: code {int(codes.max())} outside 0..{layer.levels - 1}")
        elif isinstance(layer, PackedConv2d) and layer.k != layer.in_channels * (
            layer.kernel_size[0] * layer.kernel_size[1]
        ):
            problems.append(f"{name}: codes do not match the kernel size")
    return problems


def _dataset(name: str | None, data_dir: str | None, config: dict[str, Any]):
    from lowbit import data

    recorded = config.get("data") or {}
    name = name or recorded.get("name")
    if name is None:
        return None
    if name == "synthetic" and recorded.get("name") == "synthetic":
        # The run's generated set: same shape, classes and sizes (generation is deterministic).
        return data.load(
            "synthetic",
            n_train=recorded["train_size"],
            n_test=recorded["test_size"],
            shape=tuple(recorded["input_shape"]),
            classes=recorded["classes"],
        )
    return data.load(name, data_dir)


def verify(
    packed: nn.Module | str | os.PathLike,
    *,
    against: nn.Module | str | os.PathLike | None = None,
    dataset: Any = None,
    data_dir: str | None = None,
    batch_size: int = 50,
) -> dict[str, Any]:
    """Verify a packed model (or .lowbit path); ``dataset`` is a name or a loaded Dataset, and
    defaults to the one recorded in ``against``'s run. Returns a JSON-able report with ``ok``."""
    report: dict[str, Any] = {}
    if not isinstance(packed, nn.Module):
        report["file"] = str(packed)
        report["file_bytes"] = Path(packed).stat().st_size if Path(packed).exists() else None
        packed = fileformat.load(packed)
    problems = check_codes(packed)
    report["packed_layers"] = sum(isinstance(m, PackedLayer) for m in packed.modules())
    report["codes_ok"] = not problems
    report["problems"] = problems
    config: dict[str, Any] = {}
    fake = None
    if against is not None:
        if isinstance(against, nn.Module):
            fake = against.eval()
        else:
            report["against"] = str(against)
            fake, config = checkpoint.load_trained(against)
    data = dataset if dataset is None or not isinstance(dataset, str) else None
    if data is None and (isinstance(dataset, str) or config):
        data = _dataset(dataset, data_dir, config)
    ok = not problems
    if data is not None:
        x, y = data.test_x, data.test_y
        logits = _logits(packed, x, batch_size)
        pred = logits.argmax(dim=1)
        report["dataset"] = data.name
        report["test_size"] = len(y)
        report["accuracy"] = float((pred == y).float().mean())
        if fake is not None:
            ref = _logits(fake, x, batch_size)
            mismatches = int((ref.argmax(dim=1) != pred).sum())
            report["fake_quant_accuracy"] = float((ref.argmax(dim=1) == y).float().mean())
            report["prediction_mismatches"] = mismatches
            report["identical_predictions"] = mismatches == 0
            report["max_abs_logit_diff"] = float((ref - logits).abs().max())
            ok = ok and mismatches == 0
    report["ok"] = ok
    return report
