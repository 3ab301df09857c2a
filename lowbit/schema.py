"""The module-tree schema of a .lowbit file: which modules a model not built by
``lowbit.models`` may contain, and how they are described and rebuilt.

A node is ``{"type": <name>, "args": {<argument>: <JSON value>}}`` (plus ``"children": [[name,
node], ...]`` for a ``Sequential``); ``describe(model)`` writes it, ``build(node)`` reads it.
Only the types of ``TREE_TYPES`` exist, each with a validator per constructor argument, so a file
can ask for nothing but a bounded tree of whitelisted layers: no code, no pickle. Quantized
layers (``QuantLinear``/``QuantConv2d`` and the seed-study layers) are described as the packed
layers ``convert_`` makes of them; their input transform is a node of ``INPUT_TYPES``.

Bounds: at most ``MAX_NODES`` modules in a tree and ``MAX_DEPTH`` levels of nesting, so a
forged file cannot make the loader spend minutes (or gigabytes) building modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lowbit.nn import BitLinear8, MisbornLinear, QuantConv2d, QuantLinear, SignLinear
from lowbit.packed import (
    PackedConv2d,
    PackedLayer,
    PackedLinear,
    empty_packed,
    packable,
)
from lowbit.quantizers import (
    ACTIVATION_MODES,
    ACTIVATION_NAMES,
    GRANULARITIES,
    AbsMax8,
    BinaryActivation,
    RSign,
    check_levels,
)

MAX_DEPTH = 64
MAX_NODES = 1 << 14
"""A tree holds at most this many modules (the seed models have a few dozen)."""


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


# Kernel sizes, strides, paddings, dilations and pooled output sizes: no real layer comes near
# 1024, and larger values let a forged file's model allocate gigabytes when it runs (a padding
# of 10,000 turns a 16x16 input into a 20,016x20,016 image per channel).
MAX_GEOMETRY = 1 << 10


def _v_pair_from(lo: int) -> Callable[[Any], Any]:
    """An int in [lo, MAX_GEOMETRY] or a list of two (kernel sizes, strides: lo=1; padding:
    lo=0)."""

    def check(v: Any) -> Any:
        if isinstance(v, list) and len(v) == 2:
            return tuple(_v_int(lo, MAX_GEOMETRY)(x) for x in v)
        return _v_int(lo, MAX_GEOMETRY)(v)

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
    "levels": check_levels,
    "bias": _BOOL,
    "granularity": _v_choice(*GRANULARITIES),
    "activations": _v_choice(*ACTIVATION_MODES),
}

# type name -> (class, {argument: validator}); arguments are read from the module's attributes
# of the same name, except where _ARG_GETTERS says otherwise.
TREE_TYPES: dict[str, tuple[type[nn.Module], dict[str, Callable[[Any], Any]]]] = {
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
INPUT_TYPES: dict[str, tuple[type[nn.Module], dict[str, Callable[[Any], Any]]]] = {
    "QuantLinear": (QuantLinear, {"input_quantizer": _v_optional(_v_choice(*ACTIVATION_NAMES))}),
    "QuantConv2d": (QuantConv2d, {"input_quantizer": _v_optional(_v_choice(*ACTIVATION_NAMES))}),
    "BitLinear8": (BitLinear8, {}),
    "SignLinear": (SignLinear, {"norm": _BOOL}),
    "MisbornLinear": (MisbornLinear, {}),
}


def _input_node(source: nn.Module | None) -> dict[str, Any] | None:
    if source is None:
        return None
    name = type(source).__name__
    if name not in INPUT_TYPES or type(source) is not INPUT_TYPES[name][0]:
        raise ValueError(
            f"cannot save a packed layer converted from {type(source).__name__}: its input "
            f"transform is not one of {', '.join(INPUT_TYPES)}; build the model with "
            "lowbit.models.get to save it"
        )
    args = {}
    for arg in INPUT_TYPES[name][1]:
        v = getattr(source, arg)
        args[arg] = v.name if isinstance(v, (AbsMax8, BinaryActivation, RSign)) else v
    return {"type": name, "args": args}


def describe(module: nn.Module, fqn: str = "") -> dict[str, Any]:
    """The whitelisted description of ``module`` (quantized layers described as packed).

    Raises ValueError naming the module where a type is not in ``TREE_TYPES``."""
    if packable(module) and not isinstance(module, PackedLayer):
        with torch.device("meta"):
            module = empty_packed(module)
    name = type(module).__name__
    if name not in TREE_TYPES or type(module) is not TREE_TYPES[name][0]:
        where = f" at {fqn!r}" if fqn else ""
        raise ValueError(
            f"cannot save a module of type {type(module).__name__}{where}: a model not built by "
            f"lowbit.models.get may only contain {', '.join(TREE_TYPES)} and lowbit's quantized "
            "layers"
        )
    node: dict[str, Any] = {"type": name, "args": {}}
    for arg in TREE_TYPES[name][1]:
        getter = _ARG_GETTERS.get(arg, lambda m, a=arg: getattr(m, a))
        v = getter(module)
        node["args"][arg] = list(v) if isinstance(v, tuple) else v
    if isinstance(module, PackedLayer):
        node["args"]["input"] = _input_node(module.input_source)
    children = list(module.named_children())
    if name == "Sequential":
        node["children"] = [
            [child, describe(sub, f"{fqn}.{child}" if fqn else child)] for child, sub in children
        ]
    elif children:
        raise ValueError(f"cannot save {name} at {fqn!r}: it has unexpected submodules")
    return node


class TreeError(ValueError):
    """A node that does not describe a whitelisted module (the file reader adds the path)."""


def build(root: Any) -> nn.Module:
    """Build the module tree ``root`` describes (on the current default device).

    Raises ``TreeError`` naming the module for anything outside the schema, more than
    ``MAX_NODES`` modules or nesting deeper than ``MAX_DEPTH``."""
    count = [0]
    return _build_node(root, "", 0, count)


def _build_node(node: Any, where: str, depth: int, count: list[int]) -> nn.Module:
    """Build one whitelisted module from its validated node."""
    count[0] += 1
    if count[0] > MAX_NODES:
        raise TreeError(f"module tree has more than {MAX_NODES} modules")
    if depth > MAX_DEPTH:
        raise TreeError(f"module tree nested deeper than {MAX_DEPTH} levels at {where!r}")
    if not isinstance(node, dict) or not isinstance(node.get("args"), dict):
        raise TreeError(f"module {where!r}: a node must be an object with 'type' and 'args'")
    kind = node.get("type")
    if not isinstance(kind, str) or kind not in TREE_TYPES:
        raise TreeError(f"module {where!r}: type {kind!r} is not an allowed module type")
    cls, schema = TREE_TYPES[kind]
    raw = dict(node["args"])
    source_node = raw.pop("input", None) if issubclass(cls, PackedLayer) else None
    if set(raw) != set(schema):
        raise TreeError(f"module {where!r} ({kind}): arguments must be {sorted(schema)}")
    try:
        args = {k: schema[k](v) for k, v in raw.items()}
        if issubclass(cls, PackedLayer):
            args["source"] = _build_input(source_node)
        module = cls(**args)
    except (ValueError, TypeError, RuntimeError, OverflowError) as exc:
        raise TreeError(f"module {where!r} ({kind}): invalid arguments ({exc})") from exc
    if kind == "Sequential":
        children = node.get("children")
        if not isinstance(children, list):
            raise TreeError(f"module {where!r}: Sequential needs a 'children' list")
        for item in children:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
                raise TreeError(f"module {where!r}: each child must be [name, node]")
            name, child = item
            # add_module refuses these with a KeyError; attributes (forward, training) too
            if not name or "." in name or len(name) > 256 or hasattr(module, name):
                raise TreeError(
                    f"module {where!r}: child name {name!r} is empty, contains '.', is repeated "
                    "or is an attribute of the module"
                )
            full = f"{where}.{name}" if where else name
            module.add_module(name, _build_node(child, full, depth + 1, count))
    return module


def _build_input(node: Any) -> nn.Module | None:
    if node is None:
        return None
    if (
        not isinstance(node, dict)
        or not isinstance(node.get("type"), str)
        or node["type"] not in INPUT_TYPES
    ):
        raise ValueError(f"input transform must be one of {', '.join(INPUT_TYPES)}")
    src_cls, schema = INPUT_TYPES[node["type"]]
    raw = node.get("args")
    if not isinstance(raw, dict) or set(raw) != set(schema):
        raise ValueError(f"input transform {node['type']} takes {sorted(schema)}")
    kw = {k: schema[k](v) for k, v in raw.items()}
    with torch.device("meta"):
        if issubclass(src_cls, nn.Conv2d):
            return src_cls(1, 1, 1, **kw)
        return src_cls(1, 1, **kw)
