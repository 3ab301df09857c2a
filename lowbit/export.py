"""ONNX export of packed models: ``export_onnx(model, path)`` and ``lowbit export``.

The graph is written node by node from the module tree (``onnx.helper``), not traced: every
module type a ``.lowbit`` file can hold has a converter below (``_CONVERTERS``), and a packed
layer becomes the ONNX ops that compute exactly what its kernels compute. Opset 21 plus
onnxruntime's ``com.microsoft`` domain; input ``input`` (B, C, H, W) float32 — or ``pixels``
(B, C, H, W) uint8 with ``embed_preprocessing=True`` — output ``logits`` (B, classes).

A packed weight ``W = s * (c - (N-1)/2)`` (codes c in 0..N-1, ``lowbit.kernels.reference``) is
stored as unsigned integers ``q`` with a zero point ``z`` and a step ``t`` such that
``(q - z) * t`` is bit for bit the float32 weight lowbit computes with::

    odd N:   q = c,    z = (N-1)/2,  t = s        (levels are integers)
    even N:  q = 2 c,  z = N-1,      t = s / 2    (half-integer levels, doubled; s/2 is exact)

Weight-only layers (``activations="fp32"``, y = t(x) W^T + b in float32):

* Linear: onnxruntime's ``MatMulNBits`` (``(q - z) * scale`` per block of K, ``accuracy_level``
  0 = float32 arithmetic) where q fits 8 bits, else ``DequantizeLinear`` (uint16) + ``MatMul``;
  bits 4 or 8 by the largest q of N levels, or 2 for N <= 3 with ``compact=True`` (half the
  size; onnxruntime's 2-bit CPU kernel is much slower);
* Conv2d: ``DequantizeLinear`` (uint4, uint8 or uint16 with the zero point, per-tensor or
  per-output-channel step) + ``Conv``.

The outputs equal lowbit's up to float32 summation order (the dequantized weights are equal).

absmax8 layers (``activations="int8"``) reproduce the kernels' integer arithmetic exactly::

    a      = (1 / max(max|x| over the token, 1e-5)) * 127  float32 (token: a row; a conv's image)
    x_int  = clip(round(x a), -127, 127)                  int8 (Round: half to even, as torch)
    P      = MatMulInteger(x_int + 128, c, zero point 128)  (ConvInteger)       int32, exact
    S      = sum of x_int over each dot product's inputs (ReduceSum; a ones-kernel ConvInteger)
    acc    = 2 P - (N-1) S  = sum x_int (2c - (N-1))                           int32, exact
    y      = float32(float64(acc) * s / (2 a)) + b                             as the kernels

so onnxruntime's logits equal the packed model's bit for bit. Codes are stored in the smallest
unsigned type of opset 21 that holds them (uint4 or uint8) and cast to uint8 in the graph.

A layer's input transform (``QuantLinear``'s absmax8 in fp32 mode, ``BitLinear8``'s norm +
absmax8, ``SignLinear``'s norm) is written out as the same float ops before the product.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit import models
from lowbit.errors import LowbitError
from lowbit.files import atomic_write
from lowbit.nn import BitLinear8, MisbornLinear, QuantConv2d, QuantLinear, SignLinear
from lowbit.packed import PackedConv2d, PackedLinear, convert_
from lowbit.quantizers import AbsMax8

OPSET = 21
MS_DOMAIN = "com.microsoft"
IR_VERSION = 10  # the first IR with opset 21's uint4 (onnxruntime >= 1.18 reads it)
_NBITS_BLOCK = 256  # MatMulNBits' largest block for 2-bit codes; one scale per row repeated


def _onnx() -> Any:
    """The onnx package, or a one-line error naming the extra that installs it."""
    try:
        import onnx
    except ImportError as exc:
        raise LowbitError(
            "ONNX export needs the 'onnx' package: pip install 'lowbit[onnx]'"
        ) from exc
    return onnx


# --- the integer form of a packed weight ---------------------------------------------------------


def integer_weight(
    codes: torch.Tensor, scale: torch.Tensor, levels: int
) -> tuple[np.ndarray, int, np.ndarray]:
    """(q, z, t) with ``(q - z) * t == reference.dequantize(codes, scale, levels)`` bit for bit.

    codes (N_out, K) uint8 -> q (N_out, K) int64 in 0..2(N-1); z an int; t () or (N_out,)
    float32 (see the module docstring for the odd/even forms)."""
    c = codes.to(torch.int64).numpy()
    s = scale.detach().to(torch.float32).numpy()
    if levels % 2:
        return c, (levels - 1) // 2, s
    return 2 * c, levels - 1, (s / np.float32(2)).astype(np.float32)


def _bits_for(qmax: int) -> int:
    """The smallest of 2, 4, 8, 16 bits holding 0..qmax."""
    return next(b for b in (2, 4, 8, 16) if qmax < 1 << b)


def _q_bits(levels: int) -> int:
    """Bits of ``integer_weight``'s q for N levels (a property of N, not of the codes used)."""
    return _bits_for(levels - 1 if levels % 2 else 2 * (levels - 1))


# --- the graph -----------------------------------------------------------------------------------


class _Graph:
    """Nodes and initializers in the order they are made; names are unique by a counter."""

    def __init__(self, compact: bool = False) -> None:
        self.onnx = _onnx()
        self.compact = compact
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value: Any, hint: str = "c", dtype: Any = np.float32) -> str:
        """An initializer from a number, array or tensor (converted to ``dtype``)."""
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        arr = np.asarray(value, dtype=dtype)
        name = self._name(hint)
        self.inits.append(self.onnx.numpy_helper.from_array(arr, name))
        return name

    def packed_ints(self, q: np.ndarray, bits: int, hint: str) -> tuple[str, int]:
        """An unsigned initializer of ``bits`` (4, 8 or 16; 2 is stored as 4) and its TensorProto
        type: uint4 is not a numpy type, so it is made from the flat values."""
        tp = self.onnx.TensorProto
        dtype = {4: tp.UINT4, 8: tp.UINT8, 16: tp.UINT16}[max(bits, 4)]
        name = self._name(hint)
        if dtype == tp.UINT4:
            # Two codes a byte, low nibble first (the layout make_tensor would build, bulk).
            flat = q.reshape(-1).astype(np.uint8)
            flat = np.concatenate([flat, np.zeros(len(flat) % 2, np.uint8)])
            raw = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
            t = self.onnx.helper.make_tensor(name, dtype, list(q.shape), raw, raw=True)
        else:
            np_type = np.uint8 if dtype == tp.UINT8 else np.uint16
            t = self.onnx.numpy_helper.from_array(q.astype(np_type), name)
        self.inits.append(t)
        return name, dtype

    def op(self, op_type: str, *inputs: str, domain: str = "", **attrs: Any) -> str:
        out = self._name(op_type.lower())
        node = self.onnx.helper.make_node(
            op_type, list(inputs), [out], domain=domain or None, **attrs
        )
        self.nodes.append(node)
        return out

    def axes(self, *axes: int) -> str:
        return self.const(list(axes), "axes", np.int64)


# --- packed layers -------------------------------------------------------------------------------


def _absmax_multiplier(g: _Graph, x: str, axes: tuple[int, ...]) -> str:
    """a = 127 / max(max|x| over ``axes``, 1e-5), float32, axes kept (as AbsMax8.scale).

    torch evaluates ``127 / m`` as ``reciprocal(m) * 127`` (and so do the kernels): the same
    two roundings here, not one true division."""
    amax = g.op("ReduceMax", g.op("Abs", x), g.axes(*axes), keepdims=1)
    return g.op("Mul", g.op("Reciprocal", g.op("Max", amax, g.const(1e-5))), g.const(127.0))


def _absmax_integers(g: _Graph, x: str, a: str, low: float) -> str:
    """clip(round(x a), low, 127), float32 holding integers."""
    return g.op("Clip", g.op("Round", g.op("Mul", x, a)), g.const(low), g.const(127.0))


def _rms_norm(g: _Graph, x: str, d: int) -> str:
    """``lowbit.nn.simple_rms_norm``: x / max(||x||_2, 1e-12) * d**-0.5 over the last dim."""
    norm = g.op("ReduceL2", x, g.axes(-1), keepdims=1)
    return g.op("Mul", g.op("Div", x, g.op("Max", norm, g.const(1e-12))), g.const(d**-0.5))


def _fake_absmax8(g: _Graph, x: str, axes: tuple[int, ...]) -> str:
    """``AbsMax8.__call__``: clip(round(x a), -128, 127) / a."""
    a = _absmax_multiplier(g, x, axes)
    return g.op("Div", _absmax_integers(g, x, a, -128.0), a)


def _input_transform(g: _Graph, layer: nn.Module, x: str) -> str:
    """The packed layer's ``_transform`` (the source layer's input transform) as ONNX ops."""
    src = layer.input_source
    if src is None:
        return x
    kind = type(src)
    if kind is BitLinear8:
        return _fake_absmax8(g, _rms_norm(g, x, layer.in_features), (-1,))
    if kind is SignLinear:
        return _rms_norm(g, x, layer.in_features) if src.norm else x
    if kind in (QuantLinear, QuantConv2d, MisbornLinear):
        fake = isinstance(src.input_quantizer, AbsMax8) and layer.activations == "fp32"
        if not fake:  # int8 mode: the kernels' own absmax8 is the layer's (see packed.py)
            return x
        return _fake_absmax8(g, x, (-3, -2, -1) if kind is QuantConv2d else (-1,))
    raise LowbitError(f"cannot export a packed layer whose input transform is {kind.__name__}")


def _rescale(g: _Graph, acc: str, t_step: np.ndarray, a: str, bias: Any, conv: bool) -> str:
    """y = float32(float64(acc) * s / (2 a)) + b (``reference._rescale``); s, b per channel."""
    shape = (-1, 1, 1) if conv else (-1,)
    s = g.const(t_step.reshape(shape) if t_step.ndim else t_step, "scale", np.float64)
    two_a = g.op(
        "Mul", g.op("Cast", a, to=g.onnx.TensorProto.DOUBLE), g.const(2.0, "two", np.float64)
    )
    acc64 = g.op("Cast", acc, to=g.onnx.TensorProto.DOUBLE)
    y = g.op("Cast", g.op("Div", g.op("Mul", acc64, s), two_a), to=g.onnx.TensorProto.FLOAT)
    if bias is None:
        return y
    return g.op("Add", y, g.const(bias.reshape(shape), "bias"))


def _codes_uint8(g: _Graph, codes: np.ndarray, levels: int, hint: str) -> str:
    """Codes as a uint8 tensor in the graph, stored in uint4 when they fit (a constant cast)."""
    name, dtype = g.packed_ints(codes, _bits_for(levels - 1), hint)
    if dtype == g.onnx.TensorProto.UINT8:
        return name
    return g.op("Cast", name, to=g.onnx.TensorProto.UINT8)


def _int8_product(g: _Graph, layer: nn.Module, x: str, conv: bool) -> str:
    """The int8 path: P = sum x_int c, S = sum x_int, acc = 2P - (N-1)S (int32, exact).

    The integers enter the integer ops as uint8 ``x_int + 128`` with zero point 128 (the same
    values): onnxruntime's uint8 x uint8 kernels are its fast ones (int8 x uint8 measured ~50x
    slower on one core), and ConvInteger pads with the zero point, i.e. with x_int = 0."""
    tp = g.onnx.TensorProto
    axes = (-3, -2, -1) if conv else (-1,)
    a = _absmax_multiplier(g, x, axes)
    x_int = _absmax_integers(g, x, a, -127.0)  # float32 holding integers
    x_u8 = g.op("Cast", g.op("Add", x_int, g.const(128.0)), to=tp.UINT8)
    zero = g.const(128, "x_zero_point", np.uint8)
    codes = layer.codes.to(torch.int64).numpy()
    if conv:
        attrs = _conv_attrs(layer)
        w = _codes_uint8(g, codes.reshape(layer.weight_shape), layer.levels, "codes")
        ones = g.const(np.ones((1, *layer.weight_shape[1:])), "ones", np.uint8)
        p = g.op("ConvInteger", x_u8, w, zero, **attrs)
        s = g.op("ConvInteger", x_u8, ones, zero, **attrs)  # (B, 1, H', W')
    else:
        p = g.op("MatMulInteger", x_u8, _codes_uint8(g, codes.T, layer.levels, "codes"), zero)
        if layer.in_features * 127 < 1 << 24:  # float32 sums of integers stay exact
            s = g.op("Cast", g.op("ReduceSum", x_int, g.axes(-1), keepdims=1), to=tp.INT32)
        else:
            s = g.op("ReduceSum", g.op("Cast", x_int, to=tp.INT32), g.axes(-1), keepdims=1)
    two = g.const(2, "two", np.int32)
    acc = g.op(
        "Sub", g.op("Mul", p, two), g.op("Mul", s, g.const(layer.levels - 1, "n1", np.int32))
    )
    step = layer.scale.detach().to(torch.float32).numpy()
    bias = None if layer.bias is None else layer.bias.detach().numpy()
    return _rescale(g, acc, step, a, bias, conv)


def _conv_attrs(layer: PackedConv2d) -> dict[str, Any]:
    ph, pw = layer.padding
    return {
        "pads": [ph, pw, ph, pw],
        "strides": list(layer.stride),
        "dilations": list(layer.dilation),
        "kernel_shape": list(layer.kernel_size),
    }


def _matmul_nbits(g: _Graph, x: str, q: np.ndarray, z: int, t: np.ndarray, bits: int) -> str:
    """y = x ((q - z) t)^T with MatMulNBits: q (N_out, K) packed low bits first along K in
    blocks of ``_NBITS_BLOCK`` (the last zero-padded), the row's step repeated per block."""
    n, k = q.shape
    block = min(_NBITS_BLOCK, max(16, 1 << (k - 1).bit_length()))
    blocks = -(-k // block)
    per = 8 // bits
    padded = np.zeros((n, blocks * block), np.uint8)
    padded[:, :k] = q
    lanes = padded.reshape(n, blocks, block // per, per)
    packed = np.zeros(lanes.shape[:-1], np.uint8)
    for i in range(per):
        packed |= (lanes[..., i] << (i * bits)).astype(np.uint8)
    scales = np.broadcast_to(t.reshape(-1, 1) if t.ndim else t, (n, blocks))
    # Zero points: ceil(blocks * bits / 8) bytes a row, low bits first, the same z per block.
    zbytes = -(-blocks * bits // 8)
    zp = np.zeros((n, zbytes), np.uint8)
    for j in range(blocks):
        zp[:, j * bits // 8] |= np.uint8((z << (j * bits % 8)) & 0xFF)
    return g.op(
        "MatMulNBits",
        x,
        g.const(packed, "codes", np.uint8),
        g.const(np.ascontiguousarray(scales), "scales"),
        g.const(zp.reshape(-1), "zero_points", np.uint8),
        domain=MS_DOMAIN,
        K=k,
        N=n,
        bits=bits,
        block_size=block,
        accuracy_level=0,
    )


def _dequantized(g: _Graph, q: np.ndarray, z: int, t: np.ndarray, bits: int, shape: tuple) -> str:
    """DequantizeLinear of q (stored in 4, 8 or 16 bits) with zero point z, per-row step t."""
    qname, dtype = g.packed_ints(q.reshape(shape), bits, "codes")
    zp = g.onnx.helper.make_tensor(g._name("zero_point"), dtype, list(t.shape), [z] * t.size)
    g.inits.append(zp)
    return g.op("DequantizeLinear", qname, g.const(t, "step"), zp.name, axis=0)


def _packed(g: _Graph, layer: nn.Module, x: str) -> str:
    """A PackedLinear / PackedConv2d: its input transform, then the product of its mode."""
    conv = isinstance(layer, PackedConv2d)
    if layer.activations == "binary":
        raise LowbitError(
            "cannot export a binary (XNOR-popcount) layer to ONNX yet; run it with lowbit"
        )
    x = _input_transform(g, layer, x)
    if layer.activations == "int8":
        return _int8_product(g, layer, x, conv)
    q, z, t = integer_weight(layer.codes, layer.scale, layer.levels)
    bits = _q_bits(layer.levels)
    if conv:
        w = _dequantized(g, q, z, t, bits, layer.weight_shape)
        y = g.op("Conv", x, w, **_conv_attrs(layer))
        shape: tuple[int, ...] = (-1, 1, 1)
    elif bits <= 8:
        # onnxruntime 1.32 runs 2-bit MatMulNBits ~30x slower than 4-bit on CPU (measured in
        # benchmarks/onnx_export.py): 2 bits only when asked for the smallest file
        y = _matmul_nbits(g, x, q, z, t, bits if g.compact else max(bits, 4))
        shape = (-1,)
    else:
        w = _dequantized(g, q, z, t, bits, tuple(q.shape))
        y = g.op("MatMul", x, g.op("Transpose", w, perm=[1, 0]))
        shape = (-1,)
    if layer.bias is None:
        return y
    return g.op("Add", y, g.const(layer.bias.detach().numpy().reshape(shape), "bias"))


# --- float modules -------------------------------------------------------------------------------


def _linear(g: _Graph, m: nn.Linear, x: str) -> str:
    y = g.op("MatMul", x, g.const(m.weight.T, "weight"))
    return y if m.bias is None else g.op("Add", y, g.const(m.bias, "bias"))


def _conv(g: _Graph, m: nn.Conv2d, x: str) -> str:
    if m.padding_mode != "zeros":
        raise LowbitError(f"cannot export Conv2d with padding_mode={m.padding_mode!r}")
    if isinstance(m.padding, str):
        # 'same' pads the total d*(k-1) on both sides (the extra one at the end), 'valid' none
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size, strict=True)]
        lo = [t // 2 if m.padding == "same" else 0 for t in total]
        hi = [t - t // 2 if m.padding == "same" else 0 for t in total]
        pads = [*lo, *hi]
    else:
        pads = [*m.padding, *m.padding]
    inputs = [x, g.const(m.weight, "weight")]
    if m.bias is not None:
        inputs.append(g.const(m.bias, "bias"))
    return g.op(
        "Conv",
        *inputs,
        pads=pads,
        strides=list(m.stride),
        dilations=list(m.dilation),
        group=m.groups,
        kernel_shape=list(m.kernel_size),
    )


def _flatten(g: _Graph, m: nn.Flatten, x: str) -> str:
    if m.start_dim != 1 or m.end_dim != -1:
        raise LowbitError("cannot export Flatten other than Flatten(1, -1)")
    return g.op("Flatten", x, axis=1)


def _pool_attrs(m: nn.Module) -> dict[str, Any]:
    def pair(v: Any) -> list[int]:
        return [v, v] if isinstance(v, int) else list(v)

    stride = m.stride if m.stride is not None else m.kernel_size
    ph, pw = pair(m.padding)
    return {
        "kernel_shape": pair(m.kernel_size),
        "strides": pair(stride),
        "pads": [ph, pw, ph, pw],
        "ceil_mode": int(m.ceil_mode),
    }


def _maxpool(g: _Graph, m: nn.MaxPool2d, x: str) -> str:
    d = m.dilation
    return g.op("MaxPool", x, dilations=[d, d] if isinstance(d, int) else list(d), **_pool_attrs(m))


def _avgpool(g: _Graph, m: nn.AvgPool2d, x: str) -> str:
    if m.divisor_override is not None:
        raise LowbitError("cannot export AvgPool2d with divisor_override")
    return g.op("AveragePool", x, count_include_pad=int(m.count_include_pad), **_pool_attrs(m))


def _adaptive_avgpool(g: _Graph, m: nn.AdaptiveAvgPool2d, x: str) -> str:
    if m.output_size not in (1, (1, 1), [1, 1]):
        raise LowbitError("cannot export AdaptiveAvgPool2d other than output_size=1")
    return g.op("GlobalAveragePool", x)


def _layernorm(g: _Graph, m: nn.LayerNorm, x: str) -> str:
    shape = tuple(m.normalized_shape)
    w = m.weight if m.weight is not None else torch.ones(shape)
    inputs = [x, g.const(w, "ln_weight")]
    if m.bias is not None:
        inputs.append(g.const(m.bias, "ln_bias"))
    return g.op("LayerNormalization", *inputs, axis=-len(shape), epsilon=m.eps)


def _batchnorm(g: _Graph, m: nn.modules.batchnorm._BatchNorm, x: str) -> str:
    if m.running_mean is None:
        raise LowbitError("cannot export BatchNorm without running statistics")
    c = m.num_features
    w = m.weight if m.weight is not None else torch.ones(c)
    b = m.bias if m.bias is not None else torch.zeros(c)
    stats = [g.const(t) for t in (w, b, m.running_mean, m.running_var)]
    return g.op("BatchNormalization", x, *stats, epsilon=m.eps)


def _sequential(g: _Graph, m: nn.Sequential, x: str) -> str:
    for child in m:
        x = _convert(g, child, x)
    return x


def _attention(g: _Graph, m: models.Attention, x: str) -> str:
    """(B, T, D) -> q, k, v (B, H, T, D/H) -> softmax(q k^T / sqrt(D/H)) v -> proj."""
    d = m.q.in_features
    h = m.heads

    def split(y: str) -> str:
        y = g.op("Reshape", y, g.const([0, 0, h, d // h], "shape", np.int64))
        return g.op("Transpose", y, perm=[0, 2, 1, 3])

    q, k, v = (split(_convert(g, lin, x)) for lin in (m.q, m.k, m.v))
    scores = g.op(
        "Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), g.const((d // h) ** -0.5)
    )
    y = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)  # (B, H, T, D/H)
    y = g.op(
        "Reshape", g.op("Transpose", y, perm=[0, 2, 1, 3]), g.const([0, 0, d], "shape", np.int64)
    )
    return _convert(g, m.proj, y)


def _block(g: _Graph, m: models.Block, x: str) -> str:
    x = g.op("Add", x, _convert(g, m.attn, _convert(g, m.norm1, x)))
    return g.op("Add", x, _convert(g, m.mlp, _convert(g, m.norm2, x)))


def _vit(g: _Graph, m: models.ViT, x: str) -> str:
    """``ViT.patches`` (crop, split into p x p patches, channels last), embed, blocks, head."""
    p, (gh, gw) = m.patch_size, m.grid
    c = m.embed.in_features // (p * p)
    x = g.op("Slice", x, g.axes(0, 0), g.axes(gh * p, gw * p), g.axes(2, 3))
    x = g.op("Reshape", x, g.const([-1, c, gh, p, gw, p], "shape", np.int64))
    x = g.op("Transpose", x, perm=[0, 2, 4, 3, 5, 1])
    x = g.op("Reshape", x, g.const([-1, gh * gw, p * p * c], "shape", np.int64))
    z = g.op("Add", _convert(g, m.embed, x), g.const(m.position, "position"))
    z = _convert(g, m.norm, _convert(g, m.blocks, z))
    if m.pool == "flatten":
        z = g.op("Flatten", z, axis=1)
    else:
        z = g.op("ReduceMean", z, g.axes(1), keepdims=0)
    return _convert(g, m.head, z)


def _simple(op_type: str, **attrs: Any) -> Callable[[_Graph, nn.Module, str], str]:
    return lambda g, m, x: g.op(op_type, x, **attrs)


def _passthrough(g: _Graph, m: nn.Module, x: str) -> str:
    return x  # Identity, and Dropout at inference


_CONVERTERS: dict[type, Callable[[_Graph, Any, str], str]] = {
    nn.Sequential: _sequential,
    nn.Linear: _linear,
    nn.Conv2d: _conv,
    nn.Flatten: _flatten,
    nn.ReLU: _simple("Relu"),
    nn.Tanh: _simple("Tanh"),
    nn.Sigmoid: _simple("Sigmoid"),
    nn.Identity: _passthrough,
    nn.Dropout: _passthrough,
    nn.MaxPool2d: _maxpool,
    nn.AvgPool2d: _avgpool,
    nn.AdaptiveAvgPool2d: _adaptive_avgpool,
    nn.LayerNorm: _layernorm,
    nn.BatchNorm1d: _batchnorm,
    nn.BatchNorm2d: _batchnorm,
    PackedLinear: _packed,
    PackedConv2d: _packed,
    models.Attention: _attention,
    models.Block: _block,
    models.ViT: _vit,
}


def _convert(g: _Graph, m: nn.Module, x: str) -> str:
    if type(m) is nn.GELU:
        return g.op("Gelu", x, approximate=m.approximate)
    if type(m) is nn.Softmax:
        return g.op("Softmax", x, axis=-1 if m.dim is None else m.dim)
    fn = _CONVERTERS.get(type(m))
    if fn is None:
        raise LowbitError(
            f"cannot export a module of type {type(m).__name__} to ONNX; supported: "
            f"{', '.join(sorted(t.__name__ for t in _CONVERTERS))}, GELU, Softmax"
        )
    return fn(g, m, x)


# --- public API ----------------------------------------------------------------------------------


def _packed_copy(model: nn.Module) -> nn.Module:
    """``model`` itself when no fake-quant layer is left, else a converted copy (eval mode)."""
    if any(isinstance(m, (QuantLinear, QuantConv2d)) for m in model.modules()):
        model = convert_(copy.deepcopy(model))
    return model.eval()


def _input_shape(model: nn.Module, meta: Any, input_shape: Any) -> tuple[int, int, int]:
    if input_shape is None and meta is not None and meta.input_shape is not None:
        input_shape = meta.input_shape
    if input_shape is None:
        input_shape = (
            (getattr(model, "lowbit_spec", None) or {}).get("kwargs", {}).get("input_shape")
        )
    if input_shape is None:
        raise ValueError("the model does not say its input shape: pass input_shape=(C, H, W)")
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {input_shape!r}")
    return shape  # type: ignore[return-value]


def _preprocessing(g: _Graph, meta: Any) -> str:
    """Raw uint8 pixels -> the model's input, as ``lowbit.meta.preprocess`` computes it."""
    from lowbit.meta import normalisation_arrays

    if meta is None or meta.normalisation is None:
        raise ValueError(
            "the model carries no preprocessing to embed (saved without metadata); export "
            "without embed_preprocessing, or re-pack it with 'lowbit pack'"
        )
    divide, mean, std = normalisation_arrays(meta)
    x = g.op("Cast", "pixels", to=g.onnx.TensorProto.FLOAT)
    x = g.op("Div", x, g.const(divide))
    return g.op(
        "Div", g.op("Sub", x, g.const(mean.reshape(-1, 1, 1))), g.const(std.reshape(-1, 1, 1))
    )


def to_onnx(
    model: nn.Module,
    *,
    embed_preprocessing: bool = False,
    input_shape: tuple[int, int, int] | None = None,
    compact: bool = False,
) -> Any:
    """The ``onnx.ModelProto`` of ``model`` (packed, or fake-quant: converted on a copy);
    arguments as ``export_onnx``."""
    g = _Graph(compact)
    onnx = g.onnx
    model = _packed_copy(model)
    meta = getattr(model, "lowbit_meta", None)
    shape = _input_shape(model, meta, input_shape)
    with torch.no_grad():
        if embed_preprocessing:
            name, elem = "pixels", onnx.TensorProto.UINT8
            x = _preprocessing(g, meta)
        else:
            name, elem = "input", onnx.TensorProto.FLOAT
            x = name
        logits = _convert(g, model, x)
        classes = model(torch.zeros(1, *shape)).shape[-1]
    g.nodes.append(onnx.helper.make_node("Identity", [logits], ["logits"]))
    graph = onnx.helper.make_graph(
        g.nodes,
        "lowbit",
        [onnx.helper.make_tensor_value_info(name, elem, ["batch", *shape])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", classes])],
        g.inits,
    )
    proto = onnx.helper.make_model(
        graph,
        opset_imports=[
            onnx.helper.make_opsetid("", OPSET),
            onnx.helper.make_opsetid(MS_DOMAIN, 1),
        ],
        producer_name="lowbit",
    )
    proto.ir_version = IR_VERSION
    if meta is not None:
        onnx.helper.set_model_props(proto, {"lowbit_meta": meta.to_json_text()})
    return proto


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    embed_preprocessing: bool = False,
    input_shape: tuple[int, int, int] | None = None,
    compact: bool = False,
) -> int:
    """Write ``model`` as an ONNX file (atomically); returns its size in bytes.

    ``embed_preprocessing``: the graph takes raw uint8 pixels (B, C, H, W) and applies the
    normalisation saved in the model's ``lowbit_meta``. ``input_shape`` (C, H, W) is needed only
    when neither the metadata nor the model's spec gives it. ``compact``: 2-bit MatMulNBits for
    weight-only linear layers of 2 or 3 levels (smaller file, slower in onnxruntime 1.32)."""
    proto = to_onnx(
        model, embed_preprocessing=embed_preprocessing, input_shape=input_shape, compact=compact
    )
    data = proto.SerializeToString()
    atomic_write(path, data)
    return len(data)


def session(path_or_proto: Any, threads: int | None = None) -> Any:
    """An onnxruntime CPU session (a one-line error naming the extra when it is missing)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise LowbitError(
            "running ONNX models needs the 'onnxruntime' package: pip install 'lowbit[onnx]'"
        ) from exc
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if isinstance(path_or_proto, (str, Path)):
        src: Any = str(path_or_proto)
    else:
        src = path_or_proto.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


__all__ = ["export_onnx", "integer_weight", "session", "to_onnx"]
