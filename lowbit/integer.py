"""The exact integer arithmetic of int8 activations, shared by the trained layers (``lowbit.nn``,
in eval mode) and the packed kernels (``lowbit.kernels``): it sits below both, so the layer that
trains and the kernel that ships compute the same numbers from one definition.

A weight is integer codes ``c`` (uint8, (N_out, K), values 0..levels-1) and a positive scale
``s`` (() per tensor or (N_out,) per output channel)::

    W[n, k] = s[n] * (c[n, k] - (levels - 1) / 2)                              (N_out, K)

An input is quantized per token (the last dimension; a convolution's token is its whole image)
as BitNet does, ``a = 127 / max|x|``, ``x_int = clip(round(x * a), -127, 127)``. The dot products
are taken in exact integer arithmetic with the doubled levels ``2 c - (levels - 1)`` (odd integers
for even N, even for odd N, so every level count stays integral) and rescaled once::

    acc[t, n] = sum_k x_int[t, k] * (2 c[n, k] - (levels - 1))               (exact)
    y[t, n]   = float32(acc[t, n] * s[n] / (2 a[t])) + b[n]                  (product in float64)

The compiled kernels compute exactly this (int32 accumulators); ``kernels.reference`` is the
pure-torch specification built on these functions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def dequantize(codes: torch.Tensor, scale: torch.Tensor, levels: int) -> torch.Tensor:
    """W = s * (c - (levels-1)/2): codes (N_out, K) uint8, scale () or (N_out,) -> (N_out, K)."""
    s = scale.reshape(-1, 1) if scale.dim() else scale
    return (codes.to(torch.float32) - (levels - 1) / 2) * s


def quantize_activations(
    x: torch.Tensor, dim: int | tuple[int, ...] = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax int8 over ``dim`` (the token): x -> (x_int integral in -127..127, in x's dtype; a
    the multiplier 127 / max|x| with ``dim`` kept as size 1). Per token: x (..., K), a (..., 1)."""
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
    K * 127 * (levels-1) < 2^24 (ternary up to K = 66,000); beyond that, float64. The result
    does not depend on x's float dtype (its values are integers)."""
    doubled = codes.to(torch.float32) * 2 - (levels - 1)
    if k * 127 * (levels - 1) < 1 << 24:
        return op(x_int.to(torch.float32), doubled).to(torch.float64)
    return op(x_int.to(torch.float64), doubled.to(torch.float64))


def _rescale(
    acc: torch.Tensor, scale: torch.Tensor, a: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """y = acc * s / (2 a) + b: the float64 product and quotient, then float32 (as the kernels);
    a float64 bias gives a float64 result."""
    y = (acc * scale.to(torch.float64) / (2 * a.to(torch.float64))).to(torch.float32)
    return y if bias is None else y + bias


def linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    levels: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The int8-activation linear layer: x (..., K) -> (..., N_out), per-token ``a``."""
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
) -> torch.Tensor:
    """The int8-activation convolution (groups = 1): x (B, C_in, H, W) -> (B, N_out, H', W'),
    codes (N_out, C_in*kH*kW) in ``weight.reshape(N_out, -1)``'s order. One multiplier per image,
    ``a`` (B, 1, 1, 1), so every im2col patch of an image holds integers of the same scale."""
    shape = (codes.shape[0], x.shape[-3], *kernel_size)

    def conv(inp: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(
            inp, weight.reshape(shape), None, stride, padding, dilation
        )

    x_int, a = quantize_activations(x, dim=(-3, -2, -1))  # a (B, 1, 1, 1)
    acc = _integer_product(conv, x_int, codes, levels, codes.shape[1])
    s = scale.reshape(-1, 1, 1) if scale.dim() else scale
    return _rescale(acc, s, a, None if bias is None else bias.reshape(-1, 1, 1))
