"""CSV export of a study database, for pandas and spreadsheets, and its import.

Three files in the study folder, each with the cell's config flattened into columns
(``model, layer, levels, depth, width, ...``) so each reads on its own::

    runs.csv     one row per cell: config, status, final epoch's metrics, size, versions,
                 device, classes, error
    epochs.csv   one row per (cell, epoch): config + train/test loss and accuracy, wall time
    layers.csv   one row per (cell, epoch, layer): config + levels, scale, flip ratio, zero share,
                 shares (the share of weights at each level, ';'-separated)

``import_csv`` reads such a folder back (``layers.csv`` may be gzipped, ``layers.csv.gz``): the
finished cells of an exported study enter a new database as they were, so a study that spans
machines or sessions continues from its committed export (``lowbit study --resume-from``).
Floats are written with Python's shortest round-trip repr, so an import stores the same numbers.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from lowbit.errors import ConfigError
from lowbit.files import atomic_write
from lowbit.study.spec import GRID_KEYS
from lowbit.study.store import DONE, EPOCH_FIELDS, RUN_INFO_FIELDS, Store, default_path
from lowbit.study.variants import completed

_RUN_FIELDS = (
    "status",
    "attempts",
    "started",
    "ended",
    "n_params",
    "n_quant_weights",
    "size_bytes",
    "size_method",
    "lowbit_version",
    "git_rev",
    "torch_version",
    "python_version",
    "host",
    "device",
    "classes",
)


def _write(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    atomic_write(path, buf.getvalue())
    return path


def export_csv(out_dir: str | os.PathLike) -> list[Path]:
    """Write runs.csv, epochs.csv and layers.csv next to the database; returns their paths."""
    out = Path(out_dir)
    with Store(default_path(out), readonly=True) as store:
        runs = store.runs()
        epochs = store.epochs()
        layers = store.layers()
    keys = list(GRID_KEYS)
    cfg = {r["run_id"]: [completed(r["config"]).get(k) for k in keys] for r in runs}
    last: dict[str, dict[str, Any]] = {}
    for e in epochs:
        last[e["run_id"]] = e
    run_rows = []
    for r in runs:
        fin = last.get(r["run_id"], {})
        error = (r["error"] or "").strip().splitlines()
        run_rows.append(
            [r["run_id"], *cfg[r["run_id"]], *(r[f] for f in _RUN_FIELDS)]
            + [fin.get("epoch"), *(fin.get(f) for f in EPOCH_FIELDS), error[-1] if error else ""]
        )
    files = [
        _write(
            out / "runs.csv",
            ["run_id", *keys, *_RUN_FIELDS, "final_epoch", *EPOCH_FIELDS, "error"],
            run_rows,
        ),
        _write(
            out / "epochs.csv",
            ["run_id", *keys, "epoch", *EPOCH_FIELDS],
            [
                [e["run_id"], *cfg[e["run_id"]], e["epoch"], *(e[f] for f in EPOCH_FIELDS)]
                for e in epochs
                if e["run_id"] in cfg
            ],
        ),
        _write(
            out / "layers.csv",
            ["run_id", *keys, "epoch", "layer", "levels", "numel", "scale", "flip_ratio"]
            + ["zero_share", "shares"],
            [
                [l_["run_id"], *cfg[l_["run_id"]], l_["epoch"], l_["layer"], l_["levels"]]
                + [l_["numel"], l_["scale"], l_["flip_ratio"], l_["zero_share"]]
                + [";".join(f"{s:.6g}" for s in l_["shares"])]
                for l_ in layers
                if l_["run_id"] in cfg
            ],
        ),
    ]
    return files


# --- import -------------------------------------------------------------------------------------


def _opt(cast: Callable[[str], Any]) -> Callable[[str], Any]:
    return lambda v: None if v == "" else cast(v)


_INT, _FLOAT, _STR = _opt(int), _opt(float), _opt(str)
_RUN_TYPES = {"status": str, "attempts": int, "started": _FLOAT, "ended": _FLOAT}
_RUN_TYPES |= {f: _STR for f in RUN_INFO_FIELDS}
_RUN_TYPES |= {"n_params": _INT, "n_quant_weights": _INT, "size_bytes": _FLOAT, "classes": _INT}
_EPOCH_TYPES = {"epoch": int, **{f: _FLOAT for f in EPOCH_FIELDS}}
_LAYER_TYPES = {
    "epoch": int,
    "layer": str,
    "levels": int,
    "numel": int,
    "scale": _FLOAT,
    "flip_ratio": _FLOAT,
    "zero_share": _FLOAT,
    "shares": lambda v: [float(x) for x in v.split(";")] if v else [],
}


def _read(path: Path, types: dict[str, Callable[[str], Any]], optional: Iterable[str] = ()):
    """Rows of ``path`` as dicts {"run_id", *types}, each value cast; a missing column of
    ``optional`` reads as None (exports that predate it). ConfigError naming the line."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", newline="") as f:
            reader = csv.DictReader(f)
            missing = {"run_id", *types} - set(reader.fieldnames or ()) - set(optional)
            if missing:
                raise ConfigError(
                    f"{path}: not a lowbit study export (no column {', '.join(sorted(missing))})"
                )
            rows = []
            for row in reader:
                try:
                    cast = {k: t(row[k]) if k in row else None for k, t in types.items()}
                except (TypeError, ValueError) as exc:
                    raise ConfigError(f"{path}, line {reader.line_num}: {exc}") from None
                rows.append({"run_id": row["run_id"], **cast})
            return rows
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{path}: unreadable ({exc})") from None


def runs_csv(folder: str | os.PathLike) -> Path:
    """``folder/runs.csv`` of an export, or a ConfigError saying what ``folder`` must hold."""
    path = Path(folder) / "runs.csv"
    if not path.is_file():
        raise ConfigError(
            f"{folder}: no runs.csv here; --resume-from takes a folder written by "
            "'lowbit report DIR --csv' (runs.csv, epochs.csv, layers.csv or layers.csv.gz)"
        )
    return path


def import_csv(store: Store, folder: str | os.PathLike, cell_ids: Iterable[str]) -> list[str]:
    """Store the finished (or diverged) cells of the export in ``folder`` whose ids are in
    ``cell_ids`` and that ``store`` has not finished; returns their ids. A cell's id is the
    hash of its config, so an exported cell counts only for the very same config."""
    src = Path(folder)
    runs_path = runs_csv(src)
    wanted = set(cell_ids)
    runs = [
        r
        for r in _read(runs_path, _RUN_TYPES, optional=("device", "classes"))
        if r["status"] in DONE and r["run_id"] in wanted
    ]
    if not runs:
        return []
    epochs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in _read(src / "epochs.csv", _EPOCH_TYPES):
        epochs[e["run_id"]].append(e)
    layers: dict[str, list[dict[str, Any]]] = defaultdict(list)
    layers_path = next(
        (p for p in (src / "layers.csv", src / "layers.csv.gz") if p.is_file()), None
    )
    for row in _read(layers_path, _LAYER_TYPES) if layers_path else ():
        layers[row["run_id"]].append(row)
    done = []
    for r in runs:
        if not epochs[r["run_id"]]:
            raise ConfigError(
                f"{src}: cell {r['run_id']} is {r['status']} but has no epochs.csv rows"
            )
        if store.import_run(r["run_id"], r, epochs[r["run_id"]], layers[r["run_id"]]):
            done.append(r["run_id"])
    return done
