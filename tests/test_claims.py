"""Every verdict state of every claim, driven from synthetic store contents (no training).

A scenario writes runs and epoch curves into a real results database, shaped so that a claim's
effect holds in every seed (supported), is reversed in every seed (contradicted), or flips sign
between seeds (inconclusive: the interval contains the threshold). The gates are tested for every
claim too: one seed, an fp32 baseline at chance, and the claim's networks absent.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from lowbit.study import spec as S
from lowbit.study.aggregate import load_study
from lowbit.study.claims import CLAIMS, evaluate, reading_verdicts, t_interval
from lowbit.study.store import Store

EPOCHS = 10
SVL_LAYERS = ("linear", "bitlinear8", "mybitlinear", "misborn", "ternary")
LR_MODELS = ("fcnn1", "fcnn2")
LEVELS = (2, 3, 4, 5, 8, 9, 16, 17)


def _config(**kw) -> dict:
    """A resolved cell config with the grid's defaults (what the runner stores)."""
    cfg = {k: default for k, (_, default, _) in S.GRID_KEYS.items()}
    cfg.update({"reading": None, "kernel_size": None, "levels": None, "val_split": 0.0, **kw})
    return cfg


def _svl_cells(seeds, readings=False):
    for seed in seeds:
        for depth in (1, 3):
            for width in (64, 256, 1024):
                for layer in SVL_LAYERS:
                    reads = [None]
                    if layer == "misborn":
                        reads = ["grad-mask", "weight-ste"] if readings else ["grad-mask"]
                    elif layer == "mybitlinear":
                        reads = ["bitnet", "raw-sign"] if readings else ["bitnet"]
                    for r in reads:
                        yield _config(
                            model="mlp",
                            layer=layer,
                            reading=r,
                            depth=depth,
                            width=width,
                            activation="study",
                            dataset="fashion-mnist",
                            seed=seed,
                        )


def _lr_cells(seeds):
    for seed in seeds:
        for model in LR_MODELS:
            for aug in (False, True):
                for levels in (None, *LEVELS):
                    yield _config(
                        model=model,
                        layer="nlevel" if levels else "linear",
                        levels=levels,
                        depth=None,
                        width=None,
                        activation=None,
                        augment=aug,
                        dataset="cifar10",
                        optimizer="sgd",
                        seed=seed,
                    )


BIN_LAYERS = ("linear", "sign", "ternary", "bnn", "xnor", "bireal", "reactnet")


def _bin_cells(seeds):
    for seed in seeds:
        for model, depth in (("binary_mlp", 3), ("binary_cnn", None)):
            for layer in BIN_LAYERS:
                yield _config(
                    model=model,
                    layer=layer,
                    depth=depth,
                    width=64,
                    activation=None,
                    dataset="fashion-mnist",
                    seed=seed,
                )


def _curves(p: dict) -> tuple[list[float], list[float]]:
    """Accuracy ramps to p["acc"] by epoch p["ramp"]; p["drop"] dips it once; the loss sits at
    p["loss"] and alternates by a factor 10**p["fluct"]."""
    acc = [p["acc"] * min(1.0, (t + 1) / p.get("ramp", 3)) for t in range(EPOCHS)]
    if p.get("drop"):
        acc[EPOCHS // 2] -= 0.1
    loss = [p.get("loss", 0.5) * 10 ** (p.get("fluct", 0.01) * (-1) ** t) for t in range(EPOCHS)]
    return acc, loss


def _write(tmp, cells, params: Callable[[dict], dict], claims) -> None:
    with Store(tmp / "results.sqlite") as store:
        cfgs = list(cells)
        ids = [S.cell_id(c) for c in cfgs]
        store.set_meta(name="synthetic", claims=claims, cell_ids=ids)
        store.add_runs(list(zip(ids, cfgs, strict=True)))
        for cid, cfg in zip(ids, cfgs, strict=True):
            p = params(cfg)
            acc, loss = _curves({**p, "acc": p["acc"] + 0.002 * cfg["seed"]})
            store.start_run(cid, {"classes": 10, "lowbit_version": "test", "n_params": 1})
            for t in range(EPOCHS):
                m = {"epoch": t + 1, "test_acc": acc[t], "test_loss": loss[t], "val_acc": acc[t]}
                store.add_epoch(cid, m, [])
            store.end_run(cid, "finished")


# --- scenarios: params(cfg, e) with e = +1 (claim holds in this seed) or -1 (reversed) ------------


def _lv(cfg):
    return cfg["levels"]


def svl_b8(cfg, e):
    return {"acc": 0.8 + (0.1 * e if cfg["layer"] == "bitlinear8" else 0.0)}


def svl_mis(cfg, e):
    return {"acc": 0.8 + (0.05 * e if cfg["layer"] == "misborn" else 0.0)}


def svl_largest(cfg, e):
    big = cfg["width"] == 1024 and cfg["depth"] == 3 and cfg["layer"] == "mybitlinear"
    return {"acc": 0.8 + (0.1 * e if big else 0.0)}


def svl_loss(cfg, e):
    if cfg["layer"] != "misborn":
        return {"acc": 0.8}
    if e > 0:
        return {"acc": 0.8, "loss": 100.0, "fluct": 0.1 * cfg["depth"]}
    return {"acc": 0.8, "loss": 0.5, "fluct": 0.1 / cfg["depth"]}


def svl_wide(cfg, e):
    fp = cfg["layer"] == "linear"
    return {"acc": 0.8 + (0.05 * e if fp and cfg["width"] == 256 else 0.0)}


def svl_ternary(cfg, e):
    return {"acc": 0.8 + (0.1 * e if cfg["layer"] == "ternary" else 0.0)}


def lr_gap(cfg, e):
    if _lv(cfg) is None:
        return {"acc": 0.8}
    return {"acc": 0.8 - (0.002 if e > 0 else 0.03)}


def lr_odd(cfg, e):
    n = _lv(cfg)
    if n is None or not cfg["augment"]:
        return {"acc": 0.8}
    odd = n % 2 == 1
    good = odd == (e > 0)
    return {"acc": 0.81 if good else 0.79, "drop": not good}


def lr_five(cfg, e):
    n = _lv(cfg)
    if n is None:
        return {"acc": 0.8}
    if n == 5:
        return {"acc": 0.8 - (0.001 if e > 0 else 0.03)}
    return {"acc": 0.8 - (0.03 if n < 5 else 0.001)}


def lr_onebit(cfg, e):
    n = _lv(cfg)
    return {"acc": 0.8 - ((0.1 if e > 0 else 0.01) if n == 2 else 0.0)}


def lr_epochs(cfg, e):
    n = _lv(cfg)
    if n is None:
        return {"acc": 0.8, "ramp": 2}
    slow = n <= 4
    return {"acc": 0.8, "ramp": (8 if slow else 2) if e > 0 else (2 if slow else 8)}


def lr_larger(cfg, e):
    if _lv(cfg) is None:
        return {"acc": 0.8}
    small = cfg["model"] == "fcnn1"
    return {"acc": 0.8 - (0.03 if small == (e > 0) else 0.01)}


def bin_gain(better):
    return lambda cfg, e: {"acc": 0.8 + (0.03 * e if cfg["layer"] == better else 0.0)}


def bin_85(cfg, e):
    if cfg["layer"] in ("linear", "sign", "ternary"):
        return {"acc": 0.9}
    return {"acc": 0.85 + 0.02 * e}


SCENARIOS = {
    "svl-bitlinear8-best": ("svl", svl_b8),
    "svl-misborn-beats-mybitlinear": ("svl", svl_mis),
    "svl-mybitlinear-best-largest": ("svl", svl_largest),
    "svl-misborn-loss-depth": ("svl", svl_loss),
    "svl-linear-wide": ("svl", svl_wide),
    "svl-ternary-vs-sign": ("svl", svl_ternary),
    "lr-gap-to-fp32": ("lr", lr_gap),
    "lr-odd-stable-with-augmentation": ("lr", lr_odd),
    "lr-five-levels-balance": ("lr", lr_five),
    "lr-one-bit-small-fails": ("lr", lr_onebit),
    "lr-fewer-bits-more-epochs": ("lr", lr_epochs),
    "lr-larger-models-closer": ("lr", lr_larger),
    "bin-xnor-scaling": ("bin", bin_gain("xnor")),
    "bin-bireal-shortcut": ("bin", bin_gain("bireal")),
    "bin-reactnet-thresholds": ("bin", bin_gain("reactnet")),
    "bin-mlp-85": ("bin", bin_85),
}


def test_every_claim_has_a_scenario():
    assert set(SCENARIOS) == set(CLAIMS)


def _verdict(tmp, cid, signs, *, seeds=(0, 1, 2), chance_fp32=False, other_grid=False):
    kind, fn = SCENARIOS[cid]
    if other_grid:
        kind = "lr" if kind == "svl" else "svl"
    cells = {"svl": _svl_cells, "lr": _lr_cells, "bin": _bin_cells}[kind](seeds)

    def params(cfg):
        p = fn(cfg, signs[cfg["seed"]]) if not other_grid else {"acc": 0.8}
        if chance_fp32 and cfg["layer"] == "linear":
            p = {**p, "acc": 0.1}
        return p

    _write(tmp, cells, params, [cid])
    (v,) = evaluate(load_study(tmp), [cid])
    return v


@pytest.mark.parametrize("cid", sorted(SCENARIOS))
@pytest.mark.parametrize(
    "signs, expected",
    [((1, 1, 1), "supported"), ((-1, -1, -1), "contradicted"), ((1, -1, 1), "inconclusive")],
)
def test_claim_states(tmp_path, cid, signs, expected):
    v = _verdict(tmp_path, cid, signs)
    assert v.verdict == expected, (v.verdict, v.reason, v.evidence)
    assert v.seeds == 3 and "[" in v.interval  # the interval over seeds is shown
    if expected == "inconclusive":
        assert "contains its threshold" in v.reason
    paper_data = CLAIMS[cid].paper.key == "low-resolution"
    assert ("the paper's" in v.data) == paper_data and ("stand-in" in v.data) != paper_data
    assert "of the paper's epochs" in v.epochs


@pytest.mark.parametrize("cid", sorted(SCENARIOS))
def test_claim_gates(tmp_path, cid):
    one = _verdict(tmp_path / "one", cid, (1, 1, 1), seeds=(0,))
    assert one.verdict == "inconclusive" and "fewer than 3" in one.reason
    base = _verdict(tmp_path / "chance", cid, (1, 1, 1), chance_fp32=True)
    assert base.verdict == "inconclusive" and "not clearly above chance" in base.reason
    gone = _verdict(tmp_path / "absent", cid, (1, 1, 1), other_grid=True)
    assert gone.verdict == "inconclusive" and "networks absent" in gone.reason


def test_a_tie_is_never_supported(tmp_path):
    # every layer equally accurate on the largest network: mybitlinear is not "best"
    v = _verdict(tmp_path, "svl-mybitlinear-best-largest", (0, 0, 0))
    assert v.verdict != "supported"


def test_unknown_claim_is_inconclusive(tmp_path):
    _write(tmp_path, _svl_cells((0,)), lambda c: {"acc": 0.8}, [])
    (v,) = evaluate(load_study(tmp_path), ["no-such-claim"])
    assert v.verdict == "inconclusive" and v.reason == "unknown claim"


def test_t_interval_matches_hand_values():
    m, lo, hi = t_interval([1.0, 2.0, 3.0])  # sd 1, n 3: half-width 4.303 / sqrt(3)
    assert m == 2.0 and math.isclose(hi - m, 4.303 / math.sqrt(3), rel_tol=1e-9)
    assert t_interval([5.0]) == (5.0, 5.0, 5.0)


# --- readings ------------------------------------------------------------------------------------


def _readings(tmp, weight_ste_like_paper: bool, raw_differs: bool):
    def params(cfg):
        if cfg["layer"] == "misborn" and cfg["reading"] == "weight-ste":
            if weight_ste_like_paper:
                return {"acc": 0.75, "loss": 1e4, "fluct": 0.5}
            return {"acc": 0.1, "loss": 0.5}
        if cfg["layer"] == "misborn":
            return {"acc": 0.1, "loss": 2.3}  # at chance, ordinary loss
        if cfg["layer"] == "mybitlinear" and cfg["reading"] == "raw-sign":
            return {"acc": 0.6 if raw_differs else 0.8}
        return {"acc": 0.8}

    _write(tmp, _svl_cells((0, 1, 2), readings=True), params, [])
    return {v.id: v.verdict for v in reading_verdicts(load_study(tmp))}


def test_reading_verdicts(tmp_path):
    got = _readings(tmp_path / "a", True, True)
    assert got == {
        "reading-misborn": "contradicted",
        "reading-misborn/weight-ste": "supported",
        "reading-mybitlinear": "contradicted",  # identical to bitlinear8 here
        "reading-mybitlinear/raw-sign": "supported",
    }
    got = _readings(tmp_path / "b", False, False)
    assert got["reading-misborn/weight-ste"] == "contradicted"
    assert got["reading-mybitlinear/raw-sign"] == "contradicted"
