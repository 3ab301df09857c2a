"""Study specs: a TOML file describing a Cartesian grid of training runs ("cells").

A spec has four tables; only ``[grid]`` is required::

    [study]                         # what the study is
    name = "sign-vs-linear"
    title = "..."                   # one line, shown in the report
    fallback_dataset = "fashion-mnist"   # used for a dataset that is not installed
    claims = ["svl-bitlinear8-best", ...] # paper claims the report evaluates (lowbit.study.claims)

    [grid]                          # every key: one value or a list of values
    model = "mlp"
    layer = ["linear", "ternary"]
    depth = [1, 3]
    seed = [0, 1, 2]
    epochs = "by-size"              # or an int; "by-size" uses [epochs_by_size]

    [epochs_by_size]                # epochs = min + round((max - min) * size), size in [0, 1]
    min = 4
    max = 18

    [[override]]                    # set keys on the cells that match every `when` entry
    when = { model = ["vit1", "vit2"] }
    set = { lr = 0.01 }

    [quick]                         # applied with --quick: grid keys and/or epochs_by_size
    seed = 0
    train_subset = 2000

    [[quick.override]]              # overrides applied only with --quick (after the others)
    when = { model = "cvnn2" }
    set = { epochs = 1 }

Each cell's *resolved* config holds every key of ``GRID_KEYS``; keys a model does not use are None
(depth/width only for ``mlp``, kernel_size only for ``cvnn*``, patch_size only for ``vit*``,
levels only for ``nlevel``, reading
only for the layers with readings, see ``lowbit.study.variants``), so two grid points that train
the same network collapse into one cell. ``reading = ["default", "weight-ste", "raw-sign"]`` runs
each seed layer under each of its readings (a reading of another kind falls back to the kind's
default); ``val_split = 0.1`` holds out 10% of the training images as a validation set
(``TrainConfig.val_split``); ``batch_size`` and ``seed`` default to ``TrainConfig``'s. A cell's
id is the first 16 hex digits of sha256 over its config as sorted, compact JSON: stable across
runs, machines and spec-file ordering (``reading``, ``val_split``, ``lr_schedule`` and ``patience``
are left out of the hash while unused, so cells stored before those keys existed keep their ids).
``patience = 10`` stops a cell 10 epochs after its best validation accuracy
(``TrainConfig.patience``; it needs ``val_split``): ``epochs`` is then the budget's upper bound.

Size rule for ``epochs = "by-size"`` (the sign-vs-linear preset; the paper trained "4 to 18 epochs
depending on the size"): ``size = (log2(width / w_min) + (depth - d_min)) / (log2(w_max / w_min) +
(d_max - d_min))`` over the grid's own depth and width ranges, so the smallest network gets ``min``
epochs and the largest ``max``. For depth {1,3,5,7} x width {4,...,1024} with min 4 and max 18 this
is exactly ``epochs = 4 + log2(width / 4) + (depth - 1)``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit import bnn, data, models, quantizers, train
from lowbit.errors import ConfigError
from lowbit.study.claims import CLAIMS
from lowbit.study.variants import (
    DEFAULT_READING,
    LATER_KEYS,
    READING_NAMES,
    resolve_reading,
    variant_label,
)

# The study accepts what the library accepts: one list of each, kept by its own module.
MODELS = tuple(n for n in models.NAMES if n != "vit")  # the generic vit needs kwargs a grid lacks
# the binary models' methods (lowbit.bnn) are layer kinds too; the models check which they take
LAYERS = models.LAYERS + tuple(m for m in bnn.METHODS if m not in models.LAYERS)
DATASETS = data.NAMES
OPTIMIZERS = train.OPTIMIZERS
ACTIVATIONS = models.ACTIVATIONS

# key -> (accepted python types, default, allowed values or None)
_INT = (int,)
_NUM = (int, float)
_TRAIN = train.TrainConfig()  # the library's training defaults are the study's
GRID_KEYS: dict[str, tuple[tuple[type, ...], Any, tuple | None]] = {
    "model": ((str,), "mlp", MODELS),
    "layer": ((str,), "linear", LAYERS),
    "reading": ((str,), DEFAULT_READING, READING_NAMES),
    "levels": (_INT, 3, None),
    "depth": (_INT, 3, None),
    "width": (_INT, 256, None),
    "kernel_size": (_INT, 3, (3, 5)),
    "patch_size": (_INT, models.ViTConfig.patch_size, None),
    "activation": ((str,), "relu", ACTIVATIONS),
    "dataset": ((str,), "fashion-mnist", DATASETS),
    "augment": ((bool,), False, None),
    "optimizer": ((str,), "adam", OPTIMIZERS),
    "lr": (_NUM, 1e-3, None),
    "lr_schedule": ((str,), "constant", train.LR_SCHEDULES),
    "momentum": (_NUM, 0.92, None),
    "epochs": (_INT + (str,), 5, None),
    "batch_size": (_INT, _TRAIN.batch_size, None),
    "seed": (_INT, _TRAIN.seed, None),
    "train_subset": (_INT, 0, None),
    "test_subset": (_INT, 0, None),
    "val_split": (_NUM, 0.0, None),
    "patience": (_INT, 0, None),
}
_STUDY_KEYS = {"name": (str,), "title": (str,), "fallback_dataset": (str,), "claims": (list,)}
_TOP_KEYS = ("study", "grid", "epochs_by_size", "override", "quick")


@dataclass(frozen=True)
class Cell:
    """One run of a study: its id and its resolved config (every key of ``GRID_KEYS``)."""

    id: str
    config: dict[str, Any]

    @property
    def label(self) -> str:
        """Layer variant as shown in plots: ``ternary``, ``nlevel-5``, ``linear`` (fp32)."""
        return variant_label(self.config)


@dataclass
class Spec:
    """A parsed, validated spec. ``cells(...)`` expands and resolves the grid."""

    name: str
    title: str
    grid: dict[str, list[Any]]
    epochs_by_size: dict[str, int]
    overrides: list[dict[str, dict[str, Any]]]
    fallback_dataset: str | None
    claims: list[str]
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def cells(self, dataset_available: Callable[[str], bool] | None = None) -> list[Cell]:
        """All distinct cells, in grid order. ``dataset_available(name)`` decides the fallback."""
        return expand(self, dataset_available)


def cell_id(config: dict[str, Any]) -> str:
    """Stable hash of a resolved config: sha256 of sorted compact JSON, 16 hex digits."""
    kept = {k: v for k, v in config.items() if k not in LATER_KEYS or v not in LATER_KEYS[k]}
    blob = json.dumps(kept, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _check_value(where: str, key: str, value: Any) -> Any:
    types, _, allowed = GRID_KEYS[key]
    # bool is an int subclass: never accept true/false for a number, or a number for a flag
    if isinstance(value, bool) != (types == (bool,)) or not isinstance(value, types):
        names = " or ".join(t.__name__ for t in types)
        raise ConfigError(f"{where}.{key}: expected {names}, got {value!r}")
    if key == "epochs" and isinstance(value, str) and value != "by-size":
        raise ConfigError(f'{where}.epochs: expected an integer or "by-size", got {value!r}')
    if allowed is not None and value not in allowed:
        raise ConfigError(f"{where}.{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
    if key == "levels":
        try:
            quantizers.check_levels(value)
        except ValueError as exc:
            raise ConfigError(f"{where}.{exc}") from None
    if key in ("depth", "width", "batch_size", "patch_size") and value < 1:
        raise ConfigError(f"{where}.{key}: must be >= 1, got {value}")
    if key in ("train_subset", "test_subset", "seed") and value < 0:
        raise ConfigError(f"{where}.{key}: must be >= 0 (0 = all), got {value}")
    if key == "epochs" and isinstance(value, int) and value < 1:
        raise ConfigError(f"{where}.epochs: must be >= 1, got {value}")
    if key == "lr" and not value > 0:
        raise ConfigError(f"{where}.lr: must be > 0, got {value}")
    if key == "val_split" and not 0 <= value < 1:
        raise ConfigError(f"{where}.val_split: must be in [0, 1) (a share of the training set)")
    if key == "patience" and value < 0:
        raise ConfigError(f"{where}.patience: must be >= 0 (0 = no early stopping), got {value}")
    return value


def _check_table(where: str, table: Any, *, lists: bool) -> dict[str, Any]:
    """Validate a table of grid keys; with ``lists`` every value becomes a non-empty list."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table, got {type(table).__name__}")
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in GRID_KEYS:
            raise ConfigError(
                f"{where}.{key}: unknown key; valid keys: {', '.join(GRID_KEYS)}"
                + (", epochs_by_size, override" if where == "quick" else "")
            )
        values = value if isinstance(value, list) else [value]
        if not values:
            raise ConfigError(f"{where}.{key}: empty list, the grid would have no cells")
        checked = [_check_value(where, key, v) for v in values]
        out[key] = checked if lists or isinstance(value, list) else checked[0]
    return out


def _check_epochs_rule(where: str, table: Any) -> dict[str, int]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table with min and max")
    for key in table:
        if key not in ("min", "max"):
            raise ConfigError(f"{where}.{key}: unknown key; valid keys: min, max")
    rule = {"min": table.get("min", 4), "max": table.get("max", 18)}
    for key, v in rule.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{where}.{key}: expected an integer >= 1, got {v!r}")
    if rule["min"] > rule["max"]:
        raise ConfigError(f"{where}: min ({rule['min']}) is larger than max ({rule['max']})")
    return rule


def parse(doc: dict[str, Any], *, quick: bool = False, source: str = "") -> Spec:
    """Validate a spec document (the dict ``tomllib`` returns) and apply ``[quick]`` if asked."""
    for key in doc:
        if key not in _TOP_KEYS:
            raise ConfigError(f"{key}: unknown table; valid tables: {', '.join(_TOP_KEYS)}")
    study = doc.get("study", {})
    if not isinstance(study, dict):
        raise ConfigError("study: expected a table")
    for key, value in study.items():
        if key not in _STUDY_KEYS:
            raise ConfigError(f"study.{key}: unknown key; valid keys: {', '.join(_STUDY_KEYS)}")
        if not isinstance(value, _STUDY_KEYS[key]):
            raise ConfigError(f"study.{key}: expected {_STUDY_KEYS[key][0].__name__}")
    fallback = study.get("fallback_dataset")
    if fallback is not None and fallback not in DATASETS:
        raise ConfigError(f"study.fallback_dataset: {fallback!r} is not one of {DATASETS}")
    if "grid" not in doc:
        raise ConfigError("grid: missing; a spec needs a [grid] table (e.g. layer = ['ternary'])")
    grid = _check_table("grid", doc["grid"], lists=True)
    rule = _check_epochs_rule("epochs_by_size", doc.get("epochs_by_size", {}))

    quick_doc = dict(doc.get("quick", {}))
    if not isinstance(doc.get("quick", {}), dict):
        raise ConfigError("quick: expected a table")
    raw_over = doc.get("override", [])
    quick_over = quick_doc.pop("override", [])
    if not isinstance(raw_over, list) or not isinstance(quick_over, list):
        raise ConfigError("override: expected an array of tables ([[override]])")
    overrides = []
    tagged = [("override", i, ov) for i, ov in enumerate(raw_over)]
    tagged += [("quick.override", i, ov) for i, ov in enumerate(quick_over)]
    for prefix, i, ov in tagged:
        where = f"{prefix}[{i}]"
        if not isinstance(ov, dict) or set(ov) - {"when", "set"}:
            raise ConfigError(f"{where}: expected a table with only 'when' and 'set'")
        when = _check_table(f"{where}.when", ov.get("when", {}), lists=True)
        sets = _check_table(f"{where}.set", ov.get("set", {}), lists=False)
        for key, v in sets.items():
            if isinstance(v, list):
                raise ConfigError(f"{where}.set.{key}: expected a single value, not a list")
        if prefix == "override" or quick:
            overrides.append({"when": when, "set": sets})

    # [quick] is validated either way, so a typo in it fails without --quick too
    quick_rule = quick_doc.pop("epochs_by_size", None)
    if quick_rule is not None:
        quick_rule = _check_epochs_rule("quick.epochs_by_size", quick_rule)
    quick_grid = _check_table("quick", quick_doc, lists=True)
    if quick:
        grid.update(quick_grid)
        rule = quick_rule or rule

    claims = study.get("claims", [])
    if not all(isinstance(c, str) for c in claims):
        raise ConfigError("study.claims: expected a list of strings")
    for c in claims:
        if c not in CLAIMS:
            raise ConfigError(f"study.claims: unknown claim {c!r}; known: {', '.join(CLAIMS)}")
    return Spec(
        name=study.get("name", Path(source).stem if source else "study"),
        title=study.get("title", ""),
        grid=grid,
        epochs_by_size=rule,
        overrides=overrides,
        fallback_dataset=fallback,
        claims=list(claims),
        source=source,
    )


def load(path: str | Path, *, quick: bool = False) -> Spec:
    """Read and validate a spec file, or a preset name (``sign-vs-linear``, ``low-resolution``)."""
    p = Path(path)
    if not p.suffix and not p.exists():
        p = preset_path(str(path))
    if not p.is_file():
        raise ConfigError(f"{path}: no such spec file or preset; presets: {', '.join(presets())}")
    try:
        doc = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})") from None
    return parse(doc, quick=quick, source=str(p))


def presets() -> list[str]:
    return sorted(f.stem for f in (Path(__file__).parent / "presets").glob("*.toml"))


def preset_path(name: str) -> Path:
    return Path(__file__).parent / "presets" / f"{name}.toml"


def _resolve(raw: dict[str, Any], spec: Spec, available: Callable[[str], bool] | None) -> dict:
    cfg = dict(raw)
    # the dataset falls back first, so an override can match the dataset a cell really uses
    # (e.g. when = { model = "vit1", dataset = "fashion-mnist" }, set = { patch_size = 7 })
    _fallback(cfg, spec, available)
    for ov in spec.overrides:
        if all(cfg[k] in vals for k, vals in ov["when"].items()):
            cfg.update(ov["set"])
    _fallback(cfg, spec, available)  # an override may have set the dataset
    if cfg["model"] not in ("mlp", "binary_mlp"):
        cfg["depth"] = None
    if cfg["model"] not in ("mlp", "binary_mlp", "binary_cnn"):
        cfg["width"] = None
    if cfg["model"] != "mlp":
        cfg["activation"] = None
    if not cfg["model"].startswith("cvnn"):
        cfg["kernel_size"] = None
    if not cfg["model"].startswith("vit"):
        cfg["patch_size"] = None
    if cfg["layer"] != "nlevel":
        cfg["levels"] = None
    cfg["reading"] = resolve_reading(cfg["layer"], cfg["reading"])
    if cfg["optimizer"] != "sgd":
        cfg["momentum"] = None
    if cfg["epochs"] == "by-size":
        cfg["epochs"] = _epochs_by_size(cfg, spec)
    cfg["lr"] = float(cfg["lr"])
    cfg["val_split"] = float(cfg["val_split"])
    if cfg["patience"] and not cfg["val_split"]:
        raise ConfigError(
            "grid.patience needs grid.val_split > 0: early stopping watches the validation "
            "accuracy, never the test set"
        )
    if cfg["momentum"] is not None:
        cfg["momentum"] = float(cfg["momentum"])
    return cfg


def _fallback(cfg: dict[str, Any], spec: Spec, available: Callable[[str], bool] | None) -> None:
    if available is None or cfg["dataset"] == "synthetic" or available(cfg["dataset"]):
        return
    if spec.fallback_dataset is None:
        raise ConfigError(
            f"dataset {cfg['dataset']!r} is not installed and the spec names no "
            "study.fallback_dataset; see `lowbit data`"
        )
    cfg["dataset"] = spec.fallback_dataset


def _epochs_by_size(cfg: dict[str, Any], spec: Spec) -> int:
    lo, hi = spec.epochs_by_size["min"], spec.epochs_by_size["max"]
    if cfg["model"] != "mlp":
        return hi
    widths, depths = spec.grid["width"], spec.grid["depth"]
    span = math.log2(max(widths) / min(widths)) + (max(depths) - min(depths))
    size = 0.0
    if span > 0:
        size = (math.log2(cfg["width"] / min(widths)) + cfg["depth"] - min(depths)) / span
    return lo + round((hi - lo) * size)


def expand(spec: Spec, available: Callable[[str], bool] | None = None) -> list[Cell]:
    """The grid's distinct cells. Raises ConfigError when the grid is empty."""
    keys = list(GRID_KEYS)
    axes = [spec.grid.get(k, [GRID_KEYS[k][1]]) for k in keys]
    if "by-size" in spec.grid.get("epochs", []) and not (
        "width" in spec.grid and "depth" in spec.grid
    ):
        raise ConfigError('grid.epochs: "by-size" needs grid.depth and grid.width lists')
    cells: dict[str, Cell] = {}
    for combo in itertools.product(*axes):
        cfg = _resolve(dict(zip(keys, combo, strict=True)), spec, available)
        cid = cell_id(cfg)
        cells.setdefault(cid, Cell(cid, cfg))
    if not cells:
        raise ConfigError("grid: the grid has no cells")
    return list(cells.values())
