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
``ste``, ``center`` for the quantizers; the seed layers' own flags, e.g. ``mask="weight"``), and
``bias`` for every kind: None (default) gives a bias to every layer except ``bitlinear8`` and
``mybitlinear``, which follow kyegomez/BitNet 0.2.5 in having none (see ``default_bias``).

Scales: the quantized kinds keep their quantizer's definition, one scale per weight tensor
(``ternary`` is BitNet b1.58's per-tensor absmean, ``nlevel`` the Low-Resolution study's mean|W|),
so ``layer="ternary"`` is the layer ``QuantLinear(..., weight_quantizer="ternary")`` and
``QATConfig(levels=3, quantizer="ternary")`` build. ``granularity="channel"`` gives one scale per
output row/filter (XNOR-Net's scaling). On the Fashion-MNIST MLP it gains 0.2 point (ternary) to
0.5 point (5 levels) over 10 seeds, about one to two standard errors (docs/results/accuracy.md);
it stays an option, not the default: the studies reproduce the papers' per-tensor layers, and a
saved model spec omits options left at their default, so changing one would rebuild old
checkpoints with a quantizer they were not trained with.

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
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import bnn, quantizers
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
INITS = ("torch", "glorot")

_SEED_LAYERS: dict[str, type[QuantLinear]] = {
    "bitlinear8": BitLinear8,
    "mybitlinear": SignLinear,
    "misborn": MisbornLinear,
}
# Keyword options each layer kind accepts through ``**quant`` (besides ``bias``, which all take).
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
    bias = quant.pop("bias", None)
    if bias is not None and not isinstance(bias, bool):
        raise ValueError(f"bias must be True, False or None (the kind's default), got {bias!r}")
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


def default_bias(layer: str) -> bool:
    """Whether layers of kind ``layer`` get a bias when ``bias`` is not given.

    False for ``bitlinear8`` and ``mybitlinear``: kyegomez/BitNet 0.2.5 (the code the
    sign-vs-linear study used) drops the bias, and its input norm scales each token to L2 norm
    d**-0.5, so a layer's output is O(1/d) while a bias starts at O(d**-0.5): with a bias the
    signal is swamped and an MLP barely learns (measured in docs/results/seed-layers.md). The
    layers themselves apply a bias when they have one. True for every other kind.
    """
    return layer not in ("bitlinear8", "mybitlinear")


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
    bias: bool | None = None,
    **quant: Any,
) -> nn.Linear:
    """A fully connected layer of kind ``layer``: (..., in_features) -> (..., out_features).

    ``bias=None`` takes the kind's default (``default_bias``)."""
    check_layer(layer, levels, **quant)
    bias = default_bias(layer) if bias is None else bias
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
    bias: bool | None = None,
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
    bias = default_bias(layer) if bias is None else bias
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
    layer_options = {"bias", *(o for opts in _OPTIONS.values() for o in opts)}
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


def _initialise(model: nn.Module, init: str) -> nn.Module:
    """``"torch"``: PyTorch's default init (kept); ``"glorot"``: Glorot-uniform weights and zero
    biases for every Linear/Conv2d, as the Low-Resolution study (Keras defaults)."""
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}; got {init!r}")
    if init == "glorot":
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    return model


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
    init: str = "torch",
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
    ``init``: ``"torch"`` (PyTorch defaults, as the study) or ``"glorot"``.
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
    model = nn.Sequential(
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
    return _initialise(model, init)


def _fcnn(
    hidden: tuple[int, int],
    input_shape: Sequence[int],
    classes: int,
    quantize_first: bool,
    quantize_head: bool,
    init: str,
    layer: str,
    levels: int | None,
    quant: dict[str, Any],
) -> nn.Sequential:
    _check_positive(classes=classes)
    check_layer(layer, levels, **quant)
    sizes = [math.prod(_input_shape(input_shape)), *hidden, classes]
    model = nn.Sequential(
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
    return _initialise(model, init)


@_registered
def fcnn1(
    input_shape: Sequence[int] = (3, 32, 32),
    classes: int = 10,
    *,
    quantize_first: bool = True,
    quantize_head: bool = True,
    init: str = "glorot",
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
        (256, 256), input_shape, classes, quantize_first, quantize_head, init, layer, levels, quant
    )


@_registered
def fcnn2(
    input_shape: Sequence[int] = (3, 32, 32),
    classes: int = 10,
    *,
    quantize_first: bool = True,
    quantize_head: bool = True,
    init: str = "glorot",
    layer: str = "linear",
    levels: int | None = None,
    **quant: Any,
) -> nn.Sequential:
    """Three fully connected layers, C*H*W -> 2048 -> 1024 -> classes, ReLU between.

    Sizes chosen as for ``fcnn1``: 8,401,930 parameters on 32x32x3 / 10 classes, within 5% of
    CVNN2's 8,776,330.
    """
    return _fcnn(
        (2048, 1024),
        input_shape,
        classes,
        quantize_first,
        quantize_head,
        init,
        layer,
        levels,
        quant,
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
    init: str,
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
    return _initialise(nn.Sequential(*mods), init)


@_registered
def cvnn1(
    input_shape: Sequence[int] = (3, 32, 32),
    classes: int = 10,
    *,
    kernel_size: int = 3,
    quantize_first: bool = True,
    quantize_head: bool = True,
    init: str = "glorot",
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
        init,
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
    init: str = "glorot",
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
        init,
        layer,
        levels,
        quant,
    )


# --- vision transformer --------------------------------------------------------------------------

LinearFactory = Callable[[int, int], nn.Module]


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v and output projections.

    Written out (not ``nn.MultiheadAttention``) so each projection is an ordinary layer of the
    model's kind, quantized on its own like the paper's fully connected layers. Shapes:
    (B, T, D) -> q, k, v (B, H, T, D/H) -> softmax(q k^T / sqrt(D/H)) v -> (B, T, D) -> proj.
    Dropout acts on the attention probabilities (as Keras' MultiHeadAttention).
    """

    def __init__(self, dim: int, heads: int, dropout: float, linear: LinearFactory) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads, self.dropout = heads, dropout
        self.q, self.k, self.v = linear(dim, dim), linear(dim, dim), linear(dim, dim)
        self.proj = linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, H, T, D/H)
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            split(self.q(x)),
            split(self.k(x)),
            split(self.v(x)),
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


def _gelu_mlp(sizes: Sequence[int], dropout: float, linear: LinearFactory) -> nn.Sequential:
    """Dense + GELU + Dropout for each step sizes[i] -> sizes[i+1] (the Keras example's ``mlp``)."""
    mods: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        mods += [linear(a, b), nn.GELU(), nn.Dropout(dropout)]
    return nn.Sequential(*mods)


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)); (B, T, D) -> (B, T, D)."""

    def __init__(
        self, dim: int, heads: int, mlp_units: int, dropout: float, linear: LinearFactory
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, dropout, linear)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _gelu_mlp([dim, mlp_units, dim], dropout, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patches -> patch encoder -> transformer blocks -> [LayerNorm] -> head MLP -> logits.

    (B, C, H, W) -> patches (B, N, p*p*C), N = (H // p) * (W // p) (the remainder is cropped, as
    Keras' VALID patch extraction) -> Linear(p*p*C, D) + learned position embedding (N, D) ->
    ``blocks`` x Block -> LayerNorm (``final_norm``) -> flatten (B, N*D) or mean over patches
    (B, D) (``pool``) -> Dropout(head_dropout) -> GELU MLP ``head_units`` -> Linear(classes).
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        classes: int,
        *,
        patch_size: int,
        dim: int,
        heads: int,
        blocks: int,
        mlp_units: int,
        head_units: Sequence[int],
        final_norm: bool,
        pool: str,
        dropout: float,
        head_dropout: float,
        linear: LinearFactory,
        patch_linear: LinearFactory,
        head_linear: LinearFactory,
    ) -> None:
        super().__init__()
        c, h, w = input_shape
        self.patch_size = patch_size
        self.grid = (h // patch_size, w // patch_size)
        patches = self.grid[0] * self.grid[1]
        self.pool = pool
        self.embed = patch_linear(patch_size * patch_size * c, dim)
        # Keras' Embedding initialiser: uniform(-0.05, 0.05).
        self.position = nn.Parameter(torch.empty(patches, dim).uniform_(-0.05, 0.05))
        self.blocks = nn.Sequential(
            *(Block(dim, heads, mlp_units, dropout, linear) for _ in range(blocks))
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6) if final_norm else nn.Identity()
        width = patches * dim if pool == "flatten" else dim
        self.head = nn.Sequential(
            nn.Dropout(head_dropout),
            *_gelu_mlp([width, *head_units], head_dropout, linear),
            head_linear(head_units[-1] if head_units else width, classes),
        )

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p*p*C), each patch flattened row-major with channels last."""
        p, (gh, gw) = self.patch_size, self.grid
        b, c = x.shape[:2]
        x = x[:, :, : gh * p, : gw * p].reshape(b, c, gh, p, gw, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, p * p * c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.embed(self.patches(x)) + self.position  # (B, N, D)
        z = self.norm(self.blocks(z))
        z = z.flatten(1) if self.pool == "flatten" else z.mean(dim=1)
        return self.head(z)  # (B, classes)


POOLS = ("flatten", "mean")


@_registered
def vit(
    input_shape: Sequence[int] = (3, 32, 32),
    classes: int = 10,
    *,
    patch_size: int = 8,
    dim: int = 64,
    heads: int = 4,
    blocks: int = 3,
    mlp_units: int = 256,
    head_units: Sequence[int] = (2048, 1216),
    final_norm: bool = False,
    pool: str = "flatten",
    dropout: float = 0.1,
    head_dropout: float = 0.5,
    quantize_patch: bool = False,
    quantize_head: bool = True,
    init: str = "glorot",
    layer: str = "linear",
    levels: int | None = None,
    **quant: Any,
) -> ViT:
    """A vision transformer (see ``ViT``); the defaults are VIT1.

    Quantized (kind ``layer``): q, k, v and output projections, the blocks' MLPs, the head MLP and
    the classifier (``quantize_head``). fp32: the patch embedding (``quantize_patch=False``, as the
    paper), the position embedding, every LayerNorm and all biases.

    VIT1/VIT2 (the paper's Table 2 was lost) are exact matches of its parameter counts found by
    ``benchmarks/vit_config_search.py`` (docs/results/vit-config.md): 32x32x3 input, 8x8
    patches (16), D = 64, 4 heads, block MLP 256 = 4D, flatten head without final LayerNorm;
    VIT1 has 3 blocks and head units (2048, 1216) = 4,766,282 parameters, VIT2 11 blocks and
    (3392, 1920) = 10,573,770. The two differ only in blocks and units, as the paper says; the
    counts do not identify the architecture (many other exact matches exist), so this is one
    consistent choice, not a recovery.

    On 28x28 inputs 8x8 patches crop the last 4 rows and columns (3x3 patches); pass
    ``patch_size=7`` to cover the whole image with 4x4 patches.
    """
    shape = _input_shape(input_shape)
    _check_positive(
        classes=classes, patch_size=patch_size, dim=dim, heads=heads, mlp_units=mlp_units
    )
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0:
        raise ValueError(f"blocks must be an integer >= 0, got {blocks!r}")
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}; got {pool!r}")
    if patch_size > min(shape[1:]):
        raise ValueError(f"patch_size {patch_size} is larger than the image {shape[1:]}")
    for key, rate in (("dropout", dropout), ("head_dropout", head_dropout)):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"{key} must be in [0, 1), got {rate!r}")
    head_units = [int(u) for u in head_units]
    _check_positive(**{f"head_units[{i}]": u for i, u in enumerate(head_units)})
    check_layer(layer, levels, **quant)

    def quantized(a: int, b: int) -> nn.Module:
        return make_linear(a, b, layer, levels, **quant)

    def fp32(a: int, b: int) -> nn.Module:
        return nn.Linear(a, b)

    model = ViT(
        shape,
        classes,
        patch_size=patch_size,
        dim=dim,
        heads=heads,
        blocks=blocks,
        mlp_units=mlp_units,
        head_units=head_units,
        final_norm=final_norm,
        pool=pool,
        dropout=dropout,
        head_dropout=head_dropout,
        linear=quantized,
        patch_linear=quantized if quantize_patch else fp32,
        head_linear=quantized if quantize_head else fp32,
    )
    return _initialise(model, init)


def _preset(name: str, doc: str, **preset: Any) -> Callable[..., nn.Module]:
    """A registered model that is ``vit`` with other defaults (every argument still overridable)."""
    base = inspect.signature(vit)
    params = [
        p.replace(default=preset[p.name]) if p.name in preset else p
        for p in base.parameters.values()
    ]

    def build(*args: Any, **kwargs: Any) -> nn.Module:
        bound = build.__signature__.bind(*args, **kwargs)  # type: ignore[attr-defined]
        bound.apply_defaults()
        kw = dict(bound.arguments)
        kw.update(kw.pop("quant", {}))
        return vit.__wrapped__(**kw)  # type: ignore[attr-defined]

    build.__name__ = build.__qualname__ = name
    build.__doc__ = doc
    build.__signature__ = base.replace(parameters=params)  # type: ignore[attr-defined]
    return _registered(build)


vit1 = _preset(
    "vit1",
    "VIT1 of the Low-Resolution study: ``vit`` with 3 blocks, head units (2048, 1216); "
    "4,766,282 parameters on 32x32x3 / 10 classes.",
    blocks=3,
    head_units=(2048, 1216),
)
vit2 = _preset(
    "vit2",
    "VIT2 of the Low-Resolution study: ``vit`` with 11 blocks, head units (3392, 1920); "
    "10,573,770 parameters on 32x32x3 / 10 classes.",
    blocks=11,
    head_units=(3392, 1920),
)


# --- fully binary networks (lowbit.bnn: the methods, blocks and configs) -------------------------


def _binary_method(layer: str, levels: int | None) -> str:
    if layer not in bnn.METHODS:
        raise ValueError(f"unknown binary method {layer!r}; valid: {', '.join(bnn.METHODS)}")
    if levels is not None:
        raise ValueError(f"binary models fix their levels; leave levels unset (got {levels})")
    return layer


@_registered
def binary_mlp(
    layer: str = "reactnet",
    levels: int | None = None,
    depth: int = 3,
    width: int = 512,
    input_shape: Sequence[int] = (1, 28, 28),
    classes: int = 10,
) -> nn.Module:
    """``lowbit.bnn.BinaryMLP``: fp32 first layer and head, ``depth`` hidden blocks of
    ``width`` of method ``layer`` (``bnn.METHODS``: bnn, xnor, bireal, reactnet, or the
    references sign, ternary, linear)."""
    _check_positive(depth=depth, width=width, classes=classes)
    config = bnn.BinaryMLPConfig(
        _binary_method(layer, levels), depth, width, _input_shape(input_shape), classes
    )
    return bnn.BinaryMLP(config)


@_registered
def binary_cnn(
    layer: str = "reactnet",
    levels: int | None = None,
    width: int = 64,
    input_shape: Sequence[int] = (1, 28, 28),
    classes: int = 10,
) -> nn.Module:
    """``lowbit.bnn.BinaryCNN``: fp32 stem conv and head, four 3x3 binary blocks of ``width``,
    2 ``width``, 2 ``width``, 4 ``width`` channels (28x28 or 32x32 inputs)."""
    _check_positive(width=width, classes=classes)
    config = bnn.BinaryCNNConfig(
        _binary_method(layer, levels), width, _input_shape(input_shape), classes
    )
    return bnn.BinaryCNN(config)


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
    "default_bias",
    "cvnn1",
    "cvnn2",
    "fcnn1",
    "fcnn2",
    "get",
    "make_conv",
    "make_linear",
    "mlp",
    "vit",
    "vit1",
    "vit2",
]
