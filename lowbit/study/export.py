"""CSV export of a study database, for pandas and spreadsheets.

Three files in the study folder, each with the cell's config flattened into columns
(``model, layer, levels, depth, width, ...``) so each reads on its own::

    runs.csv     one row per cell: config, status, final epoch's metrics, size, versions, error
    epochs.csv   one row per (cell, epoch): config + train/test loss and accuracy, wall time
    layers.csv   one row per (cell, epoch, layer): config + levels, scale, flip ratio, zero share,
                 shares (the share of weights at each level, ';'-separated)
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from lowbit.files import atomic_write
from lowbit.study.spec import GRID_KEYS
from lowbit.study.store import EPOCH_FIELDS, Store, default_path

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
    cfg = {r["run_id"]: [r["config"].get(k) for k in keys] for r in runs}
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
