"""XNOR-popcount kernels for binary layers (activations and weights in {-1, +1}).

    w = prepare(codes, scale)                     # once: codes (N_out, K) in {0, 1}, scale
    y = linear(x, w, bias, threshold)             # y = (sign(x - t) @ w_b.T) * alpha + b
    y = conv2d(x, w, bias, threshold, kernel_size=..., stride=..., padding=..., dilation=...)
    y = linear(x, w, epilogue=e)                  # + a block's BatchNorm, shortcut and RPReLU

``epilogue`` (``lowbit.epilogue.BlockEpilogue``) runs what follows the layer in an eval-mode binary
block inside the kernel, on each output as it is finished: one pass instead of five to eight
torch operations on the output tensor, with the same float32 operations in the same order.

The compiled kernels are ``csrc/lowbit_binary.c`` (bit layout and arithmetic in its header),
part of the library ``native`` loads; they equal ``reference.binary_linear`` /
``reference.binary_conv2d`` bit for bit on every path (``avx512`` = AVX-512 VPOPCNTDQ, ``avx2`` =
the pshufb nibble table, ``portable``). ``LOWBIT_KERNELS`` and ``isa=`` choose the path as for the
other packed kernels; where the library is missing the reference runs instead.

Registered as ``torch.ops.lowbit.binary_linear(x, codes, scale, bias, threshold)`` and
``torch.ops.lowbit.binary_conv2d(..., geometry)`` (with fake kernels): what tracers record, the
packed bits a cache of the codes; eager calls go straight to the C function.
"""

from __future__ import annotations

import ctypes

import torch
from torch.utils.weak import WeakIdKeyDictionary

from lowbit.epilogue import BlockEpilogue
from lowbit.errors import ConfigError
from lowbit.kernels import _requested, _warn_fallback, cached_on_codes, native, reference

ABI_VERSION = 5  # lb_binary_version() of the C code this binding matches
ROWS = 8  # weight rows per block of the packed layout

_declared: ctypes.CDLL | None = None
_best = "reference"  # the declared library's best path (the CPU's features do not change)


class _Epilogue(ctypes.Structure):
    """``lb_binary_epilogue`` of the C header (pointers into the ``BlockEpilogue``'s tensors)."""

    _fields_ = [
        ("scale", ctypes.c_void_p),
        ("shift", ctypes.c_void_p),
        ("pbias", ctypes.c_void_p),
        ("pslope", ctypes.c_void_p),
        ("pshift", ctypes.c_void_p),
        ("residual", ctypes.c_int64),
    ]


def _lib() -> ctypes.CDLL | None:
    """The library with the binary functions declared, or None (missing or too old a build)."""
    global _declared, _best
    lib = native.load()
    if lib is None or not hasattr(lib, "lb_binary_version"):
        return None
    if _declared is not lib:
        i64, i32, p = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
        lib.lb_binary_version.restype = i32
        lib.lb_binary_isa.restype = i32
        if lib.lb_binary_version() != ABI_VERSION:
            return None
        lib.lb_binary_pack_weights.argtypes = [p, i64, i64, i64, p]
        lib.lb_binary_pack_weights.restype = None
        lib.lb_binary_pack_activations.argtypes = [i32, p, i64, i64, p, p]
        lib.lb_binary_pack_activations.restype = None
        lib.lb_binary_linear.argtypes = [i32, p, i64, i64, p, p, i64, p, i32, p, p, p, i32]
        lib.lb_binary_linear.restype = i32
        lib.lb_binary_conv2d.argtypes = [i32, p, p, p, p, p, i64, p, i32, p, p, p, i32]
        lib.lb_binary_conv2d.restype = i32
        lib.lb_binary_nibble_weights.argtypes = [p, i64, i64, p]
        lib.lb_binary_nibble_weights.restype = i32
        lib.lb_binary_nibble_tiles.argtypes = [i64]
        lib.lb_binary_nibble_tiles.restype = i64
        lib.lb_binary_maxpool2x2_nhwc.argtypes = [i32, p, i64, i64, i64, i64, p, p, p]
        lib.lb_binary_maxpool2x2_nhwc.restype = None
        _declared, _best = lib, native.ISAS[lib.lb_binary_isa()]
    return lib


def best_isa() -> str:
    """The fastest binary path this CPU runs (avx512 needs VPOPCNTDQ), or "reference"."""
    return _best if _lib() is not None else "reference"


def _pick_isa(isa: str | None) -> str:
    choice = _requested() if isa is None else isa
    if choice not in ("auto", "reference", *native.ISAS):
        raise ConfigError(f"isa must be one of auto, reference, {', '.join(native.ISAS)}")
    if choice == "reference":
        return choice
    best = best_isa()
    if best == "reference":
        _warn_fallback()
        return best
    if choice == "auto":
        return best
    if native.ISAS.index(choice) > native.ISAS.index(best):
        raise ConfigError(f"this CPU cannot run the {choice} binary kernels (best: {best})")
    return choice


class BinaryWeight:
    """A binary weight ready for the kernels.

    ``alpha`` = scale / 2, float32 (1,) or (N_out,); ``words`` the packed (ceil(N_out / 8),
    KW * 8) int64 bits (see the C header; KW = taps * ceil(C / 64) for a convolution's tap-major
    rows, ceil(K / 64) otherwise), or None on the reference backend, which keeps ``codes``;
    ``nibbles`` the same bits one nibble a byte in tiles of 16 rows (ceil(N_out / 64) * 4 * KW *
    256 uint8, zero rows past N_out), the AVX2 convolution's lookup-table layout, else None."""

    def __init__(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        isa: str,
        conv: tuple[int, tuple[int, int]] | None = None,
    ) -> None:
        self.shape = tuple(codes.shape)
        self.scale = scale.detach().to(torch.float32).reshape(-1).contiguous()
        self.alpha = self.scale * 0.5
        self.isa = isa
        self.conv = conv
        self.codes: torch.Tensor | None = codes.contiguous() if isa == "reference" else None
        self.words: torch.Tensor | None = None
        self.nibbles: torch.Tensor | None = None
        self.calls: dict[tuple, _ConvCall] = {}  # conv2d's checked calls, per input and arguments
        if isa != "reference":
            n, k = self.shape
            taps, c = (1, k) if conv is None else (conv[1][0] * conv[1][1], conv[0])
            tap_major = codes if conv is None else native.tap_major(codes, *conv)
            tap_major = tap_major.contiguous()
            kw = taps * -(-c // 64)
            self.words = torch.empty((-(-n // ROWS), kw * ROWS), dtype=torch.int64)
            lib = _lib()
            lib.lb_binary_pack_weights(tap_major.data_ptr(), n, taps, c, self.words.data_ptr())  # type: ignore[union-attr]
            if isa == "avx2" and conv is not None:
                tiles = lib.lb_binary_nibble_tiles(n)  # type: ignore[union-attr]
                nibbles = torch.empty(tiles * kw * 256, dtype=torch.uint8)
                ptrs = (self.words.data_ptr(), n, kw, nibbles.data_ptr())
                if lib.lb_binary_nibble_weights(*ptrs) == 0:  # type: ignore[union-attr]
                    self.nibbles = nibbles  # (else K is too long for its counters)

    @property
    def per_channel(self) -> bool:
        return self.alpha.numel() > 1

    def __repr__(self) -> str:
        n, k = self.shape
        return f"BinaryWeight({n}x{k}, isa={self.isa})"


def prepare(
    codes: torch.Tensor,
    scale: torch.Tensor,
    *,
    isa: str | None = None,
    conv: tuple[int, tuple[int, int]] | None = None,
) -> BinaryWeight:
    """codes (N_out, K) uint8 in {0, 1} (a 2-level quantizer's codes), scale () or (N_out,).
    ``conv=(C_in, (kh, kw))`` prepares a convolution's weight (K = C_in*kh*kw, ``F.unfold``
    order)."""
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise ValueError(f"codes must be 2-D uint8, got {tuple(codes.shape)} {codes.dtype}")
    if codes.numel() and int(codes.max()) > 1:
        raise ValueError(f"binary codes must be 0 or 1, got a code {int(codes.max())}")
    if scale.numel() not in (1, codes.shape[0]):
        raise ValueError(f"scale must have 1 or {codes.shape[0]} elements, got {scale.numel()}")
    if conv is not None and conv[0] * conv[1][0] * conv[1][1] != codes.shape[1]:
        raise ValueError(f"conv geometry {conv} does not match {codes.shape[1]} code columns")
    chosen = _pick_isa(isa) if codes.device.type == "cpu" else "reference"
    return BinaryWeight(codes, scale, chosen, conv)


def _threshold(threshold: torch.Tensor | None, channels: int) -> torch.Tensor | None:
    if threshold is None:
        return None
    t = threshold
    if t.dtype != torch.float32 or t.dim() != 1 or not t.is_contiguous():  # (cheap when it is)
        t = t.detach().to(torch.float32).reshape(-1).contiguous()
    if t.numel() != channels:
        raise ValueError(f"threshold has {t.numel()} values, the input {channels} channels")
    return t


def _identity(t: torch.Tensor | None) -> tuple[int, int]:
    """What a cached call keys an argument tensor by: the object and its in-place version."""
    return (0, 0) if t is None else (id(t), t._version)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.detach().to(torch.float32).contiguous()


def _check_epilogue(e: BlockEpilogue | None, n: int, c_in: int) -> None:
    """An epilogue fits a layer of n outputs and c_in input channels (its tensors were checked
    when it was made)."""
    if e is None:
        return
    if e.channels != n:
        raise ValueError(f"the epilogue has {e.channels} channels, the layer {n} outputs")
    if e.residual and n % c_in:
        raise ValueError(f"a residual of {c_in} channels cannot be added to {n} outputs")


def _epilogue_struct(e: BlockEpilogue | None) -> _Epilogue | None:
    """The C view of ``e``; valid while ``e`` lives (its tensors are contiguous)."""
    if e is None:
        return None
    tensors = (e.scale, e.shift, e.prelu_bias, e.prelu_slope, e.prelu_shift)
    return _Epilogue(*map(_ptr, tensors), int(e.residual))


def _linear_native(x, weight, bias, threshold, threads, epilogue):  # noqa: ANN001, ANN202
    """x (M, K) contiguous float32 -> (M, N_out)."""
    m, k = x.shape
    n = weight.shape[0]
    y = x.new_empty((m, n))
    ep = _epilogue_struct(epilogue)
    rc = _lib().lb_binary_linear(  # type: ignore[union-attr]
        native.ISAS.index(weight.isa),
        x.data_ptr(),
        m,
        k,
        _ptr(threshold),
        weight.words.data_ptr(),
        n,
        weight.alpha.data_ptr(),
        int(weight.per_channel),
        _ptr(bias),
        None if ep is None else ctypes.addressof(ep),
        y.data_ptr(),
        threads or torch.get_num_threads(),
    )
    if rc != 0:
        raise MemoryError(f"binary linear ({m}x{k} by {n}x{k}) could not allocate its buffers")
    return y


_prepared_cache: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _prepared_for(
    codes: torch.Tensor, scale: torch.Tensor, conv: tuple | None = None
) -> BinaryWeight:
    """``prepare(codes, scale, conv=conv)``, cached (``lowbit.kernels.cached_on_codes``)."""
    return cached_on_codes(
        _prepared_cache, codes, scale, (conv,), lambda: prepare(codes, scale, conv=conv)
    )


@torch.library.custom_op("lowbit::binary_linear", mutates_args=())
def _binary_linear_op(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: torch.Tensor | None,
) -> torch.Tensor:
    """The binary linear as one op: x (..., K) -> (..., N_out) float32, the weight given by its
    codes (N_out, K) in {0, 1} and scale () or (N_out,). What tracers record; the packed bits
    are a cache."""
    return linear(x, _prepared_for(codes, scale), bias, threshold)


@_binary_linear_op.register_fake
def _(x, codes, scale, bias, threshold):  # noqa: ANN001, ANN202
    return x.new_empty((*x.shape[:-1], codes.shape[0]), dtype=torch.float32)


def linear(
    x: torch.Tensor,
    weight: BinaryWeight,
    bias: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
    *,
    epilogue: BlockEpilogue | None = None,
    threads: int | None = None,
) -> torch.Tensor:
    """y = (sign(x - t) @ w_b.T) * alpha + b, then ``epilogue``: x (..., K) -> (..., N_out)
    float32."""
    n, k = weight.shape
    if weight.conv is not None:
        raise ValueError("this weight was prepared for a convolution (conv=...), not a linear")
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features but the weight expects {k}")
    t = _threshold(threshold, k)
    _check_epilogue(epilogue, n, k)
    if weight.isa == "reference" or x.device.type != "cpu":
        return reference.binary_linear(x, weight.codes, weight.scale, bias, t, epilogue)  # type: ignore[arg-type]
    x2 = x.reshape(-1, k).to(torch.float32).contiguous()
    y = _linear_native(x2, weight, _bias(bias), t, threads, epilogue)
    return y.reshape(*x.shape[:-1], n)


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


class _ConvCall:
    """One binary convolution's C call for one input shape and one set of arguments, checked
    and laid out once: at batch 1 the Python around a ~20 us kernel costs as much as the kernel,
    so a call only allocates y and passes the pointers. x (B, C, H, W) channels-last float32 ->
    (B, N_out, Ho, Wo) channels-last."""

    def __init__(self, weight, shape, threshold, bias, geometry, out, epilogue, keys) -> None:  # noqa: ANN001
        b, c, h, w = shape
        # alive while the call is: the pointers below, and the objects whose ids key it (keys)
        self.keep = (threshold, bias, epilogue, *keys)
        n = weight.shape[0]
        self.y_shape = (b, n, *out)
        self.y_strides = (n * out[0] * out[1], 1, out[1] * n, n)  # channels-last
        self.run = _lib().lb_binary_conv2d  # type: ignore[union-attr]
        self.dims = (ctypes.c_int64 * 14)(b, c, h, w, *geometry, *out)
        self.epilogue = _epilogue_struct(epilogue)
        self.args = (  # the C arguments after x
            ctypes.addressof(self.dims),
            _ptr(threshold),
            weight.words.data_ptr(),
            _ptr(weight.nibbles),
            weight.shape[0],
            weight.alpha.data_ptr(),
            int(weight.per_channel),
            _ptr(bias),
            None if self.epilogue is None else ctypes.addressof(self.epilogue),
        )
        self.isa = native.ISAS.index(weight.isa)

    def __call__(self, x: torch.Tensor, threads: int | None) -> torch.Tensor:
        # (empty_strided: 2 us less than empty(..., memory_format=channels_last) at batch 1)
        y = torch.empty_strided(self.y_shape, self.y_strides, dtype=torch.float32)
        if y.numel():
            rc = self.run(
                self.isa,
                x.data_ptr(),
                *self.args,
                y.data_ptr(),
                threads or torch.get_num_threads(),
            )
            if rc != 0:
                raise MemoryError(f"binary conv2d on {tuple(x.shape)} could not allocate buffers")
        return y


@torch.library.custom_op("lowbit::binary_conv2d", mutates_args=())
def _binary_conv2d_op(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: torch.Tensor | None,
    geometry: list[int],
) -> torch.Tensor:
    """The binary convolution as one op: x (B, C_in, H, W) -> (B, N_out, Ho, Wo) float32
    (contiguous), codes (N_out, C_in*kh*kw); geometry = kh, kw, sh, sw, ph, pw, dh, dw."""
    kh, kw, sh, sw, ph, pw, dh, dw = geometry
    weight = _prepared_for(codes, scale, (x.shape[1], (kh, kw)))
    y = conv2d(
        x,
        weight,
        bias,
        threshold,
        kernel_size=(kh, kw),
        stride=(sh, sw),
        padding=(ph, pw),
        dilation=(dh, dw),
    )
    return y.contiguous()


@_binary_conv2d_op.register_fake
def _(x, codes, scale, bias, threshold, geometry):  # noqa: ANN001, ANN202
    kh, kw, sh, sw, ph, pw, dh, dw = geometry
    ho, wo = _out_size(x.shape[2], kh, sh, ph, dh), _out_size(x.shape[3], kw, sw, pw, dw)
    return x.new_empty((x.shape[0], codes.shape[0], ho, wo), dtype=torch.float32)


def conv2d(
    x: torch.Tensor,
    weight: BinaryWeight,
    bias: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
    *,
    kernel_size: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    epilogue: BlockEpilogue | None = None,
    threads: int | None = None,
) -> torch.Tensor:
    """A binary convolution (groups 1, the binarized input padded with +1): x (B, C_in, H, W)
    -> (B, N_out, H', W'), channels-last on the native paths (the next layer reads it in place),
    ``weight`` prepared with ``conv=(C_in, kernel_size)``, threshold None or (C_in,), then
    ``epilogue`` (a residual needs H' = H and W' = W)."""
    key = (x.shape, x.dtype, x.device, kernel_size, stride, padding, dilation)
    key += (*_identity(threshold), *_identity(bias), id(epilogue))
    try:
        call = weight.calls.get(key)
    except TypeError:  # lists in the geometry (unhashable): the same call with tuples
        kernel_size, stride, padding, dilation = map(
            tuple, (kernel_size, stride, padding, dilation)
        )
        return conv2d(
            x,
            weight,
            bias,
            threshold,
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            epilogue=epilogue,
            threads=threads,
        )
    if call is None:
        geometry = (*kernel_size, *stride, *padding, *dilation)
        t = _threshold(threshold, x.shape[1])
        _check_epilogue(epilogue, weight.shape[0], x.shape[1])
        out = tuple(max(0, _out_size(x.shape[2 + i], *geometry[i::2])) for i in (0, 1))
        if epilogue is not None and epilogue.residual and out != tuple(x.shape[2:]):
            raise ValueError(
                f"a residual needs the output on the input's pixel grid: input "
                f"{tuple(x.shape[2:])}, output {out} (stride 1 and 'same' padding)"
            )
        if weight.isa == "reference" or x.device.type != "cpu":
            return reference.binary_conv2d(
                x,
                weight.codes,  # type: ignore[arg-type]
                weight.scale,
                bias,
                t,
                kernel_size=kernel_size,
                stride=stride,
                padding=padding,
                dilation=dilation,
                epilogue=epilogue,
            )
        if weight.conv != (x.shape[1], tuple(kernel_size)):
            raise ValueError(
                f"weight was not prepared for this convolution (conv={weight.conv}, input "
                f"channels {x.shape[1]}, kernel {tuple(kernel_size)}): prepare(..., conv=(C_in, "
                f"kernel_size))"
            )
        if len(weight.calls) >= 8:  # inputs of many shapes: keep the newest few
            weight.calls.clear()
        call = weight.calls[key] = _ConvCall(
            weight, x.shape, t, _bias(bias), geometry, out, epilogue, (threshold, bias)
        )
    if x.dtype != torch.float32 or not x.is_contiguous(memory_format=torch.channels_last):
        x = x.to(torch.float32).contiguous(memory_format=torch.channels_last)
    return call(x, threads)


def _f32_vector(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()


def maxpool2x2_channels_last(
    x: torch.Tensor,
    isa: str | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """2x2 max-pooling with stride 2 (odd sizes floored) of an NCHW-contiguous float32 CPU
    image, written channels-last for the next binary convolution: (B, C, H, W) -> (B, C, H // 2,
    W // 2), the values of ``torch.maximum`` over the four pixels. With ``scale`` and ``shift``
    (contiguous float32 (C,), a folded BatchNorm) each pixel is first mapped to ``x * scale[c]
    + shift[c]`` (two float32 roundings, as torch's mul then add). Exact, so the default is the
    best path whatever ``LOWBIT_KERNELS`` asks (reading it costs 1.6 us a call). None where the
    native library is missing, ``isa`` is "reference" or x, scale or shift is of another kind (the
    caller pools in torch)."""
    lib = _lib()
    if lib is None or x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous():
        return None
    isa = best_isa() if isa is None else isa
    if isa == "reference":
        return None
    b, c, h, w = x.shape
    if scale is not None:
        if scale.numel() != c or shift is None or shift.numel() != c:
            raise ValueError(f"scale and shift must have {c} values, one per channel")
        if not all(_f32_vector(t) for t in (scale, shift)):
            return None
    ho, wo = h // 2, w // 2
    y = torch.empty_strided((b, c, ho, wo), (c * ho * wo, 1, wo * c, c))  # channels-last
    if y.numel():
        isa_id = native.ISAS.index(isa)
        lib.lb_binary_maxpool2x2_nhwc(
            isa_id, x.data_ptr(), b, c, h, w, _ptr(scale), _ptr(shift), y.data_ptr()
        )
    return y
