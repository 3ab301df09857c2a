"""The reference kernels: the specification every optimized kernel is tested against.

A packed layer's weight is stored as integer codes ``c`` (uint8, shape (N_out, K), values
0..levels-1) and a positive scale ``s`` (shape () per tensor or (N_out,) per output channel). The
weight it stands for is::

    W[n, k] = s[n] * (c[n, k] - (levels - 1) / 2)                              (N_out, K)

Two activation modes (``lowbit.quantizers.ACTIVATION_MODES``):

* ``"fp32"``:  y = x @ W.T + b, in float32 (x: (..., K) -> y: (..., N_out)). Matches the
  fake-quantized training layer up to float summation order.
* ``"int8"``:  x is quantized per token and the dot products are exact integers, rescaled once:
  the arithmetic of ``lowbit.integer`` (which the trained layers share, so a layer trained with
  ``input_quantizer="absmax8"`` gives these outputs bit for bit in eval mode); on a
  weight-only-quantized layer it is an approximation (8-bit activations). A convolution's token
  is the whole input image (one multiplier per image, as ``QuantConv2d`` trains with absmax8).
"""

from __future__ import annotations

import torch

from lowbit import integer
from lowbit.integer import dequantize, quantize_activations
from lowbit.quantizers import check_activation_mode

__all__ = ["conv2d", "dequantize", "linear", "quantize_activations"]


def linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    levels: int,
    bias: torch.Tensor | None = None,
    activations: str = "fp32",
) -> torch.Tensor:
    """y = x W^T + b with W from (codes, scale, levels); x (..., K) float32 -> (..., N_out)."""
    if check_activation_mode(activations) == "fp32":
        return torch.nn.functional.linear(x, dequantize(codes, scale, levels), bias)
    return integer.linear(x, codes, scale, levels, bias)


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
    (N_out, C_in*kH*kW) in ``weight.reshape(N_out, -1)``'s order."""
    geometry = dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation)
    if check_activation_mode(activations) == "int8":
        return integer.conv2d(x, codes, scale, levels, bias, **geometry)
    weight = dequantize(codes, scale, levels).reshape(codes.shape[0], x.shape[-3], *kernel_size)
    return torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation)
