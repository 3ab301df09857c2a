"""Executors give the same database: local process pool, Ray (a real local instance), and the
record-and-replay path a Ray task on another host uses."""

from __future__ import annotations

import os
import socket

import pytest

from lowbit.study import runner
from lowbit.study import spec as S
from lowbit.study.store import Store

DOC = {
    "grid": {
        "model": "mlp",
        "layer": ["ternary", "nlevel"],
        "levels": 5,
        "depth": 1,
        "width": 16,
        "dataset": "synthetic",
        "epochs": 2,
        "batch_size": 64,
        "seed": [0, 1],
    }
}


def _contents(out) -> tuple:
    with Store(out / "results.sqlite", readonly=True) as s:
        runs = {r["run_id"]: (r["config"], r["status"], r["size_bytes"]) for r in s.runs()}
        epochs = [{k: v for k, v in e.items() if k != "wall_s"} for e in s.epochs()]
        return runs, epochs, s.layers()


@pytest.fixture(scope="module")
def pool_db(tmp_path_factory):
    out = tmp_path_factory.mktemp("pool")
    res = runner.run(S.parse(DOC), out, workers=2, progress=False)
    assert res.statuses == {"finished": 4}
    return out


def test_recorded_writes_replay_to_the_same_database(pool_db, tmp_path):
    # what a Ray task on a host that cannot reach the database does: record, return, replay
    cells = S.parse(DOC).cells()
    with Store(tmp_path / "results.sqlite") as store:
        store.set_meta(cell_ids=[c.id for c in cells])
        store.add_runs([(c.id, c.config) for c in cells])
        for c in cells:
            task = {
                "id": c.id,
                "config": c.config,
                "out": str(tmp_path),
                "db": "/nonexistent",
                "data_dir": None,
                "threads": 1,
                "driver_host": socket.gethostname() + "-other",
            }
            cid, ops, _ = runner._ray_task(task)
            assert cid == c.id and [op[0] for op in ops] == [
                "start_run",
                "add_epoch",
                "add_epoch",
                "end_run",
            ]
            store.apply(ops)
    assert _contents(tmp_path) == _contents(pool_db)


def test_ray_executor_matches_local_pool(pool_db, tmp_path):
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    res = runner.run(S.parse(DOC), tmp_path, workers=2, backend="ray", progress=False)
    assert res.statuses == {"finished": 4}
    assert not ray.is_initialized()  # the instance the sweep started is shut down
    assert _contents(tmp_path) == _contents(pool_db)
    # each cell asked for its CPUs (threads = cores // workers) and no GPU on a CPU device
    assert len(res.resources) == 4
    assert all(r.get("CPU") == max(1, os.cpu_count() // 2) for r in res.resources.values())
    assert all("GPU" not in r for r in res.resources.values())


def test_ray_cells_carry_gpu_requests(tmp_path):
    # a local Ray declaring one (logical) GPU: cells asking for half a GPU each get exactly that;
    # training itself stays on the CPU device, so no real GPU is needed
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        res = runner.run(
            S.parse(DOC),
            tmp_path,
            workers=2,
            backend="ray",
            progress=False,
            threads=1,
            gpus_per_cell=0.5,
        )
    finally:
        ray.shutdown()
    assert res.statuses == {"finished": 4}
    assert [r["GPU"] for r in res.resources.values()] == [0.5] * 4
    assert [r["CPU"] for r in res.resources.values()] == [1.0] * 4


def test_ray_resource_request():
    assert runner.ray_resources(2, "cpu", None) == {"num_cpus": 2.0, "num_gpus": 0.0}
    assert runner.ray_resources(1, "cuda:1", None) == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert runner.ray_resources(4, "cuda", 0.25) == {"num_cpus": 4.0, "num_gpus": 0.25}
