"""Study specs, the results store (concurrent writers), the failed-cell path, reports and CSV."""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import sqlite3
from pathlib import Path

import pytest

from lowbit.errors import ConfigError
from lowbit.study import runner
from lowbit.study import spec as S
from lowbit.study.store import Store

TINY = {
    "study": {"name": "tiny", "claims": ["svl-bitlinear8-best", "lr-gap-to-fp32"]},
    "grid": {
        "model": "mlp",
        "layer": ["linear", "ternary"],
        "depth": [1, 2],
        "width": [8],
        "dataset": "synthetic",
        "epochs": 2,
        "batch_size": 64,
        "seed": [0, 1],
    },
}


def _doc(**grid) -> dict:
    return {"grid": {"dataset": "synthetic", **grid}}


# --- spec ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "doc, key",
    [
        (_doc(depthh=[1]), "grid.depthh"),
        (_doc(depth=["3"]), "grid.depth"),
        (_doc(augment=1), "grid.augment"),
        (_doc(lr=True), "grid.lr"),
        (_doc(layer=[]), "grid.layer"),
        (_doc(layer="ternery"), "grid.layer"),
        (_doc(levels=[1]), "grid.levels"),
        (_doc(epochs="many"), "grid.epochs"),
        ({"grid": {}, "extra": {}}, "extra"),
        ({"study": {"name": "x"}}, "grid"),
        ({"grid": {}, "quick": {"sed": 0}}, "quick.sed"),
        ({"grid": {}, "epochs_by_size": {"min": 9, "max": 3}}, "epochs_by_size"),
        ({"grid": {}, "override": [{"when": {"model": "mlp"}, "set": {"lr": [1]}}]}, "set.lr"),
        ({"grid": {}, "study": {"claims": ["no-such-claim"]}}, "study.claims"),
        (_doc(patience=-1), "grid.patience"),
    ],
)
def test_bad_spec_names_the_key(doc, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        S.parse(doc)


def test_cell_id_is_stable_and_order_free():
    a = S.parse({"grid": {"layer": ["ternary"], "depth": 3, "width": 64}}).cells()
    b = S.parse({"grid": {"width": [64], "depth": [3], "layer": "ternary"}}).cells()
    assert [c.id for c in a] == [c.id for c in b]
    cfg = a[0].config
    assert a[0].id == S.cell_id(dict(reversed(list(cfg.items()))))
    assert S.cell_id({**cfg, "seed": 1}) != a[0].id
    assert len(a[0].id) == 16
    # keys added later leave the ids of cells that do not use them as they were
    old = {k: v for k, v in cfg.items() if k not in ("lr_schedule", "patience")}
    assert S.cell_id(old) == a[0].id
    assert S.cell_id({**cfg, "patience": 5}) != a[0].id
    with pytest.raises(ConfigError, match="grid.patience needs grid.val_split"):
        S.parse({"grid": {"dataset": "synthetic", "patience": 5}}).cells()


def test_irrelevant_axes_collapse_and_overrides_apply():
    doc = {
        "grid": {
            "model": ["fcnn1", "vit1"],
            "layer": ["linear", "nlevel"],
            "levels": [3, 5],
            "depth": [1, 3],  # mlp only: ignored for these models
            "optimizer": "sgd",
        },
        "override": [{"when": {"model": "vit1"}, "set": {"lr": 0.01}}],
    }
    cells = S.parse(doc).cells()
    # 2 models x (fp32 + 2 levels), depth collapsed
    assert len(cells) == 6
    assert {c.config["lr"] for c in cells if c.config["model"] == "vit1"} == {0.01}
    assert {c.config["lr"] for c in cells if c.config["model"] == "fcnn1"} == {0.001}
    assert all(c.config["depth"] is None for c in cells)
    assert {c.config["levels"] for c in cells if c.config["layer"] == "linear"} == {None}


def test_epochs_by_size_rule_is_4_to_18():
    doc = {
        "grid": {"depth": [1, 3, 5, 7], "width": [4, 16, 64, 256, 1024], "epochs": "by-size"},
    }
    for c in S.parse(doc).cells():
        d, w = c.config["depth"], c.config["width"]
        assert c.config["epochs"] == 4 + (w.bit_length() - 3) + (d - 1)


def test_dataset_fallback_and_presets():
    svl = S.load("sign-vs-linear").cells(lambda name: name == "fashion-mnist")
    # mnist and cifar100 both fall back to fashion-mnist and collapse:
    # 7 variants (5 kinds, misborn and mybitlinear with 2 readings each) x 4 x 5 x 2 rules x 3
    assert len(svl) == 840 and {c.config["dataset"] for c in svl} == {"fashion-mnist"}
    quick = S.load("sign-vs-linear", quick=True).cells(lambda name: True)
    assert len(quick) == 2 * 280 and {c.config["seed"] for c in quick} == {0}
    assert {c.config["epochs"] for c in quick} == {2, 3, 4, 5}
    lr = S.load("low-resolution").cells(lambda name: False)
    assert len(lr) == 6 * 9 * 2 * 3
    # overrides see the dataset a cell really uses: 28x28 stand-in images need 7x7 ViT patches
    assert {c.config["patch_size"] for c in lr if c.config["model"].startswith("vit")} == {7}
    on_cifar = S.load("low-resolution").cells(lambda name: True)
    assert {c.config["patch_size"] for c in on_cifar if c.config["model"] == "vit2"} == {8}
    assert {c.config["patch_size"] for c in on_cifar if c.config["model"] == "cvnn1"} == {None}
    epochs = {(c.config["model"], c.config["augment"], c.config["epochs"]) for c in lr}
    assert ("vit1", True, 2000) in epochs and ("cvnn1", False, 200) in epochs
    lrq = S.load("low-resolution", quick=True).cells(lambda name: False)
    assert {c.config["epochs"] for c in lrq if c.config["model"] == "cvnn2"} == {1}
    with pytest.raises(ConfigError, match="not installed"):
        S.parse({"grid": {"dataset": "mnist"}}).cells(lambda name: False)


# --- store: concurrent writers ------------------------------------------------------------------


def _writer(path: str, worker: int, n: int) -> None:
    store = Store(path)
    store.add_runs([(f"run{worker}", {"w": worker}), ("shared", {"w": -1})])
    store.start_run(f"run{worker}", {"host": f"h{worker}"})
    layer = {"layer": "0", "levels": 3, "numel": 4, "scale": 0.5, "flip_ratio": 0.25}
    for e in range(1, n + 1):
        m = {"epoch": e, "train_loss": 1.0 / e, "test_acc": worker / 10}
        store.add_epoch(
            f"run{worker}", m, [{**layer, "zero_share": 0.5, "shares": [0.25, 0.5, 0.25]}]
        )
        # every worker also rewrites the same rows of one shared run
        store.add_epoch("shared", {"epoch": e % 5 + 1, "test_acc": 0.5}, [])
    store.end_run(f"run{worker}", "finished")
    store.close()


def test_concurrent_writers(tmp_path):
    path = str(tmp_path / "results.sqlite")
    Store(path).close()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, 60)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    with Store(path, readonly=True) as s:
        assert s.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        for w in range(3):
            eps = s.epochs(f"run{w}")
            assert [e["epoch"] for e in eps] == list(range(1, 61))
            assert len(s.layers(f"run{w}")) == 60
        assert [e["epoch"] for e in s.epochs("shared")] == [1, 2, 3, 4, 5]
        assert s.status() == {
            "run0": "finished",
            "run1": "finished",
            "run2": "finished",
            "shared": "pending",
        }


def test_epoch_rewrite_replaces(tmp_path):
    with Store(tmp_path / "r.sqlite") as s:
        s.add_runs([("a", {})])
        row = {
            "layer": "x",
            "levels": 2,
            "numel": 1,
            "scale": 1.0,
            "flip_ratio": None,
            "zero_share": None,
            "shares": [0.0, 1.0],
        }
        s.add_epoch("a", {"epoch": 1, "test_acc": 0.1}, [row])
        s.add_epoch("a", {"epoch": 1, "test_acc": 0.2}, [row])
        assert [e["test_acc"] for e in s.epochs()] == [0.2]
        assert len(s.layers()) == 1


# --- sweeps: failed cells, diagnostics, report, csv ---------------------------------------------


def test_failed_cell_is_recorded_and_sweep_goes_on(tmp_path):
    # a conv model cannot use the (fully connected) bitlinear8 layer: that cell raises; it is
    # recorded and the others finish (the process-pool path is exercised in test_study_executors)
    doc = {
        "grid": {
            "model": ["mlp", "cvnn1"],
            "layer": ["ternary", "bitlinear8"],
            "depth": 1,
            "width": 8,
            "dataset": "synthetic",
            "epochs": 2,
        }
    }
    spec = S.parse(doc)
    res = runner.run(spec, tmp_path, workers=1, progress=False, threads=1)
    assert res.statuses == {"finished": 3, "failed": 1}
    with Store(tmp_path / "results.sqlite", readonly=True) as s:
        failed = [r for r in s.runs() if r["status"] == "failed"]
        assert len(failed) == 1 and failed[0]["config"]["model"] == "cvnn1"
        assert failed[0]["config"]["layer"] == "bitlinear8"
        assert "Traceback" in failed[0]["error"] and "ValueError" in failed[0]["error"]
        assert len(s.epochs()) == 3 * 2
    # re-running retries only the failed cell (it fails again), the finished ones are skipped
    again = runner.run(spec, tmp_path, workers=1, progress=False, threads=1)
    assert again.skipped == 3 and again.statuses == {"finished": 3, "failed": 1}


def test_report_and_csv_on_a_tiny_sweep(tmp_path):
    from lowbit.cli import main
    from lowbit.study.report import pareto, write_report

    spec = S.parse(TINY)
    res = runner.run(spec, tmp_path, workers=1, progress=False, threads=1)
    assert res.statuses == {"finished": 8}
    with Store(tmp_path / "results.sqlite", readonly=True) as s:
        layers = s.layers()
        runs = s.runs()
    # diagnostics: only the ternary runs have quantized layers; shares sum to 1, zero share is
    # the middle level's, every epoch has a flip ratio (epoch 1 against the initial codes)
    assert layers and all(abs(sum(r["shares"]) - 1) < 1e-4 for r in layers)
    assert all(abs(r["zero_share"] - r["shares"][1]) < 1e-6 for r in layers)
    assert all(r["flip_ratio"] is not None for r in layers)
    assert all(r["size_bytes"] > 0 and r["n_params"] > 0 for r in runs)
    ternary = [r for r in runs if r["config"]["layer"] == "ternary"]
    linear = [r for r in runs if r["config"]["layer"] == "linear"]
    assert max(r["size_bytes"] for r in ternary) < min(r["size_bytes"] for r in linear)

    info = write_report(tmp_path)
    rep = tmp_path / "report"
    assert Path(info["index"]).is_file() and Path(info["markdown"]).is_file()
    names = {Path(f).name for f in info["figures"]}
    assert any(n.startswith("curves-") for n in names)
    assert any(n.startswith("heatmap-") for n in names)
    assert any(n.startswith("size-") for n in names) and "stability.png" in names
    for f in info["figures"]:
        assert Path(f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (rep / "report.md").read_text()
    page = (rep / "index.html").read_text()
    assert all(n in md and n in page for n in names)
    assert "ternary" in md
    # the grid lacks the paper's layers: said, not faked; one section numbering, in order
    assert "networks absent" in md and "**inconclusive**" in md and "<b>inconclusive</b>" in page
    heads = [ln.split(".")[0][3:] for ln in md.splitlines() if ln.startswith("## ")]
    assert heads == [str(i) for i in range(1, len(heads) + 1)]
    assert md.count("| synthetic / mlp") == 4  # 2 networks x 2 variants, each n = 2
    assert pareto([(1, 50), (2, 40), (3, 60), (4, 60)]) == [(1, 50), (3, 60)]

    assert main(["report", str(tmp_path), "--csv"]) == 0
    with open(tmp_path / "epochs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 * 2 and {r["layer"] for r in rows} == {"linear", "ternary"}
    with open(tmp_path / "runs.csv") as f:
        assert {r["status"] for r in csv.DictReader(f)} == {"finished"}


def test_resume_from_a_csv_export_trains_only_the_missing_cells(tmp_path):
    import gzip

    from lowbit.study.export import export_csv

    first, second = tmp_path / "first", tmp_path / "second"
    small = S.parse({**TINY, "grid": {**TINY["grid"], "seed": [0]}})
    assert runner.run(small, first, workers=1, progress=False, threads=1).statuses == {
        "finished": 4
    }
    assert not (first / "results.sqlite-wal").exists()  # the file alone holds the study
    export_csv(first)
    layers = first / "layers.csv"  # committed exports gzip their layer rows
    (first / "layers.csv.gz").write_bytes(gzip.compress(layers.read_bytes()))
    layers.unlink()
    (first / "results.sqlite").rename(tmp_path / "elsewhere.sqlite")  # the database is gone

    grown = S.parse(TINY)  # seeds 0 and 1: the export holds half the cells
    res = runner.run(grown, second, workers=1, progress=False, threads=1, resume_from=first)
    assert res.skipped == 4 and res.statuses == {"finished": 8}
    assert "4 finished cells taken from the export" in res.notes[-1]
    with (
        Store(tmp_path / "elsewhere.sqlite", readonly=True) as a,
        Store(second / "results.sqlite", readonly=True) as b,
    ):
        ids = {r["run_id"] for r in a.runs()}
        keep = ("status", "started", "ended", "size_bytes", "n_params", "classes", "device")
        old = {r["run_id"]: [r[k] for k in keep] for r in a.runs()}
        new = {r["run_id"]: [r[k] for k in keep] for r in b.runs() if r["run_id"] in ids}
        assert new == old  # the same numbers, not re-trained
        assert a.epochs() == [e for e in b.epochs() if e["run_id"] in ids]
        assert a.layers() == [r for r in b.layers() if r["run_id"] in ids]
    # a second import changes nothing; a folder without an export is refused before anything
    again = runner.run(grown, second, workers=1, progress=False, threads=1, resume_from=first)
    assert again.skipped == 8 and "0 finished cells" in again.notes[-1]
    # several exports: each cell comes from the first folder that holds it
    export_csv(second)
    both = runner.run(grown, tmp_path / "both", progress=False, resume_from=[first, second])
    assert both.skipped == 8 and both.statuses == {"finished": 8}
    assert [n.split(" finished")[0] for n in both.notes[-2:]] == ["4", "4"]
    with pytest.raises(ConfigError, match="no runs.csv here"):
        runner.run(grown, tmp_path / "third", progress=False, resume_from=tmp_path)
    assert not (tmp_path / "third").exists()
    (first / "epochs.csv").write_text("run_id,epoch\nx,1\n")
    with pytest.raises(ConfigError, match="not a lowbit study export"):
        runner.run(grown, tmp_path / "fourth", progress=False, resume_from=first)


def test_cli_study_dry_run_and_errors(tmp_path, capsys):
    from lowbit.cli import main

    spec = tmp_path / "s.toml"
    spec.write_text('[grid]\nlayer = ["ternary"]\ndataset = "synthetic"\n')
    assert main(["study", str(spec), "--out", str(tmp_path / "o"), "--dry-run", "--json"]) == 0
    cells = json.loads(capsys.readouterr().out)
    assert len(cells) == 1 and cells[0]["layer"] == "ternary"
    spec.write_text('[grid]\nlayer = ["ternary"]\nwidht = 3\n')
    assert main(["study", str(spec), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "grid.widht: unknown key" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing ran
    spec.write_text('[grid]\nlayer = ["ternary"]\ndataset = "synthetic"\n')
    good = tmp_path / "export"
    good.mkdir()
    (good / "runs.csv").write_text("run_id\n")
    args = ["study", str(spec), "--out", str(tmp_path / "o"), "--resume-from", str(good)]
    assert main([*args, "--resume-from", str(tmp_path)]) == 2  # every folder checked first
    err = capsys.readouterr().err
    assert "no runs.csv here" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_sign_vs_linear_arms(tmp_path, capsys):
    # the dry run lists the ReLU control beside the paper's rule, and every network runs at
    # least two readings of misborn (and of mybitlinear); the readings build the layers they name
    from lowbit.cli import main
    from lowbit.nn import MisbornLinear, SignLinear

    assert main(["study", "sign-vs-linear", "--dry-run", "--json", "--out", str(tmp_path)]) == 0
    cells = json.loads(capsys.readouterr().out)
    assert {c["activation"] for c in cells} == {"study", "relu"}
    readings: dict[tuple, dict[str, set]] = {}
    for c in cells:
        net = (c["dataset"], c["depth"], c["width"], c["activation"], c["seed"])
        readings.setdefault(net, {}).setdefault(c["layer"], set()).add(c["reading"])
    assert all(len(r["misborn"]) >= 2 and len(r["mybitlinear"]) >= 2 for r in readings.values())
    ds = type("DS", (), {"input_shape": (1, 8, 8), "classes": 4})
    for c in cells:
        if c["layer"] in ("misborn", "mybitlinear") and c["depth"] == 1 and c["width"] == 4:
            layer = runner.build_model(c, ds)[1]
            if c["reading"] == "weight-ste":
                assert isinstance(layer, MisbornLinear) and layer.mask == "weight"
            elif c["reading"] == "grad-mask":
                assert layer.mask == "grad"
            elif c["reading"] == "raw-sign":
                assert isinstance(layer, SignLinear) and not layer.norm
    cfg = {k: v for k, v in cells[0].items() if k != "id"}
    old = {k: v for k, v in cfg.items() if k not in ("reading", "val_split")}
    # unused new keys leave the ids of cells stored before they existed unchanged
    assert S.cell_id({**old, "reading": None, "val_split": 0.0}) == S.cell_id(old)
    assert S.cell_id(cfg) != S.cell_id(old)  # a used one (val_split 0.1 here) is part of it


def test_readonly_store_rejects_missing_db(tmp_path):
    with pytest.raises(FileNotFoundError):
        Store(tmp_path / "none.sqlite", readonly=True)
    with pytest.raises(sqlite3.OperationalError):
        Store(tmp_path / "w.sqlite").close() or Store(
            tmp_path / "w.sqlite", readonly=True
        ).db.execute("INSERT INTO meta VALUES ('a', '1')")
