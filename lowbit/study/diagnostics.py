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


def linear_cosine(model: nn.Module, x: torch.Tensor) -> float | None:
    """How far an MLP is from a linear classifier: the mean over images of

        cos(f(x), A x + c),   A = W_L ... W_2 W_1,   c = W_L(... (W_2 b_1 + b_2) ...) + b_L

    where ``W_k`` is the weight layer k's forward uses (the quantized one for quantized layers)
    and every non-linearity (ReLU, input norms, input quantization) is left out of ``A x + c``.
    1 means the logits point exactly along an affine map of the input: under the sign-vs-linear
    paper's rule (ReLU only after fp32 layers) its quantized networks are such linear
    classifiers (misborn, ternary exactly; mybitlinear up to a positive scale per image from its
    norms; bitlinear8 up to its 8-bit rounding). x: (B, C, H, W) or (B, in_features).

    None for a model that is not an ``nn.Sequential`` of Flatten, Linear (and its quantized
    subclasses) and ReLU layers.
    """
    if not isinstance(model, nn.Sequential):
        return None
    linears = [m for m in model if isinstance(m, nn.Linear)]
    if not linears or any(not isinstance(m, (nn.Linear, nn.ReLU, nn.Flatten)) for m in model):
        return None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            dev = linears[0].weight.device
            x = x.to(dev)
            logits = model(x).float()  # (B, classes)
            a, c = None, None
            for m in linears:
                get = getattr(m, "quantized_weight", None)
                w = (get() if get is not None else m.weight).float()  # (out, in)
                b = m.bias.float() if m.bias is not None else torch.zeros(w.shape[0], device=dev)
                a, c = (w, b) if a is None else (w @ a, w @ c + b)
            affine = x.flatten(1).float() @ a.T + c  # (B, classes)
            return float(torch.nn.functional.cosine_similarity(logits, affine, dim=1).mean())
    finally:
        model.train(was_training)
