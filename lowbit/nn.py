"""Drop-in quantized layers and the in-place ``quantize_`` transform.

``QuantLinear`` and ``QuantConv2d`` subclass ``nn.Linear`` / ``nn.Conv2d`` with the parent's
signature plus keyword-only ``weight_quantizer`` and ``input_quantizer`` (a registry name, a
quantizer object, or None). The latent fp32 weight is the parameter the optimizer updates; the
forward pass uses its quantized value (straight-through gradient, see ``lowbit.quantizers``)::

    y = F.linear(q_in(x), q_w(W), b)          x: (..., in_features)  ->  y: (..., out_features)

With both quantizers None the layer computes exactly what its parent computes. Biases stay fp32.

Binary layers (a binary input quantizer — ``sign``, ``approx-sign``, ``rsign`` — and 2-level
weights) are XNOR-popcount layers. Their weight is ``alpha * w_b`` with ``w_b`` in {-1, +1} and
``alpha = scale / 2`` (one per tensor, or per output channel: XNOR-Net's scaling), and the forward
multiplies by ``alpha`` after the sum::

    y = (x_b @ w_b.T) * alpha + b              x_b, w_b in {-1, +1}: the sum is an exact integer

which equals ``F.linear(x_b, alpha * w_b, b)`` up to float rounding and is, bit for bit, what the
packed kernels compute (``reference.binary_linear``). A binary convolution pads its binarized
input with +1 (sign(0) = +1: a zero-padded input binarizes to +1; larq's engine pads the same way
for speed), so the popcount kernels need no border correction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import integer, quantizers
from lowbit.epilogue import BlockEpilogue, binary_epilogue
from lowbit.quantizers import (
    ACTIVATION_NAMES,
    FIXED_LEVELS,
    GRANULARITIES,
    STES,
    AbsMax8,
    BinaryActivation,
    Quantizer,
    RSign,
    check_choice,
)

QuantizerLike = str | Quantizer | AbsMax8 | BinaryActivation | RSign | None


def _describe(q: Quantizer | AbsMax8 | None) -> str:
    if q is None:
        return "fp32"
    return f"{q.name}(levels={q.levels}, bits={q.bits:.2f})"


def _no_epilogue(epilogue: BlockEpilogue | None) -> None:
    if epilogue is not None:
        raise ValueError("an epilogue follows binary layers only (binary activations, 2 levels)")


class _QuantMixin:
    """Shared quantizer handling of QuantLinear and QuantConv2d."""

    weight_quantizer: Quantizer | AbsMax8 | None
    input_quantizer: Quantizer | AbsMax8 | BinaryActivation | RSign | None
    _CHANNEL_DIM = -1  # where the input's channels are (an rsign threshold's axis)

    def _set_quantizers(self, weight_quantizer: QuantizerLike, input_quantizer: QuantizerLike):
        self.weight_quantizer = quantizers.get(weight_quantizer)
        if isinstance(input_quantizer, str) and input_quantizer not in ACTIVATION_NAMES:
            self.input_quantizer = quantizers.get(input_quantizer)  # a weight quantizer on x
        else:
            self.input_quantizer = quantizers.get_activation(
                input_quantizer,
                channels=self.weight.shape[1] * getattr(self, "groups", 1),  # type: ignore[attr-defined]
                channel_dim=self._CHANNEL_DIM,
            )

    def is_binary(self) -> bool:
        """Binary inputs and 2-level weights: an XNOR-popcount layer (see the module doc)."""
        wq = self.weight_quantizer
        return quantizers.is_binary(self.input_quantizer) and (
            isinstance(wq, Quantizer) and wq.levels == 2
        )

    def binary_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w_b, alpha)``: w_b in {-1, +1} shaped like the weight (straight-through to the
        latent weight) and alpha = scale / 2, shape () or (C_out,), with ``quantized_weight() ==
        alpha * w_b`` exactly. The division is exact ((±scale/2) / (scale/2) = ±1) and passes
        dL/dw_b / alpha to the quantized weight, so the gradient is the unfactored layer's."""
        alpha = self.weight_quantizer.scale(self.weight) * 0.5  # type: ignore[union-attr]
        w_b = self.quantized_weight() / alpha
        return w_b, alpha.reshape(-1) if alpha.dim() else alpha

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward pass uses (straight-through to the latent weight)."""
        w = self.weight  # type: ignore[attr-defined]
        return w if self.weight_quantizer is None else self.weight_quantizer(w)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def int8_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input the int8 kernels quantize: ``x`` itself for QuantLinear / QuantConv2d, whose
        input transform is at most absmax8 (the kernels' own quantization, the same integers and
        multiplier), else the transformed input (e.g. BitLinear8's norm + absmax8), whose
        integers the kernels recover exactly."""
        return x if type(self) in (QuantLinear, QuantConv2d) else self.quantize_input(x)

    @property
    def integer_inference(self) -> bool:
        """Whether the forward computes in exact integer arithmetic (``lowbit.integer``): in eval
        mode, for a layer with absmax8 inputs and a weight quantizer. The trained model then
        gives bit for bit what its packed twin gives, instead of float rounding away from it
        (which flips an 8-bit activation now and then). Train mode keeps the float fake-quant
        forward and its straight-through gradients. Chosen by ``train()`` / ``eval()`` only,
        never by grad mode: the same input gives the same output with or without autograd."""
        return (
            not self.training  # type: ignore[attr-defined]
            and isinstance(self.input_quantizer, AbsMax8)
            and isinstance(self.weight_quantizer, Quantizer)
        )

    def _codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes (out, K) uint8, scale () or (out,)) of the quantized weight, K = in * kH * kW."""
        codes, scale = self.weight_quantizer.codes(self.weight)  # type: ignore[union-attr]
        return codes.reshape(codes.shape[0], -1), scale.reshape(-1) if scale.dim() else scale

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

    Shapes: input (..., in_features), weight (out_features, in_features),
    output (..., out_features).
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

    def forward(self, x: torch.Tensor, epilogue: BlockEpilogue | None = None) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features); ``epilogue`` (binary layers only): what
        follows the layer in an eval-mode ``lowbit.bnn.Block`` (``lowbit.epilogue``)."""
        if self.is_binary():
            w_b, alpha = self.binary_weight()
            y = F.linear(self.quantize_input(x), w_b) * alpha
            y = y if self.bias is None else y + self.bias
            return y if epilogue is None else binary_epilogue(y, x, epilogue, -1)
        _no_epilogue(epilogue)
        if self.integer_inference:
            codes, scale = self._codes()
            levels = self.weight_quantizer.levels  # type: ignore[union-attr]
            return integer.linear(self.int8_input(x), codes, scale, levels, self.bias)
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

    _CHANNEL_DIM = 1

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

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """absmax8 per image, over (C, H, W): a convolution's token is its whole input, so the
        packed kernels' im2col patches hold integers of one scale (exact integer arithmetic)."""
        if isinstance(self.input_quantizer, AbsMax8):
            return self.input_quantizer(x, dim=(-3, -2, -1))
        return super().quantize_input(x)

    def forward(self, x: torch.Tensor, epilogue: BlockEpilogue | None = None) -> torch.Tensor:
        """x (B, C_in, H, W) -> (B, C_out, H', W'); ``epilogue`` as ``QuantLinear.forward``."""
        if self.is_binary():
            y = self._binary_forward(x)
            return y if epilogue is None else binary_epilogue(y, x, epilogue, 1)
        _no_epilogue(epilogue)
        if self.integer_inference and self.groups == 1 and self.padding_mode == "zeros":
            codes, scale = self._codes()
            return integer.conv2d(
                self.int8_input(x),
                codes,
                scale,
                self.weight_quantizer.levels,  # type: ignore[union-attr]
                self.bias,
                kernel_size=self.kernel_size,
                stride=self.stride,
                padding=self.padding,
                dilation=self.dilation,
            )
        return self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias)

    def _binary_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Binarize, pad with +1 (``padding_mode="zeros"``; the other modes pad the binarized
        input their own way), convolve the ±1 tensors (exact integers), then scale and bias."""
        w_b, alpha = self.binary_weight()
        pad = self._reversed_padding_repeated_twice
        if self.padding_mode == "zeros":
            xb = F.pad(self.quantize_input(x), pad, value=1.0)
        else:
            xb = F.pad(self.quantize_input(x), pad, mode=self.padding_mode)
        y = F.conv2d(xb, w_b, None, self.stride, 0, self.dilation, self.groups)
        y = y * alpha.reshape(-1, 1, 1)
        return y if self.bias is None else y + self.bias.reshape(-1, 1, 1)

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


_WEIGHT_QUANTIZERS = ("nlevel", *FIXED_LEVELS)


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
        activations: None (fp32 inputs), ``"absmax8"`` (int8 inputs: per token in linear
            layers, per image in convolutions, see ``QuantConv2d.quantize_input``), or a binary
            activation (``"sign"``, ``"approx-sign"``, ``"rsign"``, see ``lowbit.quantizers``);
            with 2-level weights the latter make XNOR-popcount layers.
    """

    levels: int = 3
    quantizer: str = "nlevel"
    spread: float | None = None
    granularity: str = "tensor"
    ste: str = "identity"
    center: bool | None = None
    activations: str | None = None

    def __post_init__(self) -> None:
        quantizers.check_levels(self.levels, "QATConfig.levels")
        check_choice("QATConfig.quantizer", self.quantizer, _WEIGHT_QUANTIZERS)
        fixed = FIXED_LEVELS.get(self.quantizer)
        if fixed is not None and self.levels != fixed:
            raise ValueError(
                f"QATConfig.quantizer={self.quantizer!r} has {fixed} levels but levels="
                f"{self.levels}; use quantizer='nlevel' for {self.levels} levels"
            )
        if self.spread is not None and self.quantizer != "nlevel":
            raise ValueError("QATConfig.spread only applies to quantizer='nlevel'")
        if self.spread is not None and not self.spread > 0:
            raise ValueError(f"QATConfig.spread must be > 0, got {self.spread!r}")
        check_choice("QATConfig.granularity", self.granularity, GRANULARITIES)
        check_choice("QATConfig.ste", self.ste, STES)
        if self.activations is not None:
            check_choice("QATConfig.activations", self.activations, ACTIVATION_NAMES)

    def weight_quantizer(self) -> Quantizer:
        kw: dict[str, Any] = {"granularity": self.granularity, "ste": self.ste}
        if self.center is not None:
            kw["center"] = self.center
        if self.quantizer == "nlevel":
            kw.update(levels=self.levels, spread=self.spread)
        return quantizers.get(self.quantizer, **kw)

    def input_quantizer(self, channels: int | None = None, channel_dim: int = -1) -> Any:
        """The activation quantizer (``rsign`` needs the layer's input ``channels``)."""
        return quantizers.get_activation(
            self.activations, channels=channels, channel_dim=channel_dim
        )


FilterFn = Callable[[nn.Module, str], bool]


def quantize_(model: nn.Module, config: QATConfig, filter_fn: FilterFn | None = None) -> nn.Module:
    """Swap, in place, every ``nn.Linear``/``nn.Conv2d`` accepted by ``filter_fn(module, fqn)``
    for a QuantLinear/QuantConv2d that keeps the same weight and bias parameters.

    Only modules whose type is exactly ``nn.Linear`` or ``nn.Conv2d`` are swapped: subclasses
    (already quantized layers, ``nn.MultiheadAttention``'s internal projection, which it reads
    through ``.weight`` directly) are left alone. Returns ``model`` for chaining.
    """
    if not isinstance(config, QATConfig):
        raise TypeError(
            f"quantize_ needs a lowbit.QATConfig, got {config!r}; e.g. "
            "quantize_(model, QATConfig(levels=3, quantizer='ternary'))"
        )
    twins = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d}

    def twin(module: nn.Module) -> nn.Module:
        return twins[type(module)].from_float(
            module,
            weight_quantizer=config.weight_quantizer(),
            input_quantizer=config.activations,  # resolved per layer (rsign's channels)
        )

    return replace_modules(model, lambda m: type(m) in twins, twin, filter_fn, "quantize_")


def replace_modules(
    model: nn.Module,
    selects: Callable[[nn.Module], bool],
    make: Callable[[nn.Module], nn.Module],
    filter_fn: FilterFn | None,
    caller: str,
) -> nn.Module:
    """In place: every module of ``model`` that ``selects`` and ``filter_fn(module, fqn)``
    accepts is replaced by ``make(module)`` (the module swap of ``quantize_`` and ``convert_``;
    ``caller`` names the transform in errors). Returns ``model``."""
    for fqn, module in list(model.named_modules()):
        if not selects(module) or (filter_fn is not None and not filter_fn(module, fqn)):
            continue
        if not fqn:
            raise ValueError(
                f"{caller} cannot replace the root module itself; wrap it in a container"
            )
        model.set_submodule(fqn, make(module))
    return model


# --- The comparison layers of the sign-vs-linear study -------------------------------------------
#
# All three keep QuantLinear's forward, ``F.linear(quantize_input(x), quantized_weight(), bias)``,
# and differ only in the input transform and in the weight quantizer / gradient rule, so a packed
# layer reproduces any of them by calling the source layer's ``quantize_input``.


def simple_rms_norm(x: torch.Tensor) -> torch.Tensor:
    """The parameter-free norm of kyegomez/BitNet 0.2.x (zeta's ``SimpleRMSNorm``).

    ``F.normalize(x, dim=-1) * d**-0.5`` with ``d = x.shape[-1]``: each token is scaled to L2 norm
    ``1/sqrt(d)``, i.e. RMS ``1/d``. A true RMSNorm multiplies by ``d**+0.5`` (RMS 1); the
    negative exponent is kept on purpose because it is what that version computes. The absmax
    codes that follow do not depend on the scale, but their dequantized values do: a layer's
    output is ``d`` times smaller than with a true RMSNorm. Shapes: (..., d) -> (..., d).
    """
    return F.normalize(x, dim=-1) * x.shape[-1] ** -0.5


class _SeedLinear(QuantLinear):
    """QuantLinear whose quantizers are fixed by the layer's own keyword options.

    ``to_float(quantized=True)`` bakes in the weights only; the input transform
    (``quantize_input``) is part of the layer and is not carried by a plain nn.Linear.
    """

    @classmethod
    def from_float(cls, module: nn.Linear, **options: Any) -> _SeedLinear:  # type: ignore[override]
        """A layer of this kind sharing ``module``'s weight and bias; ``options`` as in __init__."""
        new = cls(
            module.in_features,
            module.out_features,
            module.bias is not None,
            device="meta",
            dtype=module.weight.dtype,
            **options,
        )
        return cls._adopt(new, module)  # type: ignore[return-value]


class BitLinear8(_SeedLinear):
    """``bitlinear8``: the 8-bit BitLinear of kyegomez/BitNet 0.2.5, with the bias applied.

    Forward (x: (..., in_features) -> y: (..., out_features))::

        x_n = F.normalize(x, dim=-1) * in_features**-0.5        # simple_rms_norm, no parameters
        s   = 127 / max(max|x_n| over the last dim, 1e-5)        # per token
        x_q = clip(round(x_n * s), -128, 127) / s                # AbsMax8, identity STE
        w_q = mean|W| * sign(W - mean W)                         # sign quantizer, center=True
        y   = x_q @ w_q.T + b

    Differences from 0.2.5, both deliberate: 0.2.5 calls ``F.linear(x_q, w_q)`` and silently
    drops the bias — here the bias is applied (with ``bias=False`` the outputs are that version's;
    ``lowbit.models`` builds this kind without a bias by default, because the O(1/d) outputs of
    the norm are swamped by an O(d**-0.5) bias and the network barely learns);
    ``sign(0) = +1`` here (the project's 2-level convention) where ``torch.sign(0) = 0`` there,
    which only matters for a weight exactly equal to the mean. The weights are binary, as in
    0.2.5 (its README says b1.58). Gradients reach the latent weight and the input straight
    through both quantizers; unlike 0.1.x a second backward works (no stale graph is kept).

    Options: ``ste`` (``"identity"``/``"clipped"``) and ``granularity`` of the weight quantizer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        ste: str = "identity",
        granularity: str = "tensor",
    ) -> None:
        QuantLinear.__init__(
            self,
            in_features,
            out_features,
            bias,
            device=device,
            dtype=dtype,
            weight_quantizer=quantizers.get("sign", center=True, ste=ste, granularity=granularity),
            input_quantizer="absmax8",
        )

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """``AbsMax8(simple_rms_norm(x))``."""
        return self.input_quantizer(simple_rms_norm(x))  # type: ignore[misc]


class SignLinear(_SeedLinear):
    """``mybitlinear``: BitLinear8 with the input quantization removed, sign weights.

    Forward (x: (..., in_features) -> y: (..., out_features))::

        x_n = simple_rms_norm(x)            if norm   else x
        w_q = a * sign(W - c)               c = mean W if center else 0
                                            a = mean|W| (scale="absmean") or 1 (scale="none")
        y   = x_n @ w_q.T + b

    The study's text says only "removing quantization part of input from 8-bit bitlinear and
    adjusting sign-quantization to the weight"; its code was not published. Defaults therefore
    keep everything of BitLinear8 but the absmax8 step: ``norm=True``, ``center=True``,
    ``scale="absmean"``. Gradient: straight through to the latent weight (``ste``).
    """

    SCALES = ("absmean", "none")
    # Readings of the study's one-sentence description, as option sets (the first is the
    # default). "bitnet": everything of BitLinear8 but the absmax8 step (the defaults above);
    # "raw-sign": "adjusting sign-quantization to the weight" read as plain sign(W) in {-1, +1},
    # input untouched (no norm, no centring, no scale).
    READINGS: dict[str, dict[str, Any]] = {
        "bitnet": {},
        "raw-sign": {"norm": False, "center": False, "scale": "none"},
    }

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        norm: bool = True,
        center: bool = True,
        scale: str = "absmean",
        ste: str = "identity",
    ) -> None:
        check_choice("SignLinear scale", scale, self.SCALES)
        if scale == "absmean":
            wq: Quantizer = quantizers.get("sign", center=center, ste=ste)  # type: ignore[assignment]
        else:
            wq = Quantizer(levels=2, center=center, ste=ste, name="sign", fixed_scale=2.0)
        QuantLinear.__init__(
            self, in_features, out_features, bias, device=device, dtype=dtype, weight_quantizer=wq
        )
        self.norm = norm

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """``simple_rms_norm(x)`` when ``norm`` else ``x`` (no quantization)."""
        return simple_rms_norm(x) if self.norm else x

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, norm={self.norm}"


class _GradMaskedSTE(torch.autograd.Function):
    """Forward ``w_hat``; backward passes ``grad`` where ``|grad| < 1`` and 0 elsewhere."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
        return w_hat

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        return grad * (grad.abs() < 1).to(grad.dtype), None


class MisbornLinear(_SeedLinear):
    """``myLittleMisborn``: a 1-bit nn.Linear, weights exactly -1/+1, straight-through learning.

    The study describes it as: normalise the weight, forward with -1/+1 (negative -> -1), learn
    through the latent weight, "weights learn only when the absolute value of gradient is less
    than 1". Its code was not published; this is the reconstruction (x: (..., in) -> (..., out))::

        W_n = normalise(W)                   norm="standardize": (W - mean W) / std W  (default)
                                             norm="l2": each row / its L2 norm;  norm="none": W
        w_q = sign(W_n) in {-1, +1}          sign(0) = +1; no scale (fixed-scale 2-level quantizer)
        y   = x @ w_q.T + b                  input untouched

    Backward: dL/dW_n = dL/dw_q * m, then autograd through the normalisation to W, where
    ``mask="grad"`` (default, as the text says): m = 1[|dL/dw_q| < 1];
    ``mask="weight"``: m = 1[|W_n| <= 1] (the classic BinaryNet hard-tanh STE).

    Every normalisation is a positive rescaling of ``W - c`` (c = mean W for "standardize", else
    0), so ``w_q`` is computed by the weight quantizer on the raw weight (exact codes for
    packing); ``W_n`` only carries the gradient. Weights of ±1 give large pre-activations that grow
    with width; the study reports extreme, fluctuating losses for this layer, which is expected.
    """

    MASKS = ("grad", "weight")
    NORMS = ("standardize", "l2", "none")
    # Readings of "weights learn only when the absolute value of gradient is less than 1", as
    # option sets (the first is the default): the gradient mask as written, or the |W_n| <= 1
    # hard-tanh STE of BinaryNet that ChatGPT typically writes for that sentence.
    READINGS: dict[str, dict[str, Any]] = {
        "grad-mask": {"mask": "grad"},
        "weight-ste": {"mask": "weight"},
    }

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        mask: str = "grad",
        norm: str = "standardize",
    ) -> None:
        check_choice("MisbornLinear mask", mask, self.MASKS)
        check_choice("MisbornLinear norm", norm, self.NORMS)
        wq = Quantizer(levels=2, center=norm == "standardize", name="sign", fixed_scale=2.0)
        QuantLinear.__init__(
            self, in_features, out_features, bias, device=device, dtype=dtype, weight_quantizer=wq
        )
        self.mask = mask
        self.norm = norm

    def _normalised(self, w: torch.Tensor) -> torch.Tensor:
        if self.norm == "standardize":
            c = w - w.mean()
            # sqrt(var + tiny): finite value and gradient for a constant (e.g. all-zero) weight.
            return c / torch.sqrt(c.pow(2).mean() + 1e-12)
        if self.norm == "l2":
            return F.normalize(w, dim=-1)
        return w

    def quantized_weight(self) -> torch.Tensor:
        """±1 weights; gradient to the latent weight through the masked STE (see class doc)."""
        w = self.weight
        w_hat = self.weight_quantizer(w.detach())  # type: ignore[misc]
        if not (w.requires_grad and torch.is_grad_enabled()):
            return w_hat
        w_n = self._normalised(w)
        if self.mask == "grad":
            return _GradMaskedSTE.apply(w_n, w_hat)
        return quantizers.straight_through(w_n, w_hat, (w_n.detach().abs() <= 1).to(w.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mask={self.mask}, norm={self.norm}"
