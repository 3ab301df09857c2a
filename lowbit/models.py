"""The networks of the seed studies, built from any layer kind, and their registry.

``get(name, layer=..., levels=None, **kw)`` builds one of ``NAMES``:

=========  ======================================================================================
``mlp``    sign-vs-linear study: ``depth`` hidden layers of ``width`` units, then the classifier
``fcnn1``  Low-Resolution study, three fully connected layers: in -> 256 -> 256 -> classes
``fcnn2``  the larger one: in -> 2048 -> 1024 -> classes
``cvnn1``  Conv64-Pool, Conv128-Pool, Conv256-Pool, Flatten, Dense128, Dense(classes)
``cvnn2``  Conv128x2-Pool, Conv256x2-Pool, Conv512x2-Pool, Flatten, Dense512, Dense(classes)
``vit1``   vision transformer, see ``vit`` (configuration in docs/results/vit-config.md)
``vit2``   the larger one
=========  ======================================================================================

``layer`` picks the kind of every quantizable layer (``LAYERS``):

* ``linear``: plain fp32 ``nn.Linear`` / ``nn.Conv2d``;
* ``sign``, ``ternary``, ``ternary-median``, ``nlevel`` (needs ``levels=N``): ``QuantLinear`` /
  ``QuantConv2d`` with that weight quantizer (``lowbit.quantizers``);
* ``bitlinear8``, ``mybitlinear``, ``misborn``: the sign-vs-linear study's layers
  (``BitLinear8``, ``SignLinear``, ``MisbornLinear``). They are fully connected layers only: a
  convolutional model asked for one raises ValueError (``CONV_LAYERS`` lists the conv kinds).

Further keyword options of the layer kind go through ``**quant`` (``spread``, ``granularity``,
``ste``, ``center`` for the quantizers; the seed layers' own flags, e.g. ``mask="weight"``).

What stays fp32, whatever ``layer`` is: biases (always), normalisation layers, the ViT's patch
embedding and position embedding (``quantize_patch=True`` quantizes the patch embedding). The first
and the last (classifier) layer follow ``layer`` unless ``quantize_first=False`` /
``quantize_head=False``. The seed studies quantized every dense and conv layer, so those are the
defaults.

Every model carries ``model.lowbit_spec = {"name": ..., "kwargs": {...}}`` with all arguments
(defaults filled in, JSON types), so ``get(spec["name"], **spec["kwargs"])`` rebuilds the same
architecture. Inputs are (B, C, H, W) with ``input_shape=(C, H, W)`` (28x28x1 and 32x32x3 both
work) and ``classes`` outputs; the dataset decides both.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from lowbit import quantizers
from lowbit.nn import BitLinear8, MisbornLinear, QuantConv2d, QuantLinear, SignLinear

LAYERS = (
    "linear",
    "bitlinear8",
    "mybitlinear",
    "misborn",
    "sign",
    "ternary",
    "ternary-median",
    "nlevel",
)
CONV_LAYERS = ("linear", "sign", "ternary", "ternary-median", "nlevel")
ACTIVATIONS = ("relu", "study")

_SEED_LAYERS: dict[str, type[QuantLinear]] = {
    "bitlinear8": BitLinear8,
    "mybitlinear": SignLinear,
    "misborn": MisbornLinear,
}
# Keyword options each layer kind accepts through ``**quant``.
_OPTIONS: dict[str, tuple[str, ...]] = {
    "linear": (),
    "sign": ("center", "granularity", "ste"),
    "ternary": ("granularity", "ste"),
    "ternary-median": ("granularity", "ste"),
    "nlevel": ("spread", "granularity", "ste"),
    "bitlinear8": ("granularity", "ste"),
    "mybitlinear": ("norm", "center", "scale", "ste"),
    "misborn": ("mask", "norm"),
}


# --- layer factory -------------------------------------------------------------------------------


def check_layer(layer: str, levels: int | None = None, **quant: Any) -> None:
    """Validate a layer kind and its options; ValueError naming what is wrong and what is valid."""
    if layer not in LAYERS:
        raise ValueError(f"unknown layer kind {layer!r}; valid kinds: {', '.join(LAYERS)}")
    unknown = sorted(set(quant) - set(_OPTIONS[layer]))
    if unknown:
        valid = ", ".join(_OPTIONS[layer]) or "none"
        raise ValueError(
            f"layer {layer!r} does not take option(s) {', '.join(unknown)}; valid options: {valid}"
        )
    if layer == "nlevel":
        if levels is None:
            raise ValueError("layer 'nlevel' needs levels=N (an integer in 2..256)")
    elif layer in ("linear", *_SEED_LAYERS) and levels is not None:
        fixed = "fp32" if layer == "linear" else "2 levels"
        raise ValueError(f"layer {layer!r} is {fixed}; leave levels unset (got levels={levels})")
    if layer in quantizers.NAMES:
        _weight_quantizer(layer, levels, quant)  # the quantizer validates levels and options
    elif layer in _SEED_LAYERS:
        _SEED_LAYERS[layer](1, 1, device="meta", **quant)


def _weight_quantizer(layer: str, levels: int | None, quant: dict[str, Any]) -> Any:
    kw = dict(quant)
    if levels is not None:
        kw["levels"] = levels
    return quantizers.get(layer, **kw)


def make_linear(
    in_features: int,
    out_features: int,
    layer: str = "linear",
    levels: int | None = None,
    bias: bool = True,
    **quant: Any,
) -> nn.Linear:
    """A fully connected layer of kind ``layer``: (..., in_features) -> (..., out_features)."""
    check_layer(layer, levels, **quant)
    if layer == "linear":
        return nn.Linear(in_features, out_features, bias)
    if layer in _SEED_LAYERS:
        return _SEED_LAYERS[layer](in_features, out_features, bias, **quant)
    return QuantLinear(
        in_features, out_features, bias, weight_quantizer=_weight_quantizer(layer, levels, quant)
    )


def make_conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    layer: str = "linear",
    levels: int | None = None,
    bias: bool = True,
    **quant: Any,
) -> nn.Conv2d:
    """A 'same'-padded (odd ``kernel_size``) 2-d convolution of kind ``layer``.

    (B, in_channels, H, W) -> (B, out_channels, H, W). Only ``CONV_LAYERS`` kinds exist as convs.
    """
    if layer in _SEED_LAYERS:
        raise ValueError(
            f"layer {layer!r} is a fully connected layer of the sign-vs-linear study and has no "
            f"convolutional form; for conv models use one of {', '.join(CONV_LAYERS)}"
        )
    check_layer(layer, levels, **quant)
    padding = kernel_size // 2
    if layer == "linear":
        return nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=bias)
    wq = _weight_quantizer(layer, levels, quant)
    return QuantConv2d(
        in_channels, out_channels, kernel_size, padding=padding, bias=bias, weight_quantizer=wq
    )


# --- registry ------------------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def _registered(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its name and stamp ``lowbit_spec`` on every model it builds."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def build(*args: Any, **kwargs: Any) -> nn.Module:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        spec: dict[str, Any] = {}
        for key, value in bound.arguments.items():
            if signature.parameters[key].kind is inspect.Parameter.VAR_KEYWORD:
                spec.update(value)
            else:
                spec[key] = value
        model = fn(*args, **kwargs)
        model.lowbit_spec = {
            "name": fn.__name__,
            "kwargs": {k: _jsonable(v) for k, v in spec.items()},
        }
        return model

    _REGISTRY[fn.__name__] = build
    return build


def get(name: str, layer: str = "linear", levels: int | None = None, **kw: Any) -> nn.Module:
    """Build model ``name`` (one of ``NAMES``) with layers of kind ``layer``.

    ``get("mlp", depth=3, width=256, layer="ternary")``; ``get("cvnn1", layer="nlevel",
    levels=5, input_shape=(3, 32, 32), classes=10)``. Unknown names, kinds or options raise
    ValueError listing the valid ones.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(NAMES)}")
    params = [p for p in inspect.signature(_REGISTRY[name]).parameters if p != "quant"]
    layer_options = {o for opts in _OPTIONS.values() for o in opts}
    unknown = sorted(k for k in kw if k not in params and k not in layer_options)
    if unknown:
        raise ValueError(
            f"model {name!r} has no argument(s) {', '.join(unknown)}; its arguments: "
            f"{', '.join(params)} (and the layer kind's options)"
        )
    return _REGISTRY[name](layer=layer, levels=levels, **kw)


# --- shared pieces -------------------------------------------------------------------------------


def _input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {input_shape!r}")
    return shape  # type: ignore[return-value]


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")


def _dense_stack(
    sizes: Sequence[int],
    layer: str,
    levels: int | None,
    quant: dict[str, Any],
    *,
    activation: str,
    quantize_first: bool,
    quantize_head: bool,
) -> list[nn.Module]:
    """Fully connected layers sizes[0] -> sizes[1] -> ... -> sizes[-1], activations between.

    ``activation="relu"``: ReLU after every hidden layer; ``"study"``: ReLU only after the hidden
    layers that are fp32 (the sign-vs-linear study's choice: quantization already acts as the
    non-linearity). The last layer (the classifier) has no activation.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")
    out: list[nn.Module] = []
    count = len(sizes) - 1
    for i in range(count):
        quantized = not ((i == 0 and not quantize_first) or (i == count - 1 and not quantize_head))
        kind = layer if quantized else "linear"
        opts = quant if quantized else {}
        out.append(make_linear(sizes[i], sizes[i + 1], kind, levels if quantized else None, **opts))
        if i < count - 1 and (activation == "relu" or kind == "linear"):
            out.append(nn.ReLU())
    return out


# --- fully connected models ----------------------------------------------------------------------


@_registered
def mlp(
    depth: int = 3,
    width: int = 256,
    in_features: int | None = None,
    classes: int = 10,
    *,
    input_shape: Sequence[int] = (1, 28, 28),
    activation: str = "relu",
    quantize_first: bool = True,
    quantize_head: bool = True,
    layer: str = "linear",
    levels: int | None = None,
    **quant: Any,
) -> nn.Sequential:
    """The sign-vs-linear study's network: Flatten, ``depth`` x (Linear(width) [+ ReLU]), head.

    (B, C, H, W) or (B, in_features) -> (B, classes). ``depth`` counts hidden layers (0 gives a
    linear classifier); ``in_features`` defaults to C*H*W of ``input_shape``. The head (the last
    Linear(width, classes)) is of kind ``layer`` when ``quantize_head`` (default, as the study
    swapped every layer), else fp32; likewise the first layer with ``quantize_first``.
    ``activation``: ``"relu"`` everywhere or ``"study"`` (ReLU only after fp32 layers).
    """
    _check_positive(width=width, classes=classes)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be an integer >= 0, got {depth!r}")
    flat = math.prod(_input_shape(input_shape))
    if in_features is None:
        in_features = flat
    _check_positive(in_features=in_features)
    check_layer(layer, levels, **quant)
    sizes = [in_features, *([width] * depth), classes]
    return nn.Sequential(
        nn.Flatten(),
        *_dense_stack(
            sizes,
            layer,
            levels,
            quant,
            activation=activation,
            quantize_first=quantize_first,
            quantize_head=quantize_head,
        ),
    )


def _fcnn(
    hidden: tuple[int, int],
    input_shape: Sequence[int],
    classes: int,
    quantize_first: bool,
    quantize_head: bool,
    layer: str,
    levels: int | None,
    quant: dict[str, Any],
) -> nn.Sequential:
    _check_positive(classes=classes)
    check_layer(layer, levels, **quant)
    sizes = [math.prod(_input_shape(input_shape)), *hidden, classes]
    return nn.Sequential(
        nn.Flatten(),
        *_dense_stack(
            sizes,
            layer,
            levels,
            quant,
            activation="relu",
            quantize_first=quantize_first,
            quantize_head=quantize_head,
        ),
    )


@_registered
def fcnn1(
    input_shape: Sequence[int] = (3, 32, 32),
    classes: int = 10,
    *,
    quantize_first: bool = True,
    quantize_head: bool = True,
    layer: str = "linear",
    levels: int | None = None,
    **quant: Any,
) -> nn.Sequential:
    """Three fully connected layers, C*H*W -> 256 -> 256 -> classes, ReLU between.

    The paper's sizes were lost. These are powers of two chosen so the parameter count on
    32x32x3 / 10 classes (855,050) is within 5% of CVNN1's (896,522): fully connected and
    convolutional networks are then compared at about equal memory.
    """
    return _fcnn(
        (256, 256), input_shape, classes, quantize_first, quantize_head, layer, levels, quant
    )


@_registered
def fcnn2(
    input_shape: Sequence[int] = (3, 32, 32),
    classes: int = 10,
    *,
    quantize_first: bool = True,
    quantize_head: bool = True,
    layer: str = "linear",
    levels: int | None = None,
    **quant: Any,
) -> nn.Sequential:
    """Three fully connected layers, C*H*W -> 2048 -> 1024 -> classes, ReLU between.

    Sizes chosen as for ``fcnn1``: 8,401,930 parameters on 32x32x3 / 10 classes, within 5% of
    CVNN2's 8,776,330.
    """
    return _fcnn(
        (2048, 1024), input_shape, classes, quantize_first, quantize_head, layer, levels, quant
    )


# --- convolutional models ------------------------------------------------------------------------


def _cvnn(
    stages: Sequence[Sequence[int]],
    dense: int,
    input_shape: Sequence[int],
    classes: int,
    kernel_size: int,
    quantize_first: bool,
    quantize_head: bool,
    layer: str,
    levels: int | None,
    quant: dict[str, Any],
) -> nn.Sequential:
    """Stages of 'same' convs + ReLU, each ending in a 2x2 max-pool; Flatten, Dense + ReLU, head."""
    c, h, w = _input_shape(input_shape)
    _check_positive(classes=classes)
    if kernel_size not in (3, 5):
        raise ValueError(f"kernel_size must be 3 or 5, got {kernel_size!r}")
    if layer in _SEED_LAYERS:
        make_conv(1, 1, kernel_size, layer)  # raises the conv-kind error
    check_layer(layer, levels, **quant)
    side = 2 ** len(stages)
    if h < side or w < side:
        raise ValueError(
            f"input_shape {tuple(input_shape)} is too small: H and W must be >= {side}"
        )
    mods: list[nn.Module] = []
    first = True
    for stage in stages:
        for out_c in stage:
            kind = layer if (quantize_first or not first) else "linear"
            opts, lv = (quant, levels) if kind == layer else ({}, None)
            mods += [make_conv(c, out_c, kernel_size, kind, lv, **opts), nn.ReLU()]
            c, first = out_c, False
        mods.append(nn.MaxPool2d(2))  # floor: 28 -> 14 -> 7 -> 3
        h, w = h // 2, w // 2
    mods.append(nn.Flatten())  # (B, c * h * w)
    mods += _dense_stack(
        [c * h * w, dense, classes],
        layer,
        levels,
        quant,
        activation="relu",
        quantize_first=True,
        quantize_head=quantize_head,
    )
    return nn.Sequential(*mods)


@_registered
def cvnn1(
    input_shape: Sequence[int] = (3, 32, 32),
    classes: int = 10,
    *,
    kernel_size: int = 3,
    quantize_first: bool = True,
    quantize_head: bool = True,
    layer: str = "linear",
    levels: int | None = None,
    **quant: Any,
) -> nn.Sequential:
    """CVNN1: Conv64-Pool, Conv128-Pool, Conv256-Pool, Flatten, Dense128, Dense(classes).

    896,522 parameters on 32x32x3 / 10 classes with 3x3 kernels (the paper's count).
    ``quantize_first`` / ``quantize_head``: the first conv / the classifier follow ``layer``.
    """
    return _cvnn(
        [(64,), (128,), (256,)],
        128,
        input_shape,
        classes,
        kernel_size,
        quantize_first,
        quantize_head,
        layer,
        levels,
        quant,
    )


@_registered
def cvnn2(
    input_shape: Sequence[int] = (3, 32, 32),
    classes: int = 10,
    *,
    kernel_size: int = 3,
    quantize_first: bool = True,
    quantize_head: bool = True,
    layer: str = "linear",
    levels: int | None = None,
    **quant: Any,
) -> nn.Sequential:
    """CVNN2: Conv128x2-Pool, Conv256x2-Pool, Conv512x2-Pool, Flatten, Dense512, Dense(classes).

    8,776,330 parameters on 32x32x3 / 10 classes with 3x3 kernels (the paper's count).
    """
    return _cvnn(
        [(128, 128), (256, 256), (512, 512)],
        512,
        input_shape,
        classes,
        kernel_size,
        quantize_first,
        quantize_head,
        layer,
        levels,
        quant,
    )


NAMES = tuple(_REGISTRY)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (what the seed papers report)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "ACTIVATIONS",
    "CONV_LAYERS",
    "LAYERS",
    "NAMES",
    "check_layer",
    "count_parameters",
    "cvnn1",
    "cvnn2",
    "fcnn1",
    "fcnn2",
    "get",
    "make_conv",
    "make_linear",
    "mlp",
]
