"""Per-epoch diagnostics of a model's quantized layers: level shares, flip ratio, scale.

For every module with a ``weight_quantizer`` that has ``codes`` (``QuantLinear``,
``QuantConv2d`` and their subclasses), after epoch ``e``::

    codes_e, scale_e = quantizer.codes(W_e)                 codes: W's shape, uint8 in 0..N-1
    shares[k]   = #{codes_e == k} / numel                   k = 0..N-1, sums to 1
    zero_share  = shares[(N - 1) / 2]                       odd N only (even N has no zero level)
    flip_ratio  = #{codes_e != codes_(e-1)} / numel         share of weights whose value changed
    scale       = mean(scale_e)                             the step; per-channel scales averaged

``codes_0`` are the codes of the freshly initialised model. The previous epoch's codes live in
memory, and on disk in the run directory (``codes-<epoch>.safetensors``, the last two kept) so a
resumed run computes the same flip ratio as an uninterrupted one: after a crash between the epoch's
database row and its checkpoint, training redoes epoch ``e`` and still finds ``codes_(e-1)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit import pack


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every module whose weight quantizer can report codes."""
    out = []
    for name, m in model.named_modules():
        q = getattr(m, "weight_quantizer", None)
        weight = getattr(m, "weight", None)
        if q is not None and hasattr(q, "codes") and isinstance(weight, torch.Tensor):
            out.append((name, m))
    return out


def current_codes(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """name -> (codes (uint8, weight's shape), scale, levels) for every quantized layer."""
    with torch.no_grad():
        out = {}
        for name, m in quantized_layers(model):
            codes, scale = m.weight_quantizer.codes(m.weight.detach())
            out[name] = (codes.contiguous(), scale, int(m.weight_quantizer.levels))
        return out


class Diagnostics:
    """Collects the per-layer rows of each epoch; keeps codes for the flip ratio.

    Args:
        model: the freshly initialised model (its codes are epoch 0's).
        run_dir: where the codes of the last epochs are kept across restarts (None: memory only).
    """

    def __init__(self, model: nn.Module, run_dir: str | os.PathLike | None = None) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._codes: dict[int, dict[str, torch.Tensor]] = {
            0: {k: c for k, (c, _, _) in current_codes(model).items()}
        }

    def _path(self, epoch: int) -> Path | None:
        return None if self.run_dir is None else self.run_dir / f"codes-{epoch}.safetensors"

    def _previous(self, epoch: int) -> dict[str, torch.Tensor] | None:
        if epoch - 1 in self._codes:
            return self._codes[epoch - 1]
        p = self._path(epoch - 1)
        if p is not None and p.is_file():
            return pack.read_tensors(p)[1]
        return None

    def collect(self, epoch: int, model: nn.Module) -> list[dict[str, Any]]:
        """Rows for epoch ``epoch`` (1-based); stores this epoch's codes for the next one."""
        now = current_codes(model)
        prev = self._previous(epoch)
        rows = []
        for name, (codes, scale, levels) in now.items():
            numel = codes.numel()
            counts = torch.bincount(codes.flatten().long(), minlength=levels)[:levels]
            shares = (counts.double() / numel).tolist()
            flip = None
            if prev is not None and name in prev and prev[name].shape == codes.shape:
                flip = (prev[name] != codes).sum().item() / numel
            rows.append(
                {
                    "layer": name,
                    "levels": levels,
                    "numel": numel,
                    "scale": float(scale.float().mean()),
                    "flip_ratio": flip,
                    "zero_share": shares[(levels - 1) // 2] if levels % 2 else None,
                    "shares": [round(s, 6) for s in shares],
                }
            )
        this = {k: c for k, (c, _, _) in now.items()}
        self._codes = {epoch: this}
        self._save(epoch, this)
        return rows

    def _save(self, epoch: int, codes: dict[str, torch.Tensor]) -> None:
        p = self._path(epoch)
        if p is None or not codes:
            return
        p.parent.mkdir(parents=True, exist_ok=True)
        pack.write_tensors(p, codes, {})
        old = self._path(epoch - 2)
        if old is not None and old.exists():
            old.unlink()
