"""The seed papers' claims as checks on a study's aggregates, each with an explicit criterion.

``evaluate(study, ids)`` returns one ``Verdict`` per claim id the spec lists: the claim as the
paper states it, the criterion applied here, the verdict (``holds``, ``does not hold``,
``mixed``, or ``not tested`` when the grid lacks the cells) and the numbers behind it. Accuracies
are mean final test accuracy over seeds, in percentage points.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lowbit.study.aggregate import Agg, Study

PAPER_LAYERS = ("linear (fp32)", "bitlinear8", "mybitlinear", "misborn")


@dataclass
class Verdict:
    id: str
    claim: str
    criterion: str
    verdict: str
    evidence: str


def _pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:.1f}%"


def _pm(a: Agg) -> str:
    s = a.std()
    return f"{100 * a.mean():.1f}" + ("" if not math.isfinite(s) else f" ± {100 * s:.1f}")


def _mlp_groups(study: Study) -> list[dict[str, Agg]]:
    out = []
    for aggs in study.groups().values():
        if aggs[0].group_config["model"] == "mlp":
            out.append({a.variant: a for a in aggs})
    return out


def _best(group: dict[str, Agg], names: tuple[str, ...]) -> str | None:
    cand = [(group[n].mean(), n) for n in names if n in group and math.isfinite(group[n].mean())]
    return max(cand)[1] if cand else None


def _majority(k: int, n: int) -> str:
    return "holds" if n and k > n / 2 else "does not hold"


def svl_bitlinear8_best(study: Study) -> Verdict:
    claim = "8-bit BitLinear gives the best accuracy with a stable learning curve in most cases."
    crit = "bitlinear8 has the highest mean final accuracy of the paper's 4 layers in > 50% of nets"
    groups = [g for g in _mlp_groups(study) if all(n in g for n in PAPER_LAYERS)]
    if not groups:
        return Verdict("svl-bitlinear8-best", claim, crit, "not tested", "no complete group")
    wins: dict[str, int] = {}
    for g in groups:
        b = _best(g, PAPER_LAYERS)
        wins[b] = wins.get(b, 0) + 1
    k = wins.get("bitlinear8", 0)
    drops = {n: np.mean([g[n].mean("max_drop") for g in groups]) for n in PAPER_LAYERS}
    ev = f"bitlinear8 best in {k}/{len(groups)} networks; best counts: " + ", ".join(
        f"{n} {c}" for n, c in sorted(wins.items(), key=lambda x: -x[1])
    )
    ev += "; mean largest epoch-to-epoch accuracy drop: " + ", ".join(
        f"{n} {100 * d:.2f} pt" for n, d in drops.items()
    )
    return Verdict("svl-bitlinear8-best", claim, crit, _majority(k, len(groups)), ev)


def svl_misborn_beats_mybitlinear(study: Study) -> Verdict:
    claim = "myLittleMisborn reaches higher accuracy than mybitlinear in most cases."
    crit = "misborn's mean final accuracy > mybitlinear's in > 50% of networks"
    groups = [g for g in _mlp_groups(study) if "misborn" in g and "mybitlinear" in g]
    if not groups:
        return Verdict("svl-misborn-beats-mybitlinear", claim, crit, "not tested", "")
    k = sum(g["misborn"].mean() > g["mybitlinear"].mean() for g in groups)
    diff = np.mean([g["misborn"].mean() - g["mybitlinear"].mean() for g in groups])
    ev = f"misborn higher in {k}/{len(groups)} networks; mean difference {100 * diff:+.1f} pt"
    return Verdict("svl-misborn-beats-mybitlinear", claim, crit, _majority(k, len(groups)), ev)


def svl_mybitlinear_best_largest(study: Study) -> Verdict:
    claim = "mybitlinear is the best layer on the largest model (CIFAR-100, width 1024, depth 5)."
    crit = "on the largest network of each dataset (max width, then max depth), mybitlinear is best"
    groups = [g for g in _mlp_groups(study) if all(n in g for n in PAPER_LAYERS)]
    if not groups:
        return Verdict("svl-mybitlinear-best-largest", claim, crit, "not tested", "")
    verdicts, parts = [], []
    for ds in sorted({next(iter(g.values())).group_config["dataset"] for g in groups}):
        gs = [g for g in groups if next(iter(g.values())).group_config["dataset"] == ds]
        g = max(
            gs,
            key=lambda g: (
                g["linear (fp32)"].group_config["width"],
                g["linear (fp32)"].group_config["depth"],
            ),
        )
        c = g["linear (fp32)"].group_config
        best = _best(g, PAPER_LAYERS)
        verdicts.append(best == "mybitlinear")
        accs = ", ".join(f"{n} {_pm(g[n])}" for n in PAPER_LAYERS)
        parts.append(f"{ds} width {c['width']} depth {c['depth']}: best {best} ({accs})")
    v = "holds" if all(verdicts) else "does not hold" if not any(verdicts) else "mixed"
    return Verdict("svl-mybitlinear-best-largest", claim, crit, v, "; ".join(parts))


def svl_misborn_loss_depth(study: Study) -> Verdict:
    claim = "myLittleMisborn's loss is extreme and fluctuates more as the network gets deeper."
    crit = (
        "misborn's median final test loss > 10x bitlinear8's, and its loss fluctuation "
        "(std over epochs of log10 test loss) grows from the smallest to the largest depth"
    )
    groups = [g for g in _mlp_groups(study) if "misborn" in g and "bitlinear8" in g]
    if not groups:
        return Verdict("svl-misborn-loss-depth", claim, crit, "not tested", "")
    ratio = np.median([g["misborn"].mean("final_loss") for g in groups]) / np.median(
        [g["bitlinear8"].mean("final_loss") for g in groups]
    )
    by_depth: dict[int, list[float]] = {}
    maxloss: dict[int, list[float]] = {}
    for g in groups:
        d = g["misborn"].group_config["depth"]
        by_depth.setdefault(d, []).append(g["misborn"].mean("loss_fluct"))
        maxloss.setdefault(d, []).append(float(np.nanmax(g["misborn"].curve_loss)))
    depths = sorted(by_depth)
    fl = {d: float(np.mean(by_depth[d])) for d in depths}
    grows = len(depths) > 1 and fl[depths[-1]] > fl[depths[0]]
    extreme = ratio > 10
    v = "holds" if grows and extreme else "mixed" if grows or extreme else "does not hold"
    ev = (
        f"median final loss misborn / bitlinear8 = {ratio:.1f}x; misborn loss fluctuation by "
        + "depth: "
        + ", ".join(f"{d}: {fl[d]:.2f}" for d in depths)
        + "; largest test loss seen by depth: "
        + ", ".join(f"{d}: {max(maxloss[d]):.3g}" for d in depths)
    )
    return Verdict("svl-misborn-loss-depth", claim, crit, v, ev)


def svl_linear_wide(study: Study) -> Verdict:
    claim = "Default linear works well, but not with width over 256 (small dataset)."
    crit = "fp32 linear's mean accuracy at the widest width (> 256) is below that at width 256"
    groups = [g for g in _mlp_groups(study) if "linear (fp32)" in g]
    widths = sorted({g["linear (fp32)"].group_config["width"] for g in groups})
    if not widths or widths[-1] <= 256 or 256 not in widths:
        return Verdict("svl-linear-wide", claim, crit, "not tested", f"widths here: {widths}")

    def acc(w: int) -> float:
        return float(
            np.mean(
                [
                    g["linear (fp32)"].mean()
                    for g in groups
                    if g["linear (fp32)"].group_config["width"] == w
                ]
            )
        )

    a256, awide = acc(256), acc(widths[-1])
    v = "holds" if awide < a256 else "does not hold"
    ev = f"linear, mean over depths: width 256 {_pct(a256)}, width {widths[-1]} {_pct(awide)}"
    return Verdict("svl-linear-wide", claim, crit, v, ev)


def svl_ternary_vs_sign(study: Study) -> Verdict:
    claim = "Future work: ternary weights (BitNet b1.58) would improve on the sign layers."
    crit = (
        "ternary's mean final accuracy beats every 1-bit layer (bitlinear8, mybitlinear, misborn)"
    )
    crit += " in > 50% of networks"
    ones = ("bitlinear8", "mybitlinear", "misborn")
    groups = [g for g in _mlp_groups(study) if "ternary" in g and all(n in g for n in ones)]
    if not groups:
        return Verdict("svl-ternary-vs-sign", claim, crit, "not tested", "")
    k = sum(g["ternary"].mean() > max(g[n].mean() for n in ones) for g in groups)
    gap = np.mean(
        [g["linear (fp32)"].mean() - g["ternary"].mean() for g in groups if "linear (fp32)" in g]
    )
    ev = f"ternary best of the quantized layers in {k}/{len(groups)} networks; mean gap to fp32 "
    ev += f"{100 * gap:.1f} pt"
    return Verdict("svl-ternary-vs-sign", claim, crit, _majority(k, len(groups)), ev)


# --- Low-Resolution Neural Networks ------------------------------------------------------------


def _lr_sets(study: Study, augment: bool) -> dict[str, dict[int | None, Agg]]:
    """model -> {levels (None = fp32): agg} for the given augmentation setting."""
    out: dict[str, dict[int | None, Agg]] = {}
    for a in study.aggs:
        c = a.group_config
        if c["model"] == "mlp" or c["augment"] != augment:
            continue
        if a.variant == "linear (fp32)" or a.variant.startswith("nlevel"):
            out.setdefault(c["model"], {})[a.levels] = a
    return {m: d for m, d in out.items() if None in d and len(d) > 1}


def lr_gap_to_fp32(study: Study) -> Verdict:
    claim = "Low-resolution weights reach results comparable to fp32 (except 1 bit)."
    crit = "without augmentation, every N >= 3 is within 1.0 point of fp32 on every model"
    sets = _lr_sets(study, False)
    if not sets:
        return Verdict("lr-gap-to-fp32", claim, crit, "not tested", "")
    ok, parts = True, []
    for m, d in sorted(sets.items()):
        fp = d[None].mean()
        gaps = {n: fp - a.mean() for n, a in sorted(d.items(), key=lambda x: x[0] or 0) if n}
        ok &= all(g <= 0.01 for n, g in gaps.items() if n >= 3)
        parts.append(
            f"{m}: fp32 {_pm(d[None])}; gap (pt) "
            + ", ".join(f"N={n} {100 * g:+.1f}" for n, g in gaps.items())
        )
    return Verdict(
        "lr-gap-to-fp32", claim, crit, "holds" if ok else "does not hold", "; ".join(parts)
    )


def lr_odd_stable_with_augmentation(study: Study) -> Verdict:
    claim = (
        "With augmentation, even-N models (no zero level) go unstable; odd-N models stay stable."
    )
    crit = (
        "with augmentation, in > 50% of the pairs (2,3), (4,5), (8,9), (16,17) per model the odd N "
        "has the higher mean accuracy and a smaller largest epoch-to-epoch accuracy drop"
    )
    sets = _lr_sets(study, True)
    pairs = [(2, 3), (4, 5), (8, 9), (16, 17)]
    k = n = 0
    parts = []
    for m, d in sorted(sets.items()):
        for e, o in pairs:
            if e in d and o in d:
                n += 1
                better = d[o].mean() > d[e].mean() and d[o].mean("max_drop") < d[e].mean("max_drop")
                k += better
                parts.append(
                    f"{m} N={e}/{o}: acc {_pm(d[e])}/{_pm(d[o])}, max drop "
                    f"{100 * d[e].mean('max_drop'):.1f}/{100 * d[o].mean('max_drop'):.1f} pt"
                )
    if not n:
        return Verdict("lr-odd-stable-with-augmentation", claim, crit, "not tested", "")
    ev = f"odd N better and steadier in {k}/{n} pairs; " + "; ".join(parts)
    return Verdict("lr-odd-stable-with-augmentation", claim, crit, _majority(k, n), ev)


def lr_five_levels_balance(study: Study) -> Verdict:
    claim = "N = 5 (2.32 bits) is the best balance of memory and accuracy."
    crit = (
        "N = 5 is the fewest levels within 0.5 point of fp32 (mean over models, both augmentation "
        "settings pooled): N = 2, 3, 4 are not, N = 5 is"
    )
    gaps: dict[int, list[float]] = {}
    for aug in (False, True):
        for d in _lr_sets(study, aug).values():
            for n, a in d.items():
                if n:
                    gaps.setdefault(n, []).append(d[None].mean() - a.mean())
    if 5 not in gaps:
        return Verdict("lr-five-levels-balance", claim, crit, "not tested", "")
    mg = {n: float(np.mean(g)) for n, g in sorted(gaps.items())}
    within = [n for n, g in mg.items() if g <= 0.005]
    smallest = min(within) if within else None
    v = "holds" if smallest == 5 else "does not hold"
    ev = "mean gap to fp32 (pt): " + ", ".join(f"N={n} {100 * g:+.2f}" for n, g in mg.items())
    ev += f"; fewest levels within 0.5 pt: {smallest}"
    return Verdict("lr-five-levels-balance", claim, crit, v, ev)


def lr_one_bit_small_fails(study: Study) -> Verdict:
    claim = "The small models with 1-bit weights (FCNN1, CVNN1) fail to train satisfactorily."
    crit = "N = 2 on fcnn1/cvnn1 is > 5 points below fp32"
    parts, fails, n = [], 0, 0
    for aug in (False, True):
        for m, d in sorted(_lr_sets(study, aug).items()):
            if m in ("fcnn1", "cvnn1") and 2 in d:
                n += 1
                gap = d[None].mean() - d[2].mean()
                fails += gap > 0.05
                parts.append(f"{m}{' aug' if aug else ''}: N=2 {_pm(d[2])} vs fp32 {_pm(d[None])}")
    if not n:
        return Verdict("lr-one-bit-small-fails", claim, crit, "not tested", "")
    v = "holds" if fails == n else "does not hold" if fails == 0 else "mixed"
    return Verdict("lr-one-bit-small-fails", claim, crit, v, "; ".join(parts))


def _epochs_to(a: Agg, target: float) -> float:
    mean = np.nanmean(a.curve_acc, axis=0)
    hit = np.nonzero(mean >= target)[0]
    return float(hit[0] + 1) if len(hit) else math.inf


def lr_fewer_bits_more_epochs(study: Study) -> Verdict:
    claim = "Models with fewer bits need more epochs to reach the fp32 result."
    crit = (
        "without augmentation, the epochs the mean curve needs to reach 97% of fp32's final "
        "accuracy are larger for N in {2, 3, 4} than for N in {8, 9, 16, 17} (mean; never = "
        "the run's length + 1)"
    )
    low, high, parts = [], [], []
    for m, d in sorted(_lr_sets(study, False).items()):
        target = 0.97 * d[None].mean()
        length = d[None].curve_acc.shape[1]
        row = []
        for n, a in sorted(d.items(), key=lambda x: x[0] or 0):
            e = _epochs_to(a, target)
            e = length + 1 if math.isinf(e) else e
            row.append(f"{'fp32' if n is None else f'N={n}'} {e:.0f}")
            if n in (2, 3, 4):
                low.append(e)
            elif n in (8, 9, 16, 17):
                high.append(e)
        parts.append(f"{m}: " + ", ".join(row))
    if not low or not high:
        return Verdict("lr-fewer-bits-more-epochs", claim, crit, "not tested", "")
    v = "holds" if np.mean(low) > np.mean(high) else "does not hold"
    ev = f"mean epochs N<=4: {np.mean(low):.1f}, N>=8: {np.mean(high):.1f}; " + "; ".join(parts)
    return Verdict("lr-fewer-bits-more-epochs", claim, crit, v, ev)


def lr_larger_models_closer(study: Study) -> Verdict:
    claim = "Larger low-resolution models get closer to fp32 than smaller ones."
    crit = (
        "mean gap to fp32 over the shared N is smaller for fcnn2/cvnn2/vit2 than fcnn1/cvnn1/vit1"
    )
    parts, k, n = [], 0, 0
    for aug in (False, True):
        sets = _lr_sets(study, aug)
        for small, big in (("fcnn1", "fcnn2"), ("cvnn1", "cvnn2"), ("vit1", "vit2")):
            if small in sets and big in sets:
                shared = [x for x in sets[small] if x and x in sets[big]]
                if not shared:
                    continue

                def gap(d: dict, shared: list = shared) -> float:
                    return float(np.mean([d[None].mean() - d[x].mean() for x in shared]))

                gs, gb = gap(sets[small]), gap(sets[big])
                n += 1
                k += gb < gs
                parts.append(
                    f"{small} vs {big}{' (aug)' if aug else ''}: gap {100 * gs:.1f} vs "
                    f"{100 * gb:.1f} pt over N={shared}"
                )
    if not n:
        return Verdict("lr-larger-models-closer", claim, crit, "not tested", "")
    v = "holds" if k == n else "does not hold" if k == 0 else "mixed"
    return Verdict("lr-larger-models-closer", claim, crit, v, "; ".join(parts))


CLAIMS: dict[str, Callable[[Study], Verdict]] = {
    "svl-bitlinear8-best": svl_bitlinear8_best,
    "svl-misborn-beats-mybitlinear": svl_misborn_beats_mybitlinear,
    "svl-mybitlinear-best-largest": svl_mybitlinear_best_largest,
    "svl-misborn-loss-depth": svl_misborn_loss_depth,
    "svl-linear-wide": svl_linear_wide,
    "svl-ternary-vs-sign": svl_ternary_vs_sign,
    "lr-gap-to-fp32": lr_gap_to_fp32,
    "lr-odd-stable-with-augmentation": lr_odd_stable_with_augmentation,
    "lr-five-levels-balance": lr_five_levels_balance,
    "lr-one-bit-small-fails": lr_one_bit_small_fails,
    "lr-fewer-bits-more-epochs": lr_fewer_bits_more_epochs,
    "lr-larger-models-closer": lr_larger_models_closer,
}


def evaluate(study: Study, ids: list[str]) -> list[Verdict]:
    out = []
    for cid in ids:
        if cid not in CLAIMS:
            out.append(Verdict(cid, "(unknown claim id)", "", "not tested", ""))
        else:
            out.append(CLAIMS[cid](study))
    return out
