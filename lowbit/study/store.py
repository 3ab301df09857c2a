"""The results store: one SQLite database per study, ``DIR/results.sqlite``.

Schema (one row per ...)::

    meta    (key PK, value)                         study name, spec, notes (JSON values)
    runs    (run_id PK, config, status, error, started, ended, attempts, lowbit_version,
             git_rev, torch_version, python_version, host, n_params, n_quant_weights,
             size_bytes, size_method, device, classes)
                                                    ... cell
    epochs  (run_id, epoch) PK, train_loss, train_acc, test_loss, test_acc, wall_s,
             val_loss, val_acc, linear_cos          ... finished epoch of a cell
    layers  (run_id, epoch, layer) PK, levels, numel, scale, flip_ratio, zero_share, shares
                                                    ... quantized layer and epoch

``status`` is one of pending, running, finished, diverged, failed, interrupted (Ctrl-C; resumed
by the next run like pending and failed cells). Epoch rows are written with
``INSERT OR REPLACE`` keyed (run_id, epoch), together with their layer rows in one transaction: a
re-run of an epoch (after a crash between the row and the checkpoint) replaces, never duplicates.

Concurrency: WAL journal (readers never block the writer), ``busy_timeout`` of 60 s, writes in
``BEGIN IMMEDIATE`` transactions, and a retry loop with backoff on "database is locked" for the
rare case the timeout is exceeded. ``synchronous=NORMAL`` with WAL keeps every committed
transaction across a process crash (SIGKILL); only a power loss can drop the last commits.

Claims: a sweep takes a cell with :meth:`Store.claim` before it trains it, in one ``BEGIN
IMMEDIATE`` transaction, so two sweeps on one folder never train the same cell. The claim records
its ``owner`` (``host:pid`` of the sweep) and a ``lease`` (an expiry time the owner renews with
:meth:`Store.renew`). A claim is void, and the cell claimable again, once its owner is dead: on the
same host that is checked directly (a SIGKILLed sweep's cells are reclaimed by the very next run),
on another host when the lease has expired.
"""

from __future__ import annotations

import json
import os
import random
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    error TEXT,
    started REAL,
    ended REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    lowbit_version TEXT,
    git_rev TEXT,
    torch_version TEXT,
    python_version TEXT,
    host TEXT,
    n_params INTEGER,
    n_quant_weights INTEGER,
    size_bytes REAL,
    size_method TEXT,
    device TEXT,
    classes INTEGER,
    owner TEXT,
    lease REAL
);
CREATE TABLE IF NOT EXISTS epochs (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    epoch INTEGER NOT NULL,
    train_loss REAL, train_acc REAL, test_loss REAL, test_acc REAL, wall_s REAL,
    val_loss REAL, val_acc REAL, linear_cos REAL,
    PRIMARY KEY (run_id, epoch)
);
CREATE TABLE IF NOT EXISTS layers (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    epoch INTEGER NOT NULL,
    layer TEXT NOT NULL,
    levels INTEGER NOT NULL,
    numel INTEGER NOT NULL,
    scale REAL,
    flip_ratio REAL,
    zero_share REAL,
    shares TEXT NOT NULL,
    PRIMARY KEY (run_id, epoch, layer)
);
"""

STATUSES = ("pending", "running", "finished", "diverged", "failed", "interrupted")
DONE = ("finished", "diverged")
LEASE_S = 120.0  # a claim's lifetime without renewal (the owner renews it every LEASE_S / 4)
EPOCH_FIELDS = (
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "wall_s",
    "val_loss",
    "val_acc",
    "linear_cos",
)
LAYER_FIELDS = ("layer", "levels", "numel", "scale", "flip_ratio", "zero_share", "shares")
RUN_INFO_FIELDS = (
    "lowbit_version",
    "git_rev",
    "torch_version",
    "python_version",
    "host",
    "n_params",
    "n_quant_weights",
    "size_bytes",
    "size_method",
    "device",
    "classes",
)
# Columns later versions added: a database made before them gets them (NULL) when opened for
# writing, so a study resumes across the upgrade.
_ADDED_COLUMNS = {
    "runs": ("device TEXT", "classes INTEGER", "owner TEXT", "lease REAL"),
    "epochs": ("val_loss REAL", "val_acc REAL", "linear_cos REAL"),
}


def _retry(fn, *args: Any, attempts: int = 40) -> Any:
    """Run ``fn`` and retry on a locked database (after busy_timeout), with jittered backoff."""
    for i in range(attempts):
        try:
            return fn(*args)
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc) or i == attempts - 1:
                raise
            time.sleep(min(2.0, 0.05 * 2**i) * (0.5 + random.random()))
    raise AssertionError("unreachable")


class Store:
    """A connection to one study database. Cheap to open; open one per process."""

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly and not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no results database here")
        if not readonly and self.path.parent.exists() and not self.path.parent.is_dir():
            raise LowbitError(f"{self.path.parent}: exists and is not a directory")
        try:
            self._open(readonly)
        except sqlite3.DatabaseError as exc:  # not a database, read-only target, full disk
            access = isinstance(exc, sqlite3.OperationalError) and "no study" not in str(exc)
            raise LowbitError(
                f"{self.path}: cannot use this results database ({exc}); "
                + ("check the permissions of it and its folder" if access else "is DIR a study?")
            ) from None

    def _open(self, readonly: bool) -> None:
        if readonly:
            uri = f"file:{self.path}?mode=ro"
            self.db = sqlite3.connect(uri, uri=True, timeout=60, isolation_level=None)
            tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master")}
            if "runs" not in tables:
                raise sqlite3.DatabaseError("it holds no study results")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            self.db.execute("PRAGMA busy_timeout = 60000")
            _retry(self.db.execute, "PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = NORMAL")
            with self.transaction() as db:
                for stmt in SCHEMA.split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                for table, columns in _ADDED_COLUMNS.items():
                    have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
                    for col in columns:
                        if col.split()[0] not in have:
                            db.execute(f"ALTER TABLE {table} ADD COLUMN {col}")
        self.db.row_factory = sqlite3.Row

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on error); takes the write lock first
        so two writers never deadlock upgrading read locks."""
        _retry(self.db.execute, "BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        _retry(self.db.execute, "COMMIT")

    def _write(self, fn) -> None:
        def attempt() -> None:
            with self.transaction() as db:
                fn(db)

        _retry(attempt)

    # --- writes ----------------------------------------------------------------------------

    def set_meta(self, **values: Any) -> None:
        self._write(
            lambda db: db.executemany(
                "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                [(k, json.dumps(v, sort_keys=True)) for k, v in values.items()],
            )
        )

    def add_runs(self, cells: list[tuple[str, dict[str, Any]]]) -> None:
        """Register cells as pending; existing rows (any status) are left as they are."""
        self._write(
            lambda db: db.executemany(
                "INSERT OR IGNORE INTO runs(run_id, config) VALUES (?, ?)",
                [(cid, json.dumps(cfg, sort_keys=True)) for cid, cfg in cells],
            )
        )

    def claim(self, run_id: str, owner: str) -> str:
        """Take cell ``run_id`` for ``owner`` (see "Claims" above), atomically.

        Returns ``"claimed"`` (it is ours now: status running, attempts + 1), ``"done"``
        (finished or diverged) or ``"busy"`` (a live sweep holds it)."""
        out = ""

        def attempt(db: sqlite3.Connection) -> None:
            nonlocal out
            row = db.execute(
                "SELECT status, owner, lease FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
            if row is None:
                raise ValueError(f"no cell {run_id!r} in {self.path}")
            status, holder, lease = row
            if status in DONE:
                out = "done"
            elif status == "running" and holder not in (None, owner) and _alive(holder, lease):
                out = "busy"
            else:
                db.execute(
                    "UPDATE runs SET status = 'running', owner = ?, lease = ?, started = ?, "
                    "ended = NULL, error = NULL, attempts = attempts + 1 WHERE run_id = ?",
                    (owner, time.time() + LEASE_S, time.time(), run_id),
                )
                out = "claimed"

        self._write(attempt)
        return out

    def renew(self, owner: str) -> None:
        """Extend the lease of every cell ``owner`` is running."""
        self._write(
            lambda db: db.execute(
                "UPDATE runs SET lease = ? WHERE owner = ? AND status = 'running'",
                (time.time() + LEASE_S, owner),
            )
        )

    def release(self, owner: str, status: str, error: str | None = None) -> list[str]:
        """End every cell ``owner`` still runs with ``status`` (e.g. interrupted); their ids."""
        ids: list[str] = []

        def write(db: sqlite3.Connection) -> None:
            ids[:] = [
                r[0]
                for r in db.execute(
                    "SELECT run_id FROM runs WHERE owner = ? AND status = 'running'", (owner,)
                )
            ]
            db.execute(
                "UPDATE runs SET status = ?, ended = ?, error = ?, owner = NULL "
                "WHERE owner = ? AND status = 'running'",
                (status, time.time(), error, owner),
            )

        self._write(write)
        return ids

    def start_run(self, run_id: str, info: dict[str, Any]) -> None:
        """Record where and with what the cell runs (its claim already made it ``running``)."""
        cols = [k for k in RUN_INFO_FIELDS if k in info]
        sets = ", ".join(f"{c} = ?" for c in cols)
        sql = f"UPDATE runs SET status = 'running'{', ' + sets if sets else ''} WHERE run_id = ?"
        self._write(lambda db: db.execute(sql, [*(info[c] for c in cols), run_id]))

    def end_run(self, run_id: str, status: str, error: str | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        self._write(
            lambda db: db.execute(
                "UPDATE runs SET status = ?, ended = ?, error = ?, owner = NULL WHERE run_id = ?",
                (status, time.time(), error, run_id),
            )
        )

    def add_epoch(self, run_id: str, metrics: dict[str, Any], layers: list[dict[str, Any]]):
        """One epoch's metrics and per-layer diagnostics, atomically; replaces a previous write
        of the same (run_id, epoch)."""
        epoch = int(metrics["epoch"])

        def write(db: sqlite3.Connection) -> None:
            db.execute(_INSERT_EPOCH, _epoch_values(run_id, {**metrics, "epoch": epoch}))
            db.execute("DELETE FROM layers WHERE run_id = ? AND epoch = ?", (run_id, epoch))
            db.executemany(_INSERT_LAYER, [(run_id, epoch, *_layer_values(r)) for r in layers])

        self._write(write)

    def import_run(
        self,
        run_id: str,
        run: dict[str, Any],
        epochs: list[dict[str, Any]],
        layers: list[dict[str, Any]],
    ) -> bool:
        """Store a cell finished elsewhere (``lowbit.study.export.import_csv``), atomically:
        ``run`` holds status (finished or diverged), started, ended, attempts and the
        ``RUN_INFO_FIELDS``; epochs and layers are rows as ``epochs()``/``layers()`` return them.
        A cell this database has finished already is left as it is; returns whether it was
        written."""
        if run.get("status") not in DONE:
            raise ValueError(f"only finished or diverged cells are imported, got {run!r}")
        cols = ["status", "started", "ended", "attempts", *RUN_INFO_FIELDS]
        written = False

        def write(db: sqlite3.Connection) -> None:
            nonlocal written
            row = db.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise ValueError(f"no cell {run_id!r} in {self.path}")
            if row[0] in DONE:
                return
            sets = ", ".join(f"{c} = ?" for c in cols)
            db.execute(
                f"UPDATE runs SET {sets}, error = NULL, owner = NULL, lease = NULL "
                "WHERE run_id = ?",
                [*(run.get(c) for c in cols), run_id],
            )
            db.execute("DELETE FROM epochs WHERE run_id = ?", (run_id,))
            db.execute("DELETE FROM layers WHERE run_id = ?", (run_id,))
            db.executemany(_INSERT_EPOCH, [_epoch_values(run_id, e) for e in epochs])
            db.executemany(
                _INSERT_LAYER, [(run_id, int(r["epoch"]), *_layer_values(r)) for r in layers]
            )
            written = True

        self._write(write)
        return written

    def apply(self, ops: list[tuple[str, tuple, dict]]) -> None:
        """Replay a list of recorded calls (``(method, args, kwargs)``), as a remote worker that
        cannot reach the database hands them back to the driver."""
        for method, args, kwargs in ops:
            if method not in ("start_run", "end_run", "add_epoch"):
                raise ValueError(f"not a store write: {method}")
            getattr(self, method)(*args, **kwargs)

    # --- reads -----------------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        return {r["key"]: json.loads(r["value"]) for r in self.db.execute("SELECT * FROM meta")}

    def runs(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM runs ORDER BY rowid").fetchall()
        return [{**dict(r), "config": json.loads(r["config"])} for r in rows]

    def status(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT run_id, status FROM runs").fetchall())

    def epochs(self, run_id: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM epochs", ()
        if run_id is not None:
            sql, args = sql + " WHERE run_id = ?", (run_id,)
        return [dict(r) for r in self.db.execute(sql + " ORDER BY run_id, epoch", args)]

    def layers(self, run_id: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM layers", ()
        if run_id is not None:
            sql, args = sql + " WHERE run_id = ?", (run_id,)
        rows = self.db.execute(sql + " ORDER BY run_id, epoch, layer", args)
        return [{**dict(r), "shares": json.loads(r["shares"])} for r in rows]


def owner_id() -> str:
    """``host:pid`` of this process, as a claim records it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(owner: str, lease: float | None) -> bool:
    """Whether the sweep ``owner`` may still be running its claim."""
    host, _, pid = owner.rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's live process
            return True
        try:  # a killed process its parent has not reaped yet is a zombie: dead
            with open(f"/proc/{pid}/stat", "rb") as f:
                return f.read().rpartition(b")")[2].split()[0] != b"Z"
        except (OSError, IndexError):
            return True
    return lease is not None and lease > time.time()


# an epoch row replaces an earlier write of the same (run_id, epoch); a layer row is new
_INSERT_EPOCH = (
    f"INSERT OR REPLACE INTO epochs(run_id, epoch, {', '.join(EPOCH_FIELDS)}) "
    f"VALUES (?, ?{', ?' * len(EPOCH_FIELDS)})"
)
_INSERT_LAYER = (
    f"INSERT INTO layers(run_id, epoch, {', '.join(LAYER_FIELDS)}) "
    f"VALUES (?, ?{', ?' * len(LAYER_FIELDS)})"
)


def _epoch_values(run_id: str, metrics: dict[str, Any]) -> tuple:
    return (run_id, int(metrics["epoch"]), *(_num(metrics.get(f)) for f in EPOCH_FIELDS))


def _layer_values(row: dict[str, Any]) -> list[Any]:
    return [json.dumps(row[f]) if f == "shares" else row[f] for f in LAYER_FIELDS]


def _num(v: Any) -> float | None:
    """Floats as SQLite stores them; inf/nan kept (a diverged loss is data, not an error)."""
    return None if v is None else float(v)


def default_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / "results.sqlite"
