"""Packed-weight kernels: one interface, a reference backend and optimized CPU backends.

    w = prepare(codes, scale, levels)       # once, at load: converts to the backend's layout
    y = linear(x, w, bias, activations)     # every call

``codes`` (N_out, K) uint8 in 0..levels-1 and ``scale`` () or (N_out,) float32 describe
``W = scale * (codes - (levels-1)/2)`` (see ``reference``). A convolution (``conv2d``, weight
prepared with ``conv=(C_in, kernel_size)``) is a ``linear`` over im2col patches; the compiled
kernel reads the patches in place from a channels-last image instead of copying them out.

Backends (``backend()`` names the one ``prepare`` picks on this machine):

* ``native-avx512``: the compiled library (``native``, layout and math in
  ``csrc/lowbit_kernels.c``): weights in 1/2/4-bit lanes (5 bits for 17 levels), AVX-512 VNNI
  ``vpdpbusd`` dot products of the unsigned codes with int8 activations; for fp32 activations
  (weight-only layers) a lookup-table kernel without multiplications: per token, the sums of
  every weight pattern of a small group are tabled and each group of 16 rows is one ``vpermt2ps``
  + add, on a second layout of table indices derived from the codes on first use
  (``PreparedWeight.lut``); convolutions build the tables once per pixel, band by band of output
  rows, and those with K = C_in * kh * kw <= 9 (a one-channel first layer) take direct float32
  products instead, faster there and within the same error bound. ``native-avx2`` and
  ``native-portable`` run the int8 algorithm in C compiled for AVX2 and for plain x86-64
  (runtime dispatch by CPU features); for fp32, portable
  runs the table loop in plain C and AVX2 decodes the lane layout to float levels (a
  conversion, no table) for FMAs.
  Used for levels 2..17 on CPU float tensors.
* ``reference``: ``reference.linear`` (pure torch). Used for levels > 17, non-CPU tensors, and
  wherever the library was not built (then one ``RuntimeWarning`` says so, once per process).

Results: ``activations="int8"`` equals the reference exactly (integer dot products, the same
float64 rescale); ``activations="fp32"`` equals it up to float32 summation order (the lookup
tables: within the bound stated in the C file's header, tested).

The environment variable ``LOWBIT_KERNELS`` forces a backend: ``reference``, ``portable``,
``avx2`` or ``avx512`` (default ``auto``, the best the CPU supports); ``prepare(..., isa=...)``
does the same for one weight. Threads: ``torch.get_num_threads()`` unless ``threads`` is given.

The packed layers are also the registered ops ``torch.ops.lowbit.packed_linear(x, codes, scale,
bias, levels, activations)`` and ``torch.ops.lowbit.packed_conv2d(..., geometry, activations)``
(with fake kernels), taking the storage codes: what ``torch.compile``, ``torch.export`` and
``jit.trace`` record from a packed layer (``lowbit.packed``). The op prepares its weight once and
caches it per codes tensor; eager calls of a layer skip the dispatcher and call ``linear`` /
``conv2d`` with the layer's own cached weight, which saves the dispatcher's Python overhead.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from lowbit.errors import ConfigError
from lowbit.kernels import native, reference
from lowbit.quantizers import check_levels

BACKENDS = ("auto", "reference", *native.ISAS)

_warned = False


class PreparedWeight:
    """A weight in the layout the active backend computes with (built once by ``prepare``).

    ``backend`` is ``"reference"`` or ``"native-<isa>"``; for the native backends ``data`` is
    the packed (N_out, kp * bits / 8) uint8 tensor described in ``native`` and the codes are not
    kept (``codes`` unpacks them on demand), so a prepared ternary weight holds 2 bits a weight.
    """

    def __init__(
        self,
        codes: torch.Tensor | None,
        scale: torch.Tensor,
        levels: int,
        backend: str = "reference",
        data: torch.Tensor | None = None,
        *,
        shape: tuple[int, int] | None = None,
        bits: int = 8,
        kp: int = 0,
        conv: tuple[int, tuple[int, int]] | None = None,
    ) -> None:
        self._codes = codes
        self.scale = scale
        self.levels = levels
        self.backend = backend
        self.data = data
        self.bits = bits
        self.kp = kp
        self.conv = conv  # (C_in, (kh, kw)): columns packed tap-major for the conv kernel
        self._shape = tuple(codes.shape) if shape is None else tuple(shape)
        self._lut: torch.Tensor | None = None
        # the C call's weight arguments, resolved once (the tensors live as long as self)
        self.call_args: tuple = ()
        if data is not None:
            self.call_args = native.weight_args(
                self.isa, data, self._shape, kp, bits, levels, scale
            )

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape  # type: ignore[return-value]

    @property
    def isa(self) -> str | None:
        return self.backend.removeprefix("native-") if self.backend != "reference" else None

    @property
    def codes(self) -> torch.Tensor:
        """(N_out, K) uint8 storage codes (unpacked from the compute layout when not kept)."""
        if self._codes is not None:
            return self._codes
        codes = native.unpack(self.data, self.bits, *self._shape)
        return codes if self.conv is None else native.channel_major(codes, *self.conv)

    @property
    def lut(self) -> torch.Tensor | None:
        """The lookup-table kernel's index layout (``native.lut_pack`` of the packed codes),
        built on the first fp32-activation call; None where the ISA has no such kernel."""
        if self._lut is None and self.data is not None and self.isa in native.LUT_ISAS:
            codes = native.unpack(self.data, self.bits, *self._shape)  # tap-major for a conv
            self._lut = native.lut_pack(codes, self.levels, self.conv)
        return self._lut

    def __repr__(self) -> str:
        n, k = self._shape
        return f"PreparedWeight({n}x{k}, levels={self.levels}, backend={self.backend})"


def eager(x: torch.Tensor) -> bool:
    """Whether to call the kernels directly: a plain tensor outside any tracer (torch.compile,
    torch.export and jit.trace see the ``torch.ops.lowbit`` ops instead, fake tensors too; a
    ctypes call would be invisible to them, its output a constant)."""
    return (
        type(x) is torch.Tensor and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
    )


def _requested() -> str:
    choice = os.environ.get("LOWBIT_KERNELS", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ConfigError(
            f"LOWBIT_KERNELS={choice!r} is not a kernel backend; use one of {', '.join(BACKENDS)}"
        )
    return choice


def _warn_fallback() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"lowbit: {native.load_error()}; packed layers use the slow reference kernels",
            RuntimeWarning,
            stacklevel=3,
        )


def _pick_isa(isa: str | None) -> str:
    """The ISA to prepare for, or "reference" (warning once if the library is missing)."""
    choice = _requested() if isa is None else isa
    if choice not in BACKENDS:
        raise ConfigError(f"isa must be one of {', '.join(BACKENDS)}, got {choice!r}")
    if choice == "reference":
        return choice
    if native.load() is None:
        _warn_fallback()
        return "reference"
    best = native.best_isa()
    if choice == "auto":
        return best
    if native.ISAS.index(choice) > native.ISAS.index(best):
        raise ConfigError(f"this CPU cannot run the {choice} kernels (best: {best})")
    return choice


def backend() -> str:
    """Name of the backend ``prepare`` picks on this machine (for levels 2..17)."""
    isa = _pick_isa(None)
    return isa if isa == "reference" else f"native-{isa}"


def prepare(
    codes: torch.Tensor,
    scale: torch.Tensor,
    levels: int,
    *,
    isa: str | None = None,
    conv: tuple[int, tuple[int, int]] | None = None,
) -> PreparedWeight:
    """Convert storage codes (N_out, K) uint8 + scale () or (N_out,) to the compute layout.

    ``conv=(C_in, (kh, kw))`` prepares a convolution's weight (K = C_in*kh*kw in ``F.unfold``'s
    column order) for ``conv2d``; such a weight is not a ``linear`` weight."""
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise ValueError(
            f"codes must be a 2-D uint8 tensor, got {tuple(codes.shape)} {codes.dtype}"
        )
    check_levels(levels)
    # a copy: the prepared weight owns every tensor its C arguments point into
    scale = scale.detach().to(torch.float32, copy=True).contiguous()
    if scale.numel() not in (1, codes.shape[0]):
        raise ValueError(
            f"scale must have 1 or {codes.shape[0]} (N_out) elements, got {scale.numel()}"
        )
    bits = native.bits_for(levels)
    if bits is None or codes.device.type != "cpu":
        return PreparedWeight(codes.contiguous(), scale, levels)
    chosen = _pick_isa(isa)
    if chosen == "reference":
        return PreparedWeight(codes.contiguous(), scale, levels)
    if codes.numel() and int(codes.max()) >= levels:
        raise ValueError(f"codes must be < levels={levels}, got a code {int(codes.max())}")
    if conv is not None and conv[0] * conv[1][0] * conv[1][1] != codes.shape[1]:
        raise ValueError(f"conv geometry {conv} does not match {codes.shape[1]} code columns")
    packed, kp = native.pack(codes if conv is None else native.tap_major(codes, *conv), bits)
    return PreparedWeight(
        None,
        scale,
        levels,
        f"native-{chosen}",
        packed,
        shape=tuple(codes.shape),
        bits=bits,
        kp=kp,
        conv=conv,
    )


def cached_on_codes(
    cache: WeakIdKeyDictionary,
    codes: torch.Tensor,
    scale: torch.Tensor,
    extra: tuple,
    build: Callable[[], Any],
) -> Any:
    """``build()`` (a compute layout of ``codes`` and ``scale``), kept in ``cache`` per codes
    tensor (weakly: the entry dies with the tensor) until the codes, the scale (identity,
    storage, in-place version) or ``extra`` change. What the custom ops' eager bodies prepare."""
    key = (codes._version, scale._version, codes.data_ptr(), scale.data_ptr(), *extra)
    hit = cache.get(codes)
    if hit is not None and hit[0] is scale and hit[1] == key:
        return hit[2]
    value = build()
    cache[codes] = (scale, key, value)
    return value


_prepared_cache: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _prepared_for(
    codes: torch.Tensor, scale: torch.Tensor, levels: int, conv: tuple | None = None
) -> PreparedWeight:
    """``prepare(codes, scale, levels, conv=conv)``, cached (``cached_on_codes``)."""
    return cached_on_codes(
        _prepared_cache,
        codes,
        scale,
        (levels, conv),
        lambda: prepare(codes, scale, levels, conv=conv),
    )


@torch.library.custom_op("lowbit::packed_linear", mutates_args=())
def _packed_linear_op(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    levels: int,
    activations: str,
) -> torch.Tensor:
    """The packed linear as one op: x (..., K) -> (..., N_out) float32, the weight given by its
    storage codes (N_out, K) uint8 and scale () or (N_out,) (see ``reference``). What tracers
    (torch.compile, torch.export, jit.trace) record; the compute layout is a cache."""
    return linear(x, _prepared_for(codes, scale, levels), bias, activations)


@_packed_linear_op.register_fake
def _(x, codes, scale, bias, levels, activations):
    return x.new_empty((*x.shape[:-1], codes.shape[0]), dtype=torch.float32)


def linear(
    x: torch.Tensor,
    weight: PreparedWeight,
    bias: torch.Tensor | None = None,
    activations: str = "fp32",
    *,
    threads: int | None = None,
) -> torch.Tensor:
    """y = x W^T + b: x (..., K) -> (..., N_out) float32 (x is read as float32)."""
    reference.check_dense_mode(activations)
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features but the weight expects {k}")
    if x.dtype != torch.float32:
        x = x.to(torch.float32)
    if weight.backend == "reference" or not x.is_cpu:
        return reference.linear(x, weight.codes, weight.scale, weight.levels, bias, activations)
    if not x.is_contiguous():
        x = x.contiguous()
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.detach().to(torch.float32).contiguous()
    y = x.new_empty((*x.shape[:-1], n))
    # the cached layout without the property's call (a per-layer cost at batch 1)
    lut = (
        (weight._lut if weight._lut is not None else weight.lut) if activations == "fp32" else None
    )
    m = x.numel() // k if k else 0
    native.call(weight.call_args, x, m, bias, y, activations, threads, lut)
    return y


@torch.library.custom_op("lowbit::packed_conv2d", mutates_args=())
def _packed_conv2d_op(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    levels: int,
    geometry: list[int],
    activations: str,
) -> torch.Tensor:
    """The packed convolution as one op: x (B, C_in, H, W) -> (B, N_out, H', W') float32
    (contiguous), codes (N_out, C_in*kh*kw); geometry = kh, kw, sh, sw, ph, pw, dh, dw."""
    kh, kw, sh, sw, ph, pw, dh, dw = geometry
    weight = _prepared_for(codes, scale, levels, (x.shape[1], (kh, kw)))
    y = conv2d(
        x,
        weight,
        bias,
        kernel_size=(kh, kw),
        stride=(sh, sw),
        padding=(ph, pw),
        dilation=(dh, dw),
        activations=activations,
    )
    return y.contiguous()


@_packed_conv2d_op.register_fake
def _(x, codes, scale, bias, levels, geometry, activations):
    kh, kw, sh, sw, ph, pw, dh, dw = geometry
    ho = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return x.new_empty((x.shape[0], codes.shape[0], ho, wo), dtype=torch.float32)


def conv2d(
    x: torch.Tensor,
    weight: PreparedWeight,
    bias: torch.Tensor | None = None,
    *,
    kernel_size: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    activations: str = "fp32",
    threads: int | None = None,
) -> torch.Tensor:
    """A groups=1 convolution: x (B, C_in, H, W) -> (B, N_out, H', W') float32, ``weight``
    prepared with ``conv=(C_in, kernel_size)`` (or any reference-backend weight).

    Native backend: the C kernel reads the image channels-last (a channels-last input, such as
    the previous packed conv's output after ReLU/pooling, is read in place), so patches are
    never copied out where C_in is a multiple of 64 (see the C file), and the result is a
    channels-last (B, N_out, H', W') tensor. ``activations="int8"`` quantizes each image with
    one absmax multiplier (``reference.conv2d``), exact integer dot products."""
    reference.check_dense_mode(activations)
    if x.dtype != torch.float32:
        x = x.to(torch.float32)
    if weight.backend == "reference" or not x.is_cpu or x.dim() != 4:
        return reference.conv2d(
            x,
            weight.codes,
            weight.scale,
            weight.levels,
            bias,
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            activations=activations,
        )
    if weight.conv is None or weight.conv != (x.shape[1], tuple(kernel_size)):
        raise ValueError(
            f"weight was not prepared for this convolution (conv={weight.conv}, input channels "
            f"{x.shape[1]}, kernel {tuple(kernel_size)}): prepare(..., conv=(C_in, kernel_size))"
        )
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.detach().to(torch.float32).contiguous()
    x = x.contiguous(memory_format=torch.channels_last)
    # the cached layout without the property's call (a per-layer cost at batch 1)
    lut = (
        (weight._lut if weight._lut is not None else weight.lut) if activations == "fp32" else None
    )
    return native.conv2d(
        weight.call_args, x, bias, kernel_size, stride, padding, dilation, activations, threads, lut
    )
