"""What a user needs to run a saved model: its input, preprocessing, classes and provenance.

``ModelMeta`` travels in the ``.lowbit`` header (key ``"meta"``, format version 2) and comes back
as ``lowbit.load(path).lowbit_meta``::

    input_shape     (C, H, W) of one image
    input_dtype     "uint8": raw pixels as the dataset's files store them; "float32": any reals
    input_range     (lo, hi) of the raw values, e.g. (0, 255)
    normalisation   Normalisation(divide, mean, std): the model's input is, per channel c,
                        x = (raw / divide - mean[c]) / std[c]                     (float32)
                    (``lowbit.data`` computes the training set's mean/std on raw / 255)
    class_names     one name per output, or None
    dataset         the training data's name (``lowbit.data.NAMES``), or None
    test_accuracy   the training run's final test accuracy (fraction), or None

Every field may be None (an old file, a model saved without it); ``preprocess(meta, raw)`` then
refuses what it cannot do with a one-line error. ``from_json`` validates strictly (types, ranges,
lengths consistent with ``input_shape``) and raises ValueError naming the field, which the file
reader turns into a ``FormatError`` naming the file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

INPUT_DTYPES = ("uint8", "float32")
_MAX_CLASSES = 100_000
_MAX_TEXT = 200


@dataclass(frozen=True)
class Normalisation:
    """x = (raw / divide - mean[c]) / std[c] per channel c; mean/std have one value a channel."""

    divide: float
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class ModelMeta:
    """See the module docstring; all fields optional (None = unknown)."""

    input_shape: tuple[int, int, int] | None = None
    input_dtype: str | None = None
    input_range: tuple[float, float] | None = None
    normalisation: Normalisation | None = None
    class_names: tuple[str, ...] | None = None
    dataset: str | None = None
    test_accuracy: float | None = None

    def __post_init__(self) -> None:
        # Validate whatever way it was built (API or file) through the one JSON checker.
        from_json(self.to_json())

    def missing(self) -> list[str]:
        """Names of the fields that are None."""
        return [k for k, v in self.to_json().items() if v is None]

    def to_json(self) -> dict[str, Any]:
        n = self.normalisation
        return {
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "input_dtype": self.input_dtype,
            "input_range": None if self.input_range is None else list(self.input_range),
            "normalisation": None
            if n is None
            else {"divide": n.divide, "mean": list(n.mean), "std": list(n.std)},
            "class_names": None if self.class_names is None else list(self.class_names),
            "dataset": self.dataset,
            "test_accuracy": self.test_accuracy,
        }

    def to_json_text(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True, allow_nan=False)


# --- validation ----------------------------------------------------------------------------------


def _number(v: Any, what: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{what} must be a finite number, got {v!r}")
    if not lo <= v <= hi:
        raise ValueError(f"{what} must lie in [{lo}, {hi}], got {v!r}")
    return float(v)


def _text(v: Any, what: str) -> str:
    if not isinstance(v, str) or not 0 < len(v) <= _MAX_TEXT:
        raise ValueError(f"{what} must be a string of 1..{_MAX_TEXT} characters, got {v!r:.60}")
    return v


def _numbers(v: Any, what: str, n: int | None, lo: float = -math.inf) -> tuple[float, ...]:
    if not isinstance(v, list) or not 1 <= len(v) <= 4096 or (n is not None and len(v) != n):
        want = f"{n} numbers (one a channel)" if n is not None else "a list of numbers"
        raise ValueError(f"{what} must be {want}, got {v!r:.60}")
    return tuple(_number(x, what, lo) for x in v)


def from_json(obj: Any) -> ModelMeta:
    """A validated ModelMeta from its JSON form; ValueError naming the bad field."""
    if not isinstance(obj, dict) or set(obj) != set(_FIELDS):
        raise ValueError(f"meta must be an object with exactly the keys {', '.join(_FIELDS)}")
    out: dict[str, Any] = {}
    shape = obj["input_shape"]
    if shape is not None:
        if not isinstance(shape, list) or len(shape) != 3:
            raise ValueError(f"meta.input_shape must be [C, H, W], got {shape!r:.60}")
        for s in shape:
            if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 1 << 16:
                raise ValueError(f"meta.input_shape must hold sizes in 1..65536, got {s!r}")
        shape = tuple(shape)
    out["input_shape"] = shape
    channels = None if shape is None else shape[0]
    dtype = obj["input_dtype"]
    if dtype is not None and dtype not in INPUT_DTYPES:
        raise ValueError(
            f"meta.input_dtype must be one of {', '.join(INPUT_DTYPES)}, got {dtype!r}"
        )
    out["input_dtype"] = dtype
    rng = obj["input_range"]
    if rng is not None:
        lo, hi = _numbers(rng, "meta.input_range", 2)
        if not lo < hi:
            raise ValueError(f"meta.input_range must be [lo, hi] with lo < hi, got {rng!r}")
        rng = (lo, hi)
    out["input_range"] = rng
    norm = obj["normalisation"]
    if norm is not None:
        if not isinstance(norm, dict) or set(norm) != {"divide", "mean", "std"}:
            raise ValueError("meta.normalisation must be an object with divide, mean and std")
        divide = _number(norm["divide"], "meta.normalisation.divide", 1e-30)
        mean = _numbers(norm["mean"], "meta.normalisation.mean", channels)
        std = _numbers(norm["std"], "meta.normalisation.std", channels, 1e-30)
        if len(mean) != len(std):
            raise ValueError("meta.normalisation: mean and std must have one value a channel")
        norm = Normalisation(divide, mean, std)
    out["normalisation"] = norm
    names = obj["class_names"]
    if names is not None:
        if not isinstance(names, list) or not 1 <= len(names) <= _MAX_CLASSES:
            raise ValueError(f"meta.class_names must be a list of 1..{_MAX_CLASSES} strings")
        names = tuple(_text(x, "meta.class_names[]") for x in names)
    out["class_names"] = names
    out["dataset"] = None if obj["dataset"] is None else _text(obj["dataset"], "meta.dataset")
    acc = obj["test_accuracy"]
    out["test_accuracy"] = None if acc is None else _number(acc, "meta.test_accuracy", 0.0, 1.0)
    return _build(out)


def _build(fields: dict[str, Any]) -> ModelMeta:
    """A ModelMeta from already validated fields (skips __post_init__'s second check)."""
    meta = object.__new__(ModelMeta)
    for k, v in fields.items():
        object.__setattr__(meta, k, v)
    return meta


_FIELDS = tuple(ModelMeta.__dataclass_fields__)


# --- preprocessing -------------------------------------------------------------------------------


def normalise(x: torch.Tensor, divide: float, mean: Any, std: Any) -> torch.Tensor:
    """(x / divide - mean_c) / std_c in float32, x (N, C, H, W); mean/std per channel (their
    float32 values). The one place this map is computed: ``lowbit.data`` normalises datasets
    with it, ``preprocess`` applies it to a user's raw images, so the two are bit-identical."""
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.to(torch.float32, copy=True).div_(divide).sub_(m).div_(s)


def normalisation_arrays(meta: ModelMeta) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(divide, mean (C,), std (C,)) as float32 arrays: what ``normalise`` computes with."""
    n = meta.normalisation
    if n is None:
        raise ValueError("the model carries no normalisation")
    return (
        np.float32(n.divide),
        np.asarray(n.mean, dtype=np.float32),
        np.asarray(n.std, dtype=np.float32),
    )


def _as_nchw(raw: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """(N, H, W) [C = 1], (N, C, H, W) or (N, H, W, C) -> (N, C, H, W); ValueError otherwise."""
    c, h, w = shape
    if raw.dim() == 3 and c == 1 and tuple(raw.shape[1:]) == (h, w):
        return raw.unsqueeze(1)
    if raw.dim() == 4 and tuple(raw.shape[1:]) == shape:
        return raw
    if raw.dim() == 4 and tuple(raw.shape[1:]) == (h, w, c):
        return raw.permute(0, 3, 1, 2)
    want = f"(N, {h}, {w}), " if c == 1 else ""
    raise ValueError(
        f"images of shape {tuple(raw.shape)} do not fit the model's input {shape}: expected "
        f"{want}(N, {c}, {h}, {w}) or (N, {h}, {w}, {c})"
    )


def preprocess(meta: ModelMeta, raw: Any) -> torch.Tensor:
    """Raw images (numpy array or tensor, a batch) -> the float32 (N, C, H, W) input the model
    expects: checks the shape and value range the file declares, then applies its
    normalisation. ValueError (one line) when the images do not fit or the file lacks what is
    needed."""
    if isinstance(raw, torch.Tensor):
        x = raw
    else:
        arr = np.asarray(raw)  # a read-only (memory-mapped) array is copied, not aliased
        x = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"images must be real numbers, got {x.dtype}")
    if meta.input_shape is None:
        raise ValueError("the model does not record its input shape; cannot check the images")
    x = _as_nchw(x, meta.input_shape)
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError("images hold NaN or infinite values; expected raw pixels")
    if meta.input_range is not None and x.numel():
        lo, hi = meta.input_range
        if float(x.min()) < lo or float(x.max()) > hi:
            raise ValueError(
                f"image values span {float(x.min()):g}..{float(x.max()):g}, outside the "
                f"{lo:g}..{hi:g} the model expects: pass raw images, not normalised ones"
            )
    if meta.normalisation is None:
        return x.to(torch.float32)
    n = meta.normalisation
    return normalise(x, n.divide, n.mean, n.std)


# --- where the metadata comes from ---------------------------------------------------------------


def from_dataset(dataset: Any, test_accuracy: float | None = None) -> ModelMeta:
    """The metadata of a model trained on ``dataset`` (a ``lowbit.data.Dataset``)."""
    from lowbit import data

    return from_data_info(
        {
            "name": dataset.name,
            "input_shape": list(dataset.input_shape),
            "classes": dataset.classes,
            "mean": list(dataset.mean),
            "std": list(dataset.std),
        },
        test_accuracy,
        class_names=data.CLASS_NAMES.get(dataset.name),
    )


def from_data_info(
    info: dict[str, Any],
    test_accuracy: float | None = None,
    class_names: Any = None,
) -> ModelMeta:
    """From a run's ``config.json`` "data" entry (name, input_shape, classes, mean, std);
    absent entries become None. Raw datasets (with mean/std) are uint8 pixels in 0..255."""
    from lowbit import data

    name = info.get("name")
    mean, std = info.get("mean") or None, info.get("std") or None
    raw = name in data.CLASS_NAMES or mean is not None
    shape = info.get("input_shape")
    names = class_names if class_names is not None else data.CLASS_NAMES.get(name)
    if names is not None and len(names) != info.get("classes", len(names)):
        names = None
    return ModelMeta(
        input_shape=tuple(shape) if shape else None,
        input_dtype="uint8" if raw else ("float32" if name else None),
        input_range=(0.0, 255.0) if raw else None,
        normalisation=Normalisation(255.0, tuple(mean), tuple(std)) if mean and std else None,
        class_names=tuple(names) if names is not None else None,
        dataset=name,
        test_accuracy=test_accuracy,
    )


def from_run(source: str | Path, config: dict[str, Any]) -> tuple[ModelMeta, list[str]]:
    """What ``lowbit pack`` saves for a training run: ``source`` is the run directory (or its
    checkpoint), ``config`` its config.json content. The data entry gives name, shape, classes
    and the normalisation (runs older than that entry's mean/std: recomputed from the local
    dataset when it is found); result.json the final test accuracy. Also returns notes on
    what could not be found (the file is then written without it)."""
    from lowbit import data
    from lowbit.errors import LowbitError

    notes: list[str] = []
    run_dir = Path(source) if Path(source).is_dir() else Path(source).parent
    if not config.get("data"):  # a checkpoint file given: its run's config.json is beside it
        try:
            config = json.loads((run_dir / "config.json").read_text())
        except (OSError, ValueError):
            pass
    info = dict(config.get("data") or {}) if isinstance(config, dict) else {}
    name = info.get("name")
    if name is None:
        notes.append("the run records no dataset: no input description saved")
    elif not info.get("mean") and name in data.CLASS_NAMES:
        try:
            ds = data.load(name)
            info.update(mean=list(ds.mean), std=list(ds.std))
            notes.append(f"normalisation recomputed from {name} in {ds.source}")
        except LowbitError as exc:
            notes.append(f"no normalisation saved ({exc}); 'lowbit predict' will need --dataset")
    acc = None
    try:
        value = json.loads((run_dir / "result.json").read_text()).get("test_acc")
        acc = float(value) if isinstance(value, (int, float)) and 0 <= value <= 1 else None
    except (OSError, ValueError, AttributeError):
        pass
    if acc is None:
        notes.append(f"no test accuracy in {run_dir / 'result.json'}")
    return from_data_info(info, acc), notes


__all__ = [
    "INPUT_DTYPES",
    "ModelMeta",
    "Normalisation",
    "from_data_info",
    "from_dataset",
    "from_json",
    "from_run",
    "normalisation_arrays",
    "normalise",
    "preprocess",
]
