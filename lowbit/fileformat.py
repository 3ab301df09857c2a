"""The .lowbit file (``save``/``load``): a safetensors container (``lowbit.pack``) with::

    <layer>.codes   U8, the codec payload of the layer's codes (dense layout by default)
    <layer>.scale   F32, () or (out,)
    <layer>.bias    F32 (when the layer has one)
    <other>         every other parameter and buffer as stored in the model (fp32 parts)

and two metadata strings: ``lowbit`` (JSON, below) and ``lowbit_sha256`` (its SHA-256)::

    {"format": "lowbit", "format_version": 1, "lowbit_version": "0.1.0",
     "model": {"kind": "registry", "name": "cvnn2", "kwargs": {...}}     # lowbit.models.get
              | {"kind": "tree", "root": {"type": "Sequential", "args": {}, "children": [...]}},
     "packed": {"<layer>": {"type": "linear" | "conv2d", "levels": 3, "shape": [out, in, ...],
                            "codec": {"layout": "dense", "k": 5, "b": 8},
                            "granularity": "tensor" | "channel", "activations": "fp32" | "int8"}},
     "sha256": {"<tensor>": "<hex digest of its bytes>", ...}}

Loading runs no pickle and no code from the file: a registry model is rebuilt by
``lowbit.models.get`` and a module tree only from a whitelist of module types (``_TREE_TYPES``)
with validated arguments; both are first built on the meta device and checked against the file's
declared shapes (which ``lowbit.pack.read_container`` has checked against the bytes present), so
nothing is allocated before the file is known to be consistent. Any inconsistency raises
``FormatError`` naming the tensor.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit import pack
from lowbit.errors import FormatError
from lowbit.nn import BitLinear8, MisbornLinear, QuantConv2d, QuantLinear, SignLinear
from lowbit.packed import (
    ACTIVATIONS,
    PackedConv2d,
    PackedLinear,
    _Packed,
    _weight_quantizer,
)
from lowbit.quantizers import AbsMax8, Quantizer

FORMAT_VERSION = 1

# --- the module tree: a whitelist of types with validated constructor arguments ------------------


def _v_int(lo: int = 0, hi: int = 1 << 31) -> Callable[[Any], Any]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"expected an integer in {lo}..{hi}, got {v!r}")
        return v

    return check


def _v_float(lo: float = -math.inf, hi: float = math.inf) -> Callable[[Any], Any]:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise ValueError(f"expected a number in [{lo}, {hi}], got {v!r}")
        return float(v)

    return check


def _v_bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")
    return v


def _v_choice(*choices: Any) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if v not in choices or isinstance(v, bool) != isinstance(choices[0], bool):
            raise ValueError(f"expected one of {choices}, got {v!r}")
        return v

    return check


def _v_pair_from(lo: int) -> Callable[[Any], Any]:
    """An int >= lo or a list of two such ints (kernel sizes, strides: lo=1; padding: lo=0)."""

    def check(v: Any) -> Any:
        if isinstance(v, list) and len(v) == 2:
            return tuple(_v_int(lo, 1 << 16)(x) for x in v)
        return _v_int(lo, 1 << 16)(v)

    return check


_v_pair = _v_pair_from(1)
_v_pad = _v_pair_from(0)


def _v_optional(inner: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda v: None if v is None else inner(v)


def _v_shape(v: Any) -> list[int]:
    if not isinstance(v, list) or not 1 <= len(v) <= 8:
        raise ValueError(f"expected a list of 1..8 sizes, got {v!r}")
    return [_v_int(1)(x) for x in v]


def _v_padding(v: Any) -> Any:
    return v if v in ("same", "valid") else _v_pad(v)


_SIZE, _COUNT, _BOOL = _v_int(1), _v_int(0), _v_bool
_LEVELS = _v_int(2, 256)


_CONV_ARGS = {
    "in_channels": _SIZE,
    "out_channels": _SIZE,
    "kernel_size": _v_pair,
    "stride": _v_pair,
    "padding": _v_padding,
    "dilation": _v_pair,
    "groups": _SIZE,
    "bias": _BOOL,
    "padding_mode": _v_choice("zeros", "reflect", "replicate", "circular"),
}
_POOL_ARGS = {
    "kernel_size": _v_pair,
    "stride": _v_optional(_v_pair),
    "padding": _v_pad,
    "dilation": _v_pair,
    "ceil_mode": _BOOL,
}
_BN_ARGS = {
    "num_features": _SIZE,
    "eps": _v_float(0, 1),
    "momentum": _v_optional(_v_float(0, 1)),
    "affine": _BOOL,
    "track_running_stats": _BOOL,
}
_PACKED_COMMON = {
    "levels": _LEVELS,
    "bias": _BOOL,
    "granularity": _v_choice("tensor", "channel"),
    "activations": _v_choice(*ACTIVATIONS),
}

# type name -> (class, {argument: validator}); arguments are read from the module's attributes
# of the same name, except where _ARG_GETTERS says otherwise.
_TREE_TYPES: dict[str, tuple[type[nn.Module], dict[str, Callable[[Any], Any]]]] = {
    "Sequential": (nn.Sequential, {}),
    "Linear": (nn.Linear, {"in_features": _SIZE, "out_features": _SIZE, "bias": _BOOL}),
    "Conv2d": (nn.Conv2d, _CONV_ARGS),
    "ReLU": (nn.ReLU, {}),
    "GELU": (nn.GELU, {"approximate": _v_choice("none", "tanh")}),
    "Tanh": (nn.Tanh, {}),
    "Sigmoid": (nn.Sigmoid, {}),
    "Identity": (nn.Identity, {}),
    "Softmax": (nn.Softmax, {"dim": _v_optional(_v_int(-8, 8))}),
    "Flatten": (nn.Flatten, {"start_dim": _v_int(-8, 8), "end_dim": _v_int(-8, 8)}),
    "Dropout": (nn.Dropout, {"p": _v_float(0, 1)}),
    "MaxPool2d": (nn.MaxPool2d, _POOL_ARGS),
    "AvgPool2d": (
        nn.AvgPool2d,
        {k: v for k, v in _POOL_ARGS.items() if k != "dilation"} | {"count_include_pad": _BOOL},
    ),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, {"output_size": _v_pair}),
    "LayerNorm": (
        nn.LayerNorm,
        {
            "normalized_shape": _v_shape,
            "eps": _v_float(0, 1),
            "elementwise_affine": _BOOL,
            "bias": _BOOL,
        },
    ),
    "BatchNorm1d": (nn.BatchNorm1d, _BN_ARGS),
    "BatchNorm2d": (nn.BatchNorm2d, _BN_ARGS),
    "PackedLinear": (
        PackedLinear,
        {"in_features": _SIZE, "out_features": _SIZE, **_PACKED_COMMON},
    ),
    "PackedConv2d": (
        PackedConv2d,
        {
            "in_channels": _SIZE,
            "out_channels": _SIZE,
            "kernel_size": _v_pair,
            "stride": _v_pair,
            "padding": _v_pad,
            "dilation": _v_pair,
            **_PACKED_COMMON,
        },
    ),
}
_ARG_GETTERS: dict[str, Callable[[nn.Module], Any]] = {
    "bias": lambda m: m.bias is not None,
    "normalized_shape": lambda m: list(m.normalized_shape),
}
# The input transforms a packed layer can carry: the class whose quantize_input is called and the
# attributes that method reads.
_INPUT_TYPES: dict[str, tuple[type[nn.Module], dict[str, Callable[[Any], Any]]]] = {
    "QuantLinear": (QuantLinear, {"input_quantizer": _v_optional(_v_choice("absmax8"))}),
    "QuantConv2d": (QuantConv2d, {"input_quantizer": _v_optional(_v_choice("absmax8"))}),
    "BitLinear8": (BitLinear8, {}),
    "SignLinear": (SignLinear, {"norm": _BOOL}),
    "MisbornLinear": (MisbornLinear, {}),
}


def _input_node(source: nn.Module | None) -> dict[str, Any] | None:
    if source is None:
        return None
    name = type(source).__name__
    if name not in _INPUT_TYPES or type(source) is not _INPUT_TYPES[name][0]:
        raise ValueError(
            f"cannot save a packed layer converted from {type(source).__name__}: its input "
            f"transform is not one of {', '.join(_INPUT_TYPES)}; build the model with "
            "lowbit.models.get to save it"
        )
    args = {}
    for arg in _INPUT_TYPES[name][1]:
        v = getattr(source, arg)
        args[arg] = v.name if isinstance(v, AbsMax8) else v
    return {"type": name, "args": args}


def _tree_node(module: nn.Module, fqn: str) -> dict[str, Any]:
    """The whitelisted description of ``module`` (quantized layers described as packed)."""
    if isinstance(module, (QuantLinear, QuantConv2d)) and isinstance(
        module.weight_quantizer, Quantizer
    ):
        module = _skeleton_of(module)
    name = type(module).__name__
    if name not in _TREE_TYPES or type(module) is not _TREE_TYPES[name][0]:
        where = f" at {fqn!r}" if fqn else ""
        raise ValueError(
            f"cannot save a module of type {type(module).__name__}{where}: a model not built by "
            f"lowbit.models.get may only contain {', '.join(_TREE_TYPES)} and lowbit's quantized "
            "layers"
        )
    node: dict[str, Any] = {"type": name, "args": {}}
    for arg in _TREE_TYPES[name][1]:
        getter = _ARG_GETTERS.get(arg, lambda m, a=arg: getattr(m, a))
        v = getter(module)
        node["args"][arg] = list(v) if isinstance(v, tuple) else v
    if isinstance(module, _Packed):
        node["args"]["input"] = _input_node(module.input_source)
    if name == "Sequential":
        node["children"] = [
            [child, _tree_node(sub, f"{fqn}.{child}" if fqn else child)]
            for child, sub in module.named_children()
        ]
    elif len(module._modules):
        raise ValueError(f"cannot save {name} at {fqn!r}: it has unexpected submodules")
    return node


def _build_node(node: Any, where: str, depth: int = 0) -> nn.Module:
    """Build one whitelisted module (on the current default device) from its validated node."""
    if depth > 64:
        raise FormatError(f"module tree nested deeper than 64 levels at {where!r}")
    if not isinstance(node, dict) or not isinstance(node.get("args"), dict):
        raise FormatError(f"module {where!r}: a node must be an object with 'type' and 'args'")
    kind = node.get("type")
    if not isinstance(kind, str) or kind not in _TREE_TYPES:
        raise FormatError(f"module {where!r}: type {kind!r} is not an allowed module type")
    cls, schema = _TREE_TYPES[kind]
    raw = dict(node["args"])
    source_node = raw.pop("input", None) if issubclass(cls, _Packed) else None
    if set(raw) != set(schema):
        raise FormatError(f"module {where!r} ({kind}): arguments must be {sorted(schema)}")
    try:
        args = {k: schema[k](v) for k, v in raw.items()}
        if issubclass(cls, _Packed):
            args["source"] = _build_input(source_node, cls, args)
        module = cls(**args)
    except (ValueError, TypeError, RuntimeError, OverflowError) as exc:
        raise FormatError(f"module {where!r} ({kind}): invalid arguments ({exc})") from exc
    if kind == "Sequential":
        children = node.get("children")
        if not isinstance(children, list):
            raise FormatError(f"module {where!r}: Sequential needs a 'children' list")
        for item in children:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
                raise FormatError(f"module {where!r}: each child must be [name, node]")
            name, child = item
            if not name or "." in name or name in module._modules:
                raise FormatError(f"module {where!r}: bad or repeated child name {name!r}")
            full = f"{where}.{name}" if where else name
            module.add_module(name, _build_node(child, full, depth + 1))
    return module


def _build_input(node: Any, cls: type, args: dict[str, Any]) -> nn.Module | None:
    if node is None:
        return None
    if (
        not isinstance(node, dict)
        or not isinstance(node.get("type"), str)
        or node["type"] not in _INPUT_TYPES
    ):
        raise ValueError(f"input transform must be one of {', '.join(_INPUT_TYPES)}")
    src_cls, schema = _INPUT_TYPES[node["type"]]
    raw = node.get("args")
    if not isinstance(raw, dict) or set(raw) != set(schema):
        raise ValueError(f"input transform {node['type']} takes {sorted(schema)}")
    kw = {k: schema[k](v) for k, v in raw.items()}
    with torch.device("meta"):
        if issubclass(src_cls, nn.Conv2d):
            return src_cls(1, 1, 1, **kw)
        return src_cls(1, 1, **kw)


def _skeleton_of(layer: nn.Module, activations: str | None = None) -> _Packed:
    """A packed layer with ``layer``'s structure and input transform but no codes (meta device)."""
    packed_cls = PackedLinear if isinstance(layer, QuantLinear) else PackedConv2d
    with torch.device("meta"):
        return packed_cls.empty_like(layer, activations)


# --- save / load ---------------------------------------------------------------------------------


def _is_packable(module: nn.Module) -> bool:
    return isinstance(module, _Packed) or (
        isinstance(module, (QuantLinear, QuantConv2d))
        and isinstance(module.weight_quantizer, Quantizer)
    )


class _Item:
    """One tensor to store: name, dtype name, shape, byte size and a way to produce its bytes."""

    def __init__(self, name: str, dtype: str, shape: tuple[int, ...], nbytes: int, data: Callable):
        self.name, self.dtype, self.shape, self.nbytes, self.data = name, dtype, shape, nbytes, data


def _tensor_bytes(t: torch.Tensor) -> Callable[[], Any]:
    def get() -> Any:
        c = t.detach().to("cpu").contiguous()
        return c.reshape(-1).view(torch.uint8).numpy() if c.numel() else b""

    return get


def _packed_layer(module: nn.Module) -> dict[str, Any]:
    """What the file records about a quantized layer, packed or still fake-quant."""
    if isinstance(module, _Packed):
        shape = (
            module.weight_shape
            if isinstance(module, PackedConv2d)
            else (module.out_features, module.in_features)
        )
        return {
            "type": "conv2d" if isinstance(module, PackedConv2d) else "linear",
            "levels": module.levels,
            "shape": list(shape),
            "granularity": module.granularity,
            "activations": module.activations,
            "_codes": lambda: module.codes,
            "_scale": module.scale,
            "_bias": module.bias,
        }
    q = _weight_quantizer(module)
    skeleton = _skeleton_of(module)

    def codes() -> torch.Tensor:
        with torch.no_grad():
            return q.codes(module.weight)[0]

    with torch.no_grad():
        scale = q.scale(module.weight).to(torch.float32).reshape(skeleton.scale.shape)
    return {
        "type": "conv2d" if isinstance(module, QuantConv2d) else "linear",
        "levels": q.levels,
        "shape": list(module.weight.shape),
        "granularity": skeleton.granularity,
        "activations": skeleton.activations,
        "_codes": codes,
        "_scale": scale,
        "_bias": module.bias,
    }


def plan(model: nn.Module, layout: str = "dense") -> tuple[dict[str, Any], list[_Item]]:
    """The metadata and the tensors ``save`` writes for ``model`` (payloads produced lazily).

    Quantized layers are stored packed whether or not ``convert_`` ran; every other parameter
    and persistent buffer is stored as it is. The sha256 entries are placeholders of the final
    length, so ``container_size`` of the plan is the exact file size."""
    if layout not in pack.LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(pack.LAYOUTS)}, got {layout!r}")
    spec = getattr(model, "lowbit_spec", None)
    if spec is not None:
        description: dict[str, Any] = {"kind": "registry", **spec}
    else:
        description = {"kind": "tree", "root": _tree_node(model, "")}
    packed: dict[str, Any] = {}
    items: list[_Item] = []
    for fqn, module in model.named_modules():
        prefix = f"{fqn}." if fqn else ""
        if _is_packable(module):
            info = _packed_layer(module)
            codec = pack.codec(info["levels"], layout)
            n = math.prod(info["shape"])

            def payload(info=info, codec=codec) -> Any:
                return codec.pack(info["_codes"]())

            items.append(
                _Item(f"{prefix}codes", "U8", (codec.nbytes(n),), codec.nbytes(n), payload)
            )
            scale = info["_scale"].detach().to(torch.float32)
            items.append(
                _Item(
                    f"{prefix}scale",
                    "F32",
                    tuple(scale.shape),
                    4 * scale.numel(),
                    _tensor_bytes(scale),
                )
            )
            if info["_bias"] is not None:
                b = info["_bias"].detach().to(torch.float32)
                items.append(
                    _Item(f"{prefix}bias", "F32", tuple(b.shape), 4 * b.numel(), _tensor_bytes(b))
                )
            packed[fqn] = {k: v for k, v in info.items() if not k.startswith("_")}
            packed[fqn]["codec"] = codec.to_json()
            continue
        if any(fqn.startswith(p + ".") for p in packed if p):
            continue
        tensors = [(k, v) for k, v in module._parameters.items() if v is not None]
        tensors += [
            (k, v)
            for k, v in module._buffers.items()
            if v is not None and k not in module._non_persistent_buffers_set
        ]
        for k, v in tensors:
            dt = pack.dtype_name(v.dtype)
            items.append(
                _Item(
                    prefix + k, dt, tuple(v.shape), v.numel() * v.element_size(), _tensor_bytes(v)
                )
            )
    # Wider dtypes first keeps every tensor aligned to its element size in the file.
    items.sort(key=lambda it: (-pack.DTYPES[it.dtype][1], it.name))
    meta = {
        "format": "lowbit",
        "format_version": FORMAT_VERSION,
        "lowbit_version": _version(),
        "model": description,
        "packed": packed,
        "sha256": {it.name: "0" * 64 for it in items},
    }
    return meta, items


def _version() -> str:
    from lowbit import __version__

    return __version__


def _metadata_strings(meta: dict[str, Any]) -> dict[str, str]:
    text = json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return {"lowbit": text, "lowbit_sha256": pack.sha256(text.encode())}


def predicted_size(model: nn.Module, layout: str = "dense") -> int:
    """The exact size in bytes of the file ``save(model, path, layout=layout)`` writes."""
    meta, items = plan(model, layout)
    return pack.container_size(
        [(it.name, it.dtype, it.shape, it.nbytes) for it in items], _metadata_strings(meta)
    )


def save(model: nn.Module, path: str | Path, *, layout: str = "dense") -> int:
    """Write ``model`` as a .lowbit file (atomically); returns the file size in bytes.

    Works on a packed model (after ``convert_``) and on a fake-quant one (its quantized layers
    are packed on the way, the model itself is not changed)."""
    meta, items = plan(model, layout)
    entries = []
    for it in items:
        data = it.data()
        entries.append(pack.Entry(it.name, it.dtype, it.shape, data))
        meta["sha256"][it.name] = pack.sha256(data)
    return pack.write_container(path, entries, _metadata_strings(meta))


def _fail(path: Path, msg: str) -> FormatError:
    return FormatError(f"{path}: {msg}")


def _read_metadata(path: Path) -> tuple[dict[str, Any], dict[str, pack.Entry]]:
    """Container + metadata checks: hashes, version, and the shape of the JSON itself."""
    strings, entries = pack.read_container(path)
    text = strings.get("lowbit")
    if text is None:
        raise _fail(
            path,
            "no lowbit metadata: not a .lowbit file (a training checkpoint? use "
            "'lowbit pack' to make one)",
        )
    if strings.get("lowbit_sha256") != pack.sha256(text.encode()):
        raise _fail(path, "metadata checksum mismatch: the header was modified or corrupted")
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _fail(path, "metadata is not valid JSON") from exc
    if not isinstance(meta, dict) or meta.get("format") != "lowbit":
        raise _fail(path, "metadata does not describe a lowbit model")
    if meta.get("format_version") != FORMAT_VERSION:
        raise _fail(
            path,
            f"format version {meta.get('format_version')!r} is not supported by lowbit "
            f"{_version()} (which reads version {FORMAT_VERSION}); use a matching lowbit",
        )
    for key, kind in (("model", dict), ("packed", dict), ("sha256", dict)):
        if not isinstance(meta.get(key), kind):
            raise _fail(path, f"metadata field {key!r} is missing or malformed")
    hashes = meta["sha256"]
    if set(hashes) != set(entries):
        extra = sorted(set(hashes) ^ set(entries))
        raise _fail(path, f"tensor {extra[0]!r}: listed in the metadata or the file but not both")
    for name, entry in entries.items():
        if pack.sha256(entry.data) != hashes[name]:
            raise _fail(
                path, f"tensor {name!r}: SHA-256 mismatch, the payload is corrupt or was modified"
            )
    return meta, entries


_MAX_MODEL_INT = 1 << 16  # a bound on registry arguments (depth, width, ...) read from a file
_LAYER_COUNTS = ("depth", "blocks")  # arguments that multiply the number of modules: <= 1024


def _plain_arg(v: Any) -> bool:
    """JSON scalars and short lists of them, integers at most ``_MAX_MODEL_INT`` (so a forged
    file cannot ask for a model of a billion layers)."""
    if isinstance(v, list):
        return len(v) <= 8 and all(_plain_arg(x) and not isinstance(x, list) for x in v)
    if isinstance(v, int) and not isinstance(v, bool):
        return abs(v) <= _MAX_MODEL_INT
    return v is None or isinstance(v, (bool, float, str))


def _skeleton(path: Path, meta: dict[str, Any]) -> nn.Module:
    """The model on the meta device, its quantized layers replaced by packed skeletons."""
    desc, packed = meta["model"], meta["packed"]
    with torch.device("meta"):
        if desc.get("kind") == "registry":
            from lowbit import models

            name, kwargs = desc.get("name"), desc.get("kwargs")
            if not isinstance(name, str) or not isinstance(kwargs, dict):
                raise _fail(path, "registry model needs a name and kwargs")
            for key, value in kwargs.items():
                if not _plain_arg(value) or (
                    key in _LAYER_COUNTS and not (isinstance(value, int) and 0 <= value <= 1024)
                ):
                    raise _fail(path, f"model argument {key!r}: {value!r} is out of range")
            try:
                model = models.get(name, **kwargs)
            except (ValueError, TypeError, RuntimeError, OverflowError) as exc:
                raise _fail(path, f"cannot rebuild model {name!r}: {exc}") from exc
            for fqn, info in packed.items():
                if not isinstance(info, dict):
                    raise _fail(path, f"layer {fqn!r}: malformed packed entry")
                try:
                    source = model.get_submodule(fqn) if fqn else None
                except AttributeError:
                    source = None
                if source is None or not _is_packable(source) or isinstance(source, _Packed):
                    raise _fail(path, f"layer {fqn!r}: not a quantized layer of model {name!r}")
                mode = info.get("activations")
                if mode not in ACTIVATIONS:
                    raise _fail(path, f"layer {fqn!r}: activations must be one of {ACTIVATIONS}")
                parent, _, child = fqn.rpartition(".")
                setattr(
                    model.get_submodule(parent) if parent else model,
                    child,
                    _skeleton_of(source, mode),
                )
        elif desc.get("kind") == "tree":
            model = _build_node(desc.get("root"), "")
        else:
            raise _fail(path, f"unknown model kind {desc.get('kind')!r}")
    return model


def _expected(
    model: nn.Module,
) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, _Packed]]:
    """Tensors the skeleton needs: name -> (dtype name, shape), and its packed layers."""
    expected: dict[str, tuple[str, tuple[int, ...]]] = {}
    layers: dict[str, _Packed] = {}
    for fqn, module in model.named_modules():
        prefix = f"{fqn}." if fqn else ""
        if isinstance(module, _Packed):
            layers[fqn] = module
        tensors = [(k, v) for k, v in module._parameters.items() if v is not None]
        tensors += [
            (k, v)
            for k, v in module._buffers.items()
            if v is not None and k not in module._non_persistent_buffers_set
        ]
        for k, v in tensors:
            expected[prefix + k] = (pack.dtype_name(v.dtype), tuple(v.shape))
    return expected, layers


def load(path: str | Path) -> nn.Module:
    """Read a .lowbit file into a packed model (eval mode), ready to run.

    Raises ``FormatError`` naming the tensor for a corrupt, truncated or modified file, an
    unsupported format version, or tensors that do not fit the described model."""
    path = Path(path)
    meta, entries = _read_metadata(path)
    model = _skeleton(path, meta)
    expected, layers = _expected(model)
    if set(layers) != set(meta["packed"]):
        raise _fail(path, "packed layers listed in the metadata do not match the model")
    codes_shapes: dict[str, tuple[pack.Codec, int]] = {}
    for fqn, layer in layers.items():
        info = meta["packed"][fqn]
        name = f"{fqn}.codes" if fqn else "codes"
        if not isinstance(info, dict):
            raise _fail(path, f"tensor {name!r}: malformed packed-layer entry")
        shape = (
            layer.weight_shape
            if isinstance(layer, PackedConv2d)
            else (layer.out_features, layer.in_features)
        )
        codec_json = info.get("codec")
        layout = codec_json.get("layout") if isinstance(codec_json, dict) else None
        if layout not in pack.LAYOUTS:
            raise _fail(path, f"tensor {name!r}: unknown codec {codec_json!r}")
        codec = pack.codec(layer.levels, layout)
        checks = {
            "levels": layer.levels,
            "shape": list(shape),
            "granularity": layer.granularity,
            "codec": codec.to_json(),
            "type": "conv2d" if isinstance(layer, PackedConv2d) else "linear",
        }
        for key, want in checks.items():
            if info.get(key) != want:
                raise _fail(
                    path,
                    f"tensor {name!r}: {key} {info.get(key)!r} does not match the model ({want!r})",
                )
        n = math.prod(shape)
        expected[name] = ("U8", (codec.nbytes(n),))
        codes_shapes[name] = (codec, n)
    for name in sorted(set(expected) | set(entries)):
        if name not in entries:
            raise _fail(path, f"tensor {name!r}: missing from the file")
        if name not in expected:
            raise _fail(path, f"tensor {name!r}: not a tensor of the described model")
        got = (entries[name].dtype, entries[name].shape)
        if got != expected[name]:
            raise _fail(
                path,
                f"tensor {name!r}: {got[0]} {list(got[1])} in the file, the model needs "
                f"{expected[name][0]} {list(expected[name][1])}",
            )
    # Everything is consistent: allocate, fill, unpack and prepare.
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for fqn, module in model.named_modules():
            prefix = f"{fqn}." if fqn else ""
            for store in (module._parameters, module._buffers):
                for k, v in store.items():
                    if v is not None and prefix + k in entries:
                        v.copy_(entries[prefix + k].tensor())
        for fqn, layer in layers.items():
            name = f"{fqn}.codes" if fqn else "codes"
            codec, n = codes_shapes[name]
            try:
                codes = codec.unpack(entries[name].data, n)
            except FormatError as exc:
                raise _fail(path, f"tensor {name!r}: {exc}") from exc
            scale = layer.scale
            if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
                raise _fail(
                    path,
                    f"tensor {name[: -len('codes')]}scale: scales must be finite and > 0",
                )
            layer.set_codes(torch.from_numpy(codes).reshape(layer.out_features_, layer.k))
    return model.eval()


# --- trained models: run directories and training checkpoints ------------------------------------


def load_trained(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The fake-quant model of a training run: ``path`` is a run directory (config.json +
    checkpoint.safetensors, as ``lowbit.train.fit`` writes) or the checkpoint file itself.

    Returns (model in eval mode, the run's config.json content or {}). The checkpoint is read
    with the strict container reader (no pickle); the model is rebuilt by ``lowbit.models.get``
    from the spec the run recorded."""
    from lowbit import models

    path = Path(path)
    config: dict[str, Any] = {}
    ckpt = path
    if path.is_dir():
        ckpt = path / "checkpoint.safetensors"
        cfg = path / "config.json"
        if cfg.exists():
            try:
                config = json.loads(cfg.read_text())
            except (OSError, ValueError) as exc:
                raise FormatError(f"{cfg}: not valid JSON ({exc})") from exc
        if not ckpt.exists():
            raise FormatError(
                f"{path}: no checkpoint.safetensors (is this a lowbit run directory?)"
            )
    elif not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    strings, entries = pack.read_container(ckpt)
    if strings.get("format") != "lowbit-checkpoint":
        raise FormatError(f"{ckpt}: not a lowbit training checkpoint")
    try:
        spec = json.loads(strings.get("model_spec", "null"))
    except ValueError as exc:
        raise FormatError(f"{ckpt}: model_spec is not valid JSON") from exc
    spec = spec or config.get("model")
    if not isinstance(spec, dict) or not isinstance(spec.get("kwargs"), dict):
        raise FormatError(
            f"{ckpt}: the run recorded no model spec (a model built outside "
            "lowbit.models cannot be rebuilt from a checkpoint)"
        )
    try:
        model = models.get(spec["name"], **spec["kwargs"])
    except (ValueError, TypeError, KeyError) as exc:
        raise FormatError(f"{ckpt}: cannot rebuild the model ({exc})") from exc
    state = {k[len("model.") :]: e.tensor() for k, e in entries.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise FormatError(
            f"{ckpt}: checkpoint does not fit its model ({str(exc).splitlines()[0]})"
        ) from exc
    if not config:
        try:
            config = {"train": json.loads(strings.get("config", "{}")), "model": spec}
        except ValueError:
            config = {"model": spec}
    return model.eval(), config


def is_lowbit_file(path: str | Path) -> bool:
    """Whether ``path`` is a file whose container metadata says it is a .lowbit model."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        strings, _ = pack.read_container(path)
    except FormatError:
        return path.suffix == ".lowbit"  # a damaged .lowbit file: let load() say what is wrong
    return "lowbit" in strings
