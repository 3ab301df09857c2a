"""Weight and activation quantizers with straight-through estimators.

Every weight quantizer in lowbit maps a latent fp32 tensor ``w`` onto a uniform grid of ``N``
levels (``N = levels``, 2..256) times a positive step ``scale``::

    w_hat = scale * level,    level in  {-L, ..., L}            for odd N,  L = (N - 1) / 2
                              level in  {±0.5, ±1.5, ..., ±L}    for even N (no zero)

    code  = level + (N - 1) / 2        in 0..N-1, increasing with the level

so ``dequantize(*codes(w)) == q(w)`` holds bit for bit (``code - (N-1)/2`` recovers the level
exactly in float). The quantizers differ only in how ``scale`` is chosen and in centering:

=================  ==========================================  ================================
name               scale (step between levels)                 paper
=================  ==========================================  ================================
``sign``           2 * mean|w|  (value = ±mean|w|)             BinaryConnect / BitNet (kyegomez)
``ternary``        mean|w|                                     BitNet b1.58 (absmean)
``ternary-median`` median|w|                                   BitNet b1.58 Reloaded
``nlevel``         mean|w| / lambda                            Low-Resolution Neural Networks
=================  ==========================================  ================================

and the level is ``clip(round(s), -L, L)`` for odd N or ``clip(floor(s) + 0.5, -L, L)`` for even N,
with ``s = (w - c) / scale`` (``c = mean(w)`` when centering, else 0). For ``nlevel`` with N = 3 and
lambda = 1 this is exactly ``ternary``; for N = 2 the rule gives +0.5 for ``s >= 0``, i.e.
``sign(0) = +1``.

Gradients (straight-through estimator, the latent weight receives the output gradient):

* ``ste="identity"``: dL/dw = dL/dw_hat.
* ``ste="clipped"``:  dL/dw = dL/dw_hat * 1[|w - c| <= scale * N / 2], zero outside the range
  covered by the outermost level's rounding bin (BinaryNet's hard-tanh rule, generalised).

The scale itself receives no gradient (as in BitNet's ``w + (q(w) - w).detach()``). The forward
value is produced by an autograd function rather than ``w + (q - w).detach()`` because the latter
is off by one ulp in float, which would break the exact ``dequantize`` round trip.

A scale of zero (an all-zero tensor) is clamped to ``EPS`` so nothing divides by zero: zero weights
quantize to level 0 (odd N) or to ±0.5 * EPS (even N) and never produce NaN.

Binary activations (``get_activation``; weights and activations in {-1, +1} make a dot product an
XNOR-popcount, see ``lowbit.kernels.binary``). Forward, for every kind::

    x_b = sign(x - t) = +1 if x >= t else -1         sign(0) = +1 (the 2-level convention above:
                                                     code 1 = +1 for x >= t, code 0 = -1)

with ``t = 0`` except for ``rsign``. Choosing +1 at zero matches the weights' N = 2 rule and makes
a zero-padded input binarize to +1, which is why binary convolutions pad with +1 (``nn``). The
kinds differ in the threshold and in the pseudo-gradient handed to ``x`` (u = x - t):

===============  =============================================  ==================================
name             dL/dx = dL/dx_b * g(u)                         paper
===============  =============================================  ==================================
``sign``         g = 1[|u| <= 1]   (hard-tanh STE)              BinaryNet (Courbariaux, Hubara
                                                                et al. 2016)
``approx-sign``  g = (2 - 2|u|) 1[|u| < 1], the derivative of   Bi-Real Net (Liu et al. 2018)
                 the piecewise polynomial F(u) = 2u - u|u| on
                 |u| < 1, sign(u) outside
``rsign``        as ``approx-sign``; ``t`` is a learnable       ReActNet (Liu et al. 2020)
                 threshold per channel, dL/dt = -sum dL/du
===============  =============================================  ==================================

The hard-tanh STE is the gradient of clip(u, -1, 1); Bi-Real's polynomial is a closer fit of sign
(its gradient peaks at u = 0 and falls linearly), which the paper found to train better.

``absmax8`` is the per-token 8-bit activation quantizer of BitNet: ``s = 127 / max|x|`` over the
last dimension, ``x_hat = clip(round(x * s), -128, 127) / s``. Its levels are -127..127
(N = 255, the odd convention); unlike the weight quantizers its ``scale`` is the multiplier
``s``, so ``dequantize(codes, s) = (codes - 127) / s``, reproducing BitNet's arithmetic exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

EPS = 1e-8
"""Smallest scale: guards all-zero tensors against division by zero."""

GRANULARITIES = ("tensor", "channel")
STES = ("identity", "clipped")
SCALE_STATS = ("absmean", "absmedian")
MAX_LEVELS = 256
"""Level counts are 2..MAX_LEVELS (codes fit a uint8)."""
FIXED_LEVELS = {"sign": 2, "ternary": 3, "ternary-median": 3}
"""The quantizers whose level count is part of their definition; ``nlevel`` takes any."""
ACTIVATION_MODES = ("fp32", "int8", "binary")
"""How a packed layer takes its input: float32 as given, absmax8 integers per token (the
input quantizer ``absmax8``; exact integer dot products, ``lowbit.integer``), or binarized to
±1 against a threshold (the binary activations below; XNOR-popcount, ``lowbit.kernels.binary``)."""


def check_levels(levels: Any, what: str = "levels") -> int:
    """``levels`` if it is an integer in 2..MAX_LEVELS, else ValueError naming ``what``."""
    if isinstance(levels, bool) or not isinstance(levels, int) or not 2 <= levels <= MAX_LEVELS:
        raise ValueError(f"{what} must be an integer in 2..{MAX_LEVELS}, got {levels!r}")
    return levels


def check_choice(what: str, value: Any, choices: tuple[str, ...]) -> Any:
    """``value`` if it is one of ``choices``, else ValueError naming the option and the choices."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)}; got {value!r}")
    return value


def check_activation_mode(mode: Any) -> str:
    """``mode`` if it is one of ``ACTIVATION_MODES``, else ValueError."""
    return check_choice("activations", mode, ACTIVATION_MODES)


class _StraightThrough(torch.autograd.Function):
    """Forward returns ``w_hat``; backward hands ``grad * mask`` to the latent ``w``."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, w_hat: torch.Tensor, mask: torch.Tensor | None):
        ctx.save_for_backward(mask if mask is not None else torch.empty(0))
        ctx.has_mask = mask is not None
        return w_hat

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        if not ctx.has_mask:
            return grad, None, None
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None


def straight_through(w: torch.Tensor, w_hat: torch.Tensor, mask: torch.Tensor | None = None):
    """Value ``w_hat`` (exactly), gradient to ``w`` (times ``mask`` where given)."""
    return _StraightThrough.apply(w, w_hat.detach(), mask)


def _reduce_dims(w: torch.Tensor, granularity: str) -> tuple[int, ...] | None:
    """Dimensions a statistic is taken over: all (per tensor) or all but dim 0 (per channel)."""
    if granularity == "tensor" or w.dim() < 2:
        return None
    return tuple(range(1, w.dim()))


def _abs_stat(w: torch.Tensor, stat: str, granularity: str) -> torch.Tensor:
    """mean|w| or median|w| per tensor (shape ()) or per output channel (shape (C, 1, ..., 1))."""
    a = w.abs()
    dims = _reduce_dims(a, granularity)
    if stat == "absmean":
        return a.mean() if dims is None else a.mean(dim=dims, keepdim=True)
    if dims is None:
        return a.median()
    flat = a.reshape(a.shape[0], -1).median(dim=1).values
    return flat.reshape((-1,) + (1,) * (a.dim() - 1))


def _center(w: torch.Tensor, granularity: str) -> torch.Tensor:
    dims = _reduce_dims(w, granularity)
    return w.mean() if dims is None else w.mean(dim=dims, keepdim=True)


def level_values(levels: int) -> torch.Tensor:
    """The level set of the project's convention, in code order: shape (levels,), float32."""
    return torch.arange(levels, dtype=torch.float32) - (levels - 1) / 2


@dataclass(frozen=True)
class Quantizer:
    """A uniform weight quantizer: ``w_hat = scale * level`` (see the module docstring).

    Args:
        levels: N, the number of values (2..256).
        spread: lambda; ``scale = stat(|w|) / spread``. 1 for ternary, 0.5 for sign.
        stat: ``"absmean"`` or ``"absmedian"``, the statistic of |w| the scale comes from.
        center: subtract ``mean(w)`` before quantizing (the value is not shifted back).
        granularity: ``"tensor"`` (scale shape ()) or ``"channel"`` (one per output row/filter,
            shape (C, 1, ..., 1)).
        ste: ``"identity"`` or ``"clipped"`` straight-through gradient.
        name: the registry name, for display.
        fixed_scale: when given, the step is this constant instead of ``stat(|w|) / spread``
            (e.g. ``levels=2, fixed_scale=2.0`` gives values exactly ±1, the 1-bit layers of the
            sign-vs-linear study); ``codes``/``dequantize`` stay exact.
    """

    levels: int
    spread: float = 1.0
    stat: str = "absmean"
    center: bool = False
    granularity: str = "tensor"
    ste: str = "identity"
    name: str = "nlevel"
    fixed_scale: float | None = None

    def __post_init__(self) -> None:
        check_levels(self.levels)
        if not self.spread > 0:
            raise ValueError(f"spread (lambda) must be > 0, got {self.spread!r}")
        if self.fixed_scale is not None and not self.fixed_scale > 0:
            raise ValueError(f"fixed_scale must be > 0, got {self.fixed_scale!r}")
        check_choice("stat", self.stat, SCALE_STATS)
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_choice("ste", self.ste, STES)

    @property
    def bits(self) -> float:
        """Nominal bits per weight, log2(levels)."""
        return math.log2(self.levels)

    @property
    def half_range(self) -> float:
        """L = (N - 1) / 2, the largest level."""
        return (self.levels - 1) / 2

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        """The step between levels, ``stat(|w|) / spread`` clamped to ``EPS``; detached.

        The statistic is taken on the uncentered ``w``, as BitNet does (beta = mean|W|).
        With ``fixed_scale`` the step is that constant (shape (), dtype and device of ``w``)."""
        if self.fixed_scale is not None:
            return torch.tensor(self.fixed_scale, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            return (_abs_stat(w, self.stat, self.granularity) / self.spread).clamp_min(EPS)

    def _levels(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Float level per weight, same shape as ``w`` (a new tensor; ``w`` is not modified).

        One allocation, then in-place passes: this runs on every training step, and fresh
        4 MB temporaries per op cost as much as the arithmetic (same values as out-of-place)."""
        if self.center:
            s = (w - _center(w, self.granularity)).div_(scale)
        else:
            s = w / scale
        if self.levels % 2:
            s.round_()
        else:
            s.floor_().add_(0.5)
        return s.clamp_(-self.half_range, self.half_range)

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        """Fake-quantize: forward value ``scale * level``, straight-through gradient to ``w``.

        The value is computed once per version of a leaf ``w`` (a parameter): a weight not
        updated since the last call (same tensor, storage and ``_version``; every in-place op
        bumps the version, the optimizer's included) reuses it, so a step that runs a layer
        several times, or an evaluation pass, quantizes once. Writes through ``w.data`` bypass
        the version counter: after ``p.data.copy_(...)`` call ``clear_cache()``."""
        w_hat, mask, cached = self._quantized(w)
        if not w.requires_grad:
            return w_hat.clone() if cached else w_hat  # the caller may write into it
        return straight_through(w, w_hat, mask)

    def _quantized(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """(w_hat, the clipped-STE mask or None, whether the cache holds them)."""
        key = _cache_key(w, self)
        if key is not None:
            hit = _quantized_cache.get(w)
            if hit is not None and hit[0] == key:
                return hit[1], hit[2], True
        scale = self.scale(w)
        with torch.no_grad():
            w_hat = self._levels(w, scale).mul_(scale)
            mask = None
            if self.ste == "clipped":
                c = _center(w, self.granularity) if self.center else 0.0
                mask = ((w - c).abs() <= scale * (self.levels / 2)).to(w.dtype)
        if key is not None:
            _quantized_cache[w] = (key, w_hat, mask)
        return w_hat, mask, key is not None

    def codes(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer codes (uint8, same shape as ``w``, values 0..N-1) and the scale."""
        with torch.no_grad():
            scale = self.scale(w)
            codes = self._levels(w, scale) + self.half_range
            return codes.to(torch.uint8), scale

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``scale * (codes - (N-1)/2)``: equals ``self(w)`` exactly for ``codes(w)``'s output."""
        return (codes.to(scale.dtype) - self.half_range) * scale


# latent weight -> (key, w_hat, mask): the last fake-quantized value of each weight tensor, held
# weakly (the entry dies with the tensor) and valid while the key matches (see _cache_key)
_quantized_cache: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _cache_key(w: torch.Tensor, quantizer: Quantizer) -> tuple | None:
    """What a cached value depends on: the tensor's version counter (bumped by every in-place
    update, the optimizer's included), its storage, shape and dtype, and the quantizer; None
    (no caching) for anything but a parameter (a derived tensor is new at every call) and
    under tracing."""
    if not isinstance(w, torch.nn.Parameter):
        return None
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return None
    return (w._version, w.data_ptr(), tuple(w.shape), w.dtype, w.device, quantizer)


def clear_cache() -> None:
    """Forget every cached fake-quantized weight (needed only after writes through ``.data``)."""
    _quantized_cache.clear()


@dataclass(frozen=True)
class AbsMax8:
    """Per-token 8-bit absmax activation quantizer (BitNet): levels -127..127 over the token.

    ``s = 127 / clamp(max|x|, 1e-5)`` over ``dim`` (the last by default; kept as size 1),
    ``x_hat = clip(round(x s), -128, 127) / s`` with an identity straight-through gradient.
    ``QuantConv2d`` passes ``dim=(-3, -2, -1)``: a convolution's token is its whole input image,
    so that the im2col patches hold integers of one scale (exact integer kernels).
    """

    levels: int = 255
    name: str = "absmax8"

    @property
    def bits(self) -> float:
        return math.log2(self.levels)

    def scale(self, x: torch.Tensor, dim: int | tuple[int, ...] = -1) -> torch.Tensor:
        with torch.no_grad():
            return 127.0 / x.abs().amax(dim=dim, keepdim=True).clamp(min=1e-5)

    def __call__(self, x: torch.Tensor, dim: int | tuple[int, ...] = -1) -> torch.Tensor:
        with torch.no_grad():
            s = self.scale(x, dim)
            x_hat = (x * s).round().clamp(-128, 127) / s
        return straight_through(x, x_hat) if x.requires_grad else x_hat

    def codes(
        self, x: torch.Tensor, dim: int | tuple[int, ...] = -1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            s = self.scale(x, dim)
            return ((x * s).round().clamp(-127, 127) + 127).to(torch.uint8), s

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (codes.to(scale.dtype) - 127) / scale


BINARY_STES = ("htanh", "approx")


def _binary_grad(u: torch.Tensor, ste: str) -> torch.Tensor:
    """g(u) of the module docstring: hard-tanh 1[|u| <= 1] or Bi-Real's (2 - 2|u|)+."""
    if ste == "htanh":
        return (u.abs() <= 1).to(u.dtype)
    return (2 - 2 * u.abs()).clamp_(min=0)


class _BinarySign(torch.autograd.Function):
    """Forward ``where(x < t, -1, +1)``; backward ``g(x - t)`` to x, its negated sum to t."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, t: torch.Tensor, ste: str) -> torch.Tensor:
        ctx.save_for_backward(x, t)
        ctx.ste = ste
        # x < t, not x - t < 0: the comparison the kernels make (identical for finite values)
        return torch.where(x < t, -1.0, 1.0).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        x, t = ctx.saved_tensors
        gx = grad * _binary_grad(x - t, ctx.ste)
        gt = -gx.sum_to_size(t.shape) if ctx.needs_input_grad[1] else None
        return gx, gt, None


def binary_sign(
    x: torch.Tensor, threshold: torch.Tensor | None = None, ste: str = "htanh"
) -> torch.Tensor:
    """``sign(x - threshold)`` in {-1, +1} with sign(0) = +1 (same shape and dtype as ``x``);
    the pseudo-gradient ``ste`` ("htanh" or "approx", see the module docstring) goes to ``x`` and
    to ``threshold`` (broadcastable to ``x``; None = 0)."""
    if ste not in BINARY_STES:
        raise ValueError(f"ste must be one of {', '.join(BINARY_STES)}; got {ste!r}")
    t = x.new_zeros(()) if threshold is None else threshold
    if not (x.requires_grad or t.requires_grad) or not torch.is_grad_enabled():
        return torch.where(x < t, -1.0, 1.0).to(x.dtype)
    return _BinarySign.apply(x, t, ste)


@dataclass(frozen=True)
class BinaryActivation:
    """``sign`` (hard-tanh STE) or ``approx-sign`` (Bi-Real's gradient): x -> {-1, +1}.

    Stateless; the threshold is 0. ``codes(x)`` gives 1 where x >= 0 (value +1), 0 elsewhere."""

    ste: str = "htanh"
    name: str = "sign"
    levels: int = 2

    bits = 1.0

    def __post_init__(self) -> None:
        if self.ste not in BINARY_STES:
            raise ValueError(f"ste must be one of {', '.join(BINARY_STES)}; got {self.ste!r}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return binary_sign(x, None, self.ste)


class RSign(nn.Module):
    """ReActNet's ``RSign``: ``sign(x - t_c)`` with a learnable threshold per channel.

    ``threshold`` has shape (channels,) and is applied along ``channel_dim`` (-1 for a linear
    layer's input (..., C), 1 for a convolution's (B, C, H, W)); it starts at 0 (plain sign).
    Gradient: Bi-Real's ``approx`` by default (as ReActNet's code), or ``htanh``."""

    name = "rsign"
    levels = 2
    bits = 1.0

    def __init__(self, channels: int, channel_dim: int = -1, ste: str = "approx") -> None:
        super().__init__()
        if ste not in BINARY_STES:
            raise ValueError(f"ste must be one of {', '.join(BINARY_STES)}; got {ste!r}")
        if channel_dim not in (-1, 1):
            raise ValueError(f"channel_dim must be -1 (linear) or 1 (conv), got {channel_dim}")
        self.threshold = nn.Parameter(torch.zeros(channels))
        self.channel_dim = channel_dim
        self.ste = ste

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.threshold
        if self.channel_dim == 1:
            t = t.reshape(-1, *([1] * (x.dim() - 2)))  # (C, 1, 1) against (B, C, H, W)
        return binary_sign(x, t, self.ste)

    def extra_repr(self) -> str:
        return f"channels={self.threshold.numel()}, ste={self.ste}"


# Default spread lambda of `nlevel` per level count, measured by benchmarks/lambda_sweep.py
# (docs/results/lambda-sweep.md: short QAT runs on Fashion-MNIST around the MSE-optimal lambda,
# one smooth model fitted to all runs). N = 3 is fixed at 1 so that nlevel(3) == ternary.
DEFAULT_SPREAD: dict[int, float] = {
    2: 0.25,
    3: 1.0,
    4: 0.4,
    5: 0.54,
    8: 0.95,
    9: 1.1,
    16: 2.1,
    17: 2.3,
}


def _outer_level(levels: int) -> float:
    """R(N) = L / lambda: where the outermost level sits, in units of mean|w| (measured N)."""
    return (levels - 1) / 2 / DEFAULT_SPREAD[levels]


def default_spread(levels: int) -> float:
    """lambda for ``levels``: the measured table where present; otherwise from the position of
    the outermost level, ``R(N) = L / lambda`` in units of mean|w| (the sweep found R ~ 3.5-3.75
    for every measured N >= 4), so ``lambda = L / R(N)`` with

    * 4 < N < 17: R interpolated linearly in log2 N between the measured neighbours;
    * N > 17: ``R(17) * sqrt(ln N / ln 17)``, the growth of the optimal clipping range of a
      Gaussian's tail (R(256) ~ 4.9 mean|w| ~ 3.9 sigma).
    """
    if levels in DEFAULT_SPREAD:
        return DEFAULT_SPREAD[levels]
    half = (levels - 1) / 2
    known = sorted(n for n in DEFAULT_SPREAD if n >= 4)  # N = 2, 3 are not on the smooth trend
    if levels > known[-1]:
        r = _outer_level(known[-1]) * math.sqrt(math.log(levels) / math.log(known[-1]))
        return half / r
    hi = next(n for n in known if n > levels)
    lo = max(n for n in known if n < levels)
    t = (math.log2(levels) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
    r = (1 - t) * _outer_level(lo) + t * _outer_level(hi)
    return half / r


def check_fixed_levels(name: str, levels: Any) -> None:
    """ValueError unless quantizer ``name`` can have ``levels`` levels (``FIXED_LEVELS``)."""
    fixed = FIXED_LEVELS.get(name)
    if fixed is not None and levels != fixed:
        raise ValueError(
            f"{name} has exactly {fixed} levels, got levels={levels!r}; use 'nlevel' for "
            "other level counts"
        )


def _sign(levels: int = 2, center: bool = True, **kw: Any) -> Quantizer:
    check_fixed_levels("sign", levels)
    return Quantizer(levels=2, spread=0.5, center=center, name="sign", **kw)


def _ternary(levels: int = 3, **kw: Any) -> Quantizer:
    check_fixed_levels("ternary", levels)
    return Quantizer(levels=3, spread=1.0, name="ternary", **kw)


def _ternary_median(levels: int = 3, **kw: Any) -> Quantizer:
    check_fixed_levels("ternary-median", levels)
    return Quantizer(levels=3, spread=1.0, stat="absmedian", name="ternary-median", **kw)


def _nlevel(levels: int = 3, spread: float | None = None, **kw: Any) -> Quantizer:
    if spread is None:
        spread = default_spread(check_levels(levels))
    return Quantizer(levels=levels, spread=spread, name="nlevel", **kw)


def _absmax8(**kw: Any) -> AbsMax8:
    if kw:
        raise ValueError(f"absmax8 takes no options, got {', '.join(kw)}")
    return AbsMax8()


_REGISTRY = {
    "sign": _sign,
    "ternary": _ternary,
    "ternary-median": _ternary_median,
    "nlevel": _nlevel,
    "absmax8": _absmax8,
}
NAMES = tuple(_REGISTRY)


ACTIVATION_NAMES = ("absmax8", "sign", "approx-sign", "rsign")
BINARY_ACTIVATION_NAMES = ACTIVATION_NAMES[1:]
ActivationQuantizer = AbsMax8 | BinaryActivation | RSign


def get_activation(
    name: str | ActivationQuantizer | None, *, channels: int | None = None, channel_dim: int = -1
) -> ActivationQuantizer | None:
    """Resolve an input (activation) quantizer by name: ``absmax8``, ``sign``, ``approx-sign``,
    or ``rsign`` (a module with a learnable threshold per channel: needs ``channels``, the size of
    ``channel_dim``); objects and None pass through."""
    if name is None or isinstance(name, (AbsMax8, BinaryActivation, RSign)):
        return name
    if name == "absmax8":
        return AbsMax8()
    if name == "sign":
        return BinaryActivation("htanh", "sign")
    if name == "approx-sign":
        return BinaryActivation("approx", "approx-sign")
    if name == "rsign":
        if channels is None:
            raise ValueError("rsign needs the number of channels its threshold covers")
        return RSign(channels, channel_dim)
    raise ValueError(
        f"unknown activation quantizer {name!r}; valid names: {', '.join(ACTIVATION_NAMES)}"
    )


def is_binary(q: object) -> bool:
    """Whether ``q`` is a binary activation quantizer (its outputs are exactly -1 and +1)."""
    return isinstance(q, (BinaryActivation, RSign))


def binary_threshold(q: BinaryActivation | RSign) -> torch.Tensor | None:
    """The threshold t a binary activation compares with, (channels,) detached; None for 0."""
    return q.threshold.detach() if isinstance(q, RSign) else None


def get(name: str | Quantizer | AbsMax8 | None, **kw: Any) -> Quantizer | AbsMax8 | None:
    """Resolve a quantizer by name (``get("nlevel", levels=5)``); objects and None pass through."""
    if name is None or isinstance(name, (Quantizer, AbsMax8)):
        if kw:
            raise ValueError("options can only be given with a quantizer name")
        return name
    if name not in _REGISTRY:
        raise ValueError(f"unknown quantizer {name!r}; valid names: {', '.join(NAMES)}")
    return _REGISTRY[name](**kw)
