"""The reference kernels: the specification every optimized kernel is tested against.

A packed layer's weight is stored as integer codes ``c`` (uint8, shape (N_out, K), values
0..levels-1) and a positive scale ``s`` (shape () per tensor or (N_out,) per output channel). The
weight it stands for is::

    W[n, k] = s[n] * (c[n, k] - (levels - 1) / 2)                              (N_out, K)

Two activation modes:

* ``"fp32"``:  y = x @ W.T + b, in float32 (x: (..., K) -> y: (..., N_out)). Matches the
  fake-quantized training layer up to float summation order.
* ``"int8"``:  x is quantized per token (per row of its last dimension) as BitNet does,
  ``a = 127 / max|x|``, ``x_int = clip(round(x * a), -127, 127)``, the dot products are taken in
  exact integer arithmetic with the doubled levels ``2 * (c - (levels-1)/2)`` (odd integers for
  even N, even integers for odd N, so every level count stays integral) and rescaled once::

      acc[t, n] = sum_k x_int[t, k] * (2 c[n, k] - (levels - 1))               (int32 exact)
      y[t, n]   = acc[t, n] * s[n] / (2 a[t]) + b[n]

  This equals a layer trained with ``input_quantizer="absmax8"`` up to float rounding; on a
  weight-only-quantized layer it is an approximation (8-bit activations).

  A convolution's token is the whole input image (``conv2d``): one multiplier ``a[b]`` per image
  over (C, H, W), as ``QuantConv2d`` trains with absmax8, so every im2col patch of image ``b``
  holds integers of the same scale and the dot products stay exact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ACTIVATION_MODES = ("fp32", "int8")


def dequantize(codes: torch.Tensor, scale: torch.Tensor, levels: int) -> torch.Tensor:
    """W = s * (c - (levels-1)/2): codes (N_out, K) uint8, scale () or (N_out,) -> (N_out, K)."""
    s = scale.reshape(-1, 1) if scale.dim() else scale
    return (codes.to(torch.float32) - (levels - 1) / 2) * s


def quantize_activations(
    x: torch.Tensor, dim: int | tuple[int, ...] = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax int8 over ``dim`` (the token): x -> (x_int float32 integral in -127..127, a the
    multiplier 127 / max|x| with ``dim`` kept as size 1). Per token: x (..., K), a (..., 1)."""
    a = 127.0 / x.abs().amax(dim=dim, keepdim=True).clamp(min=1e-5)
    return (x * a).round().clamp(-127, 127), a


def _integer_product(
    op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_int: torch.Tensor,
    codes: torch.Tensor,
    levels: int,
    k: int,
) -> torch.Tensor:
    """op(x_int, 2 c - (levels-1)) exactly, as float64: both operands are integers, so float32
    is exact (in any summation order) while every partial sum stays below 2^24, i.e. while
    K * 127 * (levels-1) < 2^24 (ternary up to K = 66,000); beyond that, float64."""
    doubled = codes.to(torch.float32) * 2 - (levels - 1)
    if k * 127 * (levels - 1) < 1 << 24:
        return op(x_int, doubled).to(torch.float64)
    return op(x_int.to(torch.float64), doubled.to(torch.float64))


def _rescale(
    acc: torch.Tensor, scale: torch.Tensor, a: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """y = acc * s / (2 a) + b: the float64 product and quotient, then float32 (as the kernels)."""
    y = (acc * scale.to(torch.float64) / (2 * a.to(torch.float64))).to(torch.float32)
    return y if bias is None else y + bias


def linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    levels: int,
    bias: torch.Tensor | None = None,
    activations: str = "fp32",
) -> torch.Tensor:
    """y = x W^T + b with W from (codes, scale, levels); x (..., K) float32 -> (..., N_out)."""
    if activations == "fp32":
        return torch.nn.functional.linear(x, dequantize(codes, scale, levels), bias)
    if activations != "int8":
        raise ValueError(f"activations must be one of {', '.join(ACTIVATION_MODES)}")
    x_int, a = quantize_activations(x)
    acc = _integer_product(torch.nn.functional.linear, x_int, codes, levels, codes.shape[1])
    return _rescale(acc, scale, a, bias)


def conv2d(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    levels: int,
    bias: torch.Tensor | None = None,
    *,
    kernel_size: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] | str = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    activations: str = "fp32",
) -> torch.Tensor:
    """The reference convolution (groups = 1): x (B, C_in, H, W) -> (B, N_out, H', W'), codes
    (N_out, C_in*kH*kW) in ``weight.reshape(N_out, -1)``'s order.

    ``"int8"``: x is quantized per image (``a`` (B, 1, 1, 1)), the convolution of the integers
    with the doubled levels is exact, then rescaled per image and output channel."""
    if activations not in ACTIVATION_MODES:
        raise ValueError(f"activations must be one of {', '.join(ACTIVATION_MODES)}")
    n = codes.shape[0]
    shape = (n, x.shape[-3], *kernel_size)

    def conv(inp: torch.Tensor, weight: torch.Tensor, b: torch.Tensor | None = None):
        return torch.nn.functional.conv2d(inp, weight.reshape(shape), b, stride, padding, dilation)

    if activations == "fp32":
        return conv(x, dequantize(codes, scale, levels), bias)
    x_int, a = quantize_activations(x, dim=(-3, -2, -1))  # a (B, 1, 1, 1)
    acc = _integer_product(conv, x_int, codes, levels, codes.shape[1])
    s = scale.reshape(-1, 1, 1) if scale.dim() else scale
    return _rescale(acc, s, a, None if bias is None else bias.reshape(-1, 1, 1))


# --- binary layers: activations and weights in {-1, +1} (XNOR-popcount, csrc/lowbit_binary.c) ---
#
# A binary layer's weight has 2 levels: codes c in {0, 1}, W = s * (c - 1/2) = alpha * w_b with
# w_b = 2c - 1 and alpha = s / 2. Its input is binarized, x_b = sign(x - t) with sign(0) = +1
# (t: rsign's threshold per input channel, else 0), and
#
#     y = (x_b @ w_b.T) * alpha + b                  the sum an exact integer, then two roundings
#
# exactly as ``QuantLinear`` computes it; a convolution pads x_b with +1.


def binarize(x: torch.Tensor, threshold: torch.Tensor | None = None) -> torch.Tensor:
    """sign(x - t) in {-1., +1.} (x's shape, float32), sign(0) = +1, computed as ``x < t``.
    ``threshold`` (t) is broadcast against x as given (None: 0)."""
    t = 0.0 if threshold is None else threshold
    return torch.where(x < t, -1.0, 1.0).to(torch.float32)


def _binary_out(dot: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, conv: bool):
    """dot (exact, float64) -> float32 ``dot * alpha + b``, alpha = scale / 2 (() or (N_out,)),
    both broadcast along the output channels (the last dim, or dim 1 of a convolution)."""
    alpha = scale.to(torch.float32) * 0.5
    if conv:
        alpha = alpha.reshape(-1, 1, 1)
        bias = None if bias is None else bias.reshape(-1, 1, 1)
    y = dot.to(torch.float32) * alpha
    return y if bias is None else y + bias


def binary_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (..., K) float32 -> (..., N_out); codes (N_out, K) in {0, 1}, scale () or (N_out,),
    threshold None or (K,). The dot products of ±1 are taken in float64 (exact)."""
    x_b = binarize(x, threshold).to(torch.float64)
    w_b = codes.to(torch.float64) * 2 - 1
    return _binary_out(torch.nn.functional.linear(x_b, w_b), scale, bias, conv=False)


def binary_conv2d(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
    *,
    kernel_size: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
) -> torch.Tensor:
    """x (B, C, H, W) -> (B, N_out, H', W') (groups 1), codes (N_out, C*kh*kw) in
    ``weight.reshape(N_out, -1)``'s order, threshold None or (C,); the binarized input is padded
    with +1."""
    t = None if threshold is None else threshold.reshape(-1, 1, 1)
    x_b = binarize(x, t).to(torch.float64)
    ph, pw = padding
    x_b = torch.nn.functional.pad(x_b, (pw, pw, ph, ph), value=1.0)
    w_b = (codes.to(torch.float64) * 2 - 1).reshape(codes.shape[0], x.shape[1], *kernel_size)
    dot = torch.nn.functional.conv2d(x_b, w_b, None, stride, 0, dilation)
    return _binary_out(dot, scale, bias, conv=True)
