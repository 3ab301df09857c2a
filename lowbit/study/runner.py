"""Running a study: each cell trains in its own run directory and writes to the results store.

    run(spec, DIR)  ->  DIR/results.sqlite   one database (see lowbit.study.store)
                        DIR/runs/<cell id>/  fit's run directory: config, metrics, checkpoint,
                                             the diagnostics' last codes

Crash safety comes from the order of writes inside one epoch: ``fit`` calls ``on_epoch`` after the
epoch's evaluation and *before* it writes the epoch's checkpoint, and ``on_epoch`` commits the
epoch row (``INSERT OR REPLACE`` keyed (run, epoch)). A SIGKILL at any point therefore leaves
either the row and the checkpoint, or the row alone (the epoch is retrained from the previous
checkpoint, bit-exactly, and its row replaced with the same values), or neither. Re-running skips
cells whose status is finished or diverged and restarts the others (pending, running — a killed
worker —, failed).

Scheduling: the sweep claims each cell in the store just before it hands it to a worker
(``Store.claim``: atomic, with the sweep's ``host:pid`` and a lease it renews), so two sweeps on one
folder share the cells and train each exactly once; a cell held by another live sweep is waited
for, a cell whose claimer died is taken over. Only as many cells as there are workers are in
flight: Ctrl-C (SIGINT) stops scheduling at once, ends the workers, marks the cells in flight
``interrupted`` (resumed bit-exactly by the next run) and the sweep returns ``interrupted=True``
(the CLI exits 130).

Executors:

* ``local`` — ``workers`` worker processes (spawn context; default: the core count), each with
  ``max(1, cores // workers)`` torch threads so they do not oversubscribe the cores. A worker
  ignores SIGINT (the sweep decides what Ctrl-C stops) and dies with the sweep: on Linux through
  the parent-death signal (``prctl(PR_SET_PDEATHSIG)``), elsewhere through a thread watching the
  parent, and an idle worker also sees its task pipe close. ``workers=1`` trains in the calling
  process.
* ``ray`` — one Ray task per cell (``pip install 'lowbit[ray]'``), each asking for ``threads``
  CPUs and, with ``device="cuda"``, one GPU (``gpus_per_cell``: any fraction, so several cells
  share a GPU). ``ray.init()`` starts a local instance with ``workers`` CPUs (and the local
  GPUs), or joins the cluster at ``RAY_ADDRESS``. At most ``workers`` cells are in flight. A task
  on the driver's
  host writes the database directly (as the local pool does); a task on another host records its
  writes and returns them, and the driver replays them in order — either way the database is the
  same. (Checkpoints stay on the host that trained the cell; resume across hosts needs ``DIR`` on
  a shared file system.)

A cell that raises is recorded as ``failed`` with its traceback, and the sweep goes on.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import multiprocessing as mp
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from multiprocessing.connection import wait as mp_wait
from pathlib import Path
from typing import Any

from lowbit.errors import ConfigError
from lowbit.study.spec import Cell, Spec
from lowbit.study.store import DONE, LEASE_S, Store, default_path, owner_id
from lowbit.study.variants import reading_options, weight_levels

BACKENDS = ("local", "ray")


@dataclasses.dataclass
class StudyResult:
    """What a sweep did: counts of cells per outcome, the database, the wall time."""

    out_dir: Path
    db_path: Path
    cells: int
    skipped: int
    statuses: dict[str, int]
    wall_s: float
    notes: list[str]
    interrupted: bool = False
    resources: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)


# --- one cell ------------------------------------------------------------------------------------


def _git_rev() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


_DATA_CACHE: dict[tuple, Any] = {}


def _dataset(config: dict[str, Any], data_dir: str | None) -> Any:
    """The cell's dataset, loaded once per process; ``test_subset`` keeps the first n test
    images."""
    from lowbit import data

    key = (config["dataset"], data_dir, config["test_subset"])
    if key not in _DATA_CACHE:
        ds = data.load(config["dataset"], data_dir=data_dir)
        n = config["test_subset"]
        if n and n < len(ds.test_y):
            ds = dataclasses.replace(ds, test_x=ds.test_x[:n], test_y=ds.test_y[:n])
        _DATA_CACHE.clear()  # one dataset at a time: a worker's memory stays bounded
        _DATA_CACHE[key] = ds
    return _DATA_CACHE[key]


def build_model(config: dict[str, Any], ds: Any) -> Any:
    """The cell's network, initialised from ``seed`` (so codes_0 and resume are reproducible)."""
    import torch

    from lowbit import models

    kw: dict[str, Any] = {"layer": config["layer"]}
    if config["levels"] is not None:
        kw["levels"] = config["levels"]
    for key in ("depth", "width", "kernel_size", "activation", "patch_size"):
        if config.get(key) is not None:
            kw[key] = config[key]
    kw.update(reading_options(config))
    kw["input_shape"] = tuple(ds.input_shape)
    kw["classes"] = int(ds.classes)
    torch.manual_seed(config["seed"])
    return models.get(config["model"], **kw)


def train_config(config: dict[str, Any], device: str = "cpu", amp: bool = False) -> Any:
    """The cell's TrainConfig; ``device`` and ``amp`` are the sweep's (not part of the cell)."""
    from lowbit.train import TrainConfig

    kw = dict(
        device=device,
        amp=amp,
        val_split=config.get("val_split") or 0.0,
        optimizer=config["optimizer"],
        lr=config["lr"],
        lr_schedule=config.get("lr_schedule") or "constant",
        patience=config.get("patience") or 0,
        batch_size=config["batch_size"],
        epochs=config["epochs"],
        seed=config["seed"],
        augment=config["augment"],
        train_subset=config["train_subset"] or None,
    )
    if config["momentum"] is not None:
        kw["momentum"] = config["momentum"]
    return TrainConfig(**kw)


def model_size(model: Any, levels: int | None) -> dict[str, Any]:
    """Parameter counts and the packed size in bytes.

    ``lowbit.summary`` gives the size the packed file really takes, when that module is present;
    otherwise the near-entropy estimate ``sum_quantized numel * log2(N) / 8 + 4 * (other
    params)`` (biases, norms and fp32 layers at 4 bytes)."""
    from lowbit.study.diagnostics import quantized_layers

    n_params = sum(p.numel() for p in model.parameters())
    qlayers = quantized_layers(model)
    n_quant = sum(m.weight.numel() for _, m in qlayers)
    try:
        from lowbit.summary import summary  # type: ignore[import-not-found]

        total = summary(model).total_bytes
        return {
            "n_params": n_params,
            "n_quant_weights": n_quant,
            "size_bytes": float(total),
            "size_method": "lowbit.summary",
        }
    except Exception:  # noqa: BLE001 - any failure falls back to the documented estimate
        pass
    import math

    qbits = sum(m.weight.numel() * math.log2(m.weight_quantizer.levels) for _, m in qlayers)
    size = qbits / 8 + 4 * (n_params - n_quant)
    return {
        "n_params": n_params,
        "n_quant_weights": n_quant,
        "size_bytes": float(size),
        "size_method": "bits x params",
    }


class _Recorder:
    """Stands in for the Store on a host that cannot reach the database: records the writes."""

    def __init__(self) -> None:
        self.ops: list[tuple[str, tuple, dict]] = []

    def start_run(self, *a: Any, **k: Any) -> None:
        self.ops.append(("start_run", a, k))

    def end_run(self, *a: Any, **k: Any) -> None:
        self.ops.append(("end_run", a, k))

    def add_epoch(self, *a: Any, **k: Any) -> None:
        self.ops.append(("add_epoch", a, k))


LINEARITY_IMAGES = 1000  # test images the linear-classifier cosine is measured on


def execute_cell(
    cell_id: str,
    config: dict[str, Any],
    out_dir: str,
    sink: Any,
    *,
    data_dir: str | None = None,
    device: str = "cpu",
    amp: bool = False,
):
    """Train one cell, writing its run info, epochs and final status through ``sink``.

    Exceptions are recorded as ``failed`` with their traceback (and not re-raised); Ctrl-C
    inside the cell is re-raised as KeyboardInterrupt (the sweep marks the cell interrupted)."""
    import torch

    from lowbit import __version__
    from lowbit.study.diagnostics import Diagnostics, linear_cosine
    from lowbit.train import fit

    run_dir = Path(out_dir) / "runs" / cell_id
    info: dict[str, Any] = {
        "lowbit_version": __version__,
        "git_rev": _git_rev(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "host": socket.gethostname(),
        "device": device,
    }
    started = False
    try:
        ds = _dataset(config, data_dir)
        model = build_model(config, ds)
        info.update(model_size(model, weight_levels(config)), classes=int(ds.classes))
        sink.start_run(cell_id, info)
        started = True
        diag = Diagnostics(model, run_dir)

        probe = ds.test_x[:LINEARITY_IMAGES]

        def on_epoch(metrics: dict[str, Any], m: Any) -> None:
            metrics["linear_cos"] = linear_cosine(m, probe)
            sink.add_epoch(cell_id, metrics, diag.collect(int(metrics["epoch"]), m))

        cfg = train_config(config, device, amp)
        result = fit(model, ds, cfg, run_dir=run_dir, on_epoch=on_epoch, progress=False)
        if result.status == "interrupted":  # Ctrl-C inside fit: the sweep stops (and marks it)
            raise KeyboardInterrupt
        status = result.status if result.status in DONE else "failed"
        error = None if status in DONE else f"fit ended with status {result.status!r}"
        sink.end_run(cell_id, status, error)
    except Exception:  # noqa: BLE001 - a failing cell must not stop the sweep
        if not started:
            sink.start_run(cell_id, info)
        sink.end_run(cell_id, "failed", traceback.format_exc())


# --- workers -------------------------------------------------------------------------------------


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


def _die_with_parent(parent_pid: int) -> None:
    """End this worker when the sweep that started it dies (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0:  # 1 = PR_SET_PDEATHSIG
                if os.getppid() != parent_pid:  # the parent died before the prctl
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _execute(task: dict[str, Any], sink: Any) -> None:
    execute_cell(
        task["id"],
        task["config"],
        task["out"],
        sink,
        data_dir=task["data_dir"],
        device=task.get("device", "cpu"),
        amp=task.get("amp", False),
    )


def _local_task(task: dict[str, Any]) -> str:
    with Store(task["db"]) as store:
        _execute(task, store)
    return task["id"]


def _worker_main(conn: Any, threads: int, parent_pid: int) -> None:
    """A worker's life: cells from ``conn`` until it closes (or None), one id back per cell."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    _init_worker(threads)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the sweep is gone
            return
        if task is None:
            return
        conn.send(_local_task(task))


class _Worker:
    """One worker process and the pipe that carries its cells; ``task`` is the cell it runs."""

    def __init__(self, ctx: Any, threads: int) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_worker_main, args=(child, threads, os.getpid()), daemon=True
        )
        self.proc.start()
        child.close()
        self.task: dict[str, Any] | None = None

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()
        self.conn.close()


def _ray_task(task: dict[str, Any]) -> tuple[str, list, dict[str, float]]:
    """(cell id, recorded writes, the resources Ray assigned to this task)."""
    _init_worker(task["threads"])
    assigned: dict[str, float] = {}
    try:
        import ray

        if ray.is_initialized():
            assigned = dict(ray.get_runtime_context().get_assigned_resources())
    except ImportError:  # called directly (tests of the record-and-replay path)
        pass
    if socket.gethostname() == task["driver_host"]:
        return _local_task(task), [], assigned
    rec = _Recorder()
    _execute(task, rec)
    return task["id"], rec.ops, assigned


def ray_resources(threads: int, device: str, gpus_per_cell: float | None) -> dict[str, float]:
    """What one cell asks Ray for: ``threads`` CPUs, and ``gpus_per_cell`` GPUs (default 1 for a
    CUDA device, else 0; a fraction packs several cells on one GPU)."""
    gpus = gpus_per_cell if gpus_per_cell is not None else float(device.startswith("cuda"))
    return {"num_cpus": float(threads), "num_gpus": float(gpus)}


class _Progress:
    """Cells done out of the total: a tqdm bar when stdout and stderr are a terminal, else one
    plain line per finished cell on stderr (done/total, failures, ETA); ``mode="off"`` is silent.
    Notes are printed as they happen."""

    def __init__(self, total: int, enabled: bool | None) -> None:
        self.total, self.done, self.failed, self.t0 = total, 0, 0, time.time()
        if enabled is False:
            self.mode = "off"
        elif enabled is None and not (sys.stdout.isatty() and sys.stderr.isatty()):
            self.mode = "lines"
        else:
            self.mode = "bar"
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="cell", dynamic_ncols=True)

    def note(self, text: str) -> None:
        if self.mode == "bar":
            self.bar.write(f"note: {text}", file=sys.stderr)
        elif self.mode == "lines":
            print(f"note: {text}", file=sys.stderr, flush=True)

    def update(self, cell_id: str, status: str) -> None:
        self.done += 1
        self.failed += status == "failed"
        if self.bar is not None:
            self.bar.update(1)
        elif self.mode == "lines":
            left = (time.time() - self.t0) / self.done * (self.total - self.done)
            eta = f", ETA {_duration(left)}" if self.done < self.total else ""
            failed = f", {self.failed} failed" if self.failed else ""
            print(
                f"study: {self.done}/{self.total} cells done{failed}{eta} ({cell_id} {status})",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class _Scheduler:
    """Hands cells to workers one at a time, each claimed in the store first (see the module
    docstring); cells another live sweep holds are waited for and taken over if it dies."""

    def __init__(self, tasks: list[dict], store: Store, bar: _Progress) -> None:
        self.assigned: dict[str, dict[str, float]] = {}  # Ray: cell id -> resources it got
        self.queue = list(tasks)
        self.store, self.bar, self.owner = store, bar, owner_id()
        self.waiting: list[dict] = []  # held by another sweep

    def next_task(self) -> dict | None:
        """The next cell this sweep claimed, or None when none is claimable now."""
        while self.queue:
            task = self.queue.pop(0)
            state = self.store.claim(task["id"], self.owner)
            if state == "claimed":
                return task
            if state == "busy":
                self.waiting.append(task)
        return None

    def wait_for_others(self) -> bool:
        """With nothing of our own to run: poll the cells others hold; True while some remain
        (those whose holder died go back to the queue)."""
        status = self.store.status()
        self.waiting = [t for t in self.waiting if status.get(t["id"]) not in DONE]
        if not self.waiting:
            return False
        time.sleep(1.0)
        self.queue, self.waiting = self.waiting, []
        return True

    def finished(self, task: dict) -> None:
        self.bar.update(task["id"], self.store.status().get(task["id"], "?"))

    def run_inline(self, threads: int) -> None:
        """``workers=1``: every cell in this process."""
        _init_worker(threads)
        while True:
            task = self.next_task()
            if task is None:
                if self.wait_for_others():
                    continue
                return
            _local_task(task)
            self.finished(task)

    def run_pool(self, workers: int, threads: int) -> None:
        ctx = mp.get_context("spawn")
        pool = [_Worker(ctx, threads) for _ in range(workers)]
        try:
            while True:
                for w in pool:
                    if w.task is None and (task := self.next_task()) is not None:
                        w.task = task
                        w.conn.send(task)
                busy = [w for w in pool if w.task is not None]
                if not busy:
                    if self.wait_for_others():
                        continue
                    return
                ready = set(mp_wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], 1.0))
                for i, w in enumerate(pool):
                    task = w.task
                    if task is None:
                        continue
                    if w.conn in ready:
                        w.conn.recv()
                        w.task = None
                    elif w.proc.sentinel in ready:  # died (killed, out of memory) mid-cell
                        self.store.end_run(
                            task["id"], "failed", "worker process died during the cell"
                        )
                        w.kill()
                        pool[i] = _Worker(ctx, threads)
                    else:
                        continue
                    self.finished(task)
        finally:
            for w in pool:
                w.kill()

    def run_ray(self, workers: int, resources: dict[str, float]) -> None:
        """Cells as Ray tasks asking for ``resources`` each; ``self.assigned`` gets what Ray
        gave them."""
        try:
            import ray
        except ImportError:  # checked before the store is made; here for direct callers
            raise ConfigError(_NO_RAY) from None
        started = False
        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS")
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if not address:
                kw["num_cpus"] = max(workers, math.ceil(resources["num_cpus"]))
                if resources["num_gpus"]:
                    import torch

                    kw["num_gpus"] = torch.cuda.device_count()
            ray.init(address=address or None, **kw)
            started = True
        try:
            remote = ray.remote(max_retries=0, **resources)(_ray_task)
            host = socket.gethostname()
            in_flight: dict[Any, dict] = {}
            while True:
                while len(in_flight) < workers and (task := self.next_task()) is not None:
                    in_flight[remote.remote({**task, "driver_host": host})] = task
                if not in_flight:
                    if self.wait_for_others():
                        continue
                    return
                done, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in done:
                    task = in_flight.pop(ref)
                    try:
                        _, ops, self.assigned[task["id"]] = ray.get(ref)
                        self.store.apply(ops)
                    except Exception:  # noqa: BLE001 - a task that died (not one that raised)
                        self.store.end_run(task["id"], "failed", traceback.format_exc())
                    self.finished(task)
        finally:
            if started:
                ray.shutdown()


class _Heartbeat:
    """Renews this sweep's claims every ``LEASE_S / 4`` seconds, on its own connection."""

    def __init__(self, db_path: Path, owner: str) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, args=(db_path, owner), daemon=True)

    def _beat(self, db_path: Path, owner: str) -> None:
        with Store(db_path) as store:
            while not self.stop.wait(LEASE_S / 4):
                store.renew(owner)

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        # Wait for the connection to close: the sweep's own connection must be the last one, so
        # its close folds the WAL into results.sqlite and the file alone holds the study.
        self.stop.set()
        self.thread.join()


_NO_RAY = "the ray backend needs Ray: pip install 'lowbit[ray]' (or use --backend local)"


# --- the sweep -----------------------------------------------------------------------------------


def dataset_checker(data_dir: str | None):
    """A ``dataset_available(name)`` for ``Spec.cells``, from ``lowbit.data.discover``."""
    from lowbit import data

    found = data.discover(data_dir)
    return lambda name: bool(found.get(name, {}).get("path"))


def run(
    spec: Spec,
    out_dir: str | os.PathLike,
    *,
    workers: int | None = None,
    backend: str = "local",
    data_dir: str | None = None,
    progress: bool | None = None,
    quick: bool = False,
    threads: int | None = None,
    device: str = "cpu",
    amp: bool = False,
    gpus_per_cell: float | None = None,
    resume_from: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
) -> StudyResult:
    """Run every unfinished cell of ``spec``; results go to ``out_dir/results.sqlite``.

    ``threads``: torch threads per worker (default ``max(1, cores // workers)``). On a machine
    other jobs share, 1 avoids threads spinning at barriers while their siblings are descheduled.
    ``device``/``amp``: where and how every cell trains (``TrainConfig``; recorded per run, not
    part of a cell's id). ``gpus_per_cell``: the Ray backend's GPU request per cell (default 1
    with a CUDA device, else 0; fractions share a GPU); each cell also asks for ``threads`` CPUs.
    ``resume_from``: a folder, or several, holding a CSV export of an earlier run (runs.csv,
    epochs.csv, layers.csv[.gz]): the finished cells of this study found there are stored as they
    are and not trained again (``lowbit.study.export.import_csv``; the first folder that holds a
    cell gives it), so a study continues across machines and sessions, and one whose cells were
    run by several specs gathers them.
    Every argument is checked before the store is created.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    from lowbit.train import resolve_device

    if backend == "local" or not os.environ.get("RAY_ADDRESS"):
        resolve_device(device)  # the machine that trains is this one: check it has the device
    if gpus_per_cell is not None and not gpus_per_cell >= 0:
        raise ConfigError(f"--gpus-per-cell must be >= 0, got {gpus_per_cell}")
    if backend == "ray":
        try:
            import ray  # noqa: F401 - only checking that it is installed
        except ImportError:
            raise ConfigError(_NO_RAY) from None
    cores = os.cpu_count() or 1
    workers = cores if workers is None else workers
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    if not str(out_dir).strip():
        raise ConfigError("--out must name a folder, got an empty string")
    exports = (
        []
        if resume_from is None
        else [resume_from]
        if isinstance(resume_from, (str, os.PathLike))
        else list(resume_from)
    )
    if exports:
        from lowbit.study.export import runs_csv

        for folder in exports:
            runs_csv(folder)
    out = Path(out_dir)
    requested = {c for c in spec.grid.get("dataset", ["fashion-mnist"])}
    cells: list[Cell] = spec.cells(dataset_checker(data_dir))
    resolved = {c.config["dataset"] for c in cells}
    notes = [
        f"dataset {d} is not installed here: its cells use {spec.fallback_dataset} instead"
        for d in sorted(requested - resolved)
    ]
    t0 = time.time()
    with Store(default_path(out)) as store:
        old = store.meta()
        store.set_meta(
            name=spec.name,
            title=spec.title,
            claims=spec.claims,
            source=spec.source,
            quick=quick or old.get("quick", False),
            notes=sorted(set(old.get("notes", [])) | set(notes)),
            cell_ids=sorted(set(old.get("cell_ids", [])) | {c.id for c in cells}),
        )
        store.add_runs([(c.id, c.config) for c in cells])
        if exports:
            from lowbit.study.export import import_csv

            for folder in exports:
                taken = import_csv(store, folder, [c.id for c in cells])
                notes.append(f"{len(taken)} finished cells taken from the export in {folder}")
        status = store.status()
        # seed-major order: every cell's first seed runs before any second seed, so a sweep cut
        # short still covers the whole grid
        todo = sorted(
            (c for c in cells if status.get(c.id) not in DONE), key=lambda c: c.config["seed"]
        )
        if threads is None:
            threads = max(1, cores // min(workers, max(1, len(todo))))
        tasks = [
            {
                "id": c.id,
                "config": c.config,
                "out": str(out),
                "db": str(store.path),
                "data_dir": data_dir,
                "threads": threads,
                "device": device,
                "amp": amp,
            }
            for c in todo
        ]
        bar = _Progress(len(tasks), progress)
        for note in notes:
            bar.note(note)
        scheduler = _Scheduler(tasks, store, bar)
        interrupted = False
        try:
            with _Heartbeat(store.path, scheduler.owner):
                if backend == "ray":
                    scheduler.run_ray(workers, ray_resources(threads, device, gpus_per_cell))
                elif min(workers, len(tasks)) <= 1:
                    scheduler.run_inline(threads)
                else:
                    scheduler.run_pool(min(workers, len(tasks)), threads)
        except KeyboardInterrupt:
            interrupted = True
            stopped = store.release(
                scheduler.owner, "interrupted", "interrupted (Ctrl-C); the next run resumes it"
            )
            bar.note(f"interrupted: {len(stopped)} cells in flight stopped; run again to resume")
        finally:
            bar.close()
        final = store.status()
    counts: dict[str, int] = {}
    for c in cells:
        counts[final.get(c.id, "pending")] = counts.get(final.get(c.id, "pending"), 0) + 1
    return StudyResult(
        out_dir=out,
        db_path=default_path(out),
        cells=len(cells),
        skipped=len(cells) - len(todo),
        statuses=counts,
        wall_s=time.time() - t0,
        notes=notes,
        interrupted=interrupted,
        resources=scheduler.assigned,
    )
