"""ctypes binding of the compiled CPU kernels (``csrc/lowbit_kernels.c``).

The C library is built by ``pip install`` (``setup.py``, an optional extension named
``lowbit.kernels._native``) with the machine's compiler; it has no Python or torch headers and is
called with raw tensor data pointers. ``load()`` returns None (with the reason in ``load_error()``)
where it was not built or cannot be loaded; ``lowbit.kernels`` then falls back to the reference.

Compute layout (see the C file's header for the drawing): each code sits in a lane of ``bits``
bits (1 for N = 2, 2 for N <= 4, 4 for N <= 16), K is zero-padded to ``kp``, a multiple of the
64-byte group (512 / bits codes). Rows come in blocks of ``ROWS`` = 8 (the last one padded with
zero rows) and a block stores its rows group by group, interleaved: (blocks, groups, 8 rows, 64
bytes), so a kernel walking a block reads one sequential stream. The weight is a (blocks,
8 * kp * bits / 8) uint8 tensor. N = 17 has ``bits = 5``: per block, the B = 4 layout of the low
nibbles (8 * kp / 2 bytes), then the B = 1 layout of the high bits (8 * kp / 8 bytes), kp a
multiple of 512.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os

import torch

ISAS = ("portable", "avx2", "avx512")
# ISAs whose fp32-activation path is the lookup-table kernel (``lut_pack``); AVX2 keeps FMA tiles
# on the lane layout: a 32-entry table costs it four 8-entry lookups and three blends, measured
# no faster than the FMAs on a Zen 2 (docs/results/kernels-avx2.md)
LUT_ISAS = ("portable", "avx512")
ABI_VERSION = 8  # lb_version() of the C library this binding matches (layout, signatures)
MAX_LEVELS = 17
ROWS = 8  # rows per block of the compute layout

_lib: ctypes.CDLL | None = None
_error: str | None = None
_tried = False


def _library_path() -> str | None:
    override = os.environ.get("LOWBIT_KERNELS_LIB")
    if override:
        return override
    spec = importlib.util.find_spec("lowbit.kernels._native")
    return spec.origin if spec is not None else None


def _declare(lib: ctypes.CDLL) -> None:
    i64, i32, p = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.lb_isa.restype = i32
    lib.lb_version.restype = i32
    lib.lb_pack.argtypes = [p, i64, i64, i32, i64, p]
    lib.lb_pack.restype = None
    lib.lb_quantize_i8.argtypes = [i32, p, i64, i64, i64, p, p, p]
    lib.lb_quantize_i8.restype = None
    lib.lb_conv2d.argtypes = [i32, i32, p, p, p, i64, i64, i32, i32, p, i32, p, p, i32, p]
    lib.lb_conv2d.restype = i32
    lib.lb_lut_shape.argtypes = [i32, p]
    lib.lb_lut_shape.restype = None
    lib.lb_lut_segments.argtypes = [i64, i64]
    lib.lb_lut_segments.restype = i64
    lib.lb_lut_size.argtypes = [i32, i64, i64, i64]
    lib.lb_lut_size.restype = i64
    lib.lb_lut_pack.argtypes = [p, i64, i64, i32, i64, p]
    lib.lb_lut_pack.restype = None
    lib.lb_linear_lut.argtypes = [i32, p, i64, i64, p, i64, i32, p, i32, p, p, i32]
    lib.lb_linear_lut.restype = i32
    linear_args = [i32, p, i64, i64, p, i64, i64, i32, i32, p, i32, p, p, i32]
    for fn in (lib.lb_linear_i8, lib.lb_linear_f32):
        fn.argtypes = linear_args
        fn.restype = i32


def load() -> ctypes.CDLL | None:
    """The loaded library, or None where it is missing or broken (reason: ``load_error()``)."""
    global _lib, _error, _tried
    if _tried:
        return _lib
    _tried = True
    path = _library_path()
    if path is None or not os.path.exists(path):
        _error = (
            "the compiled kernel library was not built "
            "(reinstall with a C compiler: pip install -e .)"
        )
        return None
    try:
        lib = ctypes.CDLL(path)
        _declare(lib)
        if lib.lb_version() != ABI_VERSION:
            raise OSError(
                f"version {lib.lb_version()}, expected {ABI_VERSION} (rebuild: pip install -e .)"
            )
    except (OSError, AttributeError) as exc:
        _error = f"the compiled kernel library {path} cannot be loaded: {exc}"
        return None
    _lib = lib
    return _lib


def load_error() -> str | None:
    return _error


def reset() -> None:
    """Forget the loaded library (tests use this to simulate a missing build)."""
    global _lib, _error, _tried
    _lib, _error, _tried = None, None, False


def best_isa() -> str:
    lib = load()
    return ISAS[lib.lb_isa()] if lib is not None else "reference"


def bits_for(levels: int) -> int | None:
    """Lane width of the compute layout, or None where the native kernels do not apply."""
    if levels == 2:
        return 1
    if 3 <= levels <= 4:
        return 2
    if 5 <= levels <= 16:
        return 4
    if levels == MAX_LEVELS:
        return 5
    return None


def padded_k(k: int, bits: int) -> int:
    group = 512 if bits == 5 else 512 // bits
    return max(group, -(-k // group) * group)


def pack(codes: torch.Tensor, bits: int) -> tuple[torch.Tensor, int]:
    """codes (N_out, K) uint8 -> (packed (ceil(N_out / 8), 8 * kp * bits / 8) uint8, kp)."""
    lib = load()
    assert lib is not None
    codes = codes.contiguous()
    n, k = codes.shape
    kp = padded_k(k, bits)
    out = torch.empty((-(-n // ROWS), ROWS * kp * bits // 8), dtype=torch.uint8)
    lib.lb_pack(codes.data_ptr(), n, k, bits, kp, out.data_ptr())
    return out, kp


def unpack(packed: torch.Tensor, bits: int, n: int, k: int) -> torch.Tensor:
    """Inverse of ``pack``: (blocks, 8 * kp * bits / 8) uint8 -> codes (N_out, K) uint8."""
    if bits == 5:
        half = packed.shape[1] * 4 // 5  # the low nibbles: 8 * kp / 2 of 8 * kp * 5 / 8 bytes
        lo = unpack(packed[:, :half], 4, n, k)
        return lo | (unpack(packed[:, half:], 1, n, k) << 4)
    blocks = packed.shape[0]
    groups = packed.reshape(blocks, -1, ROWS, 64).transpose(1, 2)  # (block, row, group, byte)
    groups = groups.reshape(blocks * ROWS, -1, 1, 64)[:n]  # (n, g, 1, i)
    shifts = (torch.arange(8 // bits, dtype=torch.uint8) * bits).reshape(1, 1, -1, 1)
    codes = (groups >> shifts) & ((1 << bits) - 1)  # (n, g, j, i): k = g*G + j*64 + i
    return codes.reshape(n, -1)[:, :k].contiguous()


def lut_shape(levels: int) -> tuple[int, int, int]:
    """(D, g, P) of the lookup-table kernel: P planes of base-D digits, g weights a table."""
    lib = load()
    assert lib is not None
    out = (ctypes.c_int * 3)()
    lib.lb_lut_shape(levels, ctypes.addressof(out))
    return out[0], out[1], out[2]


def lut_pack(
    codes: torch.Tensor, levels: int, conv: tuple[int, tuple[int, int]] | None = None
) -> torch.Tensor:
    """codes (N_out, K) uint8 (``tap_major`` for a conv) -> the lookup-table kernel's index
    layout: (ceil(N_out / 16), planes, words, 16) 32-bit words of six 5-bit table indices,
    flattened, as int32 (the C file's header draws the bits). A conv with enough channels
    starts every tap on a word of its own (``lb_lut_segments``). A pure function of the codes."""
    lib = load()
    assert lib is not None
    codes = codes.contiguous()
    n, k = codes.shape
    seg = 1 if conv is None else lib.lb_lut_segments(conv[0], conv[1][0] * conv[1][1])
    out = torch.empty(lib.lb_lut_size(levels, n, k, seg), dtype=torch.int32)
    lib.lb_lut_pack(codes.data_ptr(), n, k, levels, seg, out.data_ptr())
    return out


def quantize_i8(
    x: torch.Tensor, kp: int, isa: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token int8: x (M, K) float32 -> (q (M, kp) int8, a (M,) float32, sum_k q (M,) int32)."""
    lib = load()
    assert lib is not None
    x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, kp), dtype=torch.int8)
    a = torch.empty(m, dtype=torch.float32)
    sq = torch.empty(m, dtype=torch.int32)
    lib.lb_quantize_i8(
        ISAS.index(isa), x.data_ptr(), m, k, kp, q.data_ptr(), a.data_ptr(), sq.data_ptr()
    )
    return q, a, sq


def weight_args(
    isa: str,
    packed: torch.Tensor,
    shape: tuple[int, int],
    kp: int,
    bits: int,
    levels: int,
    scale: torch.Tensor,
) -> tuple:
    """The weight's part of the C call, resolved once at prepare (see ``call``)."""
    n, k = shape
    return (
        ISAS.index(isa),
        k,
        packed.data_ptr(),
        n,
        kp,
        bits,
        levels,
        scale.data_ptr(),
        int(scale.numel() > 1),
        packed,
        scale,
    )


def _weight_tail(wargs: tuple, bias: torch.Tensor | None, y: torch.Tensor, threads: int | None):
    """The arguments every compiled layer call ends with: weight, bias, output, threads."""
    _, _, wptr, n, kp, bits, levels, sptr, per_channel = wargs[:9]
    bptr = bias.data_ptr() if bias is not None else None
    return (
        wptr,
        n,
        kp,
        bits,
        levels,
        sptr,
        per_channel,
        bptr,
        y.data_ptr(),
        threads or torch.get_num_threads(),
    )


def call(
    wargs: tuple,
    x: torch.Tensor,
    m: int,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    activations: str,
    threads: int | None,
    lut: torch.Tensor | None = None,
) -> None:
    """y (M, N_out) = x (M, K) W^T + b, all float32 contiguous, with ``weight_args``'s weight
    (fp32 activations with ``lut``, the weight's ``lut_pack`` layout: the lookup-table kernel)."""
    isa, k = wargs[:2]
    if lut is not None and activations == "fp32":
        _, _, _, n, _, _, levels, sptr, per_channel = wargs[:9]
        bptr = bias.data_ptr() if bias is not None else None
        nthreads = threads or torch.get_num_threads()
        rc = _lib.lb_linear_lut(  # type: ignore[union-attr]
            isa,
            x.data_ptr(),
            m,
            k,
            lut.data_ptr(),
            n,
            levels,
            sptr,
            per_channel,
            bptr,
            y.data_ptr(),
            nthreads,
        )
        if rc != 0:
            raise MemoryError(f"packed linear ({m}x{k} by {n}x{k}) could not allocate its tables")
        return
    fn = _lib.lb_linear_i8 if activations == "int8" else _lib.lb_linear_f32  # type: ignore[union-attr]
    if fn(isa, x.data_ptr(), m, k, *_weight_tail(wargs, bias, y, threads)) != 0:
        n = wargs[3]
        raise MemoryError(f"packed linear ({m}x{k} by {n}x{k}) could not allocate its buffers")


def tap_major(codes: torch.Tensor, in_channels: int, kernel_size: tuple[int, int]) -> torch.Tensor:
    """Conv codes (N_out, C*kh*kw) in ``F.unfold``'s column order (channel, row, column) ->
    (N_out, kh*kw*C) in the order the conv kernel reads an NHWC image (row, column, channel)."""
    n = codes.shape[0]
    return codes.reshape(n, in_channels, *kernel_size).permute(0, 2, 3, 1).reshape(n, -1)


def channel_major(
    codes: torch.Tensor, in_channels: int, kernel_size: tuple[int, int]
) -> torch.Tensor:
    """Inverse of ``tap_major``."""
    n = codes.shape[0]
    return codes.reshape(n, *kernel_size, in_channels).permute(0, 3, 1, 2).reshape(n, -1)


def conv2d(
    wargs: tuple,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    activations: str,
    threads: int | None,
    lut: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (B, C, H, W) float32 channels-last contiguous -> (B, N_out, Ho, Wo), a channels-last
    view of the kernel's (B * Ho * Wo, N_out) output; weight packed from ``tap_major`` codes
    (and ``lut``, their ``lut_pack`` layout, for the lookup-table kernel of fp32 activations)."""
    isa, n = wargs[0], wargs[3]
    b, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    y = torch.empty((b, max(ho, 0), max(wo, 0), n), dtype=torch.float32)
    if y.numel():
        dims = (ctypes.c_int64 * 14)(b, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo)
        int8 = int(activations == "int8")
        tail = _weight_tail(wargs, bias, y, threads)
        lptr = lut.data_ptr() if lut is not None and not int8 else None
        if _lib.lb_conv2d(isa, int8, x.data_ptr(), ctypes.addressof(dims), *tail, lptr) != 0:  # type: ignore[union-attr]
            raise MemoryError(f"packed conv2d on {tuple(x.shape)} could not allocate its buffers")
    return y.permute(0, 3, 1, 2)
