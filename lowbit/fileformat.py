"""The .lowbit file (``save``/``load``): a safetensors container (``lowbit.pack``) with::

    <layer>.codes   U8, the codec payload of the layer's codes (dense layout by default)
    <layer>.scale   F32, () or (out,)
    <layer>.bias    F32 (when the layer has one)
    <layer>.threshold  F32 (C_in,), binary layers only: x >= threshold binarizes to +1
    <other>         every other parameter and buffer as stored in the model (fp32 parts)

and two metadata strings: ``lowbit`` (JSON, below) and ``lowbit_sha256`` (its SHA-256)::

    {"format": "lowbit", "format_version": 2, "lowbit_version": "0.1.0",
     "model": {"kind": "registry", "name": "cvnn2", "kwargs": {...}}     # lowbit.models.get
              | {"kind": "tree", "root": <node>},                          # lowbit.schema
     "packed": {"<layer>": {"type": "linear" | "conv2d", "levels": 3, "shape": [out, in, ...],
                            "codec": {"layout": "dense", "k": 5, "b": 8},
                            "granularity": "tensor" | "channel",
                            "activations": "fp32" | "int8" | "binary"}},
     "sha256": {"<tensor>": "<hex digest of its bytes>", ...},
     "meta": {"input_shape": [1, 28, 28], "input_dtype": "uint8", ...} | null}  # lowbit.meta

Versions: 2 added ``meta`` (what a user needs to run the model: input, normalisation, class
names, dataset, test accuracy; validated by ``lowbit.meta.from_json``). Version 1 files (no
``meta``) still load, with ``lowbit_meta = None``.

Loading runs no pickle and no code from the file: a registry model is rebuilt by
``lowbit.models.get`` and a module tree by ``lowbit.schema.build`` (a whitelist of module types
with validated arguments); both are first built on the meta device and checked against the
file's declared shapes (which ``lowbit.pack.read_container`` has checked against the file's
size), so nothing is allocated before the file is known to be consistent. Any inconsistency
raises ``FormatError`` naming the file and the tensor. Training checkpoints: ``lowbit.checkpoint``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit import meta as model_meta
from lowbit import pack, schema
from lowbit.errors import FormatError
from lowbit.meta import ModelMeta
from lowbit.packed import PackedLayer, empty_packed, packable, weight_quantizer
from lowbit.quantizers import ACTIVATION_MODES, binary_threshold

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: before "meta"


class _Item:
    """One tensor to store: name, dtype name, shape, byte size and a way to produce its bytes."""

    def __init__(self, name: str, dtype: str, shape: tuple[int, ...], nbytes: int, data: Callable):
        self.name, self.dtype, self.shape, self.nbytes, self.data = name, dtype, shape, nbytes, data


def _tensor_item(name: str, t: torch.Tensor) -> _Item:
    nbytes = t.numel() * t.element_size()
    return _Item(
        name,
        pack.dtype_name(t.dtype),
        tuple(t.shape),
        nbytes,
        lambda: pack.tensor_entry(name, t).data,
    )


def _packed_layer(module: nn.Module) -> dict[str, Any]:
    """What the file records about a quantized layer, packed or still fake-quant."""
    if isinstance(module, PackedLayer):
        layer, codes, scale = module, (lambda: module.codes), module.scale
        threshold = module.threshold
    else:
        q = weight_quantizer(module)
        with torch.device("meta"):
            layer = empty_packed(module)

        def codes() -> torch.Tensor:
            with torch.no_grad():
                return q.codes(module.weight)[0]

        with torch.no_grad():
            scale = q.scale(module.weight).to(torch.float32).reshape(layer.scale.shape)
        threshold = None
        if layer.threshold is not None:  # binary: rsign's threshold, or 0 (sign, approx-sign)
            t = binary_threshold(module.input_quantizer)
            threshold = torch.zeros(layer.threshold.shape) if t is None else t
    return {
        "type": layer.kind,
        "levels": layer.levels,
        "shape": list(layer.weight_shape),
        "granularity": layer.granularity,
        "activations": layer.activations,
        "_codes": codes,
        "_scale": scale,
        "_bias": module.bias,
        "_threshold": threshold,
    }


def _model_meta(model: nn.Module, meta: ModelMeta | dict | None) -> ModelMeta | None:
    """``meta`` (a ModelMeta or its JSON form), else the model's own ``lowbit_meta``."""
    meta = getattr(model, "lowbit_meta", None) if meta is None else meta
    if meta is None or isinstance(meta, ModelMeta):
        return meta
    if isinstance(meta, dict):
        return model_meta.from_json(meta)
    raise ValueError(f"meta must be a lowbit.ModelMeta or its JSON dict, got {type(meta).__name__}")


def plan(
    model: nn.Module, layout: str = "dense", meta: ModelMeta | dict | None = None
) -> tuple[dict[str, Any], list[_Item]]:
    """The metadata and the tensors ``save`` writes for ``model`` (payloads produced lazily).

    Quantized layers are stored packed whether or not ``convert_`` ran; every other parameter
    and persistent buffer is stored as it is. The sha256 entries are placeholders of the final
    length, so ``container_size`` of the plan is the exact file size."""
    saved_meta = _model_meta(model, meta)
    if layout not in pack.LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(pack.LAYOUTS)}, got {layout!r}")
    spec = getattr(model, "lowbit_spec", None)
    if spec is not None:
        description: dict[str, Any] = {"kind": "registry", **spec}
    else:
        description = {"kind": "tree", "root": schema.describe(model)}
    packed: dict[str, Any] = {}
    items: list[_Item] = []
    for fqn, module in model.named_modules():
        if not packable(module):
            continue
        prefix = f"{fqn}." if fqn else ""
        info = _packed_layer(module)
        codec = pack.codec(info["levels"], layout)
        nbytes = codec.nbytes(math.prod(info["shape"]))

        def payload(info=info, codec=codec) -> Any:
            return codec.pack(info["_codes"]())

        items.append(_Item(f"{prefix}codes", "U8", (nbytes,), nbytes, payload))
        items.append(_tensor_item(f"{prefix}scale", info["_scale"].detach().to(torch.float32)))
        for part in ("bias", "threshold"):
            if info[f"_{part}"] is not None:
                t = info[f"_{part}"].detach().to(torch.float32)
                items.append(_tensor_item(f"{prefix}{part}", t))
        packed[fqn] = {k: v for k, v in info.items() if not k.startswith("_")}
        packed[fqn]["codec"] = codec.to_json()
    for name, t in _plain_tensors(model, packed).items():
        items.append(_tensor_item(name, t))
    items.sort(key=lambda it: pack.storage_order(it.name, it.dtype))
    meta = {
        "format": "lowbit",
        "format_version": FORMAT_VERSION,
        "lowbit_version": _version(),
        "model": description,
        "packed": packed,
        "sha256": {it.name: "0" * 64 for it in items},
        "meta": None if saved_meta is None else saved_meta.to_json(),
    }
    return meta, items


def _plain_tensors(model: nn.Module, packed_layers: Any) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer (the state_dict) outside the packed layers."""

    def inside(name: str) -> bool:
        return any(p == "" or name.startswith(p + ".") for p in packed_layers)

    state = model.state_dict(keep_vars=True)
    return {k: v for k, v in state.items() if not inside(k)}


def _version() -> str:
    from lowbit import __version__

    return __version__


def metadata_strings(meta: dict[str, Any]) -> dict[str, str]:
    """The container's metadata for ``meta``: its compact JSON and that text's SHA-256."""
    text = json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return {"lowbit": text, "lowbit_sha256": pack.sha256(text.encode())}


def predicted_size(
    model: nn.Module, layout: str = "dense", meta: ModelMeta | dict | None = None
) -> int:
    """The exact size in bytes of the file ``save(model, path, layout=layout, meta=meta)``
    writes."""
    meta, items = plan(model, layout, meta)
    return pack.container_size(
        [(it.name, it.dtype, it.shape, it.nbytes) for it in items], metadata_strings(meta)
    )


def save(
    model: nn.Module,
    path: str | Path,
    *,
    layout: str = "dense",
    meta: ModelMeta | dict | None = None,
) -> int:
    """Write ``model`` as a .lowbit file (atomically); returns the file size in bytes.

    Works on a packed model (after ``convert_``) and on a fake-quant one (its quantized layers
    are packed on the way, the model itself is not changed). ``meta``: what a user needs to run
    it (``lowbit.ModelMeta``, e.g. ``lowbit.meta.from_dataset(data, test_acc)``); by default the
    model's ``lowbit_meta`` (so a loaded model saves back with its metadata), else none."""
    meta, items = plan(model, layout, meta)
    entries = []
    for it in items:
        data = it.data()
        entries.append(pack.Entry(it.name, it.dtype, it.shape, data))
        meta["sha256"][it.name] = pack.sha256(data)
    return pack.write_container(path, entries, metadata_strings(meta))


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
    version = meta.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:  # not true, 1.0 or "1"
        raise _fail(
            path,
            f"format version {version!r} is not supported by lowbit "
            f"{_version()} (which reads versions {', '.join(map(str, READABLE_VERSIONS))}); "
            "use a matching lowbit",
        )
    if version == 1 and "meta" in meta:
        raise _fail(path, "metadata field 'meta' is not part of format version 1")
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


def check_registry_args(path: Path, name: Any, kwargs: Any) -> None:
    """FormatError naming ``path`` unless ``lowbit.models.get(name, **kwargs)`` read from a file
    has a plain name and arguments within the bounds above (also used for training checkpoints)."""
    if not isinstance(name, str) or not isinstance(kwargs, dict):
        raise _fail(path, "registry model needs a name and kwargs")
    for key, value in kwargs.items():
        if not _plain_arg(value) or (
            key in _LAYER_COUNTS and not (isinstance(value, int) and 0 <= value <= 1024)
        ):
            raise _fail(path, f"model argument {key!r}: {value!r} is out of range")


def _registry_model(path: Path, desc: dict[str, Any], packed: dict[str, Any]) -> nn.Module:
    """``lowbit.models.get(name, **kwargs)``, its quantized layers replaced by packed skeletons
    in the activation mode the file records (on the current default device)."""
    from lowbit import models

    name, kwargs = desc.get("name"), desc.get("kwargs")
    check_registry_args(path, name, kwargs)
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
        if source is None or not packable(source) or isinstance(source, PackedLayer):
            raise _fail(path, f"layer {fqn!r}: not a quantized layer of model {name!r}")
        mode = info.get("activations")
        if mode not in ACTIVATION_MODES:
            raise _fail(path, f"layer {fqn!r}: activations must be one of {ACTIVATION_MODES}")
        model.set_submodule(fqn, empty_packed(source, mode))
    return model


def _skeleton(path: Path, meta: dict[str, Any]) -> nn.Module:
    """The model on the meta device, its quantized layers replaced by packed skeletons."""
    desc = meta["model"]
    with torch.device("meta"):
        if desc.get("kind") == "registry":
            return _registry_model(path, desc, meta["packed"])
        if desc.get("kind") == "tree":
            try:
                return schema.build(desc.get("root"))
            except schema.TreeError as exc:
                raise _fail(path, str(exc)) from exc
    raise _fail(path, f"unknown model kind {desc.get('kind')!r}")


def _check_packed_entry(path: Path, name: str, layer: PackedLayer, info: Any) -> pack.Codec:
    """The codec of a packed layer's codes, once its metadata entry agrees with the model."""
    if not isinstance(info, dict):
        raise _fail(path, f"tensor {name!r}: malformed packed-layer entry")
    codec_json = info.get("codec")
    layout = codec_json.get("layout") if isinstance(codec_json, dict) else None
    if layout not in pack.LAYOUTS:
        raise _fail(path, f"tensor {name!r}: unknown codec {codec_json!r}")
    codec = pack.codec(layer.levels, layout)
    checks = {
        "levels": layer.levels,
        "shape": list(layer.weight_shape),
        "granularity": layer.granularity,
        "activations": layer.activations,
        "codec": codec.to_json(),
        "type": layer.kind,
    }
    for key, want in checks.items():
        got = info.get(key)
        if got != want or isinstance(got, bool) != isinstance(want, bool):
            raise _fail(path, f"tensor {name!r}: {key} {got!r} does not match the model ({want!r})")
    return codec


def _check_values(path: Path, name: str, t: torch.Tensor) -> None:
    """Refuse values no trained model has: NaN or infinite floats (weights, biases, norms'
    statistics) and negative BatchNorm variances."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise _fail(path, f"tensor {name!r}: NaN or infinite values")
    if name.rpartition(".")[2] == "running_var" and bool((t < 0).any()):
        raise _fail(path, f"tensor {name!r}: a BatchNorm variance is negative")


def load(path: str | Path) -> nn.Module:
    """Read a .lowbit file into a packed model (eval mode), ready to run; ``model.lowbit_meta``
    is its ``lowbit.ModelMeta`` (None for a file saved without one): input shape, dtype and
    range, normalisation, class names, dataset, test accuracy (``lowbit.preprocess`` applies it).

    Raises ``FormatError`` naming the tensor for a corrupt, truncated or modified file, an
    unsupported format version, or tensors that do not fit the described model."""
    path = Path(path)
    meta, entries = _read_metadata(path)
    info = _read_model_meta(path, meta)
    model = _skeleton(path, meta)
    layers = {fqn: m for fqn, m in model.named_modules() if isinstance(m, PackedLayer)}
    if set(layers) != set(meta["packed"]):
        raise _fail(path, "packed layers listed in the metadata do not match the model")
    expected = {
        k: (pack.dtype_name(v.dtype), tuple(v.shape))
        for k, v in model.state_dict(keep_vars=True).items()
    }
    codecs: dict[str, tuple[pack.Codec, PackedLayer]] = {}
    for fqn, layer in layers.items():
        name = f"{fqn}.codes" if fqn else "codes"
        codec = _check_packed_entry(path, name, layer, meta["packed"][fqn])
        expected[name] = ("U8", (codec.nbytes(math.prod(layer.weight_shape)),))
        codecs[name] = (codec, layer)
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
    # Everything is consistent: read, unpack, check the values, then fill the model.
    state = {name: entry.tensor() for name, entry in entries.items() if name not in codecs}
    for name, t in state.items():
        _check_values(path, name, t)
    for name, (codec, layer) in codecs.items():
        try:
            codes = codec.unpack(entries[name].data, math.prod(layer.weight_shape))
        except FormatError as exc:
            raise _fail(path, f"tensor {name!r}: {exc}") from exc
        state[name] = torch.from_numpy(codes).reshape(layer.out_features_, layer.k)
        scale = state[name[: -len("codes")] + "scale"]
        if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
            raise _fail(path, f"tensor {name[: -len('codes')]}scale: scales must be finite and > 0")
    model = model.to_empty(device="cpu")
    model.load_state_dict(state)
    model.lowbit_meta = info
    return model.eval()


def _read_model_meta(path: Path, meta: dict[str, Any]) -> ModelMeta | None:
    """The file's ``meta`` entry, validated (None for version 1 files and files without it)."""
    if meta.get("meta") is None:
        if meta["format_version"] >= 2 and "meta" not in meta:
            raise _fail(path, "metadata field 'meta' is missing (null when unknown)")
        return None
    try:
        return model_meta.from_json(meta["meta"])
    except ValueError as exc:
        raise _fail(path, f"metadata field {exc}") from exc


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
