"""Drop-in quantized layers and the in-place ``quantize_`` transform.

``QuantLinear`` and ``QuantConv2d`` subclass ``nn.Linear`` / ``nn.Conv2d`` with the parent's
signature plus keyword-only ``weight_quantizer`` and ``input_quantizer`` (a registry name, a
quantizer object, or None). The latent fp32 weight is the parameter the optimizer updates; the
forward pass uses its quantized value (straight-through gradient, see ``lowbit.quantizers``)::

    y = F.linear(q_in(x), q_w(W), b)          x: (..., in_features)  ->  y: (..., out_features)

With both quantizers None the layer computes exactly what its parent computes. Biases stay fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import quantizers
from lowbit.quantizers import GRANULARITIES, STES, AbsMax8, Quantizer

QuantizerLike = str | Quantizer | AbsMax8 | None


def _describe(q: Quantizer | AbsMax8 | None) -> str:
    if q is None:
        return "fp32"
    return f"{q.name}(levels={q.levels}, bits={q.bits:.2f})"


class _QuantMixin:
    """Shared quantizer handling of QuantLinear and QuantConv2d."""

    weight_quantizer: Quantizer | AbsMax8 | None
    input_quantizer: Quantizer | AbsMax8 | None

    def _set_quantizers(self, weight_quantizer: QuantizerLike, input_quantizer: QuantizerLike):
        self.weight_quantizer = quantizers.get(weight_quantizer)
        self.input_quantizer = quantizers.get(input_quantizer)

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward pass uses (straight-through to the latent weight)."""
        w = self.weight  # type: ignore[attr-defined]
        return w if self.weight_quantizer is None else self.weight_quantizer(w)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def _quant_repr(self) -> str:
        return f"weight={_describe(self.weight_quantizer)}, input={_describe(self.input_quantizer)}"

    @classmethod
    def _adopt(cls, new: nn.Module, module: nn.Module) -> nn.Module:
        """Make ``new`` use ``module``'s own parameters (trained values, optimizer identity)."""
        new.weight = module.weight
        new.bias = module.bias
        return new.to(module.weight.device)


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` whose forward uses quantized weights (and optionally quantized inputs).

    Shapes: input (..., in_features), weight (out_features, in_features), output (..., out_features).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        weight_quantizer: QuantizerLike = None,
        input_quantizer: QuantizerLike = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._set_quantizers(weight_quantizer, input_quantizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._quant_repr()}"

    @classmethod
    def from_float(
        cls,
        module: nn.Linear,
        *,
        weight_quantizer: QuantizerLike = None,
        input_quantizer: QuantizerLike = None,
    ) -> QuantLinear:
        """A QuantLinear sharing ``module``'s weight and bias parameters."""
        new = cls(
            module.in_features,
            module.out_features,
            module.bias is not None,
            device="meta",
            dtype=module.weight.dtype,
            weight_quantizer=weight_quantizer,
            input_quantizer=input_quantizer,
        )
        return cls._adopt(new, module)

    def to_float(self, *, quantized: bool = False) -> nn.Linear:
        """A plain nn.Linear with the latent weights, or with the quantized ones baked in."""
        out = nn.Linear(self.in_features, self.out_features, self.bias is not None)
        out = out.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.quantized_weight() if quantized else self.weight)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` whose forward uses quantized weights (and optionally quantized inputs).

    Shapes: input (B, C_in, H, W), weight (C_out, C_in / groups, kH, kW), output (B, C_out, H', W').
    A per-channel scale is one per output filter.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
        *,
        weight_quantizer: QuantizerLike = None,
        input_quantizer: QuantizerLike = None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device=device,
            dtype=dtype,
        )
        self._set_quantizers(weight_quantizer, input_quantizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._quant_repr()}"

    @classmethod
    def from_float(
        cls,
        module: nn.Conv2d,
        *,
        weight_quantizer: QuantizerLike = None,
        input_quantizer: QuantizerLike = None,
    ) -> QuantConv2d:
        """A QuantConv2d sharing ``module``'s weight and bias parameters."""
        new = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            module.bias is not None,
            module.padding_mode,
            device="meta",
            dtype=module.weight.dtype,
            weight_quantizer=weight_quantizer,
            input_quantizer=input_quantizer,
        )
        return cls._adopt(new, module)

    def to_float(self, *, quantized: bool = False) -> nn.Conv2d:
        """A plain nn.Conv2d with the latent weights, or with the quantized ones baked in."""
        out = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.bias is not None,
            self.padding_mode,
        ).to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.quantized_weight() if quantized else self.weight)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


_FIXED_LEVELS = {"sign": 2, "ternary": 3, "ternary-median": 3}
_WEIGHT_QUANTIZERS = ("nlevel", *_FIXED_LEVELS)


@dataclass(frozen=True)
class QATConfig:
    """How ``quantize_`` quantizes a model; validated on construction.

    Args:
        levels: N, 2..256 (``QATConfig(levels=3)`` is absmean ternary).
        quantizer: ``"nlevel"`` (any N), or ``"sign"`` (N=2), ``"ternary"`` / ``"ternary-median"``
            (N=3).
        spread: lambda of ``nlevel``; None takes the measured default for N.
        granularity: ``"tensor"`` or ``"channel"`` scales.
        ste: ``"identity"`` or ``"clipped"``.
        center: subtract the weight mean before quantizing; None keeps the quantizer's default
            (True for sign, as BitNet does; False otherwise).
        activations: None (fp32 inputs) or ``"absmax8"`` (per-token int8 inputs).
    """

    levels: int = 3
    quantizer: str = "nlevel"
    spread: float | None = None
    granularity: str = "tensor"
    ste: str = "identity"
    center: bool | None = None
    activations: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.levels, bool) or not isinstance(self.levels, int):
            raise ValueError(f"QATConfig.levels must be an integer in 2..256, got {self.levels!r}")
        if not 2 <= self.levels <= 256:
            raise ValueError(f"QATConfig.levels must be in 2..256, got {self.levels}")
        if self.quantizer not in _WEIGHT_QUANTIZERS:
            raise ValueError(
                f"QATConfig.quantizer must be one of {', '.join(_WEIGHT_QUANTIZERS)}; "
                f"got {self.quantizer!r}"
            )
        fixed = _FIXED_LEVELS.get(self.quantizer)
        if fixed is not None and self.levels != fixed:
            raise ValueError(
                f"QATConfig.quantizer={self.quantizer!r} has {fixed} levels but levels="
                f"{self.levels}; use quantizer='nlevel' for {self.levels} levels"
            )
        if self.spread is not None and self.quantizer != "nlevel":
            raise ValueError("QATConfig.spread only applies to quantizer='nlevel'")
        if self.spread is not None and not self.spread > 0:
            raise ValueError(f"QATConfig.spread must be > 0, got {self.spread!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"QATConfig.granularity must be one of {', '.join(GRANULARITIES)}; "
                f"got {self.granularity!r}"
            )
        if self.ste not in STES:
            raise ValueError(f"QATConfig.ste must be one of {', '.join(STES)}; got {self.ste!r}")
        if self.activations not in (None, "absmax8"):
            raise ValueError(
                f"QATConfig.activations must be None or 'absmax8'; got {self.activations!r}"
            )

    def weight_quantizer(self) -> Quantizer:
        kw: dict[str, Any] = {"granularity": self.granularity, "ste": self.ste}
        if self.center is not None:
            kw["center"] = self.center
        if self.quantizer == "nlevel":
            kw.update(levels=self.levels, spread=self.spread)
        return quantizers.get(self.quantizer, **kw)

    def input_quantizer(self) -> AbsMax8 | None:
        return quantizers.get(self.activations) if self.activations else None


FilterFn = Callable[[nn.Module, str], bool]


def quantize_(model: nn.Module, config: QATConfig, filter_fn: FilterFn | None = None) -> nn.Module:
    """Swap, in place, every ``nn.Linear``/``nn.Conv2d`` accepted by ``filter_fn(module, fqn)``
    for a QuantLinear/QuantConv2d that keeps the same weight and bias parameters.

    Only modules whose type is exactly ``nn.Linear`` or ``nn.Conv2d`` are swapped: subclasses
    (already quantized layers, ``nn.MultiheadAttention``'s internal projection, which it reads
    through ``.weight`` directly) are left alone. Returns ``model`` for chaining.
    """
    twins = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d}
    for fqn, module in list(model.named_modules()):
        twin = twins.get(type(module))
        if twin is None or (filter_fn is not None and not filter_fn(module, fqn)):
            continue
        if not fqn:
            raise ValueError("quantize_ cannot replace the root module itself; wrap it in a container")
        new = twin.from_float(
            module,
            weight_quantizer=config.weight_quantizer(),
            input_quantizer=config.input_quantizer(),
        )
        parent_name, _, child_name = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, new)
    return model
