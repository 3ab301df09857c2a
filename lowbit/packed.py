"""Packed inference layers and ``convert_``: quantized layers without their latent weights.

``convert_(model)`` replaces, in place, every ``QuantLinear``/``QuantConv2d`` (and their
subclasses, e.g. the seed-study layers) by a ``PackedLinear``/``PackedConv2d`` that holds only

    codes   (out, K) uint8 buffer, the integer weight codes 0..N-1 (the latent fp32 weights
            are dropped; the kernels' compute layout is a cache derived from codes and scale)
    scale   () or (out,) float32 buffer, the step between levels
    bias    (out,) float32 or None

and computes ``y = kernels.linear(t(x), W, b)`` (``kernels.conv2d`` for convolutions), with
``W = scale * (codes - (N-1)/2)`` and ``t`` the source layer's own input transform (called, not
re-implemented: BitLinear8's norm + absmax8, SignLinear's norm). Activation modes:

* ``"int8"`` for layers trained with an absmax8 input quantizer (per token for linear layers,
  per image for convolutions, as ``QuantLinear``/``QuantConv2d`` train it): ``t`` is the source's
  ``int8_input`` (x itself where the transform is just absmax8, which the kernel applies; else
  the already quantized ``t(x)``, whose integers ``round(x_hat * 127 / max|x_hat|)`` gives back)
  and the dot products are exact integers. The source layer computes the same integer
  arithmetic in eval mode (``QuantLinear.integer_inference``, ``lowbit.integer``), so packed and
  trained outputs are bit-identical.
* ``"fp32"`` otherwise (weight-only quantization): ``t`` is ``quantize_input``; the output
  equals the fake-quant model's up to float summation order (tests bound it).
* ``"binary"`` for binary layers (a binary input quantizer and 2 levels, ``QuantLinear.is_binary``):
  the XNOR-popcount kernels (``lowbit.kernels.binary``) binarize x against the buffer
  ``threshold`` (rsign's per-channel threshold, zeros for sign / approx-sign) and compute
  ``(x_b @ w_b.T) * scale / 2 + b``, bit-identical to the trained layer.

Eager calls run the kernels directly; under torch.compile, torch.export and jit.trace the layer
calls the ops ``torch.ops.lowbit.packed_linear`` / ``packed_conv2d`` on its buffers, so traced
graphs hold one op per layer. Saving and loading packed models: ``lowbit.fileformat``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lowbit import kernels
from lowbit.epilogue import BlockEpilogue, binary_epilogue
from lowbit.kernels import binary, eager, reference
from lowbit.nn import QuantConv2d, QuantLinear, replace_modules
from lowbit.quantizers import (
    GRANULARITIES,
    AbsMax8,
    Quantizer,
    binary_threshold,
    check_activation_mode,
    check_choice,
    check_levels,
)

# --- layers --------------------------------------------------------------------------------------


def _input_shell(source: nn.Module) -> nn.Module:
    """A copy of ``source`` without its weight and bias: kept only to call its ``quantize_input``
    (the same code the trained layer ran), so packed layers hold no latent weights."""
    shell = copy.copy(source)
    shell._parameters = {**source._parameters, "weight": None, "bias": None}
    shell._buffers = dict(source._buffers)
    shell._modules = dict(source._modules)
    return shell


class _InputTransform:
    """Holds the input shell outside the module tree: it has no tensors of its own, so it is
    no submodule (``named_modules``, ``state_dict`` and the .lowbit schema do not see it)."""

    __slots__ = ("source",)

    def __init__(self, source: nn.Module) -> None:
        self.source = source


def _default_activations(source: nn.Module | None) -> str:
    if isinstance(source, (QuantLinear, QuantConv2d)) and source.is_binary():
        return "binary"
    return "int8" if isinstance(getattr(source, "input_quantizer", None), AbsMax8) else "fp32"


def _check_epilogue_use(layer: PackedLayer, epilogue: BlockEpilogue | None) -> None:
    if epilogue is not None and layer._activations != "binary":
        raise ValueError(
            f"an epilogue runs in the binary kernels only; this layer's activations are "
            f"{layer.activations!r}"
        )


class PackedLayer(nn.Module):
    """The base of PackedLinear and PackedConv2d: codes, scale, bias and the input transform.

    State (all of it in registered buffers / parameters, so ``state_dict``, ``deepcopy``,
    ``torch.save`` and ``.to(device)`` treat it as any torch module's):

        codes   buffer (out, K) uint8, values 0..levels-1 (K = in_features, or C_in*kH*kW)
        scale   buffer () or (out,) float32
        bias    parameter (out,) float32 (requires_grad=False) or None

    The kernels' compute layout (``kernels.prepare``) is a cache derived from ``codes`` and
    ``scale``: rebuilt on the next call whenever either is another tensor or was modified in
    place (tensor identity, data pointer and version counter), and never pickled or copied
    (``__getstate__`` drops it), so it can neither outlive nor alias its source.

    ``.to(dtype)`` (``.double()``, ``.half()``) leaves codes, scale and bias as they are: they
    are the packed format (uint8 + float32) and a float16 scale would change the weights.
    The layer computes in float32 and returns the input's dtype, so a model moved to float64
    still runs. ``.to(device)`` moves them; the kernels then run where the tensors are (the
    compiled kernels on CPU, the reference elsewhere).
    """

    kind: str  # "linear" | "conv2d", as the .lowbit file names it
    levels: int
    granularity: str
    weight_shape: tuple[int, ...]

    def _init_packed(
        self,
        out_features: int,
        k: int,
        levels: int,
        bias: bool,
        granularity: str,
        activations: str,
        source: nn.Module | None,
        device: Any,
    ) -> None:
        check_levels(levels)
        check_choice("granularity", granularity, GRANULARITIES)
        check_activation_mode(activations)
        if activations == "binary" and levels != 2:
            raise ValueError(f"binary activations need 2-level weights, got levels={levels}")
        self.levels, self.granularity, self._activations = levels, granularity, activations
        self.out_features_, self.k = out_features, k
        scale_shape = () if granularity == "tensor" else (out_features,)
        self.register_buffer(
            "codes", torch.zeros((out_features, k), dtype=torch.uint8, device=device)
        )
        self.register_buffer("scale", torch.ones(scale_shape, device=device))
        b = torch.zeros(out_features, device=device) if bias else None
        self.bias = nn.Parameter(b, requires_grad=False) if bias else None
        self._input = _InputTransform(_input_shell(source)) if source is not None else None
        # whether _transform(x) is x (plain QuantLinear/QuantConv2d inputs: the int8 kernels
        # quantize x themselves; without an input quantizer, fp32 takes x as it is): the
        # per-call path then skips it
        self._plain_input = source is None or (
            type(source) in (QuantLinear, QuantConv2d)
            and (activations == "int8" or source.input_quantizer is None)
        )
        self._cache: tuple | None = None

    def _init_threshold(self, channels: int, device: Any) -> None:
        """Binary layers: the buffer ``threshold`` (C_in,) float32 the input is binarized
        against (x >= t gives +1); None otherwise."""
        t = torch.zeros(channels, device=device) if self.activations == "binary" else None
        self.register_buffer("threshold", t)

    @property
    def activations(self) -> str:
        """ "fp32" or "int8" (``lowbit.quantizers.ACTIVATION_MODES``), fixed at construction."""
        return self._activations

    @property
    def input_source(self) -> nn.Module | None:
        """The (weightless) source layer whose input transform this layer applies, or None."""
        return None if self._input is None else self._input.source

    def set_codes(self, codes: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        """Install codes (out, k) uint8 (and optionally a new scale, stored as float32)."""
        codes = codes.detach().reshape(self.out_features_, self.k)
        if codes.dtype != torch.uint8:
            raise ValueError(f"codes must be uint8, got {codes.dtype}")
        if codes.numel() and int(codes.max()) >= self.levels:
            raise ValueError(f"codes must lie in 0..{self.levels - 1}")
        self.codes = codes.to(self.codes.device).clone()
        if scale is not None:
            self.scale = (
                scale.detach()
                .to(self.scale.device, torch.float32)
                .reshape(self.scale.shape)
                .clone()
            )

    def prepared(self) -> kernels.PreparedWeight:
        """The codes in the kernels' compute layout (``kernels.prepare``), cached until the
        codes or the scale change (another tensor, another storage or an in-place edit)."""
        codes, scale = self._buffers["codes"], self._buffers["scale"]
        c = self._cache
        if (
            c is None
            or c[0] is not codes
            or c[1] is not scale
            or c[2] != (codes._version, scale._version, codes.data_ptr(), scale.data_ptr())
        ):
            key = (codes._version, scale._version, codes.data_ptr(), scale.data_ptr())
            c = self._cache = (
                codes,
                scale,
                key,
                self._prepare(codes, scale),
            )
        return c[3]

    def __getstate__(self) -> dict[str, Any]:
        # the compute layout is derived: a copy or a pickle rebuilds it from its own buffers
        state = super().__getstate__()
        return {**state, "_cache": None}

    def _layout(self) -> dict[str, Any]:
        """Extra ``kernels.prepare`` arguments of this layer kind."""
        return {}

    def _prepare(self, codes: torch.Tensor, scale: torch.Tensor) -> Any:
        if self.activations == "binary":
            return binary.prepare(codes, scale, **self._layout())
        return kernels.prepare(codes, scale, self.levels, **self._layout())

    @classmethod
    def from_quant(cls, layer: Any, activations: str | None = None) -> Any:
        """Pack a trained QuantLinear / QuantConv2d (or subclass): its codes, scale, bias and
        input transform (the subclass's ``empty_like``, then the codes of its latent weight)."""
        with torch.device(layer.weight.device):
            new = cls.empty_like(layer, activations)
        return _fill_from(new, layer, weight_quantizer(layer))

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the layer computes with, ``scale * (codes - (N-1)/2)``, fp32."""
        return reference.dequantize(self.codes, self.scale, self.levels)

    def _transform(self, x: torch.Tensor) -> torch.Tensor:
        if self._input is None or self.activations == "binary":  # binary: the kernel binarizes
            return x
        if self._activations == "int8":
            return self._input.source.int8_input(x)
        return self._input.source.quantize_input(x)

    def _apply(self, fn: Callable, recurse: bool = True) -> nn.Module:  # type: ignore[override]
        scale = self.scale.detach()
        bias = None if self.bias is None else self.bias.detach()
        super()._apply(fn, recurse)
        # dtype conversions leave the packed format (float32 scale and bias) as it is
        if self.scale.dtype != torch.float32:
            self.scale = scale.to(self.scale.device)
        if self.bias is not None and bias is not None and self.bias.dtype != torch.float32:
            self.bias = nn.Parameter(bias.to(self.bias.device), requires_grad=False)
        return self

    def _packed_repr(self) -> str:
        src = "" if self._input is None else f", input={type(self.input_source).__name__}"
        return (
            f"levels={self.levels}, granularity={self.granularity}, "
            f"activations={self.activations}{src}"
        )


class PackedLinear(PackedLayer):
    """Inference-only linear layer with packed N-level weights: (..., in) -> (..., out)."""

    kind = "linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        levels: int,
        bias: bool = True,
        *,
        granularity: str = "tensor",
        activations: str = "fp32",
        source: nn.Module | None = None,
        device: Any = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_packed(
            out_features, in_features, levels, bias, granularity, activations, source, device
        )
        self._init_threshold(in_features, device)

    @classmethod
    def empty_like(cls, layer: QuantLinear, activations: str | None = None) -> PackedLinear:
        """``layer``'s structure and input transform, no codes yet (on the current device)."""
        q = weight_quantizer(layer)
        return cls(
            layer.in_features,
            layer.out_features,
            q.levels,
            layer.bias is not None,
            granularity=_granularity(q, layer.weight),
            activations=activations or _default_activations(layer),
            source=layer,
        )

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def forward(self, x: torch.Tensor, epilogue: BlockEpilogue | None = None) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features); ``epilogue`` (binary layers only): what
        follows the layer in an eval-mode ``lowbit.bnn.Block``, run inside the kernel."""
        t = x if self._plain_input else self._transform(x)
        _check_epilogue_use(self, epilogue)
        if self._activations == "binary":
            if eager(t):
                y = binary.linear(t, self.prepared(), self.bias, self.threshold, epilogue=epilogue)
            else:
                y = torch.ops.lowbit.binary_linear(
                    t, self.codes, self.scale, self.bias, self.threshold
                )
                if epilogue is not None:
                    y = binary_epilogue(y, t, epilogue, -1)
        elif eager(t):
            bias = self._parameters.get("bias")  # (a None bias is a plain attribute)
            y = kernels.linear(t, self.prepared(), bias, self._activations)
        else:
            y = torch.ops.lowbit.packed_linear(
                t, self.codes, self.scale, self.bias, self.levels, self.activations
            )
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self._packed_repr()}"
        )


class PackedConv2d(PackedLayer):
    """Inference-only 2-d convolution with packed N-level weights (groups = 1).

    (B, C_in, H, W) -> (B, C_out, H', W'); the weight (C_out, C_in, kH, kW) is stored as codes
    (C_out, C_in * kH * kW), the im2col patch order of ``F.unfold``."""

    kind = "conv2d"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        levels: int = 3,
        bias: bool = True,
        *,
        granularity: str = "tensor",
        activations: str = "fp32",
        source: nn.Module | None = None,
        device: Any = None,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        k = in_channels * self.kernel_size[0] * self.kernel_size[1]
        self._init_packed(out_channels, k, levels, bias, granularity, activations, source, device)
        self._init_threshold(in_channels, device)

    @classmethod
    def empty_like(cls, layer: QuantConv2d, activations: str | None = None) -> PackedConv2d:
        """``layer``'s structure and input transform, no codes yet (on the current device)."""
        q = weight_quantizer(layer)
        return cls(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            _conv_padding(layer),
            layer.dilation,
            q.levels,
            layer.bias is not None,
            granularity=_granularity(q, layer.weight),
            activations=activations or _default_activations(layer),
            source=layer,
        )

    def _layout(self) -> dict[str, Any]:
        return {"conv": (self.in_channels, self.kernel_size)}

    def _geometry(self) -> list[int]:
        """kh, kw, sh, sw, ph, pw, dh, dw: the custom ops' geometry argument."""
        return [*self.kernel_size, *self.stride, *self.padding, *self.dilation]

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def forward(self, x: torch.Tensor, epilogue: BlockEpilogue | None = None) -> torch.Tensor:
        """x (B, C_in, H, W) -> (B, C_out, H', W'); ``epilogue`` as ``PackedLinear.forward``."""
        t = x if self._plain_input else self._transform(x)
        _check_epilogue_use(self, epilogue)
        if self._activations == "binary":
            if eager(t):
                y = binary.conv2d(
                    t,
                    self.prepared(),
                    self._parameters.get("bias"),  # (the dicts: module attributes cost ~0.6 us)
                    self._buffers["threshold"],
                    kernel_size=self.kernel_size,
                    stride=self.stride,
                    padding=self.padding,
                    dilation=self.dilation,
                    epilogue=epilogue,
                )
            else:
                y = torch.ops.lowbit.binary_conv2d(
                    t, self.codes, self.scale, self.bias, self.threshold, self._geometry()
                )
                if epilogue is not None:
                    y = binary_epilogue(y, t, epilogue, 1)
        elif eager(t):
            y = kernels.conv2d(
                t,
                self.prepared(),
                self.bias,
                kernel_size=self.kernel_size,
                stride=self.stride,
                padding=self.padding,
                dilation=self.dilation,
                activations=self.activations,
            )
        else:
            geometry = self._geometry()
            y = torch.ops.lowbit.packed_conv2d(
                t, self.codes, self.scale, self.bias, self.levels, geometry, self.activations
            )
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"bias={self.bias is not None}, {self._packed_repr()}"
        )


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def weight_quantizer(layer: nn.Module) -> Quantizer:
    q = getattr(layer, "weight_quantizer", None)
    if not isinstance(q, Quantizer):
        raise ValueError(f"{type(layer).__name__} has no weight quantizer: nothing to pack")
    return q


def _granularity(q: Quantizer, w: torch.Tensor) -> str:
    return "channel" if q.granularity == "channel" and w.dim() >= 2 else "tensor"


def _conv_padding(layer: nn.Conv2d) -> tuple[int, int]:
    """Symmetric explicit padding equal to the layer's (which F.unfold needs)."""
    if layer.groups != 1:
        raise ValueError(f"PackedConv2d supports groups=1 only, got groups={layer.groups}")
    if layer.padding_mode != "zeros":
        raise ValueError(
            f"PackedConv2d supports padding_mode='zeros' only, got {layer.padding_mode!r}"
        )
    if layer.padding == "valid":
        return (0, 0)
    if layer.padding == "same":
        total = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size, strict=True)]
        if any(t % 2 for t in total):
            raise ValueError("PackedConv2d: padding='same' with an even kernel is asymmetric")
        return (total[0] // 2, total[1] // 2)
    return _pair(layer.padding)


def _fill_from(new: PackedLayer, layer: nn.Module, q: Quantizer) -> PackedLayer:
    """Codes and scale from the layer's latent weight; checks they give its forward weight."""
    with torch.no_grad():
        codes, scale = q.codes(layer.weight)
        w_q = layer.quantized_weight()
        if not torch.equal(q.dequantize(codes, scale), w_q):
            raise ValueError(
                f"{type(layer).__name__}.quantized_weight() differs from its weight quantizer's "
                "codes; such a layer cannot be packed"
            )
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
        if new.threshold is not None:
            t = binary_threshold(layer.input_quantizer)
            new.threshold.copy_(0.0 if t is None else t)
        new.set_codes(
            codes.reshape(new.out_features_, new.k), scale.reshape(-1) if scale.dim() else scale
        )
    return new


def packable(module: nn.Module) -> bool:
    """Whether ``convert_`` packs ``module`` (a QuantLinear/QuantConv2d with a weight quantizer)
    or it is packed already."""
    return isinstance(module, PackedLayer) or (
        isinstance(module, (QuantLinear, QuantConv2d))
        and isinstance(module.weight_quantizer, Quantizer)
    )


def empty_packed(layer: nn.Module, activations: str | None = None) -> PackedLayer:
    """The packed layer ``convert_`` makes of ``layer``, without codes (on the current device)."""
    kind = PackedLinear if isinstance(layer, QuantLinear) else PackedConv2d
    return kind.empty_like(layer, activations)


def convert_(
    model: nn.Module,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    *,
    activations: str | None = None,
) -> nn.Module:
    """Replace, in place, each QuantLinear/QuantConv2d with a weight quantizer (accepted by
    ``filter_fn(module, fqn)``) by its PackedLinear/PackedConv2d. ``activations`` forces a mode
    for every converted layer (default: "int8" where the layer was trained with absmax8 inputs,
    else "fp32"). Returns ``model``."""

    def packed(module: nn.Module) -> nn.Module:
        kind = PackedLinear if isinstance(module, QuantLinear) else PackedConv2d
        return kind.from_quant(module, activations)

    def selects(module: nn.Module) -> bool:
        return packable(module) and not isinstance(module, PackedLayer)

    return replace_modules(model, selects, packed, filter_fn, "convert_")
