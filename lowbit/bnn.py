"""Fully binary networks: the recipe pieces of BNN, XNOR-Net, Bi-Real Net and ReActNet, and a
binary MLP and CNN built from them (registered in ``lowbit.models`` as ``binary-mlp`` and
``binary-cnn``).

A binary layer is a ``QuantLinear`` / ``QuantConv2d`` with a binary input quantizer and 2-level
weights (``lowbit.nn``: an XNOR-popcount layer). The methods differ in how they binarize and in
what surrounds the binary layer (``METHODS``)::

    method     weights                       activations            around the binary layer
    ---------  ----------------------------  ---------------------  ---------------------------
    bnn        sign(w), no scale             sign (hard-tanh STE)   BatchNorm        BinaryNet
    xnor       alpha_c sign(w), alpha_c =    sign (hard-tanh STE)   BatchNorm        XNOR-Net
               mean|w| per output channel
    bireal     as xnor                       approx-sign            BatchNorm, real  Bi-Real Net
                                                                    shortcut
    reactnet   as xnor                       rsign (learnable       BatchNorm, real  ReActNet
                                             threshold)             shortcut, RPReLU

and, as references, the same networks with real-valued (ReLU) activations and weight-only
quantized layers: ``sign`` (lowbit's weight-only binary: mean|w| sign(w - mean w)), ``ternary``,
and ``linear`` (fp32, the ceiling). Every binary method uses the hard-tanh (``clipped``) STE on
the latent weights, so ``bnn`` and ``xnor`` differ only in the scaling. XNOR-Net's activation
scaling (the map K of mean |x|) is left out, as Bi-Real and ReActNet do. A BatchNorm after a
binary layer absorbs a per-channel weight scale in the forward pass; the scale still changes the
gradients, which is what the study's ``xnor`` vs ``bnn`` check measures.

First and last layers stay fp32 (as in all four papers): the MLP's first Linear and the CNN's
first convolution (the stem), and the classifier. One block (x: the block's real-valued input)::

    h = BN(binary_layer(x))                  # binary_layer binarizes x itself (its quantizer)
    h = h + shortcut(x)                      # bireal, reactnet: identity, or for a convolution
                                             #   that doubles the channels, [x, x] (ReActNet)
    h = RPReLU(h)                            # reactnet
    reference kinds: h = ReLU(BN(layer(x)))  # real activations, no shortcut

In eval mode a binary block computes the same function with its BatchNorm folded into one
multiply and one add per channel (``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean *
scale``) and everything after the binary layer written as ``lowbit.epilogue.BlockEpilogue``: the
trained (QAT) layer applies it with torch operations, a packed layer inside its XNOR-popcount
kernel, with the same float32 operations in the same order, so the two stay bit-identical.
The fold is the same function as the unfolded BatchNorm up to float rounding. The binary CNN's
fp32 stem folds its BatchNorm the same way in eval mode, applied by the first max-pooling as it
reads the stem convolution's output (``max_pool2x2``; the convolution itself stays a torch call,
which ``lowbit.summary`` counts).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import quantizers
from lowbit.epilogue import BlockEpilogue
from lowbit.kernels import binary, eager
from lowbit.nn import QuantConv2d, QuantLinear

T = TypeVar("T")


@dataclass(frozen=True)
class Method:
    """One way of building a block (see the module docstring's table)."""

    activations: str | None  # binary input quantizer name; None = real activations (ReLU)
    weights: str | None  # "unscaled" (±1), "channel" (alpha_c), "sign", "ternary"; None = fp32
    shortcut: bool = False
    rprelu: bool = False


METHODS: dict[str, Method] = {
    "bnn": Method("sign", "unscaled"),
    "xnor": Method("sign", "channel"),
    "bireal": Method("approx-sign", "channel", shortcut=True),
    "reactnet": Method("rsign", "channel", shortcut=True, rprelu=True),
    "sign": Method(None, "sign"),
    "ternary": Method(None, "ternary"),
    "linear": Method(None, None),
}
BINARY_METHODS = tuple(n for n, m in METHODS.items() if m.activations is not None)


def weight_quantizer(method: Method) -> quantizers.Quantizer | None:
    """The weight quantizer of a method's hidden layers."""
    if method.weights is None:
        return None
    if method.weights == "unscaled":  # BinaryNet: exactly ±1
        return quantizers.Quantizer(levels=2, name="sign", ste="clipped", fixed_scale=2.0)
    if method.weights == "channel":  # XNOR-Net: alpha_c sign(w), alpha_c = mean|w_c|
        return quantizers.get("sign", center=False, granularity="channel", ste="clipped")  # type: ignore[return-value]
    return quantizers.get(method.weights)  # type: ignore[return-value]


class LearnableBias(nn.Module):
    """``x + b_c``: a learnable shift per channel (ReActNet's move), b initialised to 0.
    x (..., C) with ``channel_dim=-1`` or (B, C, H, W) with ``channel_dim=1``."""

    def __init__(self, channels: int, channel_dim: int = -1) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.channel_dim = channel_dim

    def _shaped(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return p if self.channel_dim == -1 else p.reshape(-1, *([1] * (x.dim() - 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self._shaped(self.bias, x)


class RPReLU(LearnableBias):
    """ReActNet's RPReLU: ``PReLU_c(x - gamma_c) + zeta_c`` per channel::

        y = (x - gamma) + zeta            where x - gamma >= 0
        y = beta * (x - gamma) + zeta     elsewhere           beta_c initialised to 0.25

    ``bias`` (from LearnableBias) is -gamma; ``zeta`` is the shift after the PReLU."""

    def __init__(self, channels: int, channel_dim: int = -1) -> None:
        super().__init__(channels, channel_dim)
        self.slope = nn.Parameter(torch.full((channels,), 0.25))
        self.zeta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = super().forward(x)
        if self.channel_dim == 1 or x.dim() == 2:
            u = F.prelu(u, self.slope)  # one op; its slope runs along dim 1, the channels here
        else:
            u = torch.where(u >= 0, u, u * self.slope)
        return u + self._shaped(self.zeta, x)


class Shortcut(nn.Module):
    """Bi-Real's real-valued shortcut: ``x`` itself, or ``[x, x]`` along the channels when the
    block doubles them (ReActNet's duplication; no parameters). (B, C, ...) -> (B, C * k, ...)."""

    def __init__(self, in_channels: int, out_channels: int, channel_dim: int = -1) -> None:
        super().__init__()
        if out_channels % in_channels:
            raise ValueError(f"a shortcut cannot map {in_channels} to {out_channels} channels")
        self.repeat = out_channels // in_channels
        self.channel_dim = channel_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.repeat == 1 else torch.cat([x] * self.repeat, dim=self.channel_dim)


class StateCache:
    """A value computed from some tensors, kept while none of them is replaced or edited in
    place (their identities and versions) and gradients are off; with gradients on it is
    computed every call (the value must stay differentiable)."""

    def __init__(self) -> None:
        self._state: tuple[tuple[torch.Tensor, ...], list[int], object] | None = None

    def get(self, tensors: tuple[torch.Tensor, ...], compute: Callable[[], T]) -> T:
        if torch.is_grad_enabled():
            return compute()
        versions = [t._version for t in tensors]
        s = self._state
        if s is not None and s[1] == versions and all(map(operator.is_, s[0], tensors)):
            return s[2]  # type: ignore[return-value]
        value = compute()
        self._state = (tensors, versions, value)
        return value


def fold_batchnorm(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A BatchNorm on its running statistics as ``y = x * scale + shift`` per channel: scale =
    gamma / sqrt(var + eps), shift = beta - mean * scale (float32 (C,), contiguous)."""
    p, b = norm._parameters, norm._buffers  # the dicts: module attributes cost ~0.6 us each
    scale = p["weight"] / torch.sqrt(b["running_var"] + norm.eps)  # type: ignore[operator]
    return scale.contiguous(), (p["bias"] - b["running_mean"] * scale).contiguous()  # type: ignore[operator]


def _batchnorm_tensors(norm: nn.Module) -> tuple[torch.Tensor, ...]:
    p, b = norm._parameters, norm._buffers
    return (p["weight"], p["bias"], b["running_mean"], b["running_var"])  # type: ignore[return-value]


def max_pool2x2(
    x: torch.Tensor, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None
) -> torch.Tensor:
    """``MaxPool2x2``'s eval-mode pooling of x (B, C, H, W), after ``x * scale[c] + shift[c]``
    (a folded BatchNorm, two float32 roundings) when scale and shift (C,) are given: the native
    kernel where it applies, else the same values in torch; channels-last where nothing needs a
    gradient. Under a tracer (``lowbit.kernels.eager``) it pools in torch, which tracers see."""
    differentiable = torch.is_grad_enabled() and (
        x.requires_grad or (scale is not None and scale.requires_grad)
    )
    if not differentiable and eager(x):
        y = binary.maxpool2x2_channels_last(x, scale=scale, shift=shift)
        if y is not None:
            return y
    if scale is not None:
        x = x * scale.reshape(-1, 1, 1) + shift.reshape(-1, 1, 1)  # type: ignore[union-attr]
    if x.is_contiguous(memory_format=torch.channels_last):
        return F.max_pool2d(x, 2)
    x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]
    rows = torch.maximum(x[..., 0::2, :], x[..., 1::2, :])  # whole rows: contiguous reads
    if differentiable:  # (out= does not differentiate)
        return torch.maximum(rows[..., 0::2], rows[..., 1::2])
    b, c, h, w = rows.shape
    out = torch.empty(
        (b, c, h, w // 2), dtype=x.dtype, device=x.device, memory_format=torch.channels_last
    )
    return torch.maximum(rows[..., 0::2], rows[..., 1::2], out=out)


class MaxPool2x2(nn.Module):
    """2x2 max-pooling with stride 2, odd sizes floored: ``nn.MaxPool2d(2)``'s values, written
    channels-last in eval mode for the next (packed) convolution (``max_pool2x2``). At batch 1
    torch pools an NCHW image in a scalar loop (133 us for 64x28x28 on one Zen 4 core); the
    native kernel (``kernels.binary.maxpool2x2_channels_last``) reads each plane once and writes
    channels-last (64x28x28 on a Zen 2: 13 us with the call, against 58 us as two strided
    ``torch.maximum`` calls, the fallback). A channels-last image (what packed convolutions
    return) pools in torch (9 us for 128x14x14). Training keeps torch's (its gradient picks one
    input of a tie). (B, C, H, W) -> (B, C, H//2, W//2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or x.is_contiguous(memory_format=torch.channels_last):
            return F.max_pool2d(x, 2)
        return max_pool2x2(x)


class Block(nn.Module):
    """One hidden layer of a method (module docstring): (B, C_in[, H, W]) -> (B, C_out[, H, W])."""

    def __init__(self, method: str, layer: QuantLinear | QuantConv2d, out_channels: int) -> None:
        super().__init__()
        m = METHODS[method]
        conv = isinstance(layer, nn.Conv2d)
        dim = 1 if conv else -1
        in_channels = layer.weight.shape[1]
        self.layer = layer
        self.norm = nn.BatchNorm2d(out_channels) if conv else nn.BatchNorm1d(out_channels)
        self.shortcut = Shortcut(in_channels, out_channels, dim) if m.shortcut else None
        self.act: nn.Module = RPReLU(out_channels, dim) if m.rprelu else nn.Identity()
        if m.activations is None:
            self.act = nn.ReLU()
        self.binary = m.activations is not None
        self._epilogue = StateCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and self.binary and self.norm.track_running_stats:
            return self.layer(x, epilogue=self.epilogue())
        h = self.norm(self.layer(x))
        if self.shortcut is not None:
            h = h + self.shortcut(x)
        return self.act(h)

    def epilogue(self) -> BlockEpilogue:
        """BatchNorm (running statistics, folded), shortcut and RPReLU as one ``BlockEpilogue``,
        computed once per state of the parameters and buffers (without gradients)."""
        norm, act = self._modules["norm"], self._modules["act"]
        a = act._parameters  # type: ignore[union-attr]
        prelu = (a["bias"], a["slope"], a["zeta"]) if isinstance(act, RPReLU) else ()

        def compute() -> BlockEpilogue:
            scale, shift = fold_batchnorm(norm)  # type: ignore[arg-type]
            return BlockEpilogue(scale, shift, self.shortcut is not None, *prelu)  # type: ignore[arg-type]

        return self._epilogue.get((*_batchnorm_tensors(norm), *prelu), compute)  # type: ignore[arg-type]


def _check_method(method: str) -> Method:
    if method not in METHODS:
        raise ValueError(f"unknown binary method {method!r}; valid: {', '.join(METHODS)}")
    return METHODS[method]


def _stem_act(method: str) -> nn.Module:
    """ReLU after the fp32 stem for the real-activation kinds; the binary ones binarize next."""
    return nn.ReLU() if METHODS[method].activations is None else nn.Identity()


def _linear(method: str, n_in: int, n_out: int) -> QuantLinear:
    m = METHODS[method]
    return QuantLinear(
        n_in, n_out, bias=False, weight_quantizer=weight_quantizer(m), input_quantizer=m.activations
    )


@dataclass(frozen=True)
class BinaryMLPConfig:
    """The binary MLP: fp32 Linear(in, width) + BN, ``depth`` blocks of ``width``, fp32 head."""

    method: str = "reactnet"
    depth: int = 3
    width: int = 512
    input_shape: tuple[int, int, int] = (1, 28, 28)
    classes: int = 10


class BinaryMLP(nn.Module):
    """x (B, C, H, W) -> logits (B, classes); see ``BinaryMLPConfig`` and the module docstring."""

    def __init__(self, config: BinaryMLPConfig) -> None:
        super().__init__()
        _check_method(config.method)
        c, h, w = config.input_shape
        self.config = config
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, config.width))
        self.stem_norm = nn.Sequential(nn.BatchNorm1d(config.width), _stem_act(config.method))
        self.blocks = nn.Sequential(
            *(
                Block(
                    config.method, _linear(config.method, config.width, config.width), config.width
                )
                for _ in range(config.depth)
            )
        )
        self.head = nn.Linear(config.width, config.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem_norm(self.stem(x))  # (B, width), real valued
        return self.head(self.blocks(h))


@dataclass(frozen=True)
class BinaryCNNConfig:
    """The binary CNN for 28x28 or 32x32 inputs, ``w = width``: fp32 3x3 stem conv (w
    channels) + BN at full resolution, a 2x2 max-pool, 3x3 binary blocks (padding 1) of w and 2w
    channels, a 2x2 max-pool, blocks of 2w and 4w channels, global average pooling, fp32 head.
    For 28x28 and w = 64: stem 64 @28, blocks 64 @14, 128 @14, 128 @7, 256 @7."""

    method: str = "reactnet"
    width: int = 64
    input_shape: tuple[int, int, int] = (1, 28, 28)
    classes: int = 10

    @property
    def stages(self) -> tuple[tuple[int, bool], ...]:
        """(output channels, max-pool before the block) of each binary block."""
        w = self.width
        return ((w, True), (2 * w, False), (2 * w, True), (4 * w, False))


class BinaryCNN(nn.Module):
    """x (B, C, H, W) -> logits (B, classes); see ``BinaryCNNConfig``."""

    def __init__(self, config: BinaryCNNConfig) -> None:
        super().__init__()
        m = _check_method(config.method)
        self.config = config
        self.stem = nn.Sequential(
            nn.Conv2d(config.input_shape[0], config.width, 3, padding=1, bias=False),
            nn.BatchNorm2d(config.width),
            _stem_act(config.method),
        )
        blocks: list[nn.Module] = []
        c_in = config.width
        for c_out, pool in config.stages:
            if pool:
                blocks.append(MaxPool2x2())
            conv = QuantConv2d(
                c_in,
                c_out,
                3,
                padding=1,
                bias=False,
                weight_quantizer=weight_quantizer(m),
                input_quantizer=m.activations,
            )
            blocks.append(Block(config.method, conv, c_out))
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, config.classes)
        )
        # binary kinds in eval mode: the stem's BatchNorm folded into the first pooling
        self._folds_stem = m.activations is not None and config.stages[0][1]
        self._stem_fold = StateCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.stem._modules["1"]
        if self.training or not self._folds_stem or not norm.track_running_stats:  # type: ignore[union-attr]
            h = self.blocks(self.stem(x))
        else:  # binary kinds in eval mode
            # stem conv, then its BatchNorm folded (y * scale + shift) and the 2x2 max-pool in
            # one pass (lowbit.kernels.binary.maxpool2x2_channels_last): 58 -> 15 us at batch 1
            # on 64x28x28 (Zen 2)
            scale, shift = self._stem_fold.get(
                _batchnorm_tensors(norm),  # type: ignore[arg-type]
                lambda: fold_batchnorm(norm),  # type: ignore[arg-type]
            )
            h = max_pool2x2(self.stem._modules["0"](x), scale, shift)  # type: ignore[misc]
            blocks = iter(self.blocks)
            next(blocks)  # the pooling, done
            for block in blocks:
                h = block(h)
            # the head's average pooling and flattening as one mean over H, W (10 us less at
            # batch 1), then its Linear
            return self.head._modules["2"](h.mean((2, 3)))  # type: ignore[misc]
        # (B, 4 width, H/4, W/4), real valued; channels-last from the binary blocks in eval mode,
        # trained or packed (lowbit.epilogue), so their average pooling sums in the same order
        return self.head(h)


def binary_mlp(config: BinaryMLPConfig | None = None, **fields: object) -> BinaryMLP:
    """``BinaryMLP(BinaryMLPConfig(**fields))``."""
    return BinaryMLP(config or BinaryMLPConfig(**fields))  # type: ignore[arg-type]


def binary_cnn(config: BinaryCNNConfig | None = None, **fields: object) -> BinaryCNN:
    """``BinaryCNN(BinaryCNNConfig(**fields))``."""
    return BinaryCNN(config or BinaryCNNConfig(**fields))  # type: ignore[arg-type]
