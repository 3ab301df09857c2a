"""``lowbit.summary``: what a model stores, per layer and in total, and what the file will weigh.

For each module holding tensors (a row)::

    type           the module's class (QuantLinear and PackedLinear rows are stored packed)
    levels         N of a quantized layer (None for fp32 parts)
    nominal bits   log2 N (32 for fp32 parts)
    stored bits    bits per weight actually written: 8 * payload bytes / weights (codec b/k,
                   plus the rounding of the last byte)
    params         stored values: weights + bias (+ buffers such as running statistics)
    packed bytes   bytes the layer's tensors take in the .lowbit file (codes, scale, bias, fp32)
    fp32 bytes     the same values as float32: 4 * params
    MACs           multiply-accumulates of one forward pass for ``input_shape`` (batch 1), of
                   Linear/Conv2d layers (attention's activation products are not counted),
                   binary layers excepted:
    BOPs           the binary layers' 1-bit x 1-bit multiply-accumulates (an XNOR and a
                   popcount bit each), counted apart from the MACs as larq's summary does

Totals: ``total_bytes`` is the size of the .lowbit file ``lowbit.save`` writes (tensors plus the
header, computed the way ``save`` builds it: exact), ``fp32_bytes`` the float32 model,
``compression = fp32_bytes / total_bytes`` and ``bits_per_weight = 8 * total_bytes / params``
(fp32 parts and header included).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit import checkpoint, fileformat, pack


@dataclass
class Row:
    name: str
    type: str
    levels: int | None
    nominal_bits: float
    stored_bits: float
    params: int
    packed_bytes: int
    fp32_bytes: int
    macs: int | None
    bops: int | None = None


@dataclass
class Summary:
    rows: list[Row]
    total_bytes: int
    header_bytes: int
    fp32_bytes: int
    params: int
    macs: int | None
    bops: int | None = None
    layout: str = "dense"
    file_bytes: int | None = None  # the real size, when summarising a .lowbit file
    source: str = ""
    input_shape: tuple[int, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def compression(self) -> float:
        return self.fp32_bytes / self.total_bytes if self.total_bytes else math.nan

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.total_bytes / self.params if self.params else math.nan

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(compression=self.compression, bits_per_weight=self.bits_per_weight)
        return d

    def __str__(self) -> str:
        head = (
            "layer",
            "type",
            "levels",
            "bits",
            "stored",
            "params",
            "packed B",
            "fp32 B",
            "MACs",
            "BOPs",
        )
        body = [
            (
                r.name or "(root)",
                r.type,
                "-" if r.levels is None else str(r.levels),
                f"{r.nominal_bits:.2f}",
                f"{r.stored_bits:.3f}",
                f"{r.params:,}",
                f"{r.packed_bytes:,}",
                f"{r.fp32_bytes:,}",
                "-" if r.macs is None else f"{r.macs:,}",
                "-" if r.bops is None else f"{r.bops:,}",
            )
            for r in self.rows
        ]
        widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
        left = {0, 1}

        def line(cells: tuple[str, ...]) -> str:
            return "  ".join(
                c.ljust(w) if i in left else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        out = [line(head), "  ".join("-" * w for w in widths)]
        out += [line(b) for b in body]
        macs = "-" if self.macs is None else f"{self.macs:,}"
        out += [
            "",
            f"packed size   {self.total_bytes:,} bytes ({self.header_bytes:,} header, "
            f"{self.layout} layout)"
            + ("" if self.file_bytes is None else f"; file on disk {self.file_bytes:,} bytes"),
            f"fp32 size     {self.fp32_bytes:,} bytes",
            f"compression   {self.compression:.2f}x",
            f"bits/weight   {self.bits_per_weight:.3f} (whole model: {self.params:,} values)",
            f"MACs          {macs}"
            + ("" if self.input_shape is None else f" for input {tuple(self.input_shape)}"),
        ]
        if self.bops:
            out.append(f"BOPs          {self.bops:,} (binary 1-bit x 1-bit MACs)")
        return "\n".join(out)


def _is_binary(module: nn.Module) -> bool:
    """A binary (XNOR-popcount) layer, packed or still fake-quant."""
    if getattr(module, "activations", None) == "binary":
        return True
    return callable(getattr(module, "is_binary", None)) and module.is_binary()  # type: ignore[operator]


def _macs(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """MACs per Linear/Conv2d-like module from one zero-input forward pass (batch 1); a binary
    layer's are its BOPs."""
    from lowbit.packed import PackedConv2d, PackedLinear

    names = {m: n for n, m in model.named_modules()}
    counts: dict[str, int] = {}

    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        if isinstance(module, (nn.Linear, PackedLinear)):
            counts[names[module]] = counts.get(names[module], 0) + out.numel() * module.in_features
        elif isinstance(module, (nn.Conv2d, PackedConv2d)):
            groups = getattr(module, "groups", 1)
            k = module.in_channels // groups * math.prod(module.kernel_size)
            counts[names[module]] = counts.get(names[module], 0) + out.numel() * k

    if len(input_shape) != 3 or min(input_shape) < 1 or math.prod(input_shape) > 1 << 26:
        raise ValueError(f"input shape must be C,H,W with sizes >= 1, got {input_shape}")
    handles = [m.register_forward_hook(hook) for m in names]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    except (RuntimeError, ValueError, IndexError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(
            f"input shape {tuple(input_shape)} does not fit the model ({first})"
        ) from None
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return counts


def _file_layout(path: Path, default: str) -> str:
    """The code layout a .lowbit file was written with (its first packed layer's)."""
    meta = json.loads(pack.read_container(path)[0]["lowbit"])
    layouts = {info["codec"]["layout"] for info in meta["packed"].values()}
    return layouts.pop() if len(layouts) == 1 else default


def summary(
    x: nn.Module | str | os.PathLike,
    *,
    input_shape: tuple[int, ...] | None = None,
    layout: str = "dense",
) -> Summary:
    """Summarise a model, a .lowbit file, a training run directory or checkpoint.

    ``input_shape`` (C, H, W) for the MAC count: defaults to the model spec's ``input_shape``;
    without either, MACs are left out. A .lowbit file is summarised in the layout it was written
    with (``layout`` applies to models, runs and checkpoints)."""
    file_bytes, source = None, ""
    if isinstance(x, nn.Module):
        model = x
    else:
        path = Path(x)
        source = str(path)
        if fileformat.is_lowbit_file(path):
            model = fileformat.load(path)
            file_bytes = path.stat().st_size
            layout = _file_layout(path, layout)
        else:
            model, _ = checkpoint.load_trained(path)
    meta, items = fileformat.plan(model, layout)
    layout_items = [(it.name, it.dtype, it.shape, it.nbytes) for it in items]
    total = pack.container_size(layout_items, fileformat.metadata_strings(meta))
    data_bytes = sum(it.nbytes for it in items)

    spec = getattr(model, "lowbit_spec", None)
    if input_shape is None and spec is not None:
        shape = spec.get("kwargs", {}).get("input_shape")
        input_shape = tuple(shape) if shape else None
    macs = _macs(model, tuple(input_shape)) if input_shape is not None else {}

    by_module: dict[str, list[Any]] = {}
    for it in items:
        owner = it.name.rpartition(".")[0]
        by_module.setdefault(owner, []).append(it)
    rows = []
    for fqn, module in model.named_modules():
        if fqn not in by_module:
            continue
        own = by_module[fqn]
        nbytes = sum(it.nbytes for it in own)
        info = meta["packed"].get(fqn)
        if info is not None:
            weights = math.prod(info["shape"])
            codes = next(it for it in own if it.name.endswith("codes"))
            # the bias and, for a binary layer, its input threshold
            extra = [it for it in own if it.name.rpartition(".")[2] in ("bias", "threshold")]
            params = weights + sum(math.prod(it.shape) for it in extra)
            levels, nominal = info["levels"], math.log2(info["levels"])
            stored = 8 * codes.nbytes / weights
        else:
            params = sum(math.prod(it.shape) for it in own)
            levels, nominal = None, 32.0
            stored = 8 * nbytes / params if params else 0.0
        n = macs.get(fqn) if macs else None
        binary = n is not None and _is_binary(module)
        rows.append(
            Row(
                fqn,
                type(module).__name__,
                levels,
                nominal,
                stored,
                params,
                nbytes,
                4 * params,
                0 if binary else n,
                n if binary else None,
            )
        )
    return Summary(
        rows=rows,
        total_bytes=total,
        header_bytes=total - data_bytes,
        fp32_bytes=sum(r.fp32_bytes for r in rows),
        params=sum(r.params for r in rows),
        macs=sum(r.macs or 0 for r in rows) if macs else None,
        bops=sum(r.bops or 0 for r in rows) or None,
        layout=layout,
        file_bytes=file_bytes,
        source=source,
        input_shape=input_shape,
    )
