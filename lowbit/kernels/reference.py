"""The reference kernels: the specification every optimized kernel is tested against.

A packed layer's weight is stored as integer codes ``c`` (uint8, shape (N_out, K), values
0..levels-1) and a positive scale ``s`` (shape () per tensor or (N_out,) per output channel). The
weight it stands for is::

    W[n, k] = s[n] * (c[n, k] - (levels - 1) / 2)                              (N_out, K)

Activation modes (``lowbit.quantizers.ACTIVATION_MODES``; ``"binary"``: ``binary_linear`` and
``binary_conv2d`` below):

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
from lowbit.epilogue import BlockEpilogue, binary_epilogue
from lowbit.integer import dequantize, quantize_activations
from lowbit.quantizers import check_activation_mode

__all__ = [
    "BlockEpilogue",
    "binarize",
    "binary_epilogue",
    "binary_conv2d",
    "binary_linear",
    "conv2d",
    "dequantize",
    "linear",
    "quantize_activations",
]


def check_dense_mode(activations: str) -> str:
    """``activations`` if it is a mode of the N-level kernels (fp32, int8), else ValueError:
    ``"binary"`` layers run on ``lowbit.kernels.binary`` (``binary_linear`` / ``binary_conv2d``)."""
    if check_activation_mode(activations) == "binary":
        raise ValueError("activations='binary' runs on lowbit.kernels.binary, not these kernels")
    return activations


def linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    levels: int,
    bias: torch.Tensor | None = None,
    activations: str = "fp32",
) -> torch.Tensor:
    """y = x W^T + b with W from (codes, scale, levels); x (..., K) float32 -> (..., N_out)."""
    if check_dense_mode(activations) == "fp32":
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
    if check_dense_mode(activations) == "int8":
        return integer.conv2d(x, codes, scale, levels, bias, **geometry)
    weight = dequantize(codes, scale, levels).reshape(codes.shape[0], x.shape[-3], *kernel_size)
    return torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation)


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
    epilogue: BlockEpilogue | None = None,
) -> torch.Tensor:
    """x (..., K) float32 -> (..., N_out); codes (N_out, K) in {0, 1}, scale () or (N_out,),
    threshold None or (K,), then ``epilogue`` (None: none). The dot products of ±1 are taken in
    float64 (exact)."""
    x_b = binarize(x, threshold).to(torch.float64)
    w_b = codes.to(torch.float64) * 2 - 1
    y = _binary_out(torch.nn.functional.linear(x_b, w_b), scale, bias, conv=False)
    return y if epilogue is None else binary_epilogue(y, x, epilogue, -1)


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
    epilogue: BlockEpilogue | None = None,
) -> torch.Tensor:
    """x (B, C, H, W) -> (B, N_out, H', W') (groups 1), codes (N_out, C*kh*kw) in
    ``weight.reshape(N_out, -1)``'s order, threshold None or (C,); the binarized input is padded
    with +1; then ``epilogue`` (None: none; a residual needs H' = H, W' = W)."""
    t = None if threshold is None else threshold.reshape(-1, 1, 1)
    x_b = binarize(x, t).to(torch.float64)
    ph, pw = padding
    x_b = torch.nn.functional.pad(x_b, (pw, pw, ph, ph), value=1.0)
    w_b = (codes.to(torch.float64) * 2 - 1).reshape(codes.shape[0], x.shape[1], *kernel_size)
    dot = torch.nn.functional.conv2d(x_b, w_b, None, stride, 0, dilation)
    y = _binary_out(dot, scale, bias, conv=True)
    return y if epilogue is None else binary_epilogue(y, x, epilogue, 1)
