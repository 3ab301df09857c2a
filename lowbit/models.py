"""The networks of the seed studies, built from any layer kind, and their registry.

``get(name, layer=..., levels=None, **kw)`` builds one of ``NAMES``. Each family's architecture is
a frozen config dataclass (nanoGPT's ``GPTConfig`` style): ``MLPConfig``, ``FCNNConfig``,
``CVNNConfig``, ``ViTConfig``; a named model is a family plus preset values (``MODELS``), and
``**kw`` sets any field of its config: ``get("vit1", patch_size=7, input_shape=(1, 28, 28))``.

=========  =======================================================================================
``mlp``    ``MLPConfig``: sign-vs-linear study, ``depth`` hidden layers of ``width`` units, head
``fcnn1``  ``FCNNConfig(hidden=(256, 256))``: Low-Resolution study, in -> 256 -> 256 -> classes
``fcnn2``  ``FCNNConfig(hidden=(2048, 1024))``: the larger one
``cvnn1``  ``CVNNConfig``: Conv64-Pool, Conv128-Pool, Conv256-Pool, Flatten, Dense128, head
``cvnn2``  ``CVNNConfig(channels=(128, 256, 512), convs=2, dense=512)``
``vit``    ``ViTConfig``: a vision transformer (defaults = VIT1)
``vit1``   ``ViTConfig(blocks=3, head_units=(2048, 1216))`` (docs/results/vit-config.md)
``vit2``   ``ViTConfig(blocks=11, head_units=(3392, 1920))``
=========  =======================================================================================

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

Every model carries ``model.lowbit_spec = {"name": ..., "kwargs": {...}}``: every field of its
config (JSON types), ``layer``, ``levels`` and the layer options given, so
``get(spec["name"], **spec["kwargs"])`` rebuilds the same architecture. Inputs are (B, C, H, W)
with ``input_shape=(C, H, W)`` (28x28x1 and 32x32x3 both
work) and ``classes`` outputs; the dataset decides both.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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


# --- configs: one frozen dataclass per family ----------------------------------------------------


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")


def _check_flag(**values: bool) -> None:
    for key, value in values.items():
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be True or False, got {value!r}")


def _tuple(value: Any) -> tuple:
    """Lists (from a JSON spec) and tuples alike, nested, as tuples."""
    return tuple(_tuple(v) if isinstance(v, (list, tuple)) else v for v in value)


class _Config:
    """What every family config shares: (C, H, W) input, class count, init, quantized ends.

    Subclasses are frozen dataclasses with these fields; ``_check`` normalises and validates
    them (ValueError naming the field), ``_family_check`` adds the family's own rules."""

    input_shape: tuple[int, int, int]
    classes: int
    init: str
    quantize_head: bool

    def __post_init__(self) -> None:
        shape = tuple(self.input_shape) if isinstance(self.input_shape, (list, tuple)) else ()
        if len(shape) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                                  for v in shape):  # fmt: skip
            raise ValueError(
                f"input_shape must be (C, H, W) with positive sizes, got {self.input_shape!r}"
            )
        object.__setattr__(self, "input_shape", shape)
        _check_positive(classes=self.classes)
        _check_flag(quantize_head=self.quantize_head)
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}; got {self.init!r}")
        self._family_check()

    def _family_check(self) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class MLPConfig(_Config):
    """The sign-vs-linear study's network: Flatten, ``depth`` x (Linear(width) [+ ReLU]), head.

    (B, C, H, W) or (B, in_features) -> (B, classes). ``depth`` counts hidden layers (0 gives a
    linear classifier); ``in_features`` defaults to C*H*W of ``input_shape``. ``activation``:
    ``"relu"`` after every hidden layer, or ``"study"`` (ReLU only after fp32 layers, the paper's
    rule: its quantized MLPs are then linear classifiers). ``init``: ``"torch"`` (PyTorch's
    defaults, as the study) or ``"glorot"``. The first / last layer follow ``layer`` unless
    ``quantize_first`` / ``quantize_head`` is False (the study swapped every layer).
    """

    depth: int = 3
    width: int = 256
    in_features: int | None = None
    classes: int = 10
    input_shape: tuple[int, int, int] = (1, 28, 28)
    activation: str = "relu"
    quantize_first: bool = True
    quantize_head: bool = True
    init: str = "torch"

    def _family_check(self) -> None:
        _check_positive(width=self.width)
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 0:
            raise ValueError(f"depth must be an integer >= 0, got {self.depth!r}")
        if self.in_features is not None:
            _check_positive(in_features=self.in_features)
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {', '.join(ACTIVATIONS)}; got {self.activation!r}"
            )
        _check_flag(quantize_first=self.quantize_first)


@dataclass(frozen=True)
class FCNNConfig(_Config):
    """The Low-Resolution study's fully connected networks: C*H*W -> hidden... -> classes, ReLU
    between, Glorot-uniform init and zero biases (Keras defaults).

    The paper's sizes were lost. FCNN1 (256, 256) and FCNN2 (2048, 1024) are powers of two chosen
    so the parameter counts on 32x32x3 / 10 classes (855,050 and 8,401,930) are within 5% of
    CVNN1's (896,522) and CVNN2's (8,776,330): fully connected and convolutional networks are then
    compared at about equal memory.
    """

    hidden: tuple[int, ...] = (256, 256)
    input_shape: tuple[int, int, int] = (3, 32, 32)
    classes: int = 10
    quantize_first: bool = True
    quantize_head: bool = True
    init: str = "glorot"

    def _family_check(self) -> None:
        object.__setattr__(self, "hidden", _tuple(self.hidden))
        _check_positive(**{f"hidden[{i}]": u for i, u in enumerate(self.hidden)})
        _check_flag(quantize_first=self.quantize_first)


@dataclass(frozen=True)
class CVNNConfig(_Config):
    """The Low-Resolution study's CNNs: stages of 'same' ``kernel_size`` convs + ReLU, each stage
    ending in a 2x2 max-pool (floor: 28 -> 14 -> 7 -> 3); Flatten, Dense(``dense``) + ReLU, head.

    Stage k has ``convs`` convolutions of ``channels[k]`` filters. CVNN1 (channels (64, 128,
    256), 1 conv per stage, dense 128) has 896,522 parameters and CVNN2 (channels (128, 256,
    512), 2 convs per stage, dense 512) 8,776,330 on 32x32x3 / 10 classes with 3x3 kernels: the
    paper's counts, recovered exactly. The paper also trains 5x5 kernels.
    """

    channels: tuple[int, ...] = (64, 128, 256)
    convs: int = 1
    dense: int = 128
    kernel_size: int = 3
    input_shape: tuple[int, int, int] = (3, 32, 32)
    classes: int = 10
    quantize_first: bool = True
    quantize_head: bool = True
    init: str = "glorot"

    def _family_check(self) -> None:
        object.__setattr__(self, "channels", _tuple(self.channels))
        _check_positive(**{f"channels[{i}]": c for i, c in enumerate(self.channels)})
        _check_positive(convs=self.convs, dense=self.dense)
        if self.kernel_size not in (3, 5):
            raise ValueError(f"kernel_size must be 3 or 5, got {self.kernel_size!r}")
        _check_flag(quantize_first=self.quantize_first)
        side = 2 ** len(self.channels)
        if min(self.input_shape[1:]) < side:
            raise ValueError(
                f"input_shape {self.input_shape} is too small: H and W must be >= {side}"
            )


POOLS = ("flatten", "mean")


@dataclass(frozen=True)
class ViTConfig(_Config):
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

    ``patch_size`` must tile the image: 28x28 inputs (Fashion-MNIST) need ``patch_size=7`` (or 4,
    14, 2); an image that does not tile is an error, never a silent crop.
    """

    input_shape: tuple[int, int, int] = (3, 32, 32)
    classes: int = 10
    patch_size: int = 8
    dim: int = 64
    heads: int = 4
    blocks: int = 3
    mlp_units: int = 256
    head_units: tuple[int, ...] = (2048, 1216)
    final_norm: bool = False
    pool: str = "flatten"
    dropout: float = 0.1
    head_dropout: float = 0.5
    quantize_patch: bool = False
    quantize_head: bool = True
    init: str = "glorot"

    def _family_check(self) -> None:
        _check_positive(
            patch_size=self.patch_size, dim=self.dim, heads=self.heads, mlp_units=self.mlp_units
        )
        if isinstance(self.blocks, bool) or not isinstance(self.blocks, int) or self.blocks < 0:
            raise ValueError(f"blocks must be an integer >= 0, got {self.blocks!r}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}; got {self.pool!r}")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        for key in ("dropout", "head_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {getattr(self, key)!r}")
        _check_flag(final_norm=self.final_norm, quantize_patch=self.quantize_patch)
        object.__setattr__(self, "head_units", tuple(int(u) for u in self.head_units))
        _check_positive(**{f"head_units[{i}]": u for i, u in enumerate(self.head_units)})
        h, w = self.input_shape[1:]
        p = self.patch_size
        if h % p or w % p:
            fits = [d for d in range(2, min(h, w) + 1) if h % d == 0 and w % d == 0]
            fix = f"pass patch_size= one of {fits}" if fits else "resize the input"
            raise ValueError(
                f"a {h}x{w} image does not tile into {p}x{p} patches; {fix} (lowbit never crops)"
            )


# --- building blocks -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerChoice:
    """The kind of a model's quantizable layers: ``kind`` (``LAYERS``), ``levels`` (nlevel) and
    the kind's keyword options (``bias``, ``spread``, ``mask``, ...)."""

    kind: str = "linear"
    levels: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_layer(self.kind, self.levels, **self.options)

    def linear(self, a: int, b: int, quantized: bool = True) -> nn.Module:
        if not quantized:
            return make_linear(a, b)
        return make_linear(a, b, self.kind, self.levels, **self.options)

    def conv(self, a: int, b: int, kernel_size: int, quantized: bool = True) -> nn.Module:
        if not quantized:
            return make_conv(a, b, kernel_size)
        return make_conv(a, b, kernel_size, self.kind, self.levels, **self.options)


def _initialise(model: nn.Module, init: str) -> nn.Module:
    """``"torch"``: PyTorch's default init (kept); ``"glorot"``: Glorot-uniform weights and zero
    biases for every Linear/Conv2d, as the Low-Resolution study (Keras defaults)."""
    if init == "glorot":
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    return model


def _dense_stack(
    sizes: Sequence[int],
    layer: LayerChoice,
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
    out: list[nn.Module] = []
    count = len(sizes) - 1
    for i in range(count):
        quantized = not ((i == 0 and not quantize_first) or (i == count - 1 and not quantize_head))
        out.append(layer.linear(sizes[i], sizes[i + 1], quantized))
        fp32 = not quantized or layer.kind == "linear"
        if i < count - 1 and (activation == "relu" or fp32):
            out.append(nn.ReLU())
    return out


# --- the families --------------------------------------------------------------------------------


def _build_mlp(cfg: MLPConfig, layer: LayerChoice) -> nn.Sequential:
    in_features = cfg.in_features or math.prod(cfg.input_shape)
    sizes = [in_features, *([cfg.width] * cfg.depth), cfg.classes]
    stack = _dense_stack(
        sizes,
        layer,
        activation=cfg.activation,
        quantize_first=cfg.quantize_first,
        quantize_head=cfg.quantize_head,
    )
    return _initialise(nn.Sequential(nn.Flatten(), *stack), cfg.init)


def _build_fcnn(cfg: FCNNConfig, layer: LayerChoice) -> nn.Sequential:
    sizes = [math.prod(cfg.input_shape), *cfg.hidden, cfg.classes]
    stack = _dense_stack(
        sizes,
        layer,
        activation="relu",
        quantize_first=cfg.quantize_first,
        quantize_head=cfg.quantize_head,
    )
    return _initialise(nn.Sequential(nn.Flatten(), *stack), cfg.init)


def _build_cvnn(cfg: CVNNConfig, layer: LayerChoice) -> nn.Sequential:
    if layer.kind in _SEED_LAYERS:
        make_conv(1, 1, cfg.kernel_size, layer.kind)  # raises the conv-kind error
    c, h, w = cfg.input_shape
    mods: list[nn.Module] = []
    first = True
    for out_c in cfg.channels:
        for _ in range(cfg.convs):
            quantized = cfg.quantize_first or not first
            mods += [layer.conv(c, out_c, cfg.kernel_size, quantized), nn.ReLU()]
            c, first = out_c, False
        mods.append(nn.MaxPool2d(2))  # floor: 28 -> 14 -> 7 -> 3
        h, w = h // 2, w // 2
    mods.append(nn.Flatten())  # (B, c * h * w)
    mods += _dense_stack(
        [c * h * w, cfg.dense, cfg.classes],
        layer,
        activation="relu",
        quantize_first=True,
        quantize_head=cfg.quantize_head,
    )
    return _initialise(nn.Sequential(*mods), cfg.init)


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

    (B, C, H, W) -> patches (B, N, p*p*C), N = (H / p) * (W / p) (``ViTConfig`` checks that the
    patches tile the image) -> Linear(p*p*C, D) + learned position embedding (N, D) ->
    ``blocks`` x Block -> LayerNorm (``final_norm``) -> flatten (B, N*D) or mean over patches
    (B, D) (``pool``) -> Dropout(head_dropout) -> GELU MLP ``head_units`` -> Linear(classes).
    """

    def __init__(self, cfg: ViTConfig, layer: LayerChoice) -> None:
        super().__init__()
        c, h, w = cfg.input_shape
        p, dim = cfg.patch_size, cfg.dim
        self.patch_size = p
        self.grid = (h // p, w // p)
        patches = self.grid[0] * self.grid[1]
        self.pool = cfg.pool
        self.embed = layer.linear(p * p * c, dim, cfg.quantize_patch)
        # Keras' Embedding initialiser: uniform(-0.05, 0.05).
        self.position = nn.Parameter(torch.empty(patches, dim).uniform_(-0.05, 0.05))
        self.blocks = nn.Sequential(
            *(
                Block(dim, cfg.heads, cfg.mlp_units, cfg.dropout, layer.linear)
                for _ in range(cfg.blocks)
            )
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6) if cfg.final_norm else nn.Identity()
        width = patches * dim if cfg.pool == "flatten" else dim
        units = cfg.head_units
        self.head = nn.Sequential(
            nn.Dropout(cfg.head_dropout),
            *_gelu_mlp([width, *units], cfg.head_dropout, layer.linear),
            layer.linear(units[-1] if units else width, cfg.classes, cfg.quantize_head),
        )

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p*p*C), each patch flattened row-major with channels last."""
        p, (gh, gw) = self.patch_size, self.grid
        b, c = x.shape[:2]
        if x.shape[2:] != (gh * p, gw * p):
            raise ValueError(
                f"input {tuple(x.shape[1:])} is not the {gh * p}x{gw * p} image this ViT was "
                "built for"
            )
        x = x.reshape(b, c, gh, p, gw, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, p * p * c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.embed(self.patches(x)) + self.position  # (B, N, D)
        z = self.norm(self.blocks(z))
        z = z.flatten(1) if self.pool == "flatten" else z.mean(dim=1)
        return self.head(z)  # (B, classes)


def _build_vit(cfg: ViTConfig, layer: LayerChoice) -> ViT:
    return _initialise(ViT(cfg, layer), cfg.init)


# --- the registry --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """A named model: its config class, the preset values, and the builder."""

    config: type[_Config]
    preset: dict[str, Any]
    build: Callable[[Any, LayerChoice], nn.Module]


MODELS: dict[str, Family] = {
    "mlp": Family(MLPConfig, {}, _build_mlp),
    "fcnn1": Family(FCNNConfig, {"hidden": (256, 256)}, _build_fcnn),
    "fcnn2": Family(FCNNConfig, {"hidden": (2048, 1024)}, _build_fcnn),
    "cvnn1": Family(CVNNConfig, {}, _build_cvnn),
    "cvnn2": Family(
        CVNNConfig, {"channels": (128, 256, 512), "convs": 2, "dense": 512}, _build_cvnn
    ),
    "vit": Family(ViTConfig, {}, _build_vit),
    "vit1": Family(ViTConfig, {"blocks": 3, "head_units": (2048, 1216)}, _build_vit),
    "vit2": Family(ViTConfig, {"blocks": 11, "head_units": (3392, 1920)}, _build_vit),
}
# the fully binary networks (lowbit.bnn): ``layer`` is their method (bnn.METHODS), not a kind
BINARY_MODELS = {"binary_mlp": bnn.BinaryMLP, "binary_cnn": bnn.BinaryCNN}
MODELS["binary_mlp"] = Family(bnn.BinaryMLPConfig, {}, lambda cfg, _: bnn.BinaryMLP(cfg))
MODELS["binary_cnn"] = Family(bnn.BinaryCNNConfig, {}, lambda cfg, _: bnn.BinaryCNN(cfg))
NAMES = tuple(MODELS)
_LAYER_OPTIONS = {"bias", *(o for opts in _OPTIONS.values() for o in opts)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def config(name: str, **fields: Any) -> _Config:
    """The config of model ``name`` with its preset and ``fields`` applied (validated)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(NAMES)}")
    family = MODELS[name]
    return family.config(**{**family.preset, **fields})


def config_fields(name: str) -> tuple[str, ...]:
    """The config fields of model ``name`` (what ``get`` accepts besides the layer options)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(NAMES)}")
    return tuple(f.name for f in dataclasses.fields(MODELS[name].config))


def get(name: str, layer: str = "linear", levels: int | None = None, **kw: Any) -> nn.Module:
    """Build model ``name`` (one of ``NAMES``) with layers of kind ``layer``.

    ``kw`` holds fields of the model's config (``depth``, ``input_shape``, ``patch_size``, ...)
    and options of the layer kind (``bias``, ``spread``, ``mask``, ...):
    ``get("mlp", depth=3, width=256, layer="ternary")``; ``get("cvnn1", layer="nlevel",
    levels=5, input_shape=(3, 32, 32), classes=10)``. Unknown names, kinds or options raise
    ValueError listing the valid ones.
    """
    fields = config_fields(name)
    unknown = sorted(k for k in kw if k not in fields and k not in _LAYER_OPTIONS)
    if unknown:
        raise ValueError(
            f"model {name!r} has no argument(s) {', '.join(unknown)}; its arguments: layer, "
            f"levels, {', '.join(fields)} (and the layer kind's options)"
        )
    options = {k: v for k, v in kw.items() if k not in fields}
    if name in BINARY_MODELS:
        if layer not in bnn.METHODS:
            raise ValueError(f"unknown binary method {layer!r}; valid: {', '.join(bnn.METHODS)}")
        if levels is not None or options:
            raise ValueError("binary models fix their levels and options; leave levels unset")
        given = {k: v for k, v in kw.items() if k in fields and k != "method"}
        cfg = config(name, **given, method=layer)
        model = MODELS[name].build(cfg, None)
        spec = {k: _jsonable(v) for k, v in dataclasses.asdict(cfg).items() if k != "method"}
        model.lowbit_spec = {"name": name, "kwargs": {**spec, "layer": layer, "levels": None}}
        return model
    choice = LayerChoice(layer, levels, options)
    cfg = config(name, **{k: v for k, v in kw.items() if k in fields})
    model = MODELS[name].build(cfg, choice)
    spec = {k: _jsonable(v) for k, v in dataclasses.asdict(cfg).items()}
    model.lowbit_spec = {
        "name": name,
        "kwargs": {**spec, "layer": layer, "levels": levels, **options},
    }
    return model


# ``models.mlp(depth=2, width=8, layer="ternary")``: each name as a function of its config fields
mlp, fcnn1, fcnn2, cvnn1, cvnn2, vit, vit1, vit2, binary_mlp, binary_cnn = (
    functools.partial(get, n) for n in NAMES
)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (what the seed papers report)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "ACTIVATIONS",
    "CONV_LAYERS",
    "CVNNConfig",
    "FCNNConfig",
    "LAYERS",
    "MLPConfig",
    "MODELS",
    "NAMES",
    "ViTConfig",
    "check_layer",
    "config",
    "count_parameters",
    "cvnn1",
    "cvnn2",
    "default_bias",
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
