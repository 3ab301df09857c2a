"""Report layout from synthetic store contents: numbered sections, width order, unique figure
names when a study varies a setting the title does not show, one seed, formatted losses."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from test_claims import _config, _write

from lowbit.study.report import write_report


def _cells(seeds, lrs):
    for seed in seeds:
        for lr in lrs:
            for width in (1024, 64, 256):
                for layer in ("linear", "bitlinear8", "mybitlinear", "misborn"):
                    yield _config(
                        model="mlp",
                        layer=layer,
                        depth=1,
                        width=width,
                        lr=lr,
                        seed=seed,
                        activation="study",
                        dataset="fashion-mnist",
                        reading={"misborn": "grad-mask", "mybitlinear": "bitnet"}.get(layer),
                    )


def test_report_layout(tmp_path):
    def params(cfg):
        loss = 123456.0 if cfg["layer"] == "misborn" else 0.5
        return {"acc": 0.8, "loss": loss}

    _write(tmp_path, _cells((0,), (1e-3, 1e-2)), params, ["svl-bitlinear8-best"])
    info = write_report(tmp_path)
    names = [Path(f).name for f in info["figures"]]
    assert len(names) == len(set(names))  # nothing overwritten
    curves = [n for n in names if n.startswith("curves-")]
    assert len(curves) == 6  # 3 widths x 2 learning rates, each its own figure
    md = (tmp_path / "report" / "report.md").read_text()
    heads = [ln.split(".")[0][3:] for ln in md.splitlines() if ln.startswith("## ")]
    assert heads == [str(i) for i in range(1, len(heads) + 1)]
    rows = [ln for ln in md.splitlines() if ln.startswith("| fashion-mnist / mlp")]
    widths = [int(r.split("width ")[1].split(" ")[0]) for r in rows]
    lr_rows = [r for r in rows if "lr 0.001" in r]
    assert [int(r.split("width ")[1].split(" ")[0]) for r in lr_rows] == [64] * 4 + [256] * 4 + [
        1024
    ] * 4  # networks in width order (64 < 256 < 1024, not as strings)
    assert len(widths) == 24
    # an extreme loss in three significant figures (1.21e+05), not 120645.123
    assert re.search(r"\| 1\.\d\de\+05 \|", md)
    assert "**inconclusive**" in md and "1 paired seed(s), fewer than 3" in md
    assert "stability.png" in names
    # a second rendering after a group vanished drops that group's figures, keeps foreign files
    stale, foreign = tmp_path / "report" / "curves-099-gone.png", tmp_path / "report" / "mine.png"
    stale.write_bytes(b"x"), foreign.write_bytes(b"x")
    again = {Path(f).name for f in write_report(tmp_path)["figures"]}
    assert again == set(names) and not stale.exists() and foreign.exists()


def test_colours_of_readings_repeated_per_network_and_seed():
    """The size plot passes one variant per point: a reading repeated over many networks and
    seeds gets one colour, and more distinct readings than colours still get colours."""
    from lowbit.study.report import _colors

    readings = [f"misborn/r{i}" for i in range(9)]
    colours = _colors(readings * 40 + ["bitlinear8"] * 40)
    assert all(r in colours for r in readings)
    assert len({colours[r] for r in readings[:7]}) == 7


def test_plateau_table_counts_runs_whose_last_quarter_added_little(tmp_path):
    from lowbit.study.aggregate import late_gain

    assert late_gain([0.5, 0.6, 0.7, 0.8]) == pytest.approx(10.0)  # best of 3 epochs 0.7
    assert late_gain([0.5, 0.9, 0.8, 0.85]) == pytest.approx(-5.0)  # fell back: settled
    assert late_gain([0.5, 0.6, 0.7]) is None and late_gain([math.nan] * 5) is None

    def params(cfg):  # ramps to its accuracy at epoch 3 (settled) or at the last (still rising)
        return {"acc": 0.8, "ramp": 3 if cfg["width"] == 64 else 10}

    _write(tmp_path, _cells((0, 1), (1e-3,)), params, [])
    write_report(tmp_path)
    md = (tmp_path / "report" / "report.md").read_text()
    head = next(ln for ln in md.splitlines() if "runs at plateau" in ln)
    row = next(ln for ln in md.splitlines() if ln.startswith("| mlp |"))
    cells = dict(zip(head.split("|"), row.split("|"), strict=True))
    assert cells[" runs at plateau "].strip() == "8/24"  # the 8 width-64 runs
    assert cells[" median best-val epoch "].strip() == "10 (of 10)"


def test_a_run_ended_by_early_stopping_is_at_its_plateau():
    from lowbit.study.aggregate import Agg
    from lowbit.study.report import _at_plateau

    a = Agg((), {"epochs": 200, "patience": 10}, "nlevel-3", 3)
    a.seeds, a.epochs, a.late_val_gain = [0, 1, 2], [57, 200, 200], [1.2, 1.2, 0.1]
    assert [_at_plateau(a, i) for i in range(3)] == [True, False, True]
    a.group_config = {"epochs": 200}  # no early stopping: fewer epochs mean something else
    assert not _at_plateau(a, 0)
    a.group_config = {"epochs": 200, "lr_schedule": "cosine"}  # one annealed run cannot tell
    assert _at_plateau(a, 2) is None


def test_configs_stored_before_a_key_existed_group_with_newer_ones(tmp_path):
    from lowbit.study.aggregate import load_study

    def cells():
        for seed in (0, 1, 2):
            for layer in ("linear", "ternary"):
                cfg = _config(model="mlp", layer=layer, depth=1, width=64, seed=seed)
                if seed == 0:  # stored by a version that predates these keys
                    del cfg["patience"], cfg["lr_schedule"]
                yield cfg

    _write(tmp_path, cells(), lambda cfg: {"acc": 0.8}, [])
    study = load_study(tmp_path)
    assert len(study.aggs) == 2 and all(a.seeds == [0, 1, 2] for a in study.aggs)


def test_report_of_runs_with_and_without_a_git_revision(tmp_path):
    import sqlite3

    _write(tmp_path, _cells((0,), (1e-3,)), lambda cfg: {"acc": 0.8}, [])
    db = sqlite3.connect(tmp_path / "results.sqlite")  # one run made in a git checkout
    db.execute("UPDATE runs SET git_rev = 'abc123' WHERE rowid = 1")
    db.commit()
    db.close()
    write_report(tmp_path)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "abc123" in md
