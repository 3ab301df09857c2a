"""Reading a study database into per-cell aggregates over seeds (the report's and claims' input).

A *group* is a network and its training set-up with the layer kind removed (dataset, model,
depth, width, kernel size, augmentation, ...); a *variant* is the layer kind (``linear (fp32)``,
``ternary``, ``nlevel-5``, ...). One ``Agg`` row per (group, variant) holds the seeds' runs:

    seeds                   the seeds, in the order of every per-seed list below
    final_acc, final_loss   last epoch's test accuracy (fraction) / loss, one per seed
    final_linear_cos        last epoch's linear-classifier cosine (MLPs; None elsewhere)
    best_val_epoch          epoch of the highest validation accuracy (None without validation)
    late_val_gain           the last quarter's validation gain, one per seed: 100 * (last epoch's
                            val_acc - best val_acc of the first ceil(3/4 * epochs) epochs), in
                            points; None without validation or under 4 epochs. Near zero or below
                            = at a constant lr, the run had reached its plateau (under an
                            annealed lr the last quarter gains by construction)
    max_drop                largest epoch-to-epoch fall of test accuracy, one per seed
    loss_fluct              std over epochs of log10(test loss), one per seed
    curve_acc, curve_loss   (seeds, epochs) arrays, NaN-padded where a run is shorter
    curves                  the same for every epoch metric: "train_acc", "val_loss", ...
    epochs                  epochs each seed ran
    classes                 the dataset's class count (None in databases that predate it)
    zero_share, flip_ratio  per epoch, averaged over the seeds and the layers (weighted by numel)

Only runs whose status is finished or diverged count; others are listed in ``incomplete``.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.study.store import DONE, Store, default_path
from lowbit.study.variants import completed, variant_label, weight_levels

VARIANT_KEYS = ("layer", "levels", "reading", "seed")
CURVE_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc")


@dataclass(eq=False)  # identity: claims key per-seed values by the Agg itself
class Agg:
    group: tuple
    group_config: dict[str, Any]
    variant: str
    levels: int | None
    seeds: list[int] = field(default_factory=list)
    final_acc: list[float] = field(default_factory=list)
    final_loss: list[float] = field(default_factory=list)
    max_drop: list[float] = field(default_factory=list)
    loss_fluct: list[float] = field(default_factory=list)
    final_linear_cos: list[float | None] = field(default_factory=list)
    best_val_epoch: list[int | None] = field(default_factory=list)
    late_val_gain: list[float | None] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    diverged: int = 0
    curves: dict[str, np.ndarray] = field(default_factory=dict)
    classes: int | None = None
    zero_share: list[float | None] = field(default_factory=list)
    flip_ratio: list[float | None] = field(default_factory=list)
    size_bytes: float | None = None
    size_method: str | None = None
    n_params: int | None = None

    @property
    def bits(self) -> float:
        return 32.0 if self.levels is None else math.log2(self.levels)

    @property
    def n(self) -> int:
        return len(self.final_acc)

    @property
    def curve_acc(self) -> np.ndarray:
        return self.curves["test_acc"]

    @property
    def curve_loss(self) -> np.ndarray:
        return self.curves["test_loss"]

    def by_seed(self, key: str = "final_acc") -> dict[int, float]:
        """seed -> value of a per-seed list (non-finite and missing values left out)."""
        vals = getattr(self, key)
        return {
            s: float(v)
            for s, v in zip(self.seeds, vals, strict=True)
            if v is not None and math.isfinite(v)
        }

    def mean(self, key: str = "final_acc") -> float:
        vals = [v for v in getattr(self, key) if v is not None and math.isfinite(v)]
        return float(np.mean(vals)) if vals else math.nan

    def std(self, key: str = "final_acc") -> float:
        vals = [v for v in getattr(self, key) if v is not None and math.isfinite(v)]
        return float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan


@dataclass
class Study:
    meta: dict[str, Any]
    aggs: list[Agg]
    runs: list[dict[str, Any]]
    incomplete: list[dict[str, Any]]
    failed: list[dict[str, Any]]

    def groups(self) -> dict[tuple, list[Agg]]:
        out: dict[tuple, list[Agg]] = defaultdict(list)
        for a in self.aggs:
            out[a.group].append(a)
        return dict(out)

    def find(self, **match: Any) -> list[Agg]:
        """Aggregates whose group config (or ``variant``) matches every given value."""
        out = []
        for a in self.aggs:
            vals = {**a.group_config, "variant": a.variant, "levels": a.levels}
            if all(vals.get(k) == v for k, v in match.items()):
                out.append(a)
        return out


def group_label(cfg: dict[str, Any]) -> str:
    parts = [cfg["dataset"], cfg["model"]]
    if cfg.get("depth") is not None:
        parts.append(f"depth {cfg['depth']} width {cfg['width']}")
    if cfg.get("activation") == "study":
        parts.append("ReLU after fp32 layers only")
    elif cfg.get("activation") is not None and cfg.get("model") == "mlp":
        parts.append("ReLU everywhere")
    if cfg.get("kernel_size") not in (None, 3):
        parts.append(f"{cfg['kernel_size']}x{cfg['kernel_size']} filters")
    parts.append("augmented" if cfg.get("augment") else "no augmentation")
    return " / ".join(parts)


def _pad(rows: list[list[float]]) -> np.ndarray:
    n = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), n), np.nan)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _mean_over(per_seed: list[dict[int, float]]) -> list[float | None]:
    n = max((max(d) for d in per_seed if d), default=0)
    out: list[float | None] = []
    for e in range(1, n + 1):
        vals = [d[e] for d in per_seed if e in d]
        out.append(float(np.mean(vals)) if vals else None)
    return out


def late_gain(val: list[float]) -> float | None:
    """Validation gain of the last quarter of a run, in points (module docstring)."""
    head = math.ceil(3 * len(val) / 4)
    early = [v for v in val[:head] if math.isfinite(v)]
    if len(val) < 4 or not early or not math.isfinite(val[-1]):
        return None
    return 100 * (val[-1] - max(early))


def load_study(out_dir: str | os.PathLike) -> Study:
    """Read ``out_dir/results.sqlite`` (read-only) and aggregate it."""
    with Store(default_path(Path(out_dir)), readonly=True) as store:
        meta = store.meta()
        runs = store.runs()
        epochs = store.epochs()
        layers = store.layers()
    by_run: dict[str, list[dict]] = defaultdict(list)
    for e in epochs:
        by_run[e["run_id"]].append(e)
    diag: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in layers:
        diag[row["run_id"]][row["epoch"]].append(row)

    wanted = set(meta.get("cell_ids", [])) or {r["run_id"] for r in runs}
    runs = [r for r in runs if r["run_id"] in wanted]
    aggs: dict[tuple, Agg] = {}
    buf: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r["status"] not in DONE or not by_run.get(r["run_id"]):
            continue
        cfg = completed(r["config"])
        gcfg = {k: v for k, v in cfg.items() if k not in VARIANT_KEYS}
        group = tuple(sorted((k, json_key(v)) for k, v in gcfg.items()))
        key = (group, variant_label(cfg))
        a = aggs.setdefault(key, Agg(group, gcfg, variant_label(cfg), weight_levels(cfg)))
        es = by_run[r["run_id"]]
        series = {k: [_nan(e.get(k)) for e in es] for k in CURVE_KEYS}
        acc, loss = series["test_acc"], series["test_loss"]
        a.seeds.append(cfg["seed"])
        a.final_acc.append(acc[-1])
        a.final_loss.append(loss[-1])
        a.final_linear_cos.append(es[-1].get("linear_cos"))
        val = series["val_acc"]
        finite = [i for i, v in enumerate(val) if math.isfinite(v)]
        a.best_val_epoch.append(max(finite, key=lambda i: val[i]) + 1 if finite else None)
        a.late_val_gain.append(late_gain(val))
        a.epochs.append(len(es))
        drops = [acc[i - 1] - acc[i] for i in range(1, len(acc))]
        a.max_drop.append(max([0.0, *[d for d in drops if math.isfinite(d)]]))
        logs = [math.log10(v) for v in loss if math.isfinite(v) and v > 0]
        a.loss_fluct.append(float(np.std(logs)) if len(logs) > 1 else 0.0)
        a.diverged += r["status"] == "diverged"
        a.size_bytes, a.size_method, a.n_params = r["size_bytes"], r["size_method"], r["n_params"]
        a.classes = r.get("classes")
        for k in CURVE_KEYS:
            buf[key][k].append(series[k])
        zs, fl = {}, {}
        for ep, rows in diag.get(r["run_id"], {}).items():
            w = sum(x["numel"] for x in rows)
            if w and all(x["zero_share"] is not None for x in rows):
                zs[ep] = sum(x["zero_share"] * x["numel"] for x in rows) / w
            if w and all(x["flip_ratio"] is not None for x in rows):
                fl[ep] = sum(x["flip_ratio"] * x["numel"] for x in rows) / w
        buf[key]["zero"].append(zs)
        buf[key]["flip"].append(fl)
    for key, a in aggs.items():
        a.curves = {k: _pad(buf[key][k]) for k in CURVE_KEYS}
        a.zero_share = _mean_over(buf[key]["zero"])
        a.flip_ratio = _mean_over(buf[key]["flip"])
    incomplete = [r for r in runs if r["status"] not in DONE]
    failed = [r for r in runs if r["status"] == "failed"]
    ordered = sorted(
        aggs.values(),
        key=lambda a: (network_key(a.group_config), a.levels or 999, a.variant),
    )
    return Study(meta, ordered, runs, incomplete, failed)


def network_key(cfg: dict[str, Any]) -> tuple:
    """Sort key of a network: its config with numbers compared as numbers (width 64 < 256)."""

    def value(v: Any) -> tuple:
        if v is None:
            return (0, 0, "")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return (1, v, "")
        return (2, 0, str(v))

    order = ("dataset", "model", "activation", "augment", "depth", "width")
    keys = [k for k in order if k in cfg] + sorted(k for k in cfg if k not in order)
    return tuple((k, value(cfg[k])) for k in keys)


def _nan(v: Any) -> float:
    return math.nan if v is None else float(v)


def json_key(v: Any) -> Any:
    """Hashable, sortable stand-in for a config value (None sorts first)."""
    return (0, "") if v is None else (1, str(v)) if isinstance(v, str) else (1, repr(v))
