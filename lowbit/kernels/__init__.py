"""Packed-weight kernels: one interface, a reference backend and optimized CPU backends.

    w = prepare(codes, scale, levels)       # once, at load: converts to the backend's layout
    y = linear(x, w, bias, activations)     # every call

``codes`` (N_out, K) uint8 in 0..levels-1 and ``scale`` () or (N_out,) float32 describe
``W = scale * (codes - (levels-1)/2)`` (see ``reference``). A convolution is a ``linear`` over
im2col patches (PackedConv2d does the unfolding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.kernels import reference
from lowbit.kernels.reference import ACTIVATION_MODES


@dataclass
class PreparedWeight:
    """A weight in the layout the active backend computes with (built once by ``prepare``)."""

    codes: torch.Tensor  # (N_out, K) uint8, the storage codes
    scale: torch.Tensor  # () or (N_out,) float32
    levels: int
    backend: str = "reference"
    data: object = None  # backend-specific layout

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]


def backend() -> str:
    """Name of the backend ``prepare`` picks on this machine."""
    return "reference"


def prepare(codes: torch.Tensor, scale: torch.Tensor, levels: int) -> PreparedWeight:
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise ValueError(f"codes must be a 2-D uint8 tensor, got {tuple(codes.shape)} {codes.dtype}")
    return PreparedWeight(codes.contiguous(), scale.to(torch.float32), levels)


def linear(
    x: torch.Tensor,
    weight: PreparedWeight,
    bias: torch.Tensor | None = None,
    activations: str = "fp32",
) -> torch.Tensor:
    """y = x W^T + b: x (..., K) float32 -> (..., N_out) float32."""
    if activations not in ACTIVATION_MODES:
        raise ValueError(f"activations must be one of {', '.join(ACTIVATION_MODES)}, got {activations!r}")
    return reference.linear(x, weight.codes, weight.scale, weight.levels, bias, activations)


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
    from codes (N_out, C_in*kH*kW). For now ``linear`` over im2col patches
    (``reference.im2col_conv2d``); a direct convolution kernel can take over here."""
    return reference.im2col_conv2d(
        x,
        lambda cols: linear(cols, weight, bias, activations),
        weight.shape[0],
        kernel_size,
        stride,
        padding,
        dilation,
    )
