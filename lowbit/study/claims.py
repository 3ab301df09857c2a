"""The seed papers' claims as tests on a study's per-seed results, each with a 95% interval.

A claim is a :class:`Claim`: an id, its :class:`Paper`, the statement as the paper makes it, the
criterion applied here, and ``measure(study)``, which returns a :class:`Measured` (the tests and
the cells it used) or a string saying which networks are missing. Adding a claim (e.g. for a new
preset) is one function and one ``Claim(...)`` line in ``CLAIMS``; the preset lists its id under
``study.claims``. Unit tests drive every verdict of every claim from a synthetic store
(``tests/test_claims.py``).

Statistics. A *test* is one number per seed, computed within that seed: arms compared in a claim
are paired by seed (seed s of layer A against seed s of layer B, on the same network), and a claim
over many networks reduces them per seed first (e.g. the share of networks where bitlinear8 is
best in seed s). Over the n seeds present in every compared cell the test's value is

    mean  m = sum(v_s) / n,   95% t interval  m +- t(0.975, n - 1) * sd(v) / sqrt(n)

(Student's t, two-sided, ``sd`` with n - 1 degrees of freedom). The criterion of each test is
``value > threshold``. Verdicts:

    supported     every test's interval lies above its threshold
    contradicted  some test's interval lies below its threshold
    inconclusive  otherwise (an interval contains its threshold, so a tie is never supported),
                  and whenever fewer than 3 seeds are paired, a compared fp32 baseline has not
                  learned (the lower end of its accuracy's interval is not 5 points above chance),
                  or the claim's networks are absent

Each verdict also says the data it used (and whether that is the paper's data or a stand-in),
the seeds, and the epochs run as a share of the paper's budget for those networks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lowbit.study.aggregate import Agg, Study

STATES = ("supported", "contradicted", "inconclusive")
MIN_SEEDS = 3
BASELINE_MARGIN = 0.05  # fp32 has learned when its 95% lower bound is 5 points above chance
DEFAULT_CHANCE = 0.1  # databases without a class count: 10 classes (conservative for CIFAR-100)
FP32 = "linear (fp32)"
PAPER_LAYERS = (FP32, "bitlinear8", "mybitlinear", "misborn")
ONE_BIT = ("bitlinear8", "mybitlinear", "misborn")

# t(0.975, df) for df = 1..30; 1.96 beyond (the normal limit; within 2% from df = 60)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179)
_T975 += (2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064)
_T975 += (2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of the 95% t interval of the mean; low = high = mean for one value."""
    v = np.asarray(values, dtype=float)
    m = float(v.mean())
    if len(v) < 2:
        return m, m, m
    t = _T975[len(v) - 2] if len(v) - 1 <= len(_T975) else 1.96
    half = t * float(v.std(ddof=1)) / math.sqrt(len(v))
    return m, m - half, m + half


# --- what a claim returns --------------------------------------------------------------------


@dataclass(frozen=True)
class Paper:
    """A seed paper: its datasets and its epoch budget for a cell's config."""

    key: str
    datasets: tuple[str, ...]
    epochs: Callable[[dict[str, Any]], int]


@dataclass
class Test:
    """One number per seed; the criterion is ``value > threshold``.

    ``unit`` and ``scale`` only format it (accuracy differences: "pt", 100)."""

    label: str
    per_seed: dict[int, float]
    threshold: float = 0.0
    unit: str = "pt"
    scale: float = 100.0


@dataclass
class Measured:
    tests: list[Test]
    cells: list[Agg]  # every cell the tests read (data, epochs)
    baselines: list[Agg] = field(default_factory=list)  # fp32 arms that must have learned
    detail: str = ""


@dataclass(frozen=True)
class Claim:
    id: str
    paper: Paper
    statement: str
    criterion: str
    measure: Callable[[Study], Measured | str]


@dataclass
class Verdict:
    id: str
    claim: str
    criterion: str
    verdict: str
    evidence: str
    interval: str = ""
    seeds: int = 0
    data: str = ""
    epochs: str = ""
    reason: str = ""


# --- helpers -----------------------------------------------------------------------------------


def _paired(aggs: list[Agg], fn: Callable[[dict[Agg, float]], float], key="final_acc"):
    """seed -> fn({agg: value in that seed}) over the seeds every agg has."""
    maps = [a.by_seed(key) for a in aggs]
    seeds = set.intersection(*(set(m) for m in maps)) if maps else set()
    return {s: fn({a: m[s] for a, m in zip(aggs, maps, strict=True)}) for s in sorted(seeds)}


def _per_seed_mean(parts: list[dict[int, float]]) -> dict[int, float]:
    """seed -> mean over the parts (networks) that have that seed, for seeds all parts have."""
    if not parts:
        return {}
    seeds = set.intersection(*(set(p) for p in parts))
    return {s: float(np.mean([p[s] for p in parts])) for s in sorted(seeds)}


def _chance(a: Agg) -> float:
    return 1.0 / a.classes if a.classes else DEFAULT_CHANCE


def _learned(a: Agg) -> bool:
    vals = list(a.by_seed().values())
    return bool(vals) and t_interval(vals)[1] > _chance(a) + BASELINE_MARGIN


def _mlp_groups(study: Study, activation: str | None = "study") -> list[dict[str, Agg]]:
    """The MLP networks (variant -> agg) with the given activation rule (None: any)."""
    out = []
    for aggs in study.groups().values():
        cfg = aggs[0].group_config
        if cfg["model"] == "mlp" and (activation is None or cfg.get("activation") == activation):
            out.append({a.variant: a for a in aggs})
    return out


def _complete(groups: list[dict[str, Agg]], names: tuple[str, ...]) -> list[dict[str, Agg]]:
    return [g for g in groups if all(n in g for n in names)]


def _cells(groups: list[dict[str, Agg]], names: tuple[str, ...]) -> list[Agg]:
    return [g[n] for g in groups for n in names if n in g]


def _fp32(groups: list[dict[str, Agg]]) -> list[Agg]:
    return [g[FP32] for g in groups if FP32 in g]


def _share(groups: list[dict[str, Agg]], wins: Callable[[dict[str, float]], bool], names):
    """seed -> share of networks where ``wins({variant: acc in that seed})``."""
    parts = [
        _paired(
            [g[n] for n in names], lambda v, g=g: float(wins({a.variant: x for a, x in v.items()}))
        )
        for g in groups
    ]
    return _per_seed_mean(parts)


# --- Comparing accuracy of sign-quantized layers with linear layer in small models ----------------


def _svl_epochs(cfg: dict[str, Any]) -> int:
    """The paper's "4 to 18 epochs depending on the size": 4 + log2(width / 4) + (depth - 1)
    over its grid (depth 1..7, width 4..1024), clipped to 4..18."""
    if cfg.get("width") is None:
        return 18
    size = math.log2(max(cfg["width"], 4) / 4) + max(cfg["depth"], 1) - 1
    return int(min(18, max(4, 4 + round(size))))


SVL = Paper("sign-vs-linear", ("mnist", "cifar100"), _svl_epochs)


def svl_bitlinear8_best(study: Study) -> Measured | str:
    groups = _complete(_mlp_groups(study), PAPER_LAYERS)
    if not groups:
        return "no MLP network (paper's activation rule) has all of " + ", ".join(PAPER_LAYERS)

    def best(acc: dict[str, float]) -> bool:
        return all(acc["bitlinear8"] > acc[n] for n in PAPER_LAYERS if n != "bitlinear8")

    t = Test("share of networks where bitlinear8 is best", _share(groups, best, PAPER_LAYERS), 0.5)
    t.unit, t.scale = "%", 100.0
    return Measured([t], _cells(groups, PAPER_LAYERS), _fp32(groups), f"{len(groups)} networks")


def svl_misborn_beats_mybitlinear(study: Study) -> Measured | str:
    names = ("misborn", "mybitlinear")
    groups = _complete(_mlp_groups(study), names)
    if not groups:
        return "no MLP network (paper's activation rule) has both misborn and mybitlinear"
    share = _share(groups, lambda acc: acc["misborn"] > acc["mybitlinear"], names)
    t = Test("share of networks where misborn beats mybitlinear", share, 0.5, "%")
    return Measured([t], _cells(groups, names), _fp32(groups), f"{len(groups)} networks")


def svl_mybitlinear_best_largest(study: Study) -> Measured | str:
    groups = _complete(_mlp_groups(study), PAPER_LAYERS)
    if not groups:
        return "no MLP network (paper's activation rule) has all of " + ", ".join(PAPER_LAYERS)
    tests, used = [], []
    for ds in sorted({g[FP32].group_config["dataset"] for g in groups}):
        g = max(
            (g for g in groups if g[FP32].group_config["dataset"] == ds),
            key=lambda g: (g[FP32].group_config["width"], g[FP32].group_config["depth"]),
        )
        c = g[FP32].group_config
        margin = _paired(
            [g[n] for n in PAPER_LAYERS],
            lambda v: (
                sum(x for a, x in v.items() if a.variant == "mybitlinear")
                - max(x for a, x in v.items() if a.variant != "mybitlinear")
            ),
        )
        label = f"{ds} width {c['width']} depth {c['depth']}: mybitlinear - best other layer"
        tests.append(Test(label, margin))
        used.append(g)
    return Measured(tests, _cells(used, PAPER_LAYERS), _fp32(used))


def svl_misborn_loss_depth(study: Study) -> Measured | str:
    groups = _complete(_mlp_groups(study), ("misborn", "bitlinear8"))
    depths = sorted({g["misborn"].group_config["depth"] for g in groups})
    if len(depths) < 2:
        return "misborn and bitlinear8 need MLP networks of at least two depths"
    loss_m = _per_seed_median([g["misborn"].by_seed("final_loss") for g in groups])
    loss_b = _per_seed_median([g["bitlinear8"].by_seed("final_loss") for g in groups])
    ratio = {s: math.log10(loss_m[s] / loss_b[s]) for s in loss_m if s in loss_b and loss_b[s] > 0}
    growth = []
    for w in sorted({g["misborn"].group_config["width"] for g in groups}):
        by_d = {
            g["misborn"].group_config["depth"]: g["misborn"]
            for g in groups
            if g["misborn"].group_config["width"] == w
        }
        if len(by_d) >= 2:
            lo, hi = by_d[min(by_d)], by_d[max(by_d)]
            growth.append(_paired([lo, hi], lambda v, lo=lo, hi=hi: v[hi] - v[lo], "loss_fluct"))
    tests = [
        Test("log10(median final loss misborn / bitlinear8)", ratio, 1.0, "", 1.0),
        Test(
            "misborn's loss fluctuation (std of log10 loss), deepest - shallowest",
            _per_seed_mean(growth),
            0.0,
            "",
            1.0,
        ),
    ]
    return Measured(tests, _cells(groups, ("misborn", "bitlinear8")), _fp32(groups))


def _per_seed_median(parts: list[dict[int, float]]) -> dict[int, float]:
    seeds = set.intersection(*(set(p) for p in parts)) if parts else set()
    return {s: float(np.median([p[s] for p in parts])) for s in sorted(seeds)}


def svl_linear_wide(study: Study) -> Measured | str:
    groups = [g for g in _mlp_groups(study) if FP32 in g]
    widths = sorted({g[FP32].group_config["width"] for g in groups})
    if 256 not in widths or widths[-1] <= 256:
        return f"fp32 needs width 256 and a wider network; widths here: {widths}"
    parts, used = [], []
    for d in sorted({g[FP32].group_config["depth"] for g in groups}):
        at = {
            g[FP32].group_config["width"]: g[FP32]
            for g in groups
            if g[FP32].group_config["depth"] == d
        }
        if 256 in at and widths[-1] in at:
            a, b = at[256], at[widths[-1]]
            parts.append(_paired([a, b], lambda v, a=a, b=b: v[a] - v[b]))
            used += [a, b]
    t = Test(
        f"fp32 accuracy at width 256 - width {widths[-1]} (mean over depths)", _per_seed_mean(parts)
    )
    return Measured([t], used, used)


def svl_ternary_vs_sign(study: Study) -> Measured | str:
    names = ("ternary", *ONE_BIT)
    groups = _complete(_mlp_groups(study), names)
    if not groups:
        return "no MLP network (paper's activation rule) has ternary and the three 1-bit layers"
    share = _share(groups, lambda acc: acc["ternary"] > max(acc[n] for n in ONE_BIT), names)
    t = Test("share of networks where ternary beats every 1-bit layer", share, 0.5, "%")
    return Measured([t], _cells(groups, names), _fp32(groups), f"{len(groups)} networks")


# --- Low-Resolution Neural Networks ------------------------------------------------------------


def _lr_epochs(cfg: dict[str, Any]) -> int:
    """200 epochs (1000 with augmentation) for FC/conv models, 300 (2000) for ViT."""
    vit = str(cfg.get("model", "")).startswith("vit")
    return (2000 if vit else 1000) if cfg.get("augment") else (300 if vit else 200)


LR = Paper("low-resolution", ("cifar10",), _lr_epochs)


def _lr_sets(study: Study, augment: bool) -> dict[str, dict[int | None, Agg]]:
    """model -> {levels (None = fp32): agg} for one augmentation setting, models with fp32."""
    out: dict[str, dict[int | None, Agg]] = {}
    for a in study.aggs:
        c = a.group_config
        if c["model"] == "mlp" or bool(c.get("augment")) != augment:
            continue
        if a.variant == FP32 or a.variant.startswith("nlevel"):
            out.setdefault(c["model"], {})[a.levels] = a
    return {m: d for m, d in sorted(out.items()) if None in d and len(d) > 1}


def _gap(fp: Agg, q: Agg) -> dict[int, float]:
    return _paired([fp, q], lambda v: v[fp] - v[q])


def lr_gap_to_fp32(study: Study) -> Measured | str:
    sets = _lr_sets(study, False)
    tests, used = [], []
    for m, d in sets.items():
        qs = [a for n, a in d.items() if n is not None and n >= 3]
        if not qs:
            continue
        fp = d[None]
        worst = _paired(
            [fp, *qs], lambda v, fp=fp: 0.01 - max(v[fp] - v[q] for q in v if q is not fp)
        )
        tests.append(Test(f"{m}: 1 pt - largest gap of N >= 3 to fp32", worst))
        used += [fp, *qs]
    if not tests:
        return "no model (no augmentation) has fp32 and some N >= 3"
    return Measured(tests, used, [a for a in used if a.levels is None])


def lr_odd_stable_with_augmentation(study: Study) -> Measured | str:
    drop, acc, used = [], [], []
    for d in _lr_sets(study, True).values():
        for e, o in ((2, 3), (4, 5), (8, 9), (16, 17)):
            if e in d and o in d:
                de, do = d[e], d[o]
                drop.append(_paired([de, do], lambda v, de=de, do=do: v[de] - v[do], "max_drop"))
                acc.append(_paired([de, do], lambda v, de=de, do=do: v[do] - v[de]))
                used += [de, do, d[None]]
    if not drop:
        return "no model with augmentation has a pair (2,3), (4,5), (8,9) or (16,17) and fp32"
    tests = [
        Test(
            "largest epoch-to-epoch accuracy drop, even N - odd N (mean over pairs)",
            _per_seed_mean(drop),
        ),
        Test("accuracy, odd N - even N (mean over pairs)", _per_seed_mean(acc)),
    ]
    return Measured(tests, used, [a for a in used if a.levels is None])


def lr_five_levels_balance(study: Study) -> Measured | str:
    gaps: dict[int, list[dict[int, float]]] = {}
    used = []
    for aug in (False, True):
        for d in _lr_sets(study, aug).values():
            for n, a in d.items():
                if n is not None:
                    gaps.setdefault(n, []).append(_gap(d[None], a))
                    used += [a, d[None]]
    fewer = [n for n in (2, 3, 4) if n in gaps]
    if 5 not in gaps or not fewer:
        return "needs N = 5 and at least one of N = 2, 3, 4 with fp32 on the same model"
    g5 = _per_seed_mean(gaps[5])
    low = {n: _per_seed_mean(gaps[n]) for n in fewer}
    seeds = set(g5).intersection(*(set(v) for v in low.values()))
    tests = [
        Test("0.5 pt - gap of N = 5 to fp32", {s: 0.005 - g5[s] for s in sorted(seeds)}),
        Test(
            f"smallest gap of N = {', '.join(map(str, fewer))} to fp32 - 0.5 pt",
            {s: min(low[n][s] for n in fewer) - 0.005 for s in sorted(seeds)},
        ),
    ]
    return Measured(tests, used, [a for a in used if a.levels is None])


def lr_one_bit_small_fails(study: Study) -> Measured | str:
    parts, used = [], []
    for aug in (False, True):
        for m, d in _lr_sets(study, aug).items():
            if m in ("fcnn1", "cvnn1") and 2 in d:
                parts.append(_gap(d[None], d[2]))
                used += [d[None], d[2]]
    if not parts:
        return "needs fcnn1 or cvnn1 with N = 2 and fp32"
    t = Test("gap of N = 2 to fp32 on fcnn1/cvnn1 (mean)", _per_seed_mean(parts), 0.05)
    return Measured([t], used, [a for a in used if a.levels is None])


def _epochs_to(curve: np.ndarray, target: float) -> float:
    """First epoch (1-based) the curve reaches target; the run's length + 1 if never."""
    hit = np.nonzero(curve >= target)[0]
    return float(hit[0] + 1) if len(hit) else float(len(curve) + 1)


def lr_fewer_bits_more_epochs(study: Study) -> Measured | str:
    parts, used = [], []
    for d in _lr_sets(study, False).values():
        low = [d[n] for n in (2, 3, 4) if n in d]
        high = [d[n] for n in (8, 9, 16, 17) if n in d]
        if not low or not high:
            continue
        fp = d[None]
        rows = {a: dict(zip(a.seeds, a.curve_acc, strict=True)) for a in (fp, *low, *high)}
        seeds = set.intersection(*(set(r) for r in rows.values()))
        per = {}
        for s in sorted(seeds):
            target = 0.97 * fp.by_seed().get(s, math.nan)
            if not math.isfinite(target):
                continue
            e_low = np.mean([_epochs_to(rows[a][s], target) for a in low])
            e_high = np.mean([_epochs_to(rows[a][s], target) for a in high])
            per[s] = float(e_low - e_high)
        parts.append(per)
        used += [fp, *low, *high]
    if not parts:
        return "needs a model (no augmentation) with fp32, some N in 2..4 and some N in 8..17"
    t = Test(
        "epochs to 97% of fp32's final accuracy, N <= 4 - N >= 8 (mean)",
        _per_seed_mean(parts),
        0.0,
        "epochs",
        1.0,
    )
    return Measured([t], used, [a for a in used if a.levels is None])


def lr_larger_models_closer(study: Study) -> Measured | str:
    parts, used = [], []
    for aug in (False, True):
        sets = _lr_sets(study, aug)
        for small, big in (("fcnn1", "fcnn2"), ("cvnn1", "cvnn2"), ("vit1", "vit2")):
            if small not in sets or big not in sets:
                continue
            shared = [n for n in sets[small] if n is not None and n in sets[big]]
            if not shared:
                continue
            cells = [sets[m][n] for m in (small, big) for n in (None, *shared)]

            def diff(v: dict[Agg, float], s=sets[small], b=sets[big], shared=shared) -> float:
                gs = np.mean([v[s[None]] - v[s[n]] for n in shared])
                gb = np.mean([v[b[None]] - v[b[n]] for n in shared])
                return float(gs - gb)

            parts.append(_paired(cells, diff))
            used += cells
    if not parts:
        return "needs a small and a large model (fcnn1/2, cvnn1/2, vit1/2) with a shared N and fp32"
    t = Test("gap to fp32, small model - large model (mean over pairs)", _per_seed_mean(parts))
    return Measured([t], used, [a for a in used if a.levels is None])


# --- Binary networks: BinaryNet, XNOR-Net, Bi-Real Net, ReActNet (lowbit.bnn) -------------------

# ImageNet is these papers' common benchmark; 256 epochs is ReActNet's budget per training stage,
# taken as the reference budget of the binarization preset.
BIN = Paper("binary-networks", ("imagenet",), lambda cfg: 256)
BINARY_MODELS = ("binary_mlp", "binary_cnn")


def _binary_groups(study: Study, names: tuple[str, ...]) -> list[dict[str, Agg]]:
    """The binary models' networks (variant -> agg) that have every method in ``names``."""
    out = []
    for aggs in study.groups().values():
        if aggs[0].group_config["model"] in BINARY_MODELS:
            out.append({a.variant: a for a in aggs})
    return _complete(out, names)


def _bin_net(a: Agg) -> str:
    return f"{a.group_config['model']} ({_net(a)})"


def _binary_gain(better: str, worse: str) -> Callable[[Study], Measured | str]:
    """accuracy(better) - accuracy(worse), paired by seed, one test per binary network."""

    def measure(study: Study) -> Measured | str:
        groups = _binary_groups(study, (better, worse))
        if not groups:
            return f"no binary network has both {better} and {worse}"
        tests = [
            Test(
                f"{_bin_net(g[better])}: {better} - {worse}",
                _paired([g[better], g[worse]], lambda v, g=g: v[g[better]] - v[g[worse]]),
            )
            for g in groups
        ]
        return Measured(tests, _cells(groups, (better, worse)), _fp32(groups))

    return measure


def bin_mlp_reaches_85(study: Study) -> Measured | str:
    from lowbit.bnn import BINARY_METHODS

    groups = [
        g
        for g in _binary_groups(study, ())
        if next(iter(g.values())).group_config["model"] == "binary_mlp"
    ]
    tests, used = [], []
    for g in groups:
        methods = [m for m in BINARY_METHODS if m in g]
        if not methods:
            continue
        best = max(methods, key=lambda m: g[m].mean())
        per_seed = {s: v - 0.85 for s, v in g[best].by_seed().items()}
        tests.append(Test(f"{_bin_net(g[best])}: {best} (best binary method) - 85%", per_seed))
        used.append(g[best])
    if not tests:
        return "no binary_mlp network with a binary method"
    return Measured(tests, used, _fp32(groups))


# --- the registry --------------------------------------------------------------------------------

CLAIMS: dict[str, Claim] = {
    c.id: c
    for c in (
        Claim(
            "svl-bitlinear8-best",
            SVL,
            "8-bit BitLinear gives the best accuracy with a stable learning curve in most cases.",
            "share of networks (paper's activation rule) where bitlinear8 has the highest final "
            "accuracy of the paper's 4 layers, per seed, > 50%",
            svl_bitlinear8_best,
        ),
        Claim(
            "svl-misborn-beats-mybitlinear",
            SVL,
            "myLittleMisborn reaches higher accuracy than mybitlinear in most cases.",
            "share of networks where misborn's final accuracy > mybitlinear's, per seed, > 50%",
            svl_misborn_beats_mybitlinear,
        ),
        Claim(
            "svl-mybitlinear-best-largest",
            SVL,
            "mybitlinear is the best layer on the largest model (CIFAR-100, width 1024, depth 5).",
            "on the largest network of each dataset (max width, then depth), mybitlinear's "
            "accuracy minus the best other paper layer's, paired by seed, > 0",
            svl_mybitlinear_best_largest,
        ),
        Claim(
            "svl-misborn-loss-depth",
            SVL,
            "myLittleMisborn's loss is extreme and fluctuates more as the network gets deeper.",
            "misborn's median final loss > 10x bitlinear8's (log10 ratio > 1), and its loss "
            "fluctuation (std over epochs of log10 test loss) larger at the deepest than at the "
            "shallowest depth (> 0)",
            svl_misborn_loss_depth,
        ),
        Claim(
            "svl-linear-wide",
            SVL,
            "Default linear works well, but not with width over 256 (small dataset).",
            "fp32 accuracy at width 256 minus at the widest width (> 256), paired by seed, > 0",
            svl_linear_wide,
        ),
        Claim(
            "svl-ternary-vs-sign",
            SVL,
            "Future work: ternary weights (BitNet b1.58) would improve on the sign layers.",
            "share of networks where ternary beats every 1-bit layer (bitlinear8, mybitlinear, "
            "misborn), per seed, > 50%",
            svl_ternary_vs_sign,
        ),
        Claim(
            "lr-gap-to-fp32",
            LR,
            "Low-resolution weights reach results comparable to fp32 (except 1 bit).",
            "without augmentation, on every model, the largest gap of N >= 3 to fp32 (paired by "
            "seed) is < 1 point",
            lr_gap_to_fp32,
        ),
        Claim(
            "lr-odd-stable-with-augmentation",
            LR,
            "With augmentation, even-N models (no zero level) go unstable; odd-N models stay "
            "stable.",
            "with augmentation, over the pairs (2,3), (4,5), (8,9), (16,17): the even N's largest "
            "epoch-to-epoch accuracy drop exceeds the odd N's (> 0) and the odd N is more "
            "accurate (> 0)",
            lr_odd_stable_with_augmentation,
        ),
        Claim(
            "lr-five-levels-balance",
            LR,
            "N = 5 (2.32 bits) is the best balance of memory and accuracy.",
            "N = 5 is within 0.5 point of fp32 and N = 2, 3, 4 are not (gaps paired by seed, "
            "mean over models and augmentation settings)",
            lr_five_levels_balance,
        ),
        Claim(
            "lr-one-bit-small-fails",
            LR,
            "The small models with 1-bit weights (FCNN1, CVNN1) fail to train satisfactorily.",
            "gap of N = 2 to fp32 on fcnn1/cvnn1, paired by seed, > 5 points",
            lr_one_bit_small_fails,
        ),
        Claim(
            "lr-fewer-bits-more-epochs",
            LR,
            "Models with fewer bits need more epochs to reach the fp32 result.",
            "without augmentation, epochs to reach 97% of fp32's final accuracy (same seed; "
            "never = the run's length + 1), N in {2, 3, 4} minus N in {8, 9, 16, 17}, > 0",
            lr_fewer_bits_more_epochs,
        ),
        Claim(
            "lr-larger-models-closer",
            LR,
            "Larger low-resolution models get closer to fp32 than smaller ones.",
            "gap to fp32 over the shared N, fcnn1/cvnn1/vit1 minus fcnn2/cvnn2/vit2, paired by "
            "seed, > 0",
            lr_larger_models_closer,
        ),
        Claim(
            "bin-xnor-scaling",
            BIN,
            "XNOR-Net: scaling binary weights by alpha = mean|w| per output channel improves on "
            "unscaled sign weights (BinaryNet).",
            "xnor minus bnn final accuracy (same activations, STE and network; only the scale "
            "differs), paired by seed, > 0 on each binary network",
            _binary_gain("xnor", "bnn"),
        ),
        Claim(
            "bin-bireal-shortcut",
            BIN,
            "Bi-Real Net: a real-valued shortcut around every binary layer (with the approx-sign "
            "gradient) improves on XNOR-Net.",
            "bireal minus xnor final accuracy, paired by seed, > 0 on each binary network (the "
            "shortcut and the gradient change together, as in the paper's comparison)",
            _binary_gain("bireal", "xnor"),
        ),
        Claim(
            "bin-reactnet-thresholds",
            BIN,
            "ReActNet: learnable activation thresholds (RSign) and RPReLU improve on Bi-Real Net.",
            "reactnet minus bireal final accuracy, paired by seed, > 0 on each binary network",
            _binary_gain("reactnet", "bireal"),
        ),
        Claim(
            "bin-mlp-85",
            BIN,
            "lowbit's binary MLP (binary hidden layers, fp32 first and last layers) reaches 85% "
            "on Fashion-MNIST (issue 13's target, not a paper's).",
            "final test accuracy of the best binary method (bnn, xnor, bireal, reactnet; best by "
            "mean over seeds) minus 85%, per seed, > 0",
            bin_mlp_reaches_85,
        ),
    )
}


# --- verdicts ------------------------------------------------------------------------------------


def _fmt(t: Test, x: float) -> str:
    v = x * t.scale
    return f"{v:+.2f}" if abs(v) < 10 else f"{v:+.1f}"


def _interval_text(t: Test) -> str:
    vals = list(t.per_seed.values())
    if not vals:
        return f"{t.label}: no paired seeds"
    m, lo, hi = t_interval(vals)
    unit = f" {t.unit}" if t.unit else ""
    ci = f" [{_fmt(t, lo)}, {_fmt(t, hi)}]" if len(vals) > 1 else " (one seed, no interval)"
    return f"{t.label}: {_fmt(t, m)}{ci}{unit} vs {_fmt(t, t.threshold)}"


def _data_text(paper: Paper, cells: list[Agg]) -> str:
    parts = []
    for ds in sorted({a.group_config["dataset"] for a in cells}):
        own = "the paper's" if ds in paper.datasets else f"stand-in for {'/'.join(paper.datasets)}"
        subsets = sorted(
            {
                a.group_config.get("train_subset") or 0
                for a in cells
                if a.group_config["dataset"] == ds
            }
        )
        train = (
            "all training images"
            if subsets == [0]
            else "training subset " + "/".join("all" if n == 0 else f"{n:,}" for n in subsets)
        )
        parts.append(f"{ds} ({own}; {train})")
    return "; ".join(parts)


def _epochs_text(paper: Paper, cells: list[Agg]) -> str:
    shares = [e / paper.epochs(a.group_config) for a in cells for e in a.epochs]
    if not shares:
        return ""
    lo, hi = min(shares), max(shares)
    pct = (
        f"{100 * lo:.0f}%"
        if round(100 * lo) == round(100 * hi)
        else f"{100 * lo:.0f}-{100 * hi:.0f}%"
    )
    return f"{pct} of the paper's epochs"


def judge(claim: Claim, study: Study) -> Verdict:
    """The verdict of one claim on one study (see the module docstring for the rules)."""
    out = claim.measure(study)
    v = Verdict(claim.id, claim.statement, claim.criterion, "inconclusive", "")
    if isinstance(out, str):
        v.reason = v.evidence = f"networks absent: {out}"
        return v
    v.evidence = "; ".join(
        [*(_interval_text(t) for t in out.tests), *([out.detail] if out.detail else [])]
    )
    v.interval = "; ".join(_interval_text(t) for t in out.tests)
    v.seeds = min((len(t.per_seed) for t in out.tests), default=0)
    v.data = _data_text(claim.paper, out.cells)
    v.epochs = _epochs_text(claim.paper, out.cells)
    unlearned = sorted(
        {f"{a.group_config['model']} {_net(a)}" for a in out.baselines if not _learned(a)}
    )
    states = []
    for t in out.tests:
        vals = list(t.per_seed.values())
        if len(vals) < MIN_SEEDS:
            states.append("inconclusive")
            continue
        _, lo, hi = t_interval(vals)
        states.append(
            "supported"
            if lo > t.threshold
            else "contradicted"
            if hi < t.threshold
            else "inconclusive"
        )
    if v.seeds < MIN_SEEDS:
        v.reason = f"{v.seeds} paired seed(s), fewer than {MIN_SEEDS}"
    elif unlearned:
        v.reason = "fp32 baseline not clearly above chance: " + ", ".join(unlearned)
    elif "contradicted" in states:
        v.verdict = "contradicted"
    elif states and all(s == "supported" for s in states):
        v.verdict = "supported"
    else:
        v.reason = "an interval contains its threshold"
    return v


def _net(a: Agg) -> str:
    c = a.group_config
    parts = [c["dataset"]]
    if c.get("depth") is not None:
        parts.append(f"d{c['depth']} w{c['width']}")
    if c.get("augment"):
        parts.append("aug")
    return " ".join(parts)


def evaluate(study: Study, ids: list[str]) -> list[Verdict]:
    """One verdict per claim id (an unknown id gives an inconclusive row saying so)."""
    out = []
    for cid in ids:
        if cid in CLAIMS:
            out.append(judge(CLAIMS[cid], study))
        else:
            v = Verdict(cid, "(unknown claim id)", "", "inconclusive", "", reason="unknown claim")
            out.append(v)
    return out


def check_ids(ids: list[str]) -> str | None:
    """The first id that is not a known claim, or None."""
    return next((c for c in ids if c not in CLAIMS), None)


# --- which reading of the seed layers behaves as the paper describes ---------------------------


def _reading_measure(variant: str) -> Callable[[Study], Measured | str]:
    """The described behaviour of a misborn or mybitlinear reading, as tests (paper's rule):

    misborn: decent accuracy (at least halfway from chance to fp32: acc - c - (fp32 - c) / 2 > 0),
    an extreme loss (median final loss > 10x bitlinear8's) that fluctuates (std over epochs of
    log10 loss above bitlinear8's). mybitlinear: clearly different from bitlinear8 (mean absolute
    accuracy difference over networks > 2 points)."""

    def measure(study: Study) -> Measured | str:
        groups = _complete(_mlp_groups(study), (variant, "bitlinear8", FP32))
        if not groups:
            return f"no MLP network (paper's activation rule) has {variant}, bitlinear8 and fp32"
        cells = _cells(groups, (variant, "bitlinear8"))
        if variant.startswith("mybitlinear"):
            diff = _per_seed_mean(
                [
                    _paired(
                        [g[variant], g["bitlinear8"]],
                        lambda v: abs(float(np.diff(list(v.values()))[0])),
                    )
                    for g in groups
                ]
            )
            t = Test(f"mean |accuracy {variant} - bitlinear8|", diff, 0.02)
            return Measured([t], cells, _fp32(groups))

        def decent(g: dict[str, Agg]) -> dict[int, float]:
            c = _chance(g[FP32])
            return _paired(
                [g[variant], g[FP32]],
                lambda v: v[g[variant]] - c - (v[g[FP32]] - c) / 2,
            )

        loss_r = _per_seed_median([g[variant].by_seed("final_loss") for g in groups])
        loss_b = _per_seed_median([g["bitlinear8"].by_seed("final_loss") for g in groups])
        ratio = {
            s: math.log10(loss_r[s] / loss_b[s]) for s in loss_r if s in loss_b and loss_b[s] > 0
        }
        fluct = _per_seed_mean(
            [
                _paired(
                    [g[variant], g["bitlinear8"]],
                    lambda v, g=g: v[g[variant]] - v[g["bitlinear8"]],
                    "loss_fluct",
                )
                for g in groups
            ]
        )
        tests = [
            Test(
                "accuracy above halfway from chance to fp32",
                _per_seed_mean([decent(g) for g in groups]),
            ),
            Test(f"log10(median final loss {variant} / bitlinear8)", ratio, 1.0, "", 1.0),
            Test(f"loss fluctuation {variant} - bitlinear8", fluct, 0.0, "", 1.0),
        ]
        return Measured(tests, cells, _fp32(groups), f"{len(groups)} networks")

    return measure


def reading_verdicts(study: Study) -> list[Verdict]:
    """One verdict per misborn / mybitlinear reading present: "supported" means the reading
    reproduces the behaviour the paper describes for that layer (see ``_reading_measure``)."""
    variants = sorted(
        {a.variant for a in study.aggs if a.variant.split("/")[0] in ("misborn", "mybitlinear")}
    )
    out = []
    for var in variants:
        if var.startswith("misborn"):
            text = f"{var} shows decent accuracy with an extreme, fluctuating loss."
            crit = (
                "accuracy at least halfway from chance to fp32, median final loss > 10x "
                "bitlinear8's, loss fluctuation above bitlinear8's (all paired by seed)"
            )
        else:
            text = f"{var} differs clearly from bitlinear8 (the paper's Fig. 1 vs Fig. 3)."
            crit = "mean absolute accuracy difference to bitlinear8 over networks > 2 points"
        claim = Claim(f"reading-{var}", SVL, text, crit, _reading_measure(var))
        out.append(judge(claim, study))
    return out
