"""Packed-weight kernels: one interface, a reference backend and optimized CPU backends.

    w = prepare(codes, scale, levels)       # once, at load: converts to the backend's layout
    y = linear(x, w, bias, activations)     # every call

``codes`` (N_out, K) uint8 in 0..levels-1 and ``scale`` () or (N_out,) float32 describe
``W = scale * (codes - (levels-1)/2)`` (see ``reference``). A convolution (``conv2d``) is a
``linear`` over im2col patches.

Backends (``backend()`` names the one ``prepare`` picks on this machine):

* ``native-avx512``: the compiled library (``native``, layout and math in
  ``csrc/lowbit_kernels.c``): weights in 1/2/4-bit lanes (5 bits for 17 levels), AVX-512 VNNI
  ``vpdpbusd`` dot products of the unsigned codes with int8 activations, or a ``vpermps``
  level table + FMA for fp32 activations; ``native-avx2`` and ``native-portable`` are the same
  algorithm in C compiled for AVX2 and for plain x86-64 (runtime dispatch by CPU features).
  Used for levels 2..17 on CPU float tensors.
* ``reference``: ``reference.linear`` (pure torch). Used for levels > 17, non-CPU tensors, and
  wherever the library was not built (then one ``RuntimeWarning`` says so, once per process).

Results: ``activations="int8"`` equals the reference exactly (integer dot products, the same
float64 rescale); ``activations="fp32"`` equals it up to float32 summation order.

The environment variable ``LOWBIT_KERNELS`` forces a backend: ``reference``, ``portable``,
``avx2`` or ``avx512`` (default ``auto``, the best the CPU supports); ``prepare(..., isa=...)``
does the same for one weight. Threads: ``torch.get_num_threads()`` unless ``threads`` is given.

The compiled call is registered as the single op ``torch.ops.lowbit.packed_linear`` (with a fake
kernel) so ``torch.compile`` traces through it; eager calls skip the dispatcher and call the
same implementation directly, which saves its Python overhead on small layers.
"""

from __future__ import annotations

import os
import warnings

import torch

from lowbit.errors import ConfigError
from lowbit.kernels import native, reference
from lowbit.kernels.reference import ACTIVATION_MODES

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
    ) -> None:
        self._codes = codes
        self.scale = scale
        self.levels = levels
        self.backend = backend
        self.data = data
        self.bits = bits
        self.kp = kp
        self._shape = tuple(codes.shape) if shape is None else tuple(shape)
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
        return native.unpack(self.data, self.bits, self._shape[1])

    def __repr__(self) -> str:
        n, k = self._shape
        return f"PreparedWeight({n}x{k}, levels={self.levels}, backend={self.backend})"


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
    codes: torch.Tensor, scale: torch.Tensor, levels: int, *, isa: str | None = None
) -> PreparedWeight:
    """Convert storage codes (N_out, K) uint8 + scale () or (N_out,) to the compute layout."""
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise ValueError(
            f"codes must be a 2-D uint8 tensor, got {tuple(codes.shape)} {codes.dtype}"
        )
    if not 2 <= levels <= 256:
        raise ValueError(f"levels must be in 2..256, got {levels}")
    scale = scale.detach().to(torch.float32).contiguous()
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
    packed, kp = native.pack(codes, bits)
    return PreparedWeight(
        None, scale, levels, f"native-{chosen}", packed, shape=tuple(codes.shape), bits=bits, kp=kp
    )


@torch.library.custom_op("lowbit::packed_linear", mutates_args=())
def _packed_linear_op(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    kp: int,
    levels: int,
    bits: int,
    activations: str,
    isa: str,
    threads: int,
) -> torch.Tensor:
    """x (M, K) float32 -> (M, N_out) float32 with the compiled kernels."""
    return native.linear(
        x.contiguous(), packed, scale, bias, k, kp, levels, bits, activations, isa, threads
    )


@_packed_linear_op.register_fake
def _(x, packed, scale, bias, k, kp, levels, bits, activations, isa, threads):
    return x.new_empty((x.shape[0], packed.shape[0]))


def linear(
    x: torch.Tensor,
    weight: PreparedWeight,
    bias: torch.Tensor | None = None,
    activations: str = "fp32",
    *,
    threads: int | None = None,
) -> torch.Tensor:
    """y = x W^T + b: x (..., K) float32 -> (..., N_out) float32."""
    if activations not in ACTIVATION_MODES:
        modes = ", ".join(ACTIVATION_MODES)
        raise ValueError(f"activations must be one of {modes}, got {activations!r}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features but the weight expects {k}")
    if weight.backend == "reference" or x.device.type != "cpu":
        return reference.linear(x, weight.codes, weight.scale, weight.levels, bias, activations)
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.to(torch.float32).contiguous()
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.detach().to(torch.float32).contiguous()
    if not torch.compiler.is_compiling():
        # eager fast path: the same C call as the op, without the dispatcher's overhead
        y = x.new_empty((*x.shape[:-1], n))
        native.call(weight.call_args, x, x.numel() // k if k else 0, bias, y, activations, threads)
        return y
    args = (x.reshape(-1, k), weight.data, weight.scale, bias, k, weight.kp, weight.levels)
    y = torch.ops.lowbit.packed_linear(*args, weight.bits, activations, weight.isa, threads or 0)
    return y.reshape(*x.shape[:-1], n)


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
) -> torch.Tensor:
    """A groups=1 convolution: x (B, C_in, H, W) -> (B, N_out, H', W'), with ``weight`` prepared
    from codes (N_out, C_in*kH*kW): ``linear`` over im2col patches. With the native backend
    the patches are written token-major by the C ``im2col`` in one pass (torch's unfold +
    transpose cost more than the int8 GEMM itself) and the result is returned as a
    channels-last view; otherwise ``reference.im2col_conv2d``."""
    if weight.backend != "reference" and x.device.type == "cpu" and x.dim() == 4:
        if x.dtype != torch.float32:
            x = x.to(torch.float32)
        if torch.compiler.is_compiling():  # torch's unfold traces; the C im2col does not
            cols = torch.nn.functional.unfold(x, kernel_size, dilation, padding, stride)
            ho = x.shape[2] + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1
            wo = x.shape[3] + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1
            ho, wo = ho // stride[0] + 1, wo // stride[1] + 1
            cols = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        else:
            cols, ho, wo = native.im2col(x, kernel_size, stride, padding, dilation)
        y = linear(cols, weight, bias, activations)  # (B * Ho * Wo, C_out)
        # (B, Ho, Wo, C_out) viewed as (B, C_out, Ho, Wo): channels-last strides, no copy
        return y.reshape(x.shape[0], ho, wo, -1).permute(0, 3, 1, 2)
    return reference.im2col_conv2d(
        x,
        lambda cols: linear(cols, weight, bias, activations),
        weight.shape[0],
        kernel_size,
        stride,
        padding,
        dilation,
    )
