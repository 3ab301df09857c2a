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


def _int8_linear(
    x_int: torch.Tensor,
    a: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    levels: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """acc = x_int (..., K) @ (2 c - (levels-1))^T exactly, y = acc * s / (2 a) + b."""
    doubled = codes.to(torch.float64) * 2 - (levels - 1)  # (N_out, K), integral
    acc = x_int.to(torch.float64) @ doubled.T  # exact: |acc| < 127 * 255 * K << 2**53
    s = scale.to(torch.float64)
    y = (acc * s / (2 * a.to(torch.float64))).to(torch.float32)
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
    return _int8_linear(*quantize_activations(x), codes, scale, levels, bias)


def im2col_conv2d(
    x: torch.Tensor,
    linear_fn: Callable[[torch.Tensor], torch.Tensor],
    out_channels: int,
    kernel_size: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
) -> torch.Tensor:
    """A groups=1 convolution as a linear map over im2col patches.

    x (B, C, H, W) -> patches (B, L, C*kH*kW) (``F.unfold``'s order: channel, then kernel row,
    then column, matching ``weight.reshape(C_out, -1)``) -> ``linear_fn`` -> (B, L, C_out) ->
    (B, C_out, H', W') with H' = (H + 2 pH - dH (kH - 1) - 1) // sH + 1 (W' likewise)."""
    b, _, h, w = x.shape
    cols = torch.nn.functional.unfold(x, kernel_size, dilation, padding, stride)  # (B, K, L)
    ho = (h + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
    y = linear_fn(cols.transpose(1, 2))  # (B, L, C_out)
    return y.transpose(1, 2).reshape(b, out_channels, ho, wo)


def conv2d(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    levels: int,
    bias: torch.Tensor | None = None,
    *,
    kernel_size: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    activations: str = "fp32",
) -> torch.Tensor:
    """The reference convolution: ``linear`` over im2col patches; codes (C_out, C_in*kH*kW).

    ``"int8"``: x (B, C, H, W) is quantized per image (``a`` (B, 1, 1, 1)), then the patches of
    the integers go through the exact integer product with that image's multiplier."""
    if activations not in ACTIVATION_MODES:
        raise ValueError(f"activations must be one of {', '.join(ACTIVATION_MODES)}")
    a = None
    if activations == "int8":
        x, a = quantize_activations(x, dim=(-3, -2, -1))  # a (B, 1, 1, 1)

    def on_patches(cols: torch.Tensor) -> torch.Tensor:  # (B, L, K) -> (B, L, C_out)
        if a is None:
            return linear(cols, codes, scale, levels, bias)
        return _int8_linear(cols, a.reshape(-1, 1, 1), codes, scale, levels, bias)

    return im2col_conv2d(
        x,
        on_patches,
        codes.shape[0],
        kernel_size,
        stride,
        padding,
        dilation,
    )
