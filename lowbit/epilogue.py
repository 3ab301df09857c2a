"""What follows a binary layer in an eval-mode block, as arithmetic both sides share.

A ``lowbit.bnn.Block`` in eval mode ends its binary layer with a BatchNorm on running statistics,
maybe a real-valued shortcut and an RPReLU. ``BlockEpilogue`` writes that as per-channel float32
operations in a fixed order; the trained layers (``lowbit.nn``) apply it with torch operations
(``binary_epilogue``) and the packed layers inside their XNOR-popcount kernel
(``lowbit.kernels.binary``, ``lb_binary_epilogue`` in ``csrc/lowbit_binary.c``), so the two give
bit-identical outputs. It sits below both, as ``lowbit.integer`` does for the int8 arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockEpilogue:
    """What follows a binary layer in an eval-mode block (``lowbit.bnn.Block``), on its output y
    of N channels, per channel c, in this order, each step one float32 operation::

        z = y * scale[c] + shift[c]        BatchNorm with its running statistics, folded
        z = z + x[..., c mod C_in]         residual: the layer's real-valued input x (C_in channels,
                                           repeated along the channels when N = k * C_in)
        u = z + prelu_bias[c]; u = u if u >= 0 else u * prelu_slope[c]; z = u + prelu_shift[c]

    ``residual`` False / ``prelu_bias`` None skip a step; every tensor is a contiguous float32
    (N,) (checked on construction: the kernels read them in place)."""

    scale: torch.Tensor
    shift: torch.Tensor
    residual: bool = False
    prelu_bias: torch.Tensor | None = None
    prelu_slope: torch.Tensor | None = None
    prelu_shift: torch.Tensor | None = None

    def __post_init__(self) -> None:
        prelu = (self.prelu_bias, self.prelu_slope, self.prelu_shift)
        if any(t is None for t in prelu) and any(t is not None for t in prelu):
            raise ValueError("BlockEpilogue: prelu_bias, prelu_slope and prelu_shift come together")
        n = self.scale.numel()
        for name in ("scale", "shift", "prelu_bias", "prelu_slope", "prelu_shift"):
            t = getattr(self, name)
            if t is not None and (
                t.dtype != torch.float32 or t.dim() != 1 or t.numel() != n or not t.is_contiguous()
            ):
                raise ValueError(
                    f"BlockEpilogue.{name} must be a contiguous float32 (N,) tensor like scale "
                    f"({n} values), got {tuple(t.shape)} {t.dtype}"
                )

    @property
    def channels(self) -> int:
        """N, the output channels it applies to."""
        return self.scale.numel()


def binary_epilogue(
    y: torch.Tensor, x: torch.Tensor, epilogue: BlockEpilogue, channel_dim: int
) -> torch.Tensor:
    """``epilogue`` (see ``BlockEpilogue``) applied to a binary layer's output y, its input x:
    (B, N, H, W) and (B, C_in, H, W) with ``channel_dim=1``, or (..., N) and (..., C_in) with -1.
    A convolution's result is channels-last, the layout the packed kernel writes, so that what
    follows (a pooling, whose summation order depends on the layout) computes alike on both."""
    view = (-1, 1, 1) if channel_dim == 1 else (-1,)
    e = epilogue
    z = y * e.scale.reshape(view) + e.shift.reshape(view)
    if e.residual:
        repeat = y.shape[channel_dim] // x.shape[channel_dim]
        z = z + (x if repeat == 1 else torch.cat([x] * repeat, dim=channel_dim))
    if e.prelu_bias is not None:
        u = z + e.prelu_bias.reshape(view)
        u = torch.where(u >= 0, u, u * e.prelu_slope.reshape(view))  # type: ignore[union-attr]
        z = u + e.prelu_shift.reshape(view)  # type: ignore[union-attr]
    return z.contiguous(memory_format=torch.channels_last) if channel_dim == 1 else z
