"""``lowbit report DIR``: figures (PNG, matplotlib Agg), ``report.md`` and ``index.html``.

Everything lands in ``DIR/report/`` and reads without lowbit installed. The content is described
once, as a list of blocks (headings, paragraphs, tables, figures), and rendered to both Markdown
and HTML; headings are numbered in the order they appear. Sections, when the data has them:

* the paper claims: verdict, 95% interval over seeds, seeds, data, epochs as a share of the
  paper's (``lowbit.study.claims``), and which reading of the seed layers behaves as described;
* the linear-classifier property of MLPs (``diagnostics.linear_cosine``);
* epochs run against the paper's budget, and the best-validation epoch (plateau);
* ``curves-NNN-*.png``: per network, test accuracy (training dashed) and loss (log axis); with a
  validation split also validation against training accuracy and loss (overfitting);
* ``heatmap-NN-*.png``: MLP grids, final accuracy over depth x width per variant and its
  difference to fp32;
* ``bits-*.png``: accuracy against bits per weight per model, every quantized layer kind;
* ``size-*.png``: accuracy against packed model size (``lowbit.summary``'s .lowbit size when
  present at run time, else log2(N) bits per quantized weight + 4 bytes per other parameter),
  with the Pareto front; colour = variant, marker = network;
* ``stability.png`` (spread over seeds when there are several, largest epoch-to-epoch drop) and
  ``diagnostics*.png`` (zero-level share and flip ratio per epoch);
* every cell: mean ± std (n seeds).

File names carry an index and every setting that differs between networks, so a study varying
lr or optimizer never overwrites a figure.
"""

from __future__ import annotations

import html
import itertools
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.files import atomic_open, atomic_write
from lowbit.study.aggregate import Agg, Study, group_label, json_key, load_study
from lowbit.study.claims import FP32, Verdict, evaluate, reading_verdicts

DPI = 80
PLATEAU_GAIN = 0.5  # points of validation accuracy the last quarter of a run may still add


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _colors(variants: list[str]) -> dict[str, Any]:
    plt = _plt()
    fixed = {
        FP32: "black",
        "bitlinear8": "tab:blue",
        "mybitlinear": "tab:orange",
        "misborn": "tab:red",
        "ternary": "tab:green",
        "sign": "tab:purple",
        "ternary-median": "tab:olive",
    }
    # readings of the seed layers (``misborn/weight-ste``): colours no fixed kind uses
    # (``variants`` repeats a variant once per network and seed: colour each distinct one once)
    extra = itertools.cycle(
        ["tab:brown", "tab:pink", "tab:cyan", "tab:gray", "gold", "navy", "lime"]
    )
    for v in sorted({v for v in variants if "/" in v}):
        fixed[v] = next(extra)
    levels = sorted(int(v.split("-")[1]) for v in variants if v.startswith("nlevel-"))
    cmap = plt.get_cmap("viridis")
    for i, n in enumerate(levels):
        fixed[f"nlevel-{n}"] = cmap(i / max(1, len(levels) - 1) * 0.9)
    return fixed


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=DPI)
    _plt().close(fig)
    return path.name


def _band(ax: Any, curve: np.ndarray, color: Any, label: str | None, ls: str = "-") -> None:
    if not curve.size or not np.isfinite(curve).any():
        return
    x = np.arange(1, curve.shape[1] + 1)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(curve, axis=0)
            std = np.nanstd(curve, axis=0, ddof=1) if curve.shape[0] > 1 else np.zeros_like(mean)
    marker = "o" if len(x) < 8 and ls == "-" else None
    ax.plot(
        x, mean, color=color, label=label, lw=1.5 if ls == "-" else 1.0, ls=ls, marker=marker, ms=3
    )
    if curve.shape[0] > 1:
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, lw=0)


_LABELLED = {"dataset", "model", "depth", "width", "kernel_size", "augment", "activation"}


def _group_title(study: Study, cfg: dict[str, Any]) -> str:
    """``group_label`` plus every other setting that differs between the study's networks
    (lr, optimizer, batch size, ...), so two networks never share a title or a file name."""
    groups = [aggs[0].group_config for aggs in study.groups().values()]
    varying = sorted(
        k for k in cfg if k not in _LABELLED and len({json_key(g.get(k)) for g in groups}) > 1
    )
    extra = [f"{k} {cfg.get(k)}" for k in varying]
    return " / ".join([group_label(cfg), *extra])


def fig_curves(study: Study, out: Path) -> list[tuple[str, str]]:
    """Per network: test accuracy (with the training accuracy dashed) and test loss; with a
    validation split also train vs validation accuracy and loss (overfitting)."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    figs = []
    for k, aggs in enumerate(study.groups().values()):
        colors = _colors([a.variant for a in aggs])
        title = _group_title(study, aggs[0].group_config)
        has_val = any(np.isfinite(a.curves["val_acc"]).any() for a in aggs)
        rows = 2 if has_val else 1
        fig, axes = plt.subplots(rows, 2, figsize=(9, 3.4 * rows), squeeze=False)
        for a in sorted(aggs, key=lambda a: _vkey(a.variant)):
            lab, col = f"{a.variant} (n={a.n})", colors.get(a.variant)
            _band(axes[0, 0], a.curve_acc * 100, col, lab)
            _band(axes[0, 1], a.curve_loss, col, lab)
            if has_val:
                _band(axes[1, 0], a.curves["val_acc"] * 100, col, lab)
                _band(axes[1, 1], a.curves["val_loss"], col, lab)
                _band(axes[1, 0], a.curves["train_acc"] * 100, col, None, ls="--")
                _band(axes[1, 1], a.curves["train_loss"], col, None, ls="--")
            else:
                _band(axes[0, 0], a.curves["train_acc"] * 100, col, None, ls="--")
        for ax in axes.flat:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        acc_title = "test accuracy" + ("" if has_val else " (dashed: training)")
        axes[0, 0].set(xlabel="epoch", ylabel="accuracy (%)", title=acc_title)
        axes[0, 1].set(xlabel="epoch", ylabel="test loss (log)", title="test loss", yscale="log")
        if has_val:
            axes[1, 0].set(
                xlabel="epoch", ylabel="accuracy (%)", title="validation (dashed: training)"
            )
            axes[1, 1].set(
                xlabel="epoch",
                ylabel="loss (log)",
                title="validation loss (dashed: training)",
                yscale="log",
            )
        axes[0, 1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.suptitle(title, fontsize=10)
        figs.append((_save(fig, out / f"curves-{k + 1:03d}-{_slug(title)[:80]}.png"), title))
    return figs


def fig_heatmaps(study: Study, out: Path) -> list[tuple[str, str]]:
    plt = _plt()
    figs = []
    mlp = [a for a in study.aggs if a.group_config["model"] == "mlp"]
    sheets: dict[tuple, list[Agg]] = {}  # one figure per MLP set-up with depth and width removed
    for a in mlp:
        rest = {k: v for k, v in a.group_config.items() if k not in ("depth", "width")}
        sheets.setdefault(tuple(sorted((k, json_key(v)) for k, v in rest.items())), []).append(a)
    for sheet, sel in enumerate(sheets.values()):
        depths = sorted({a.group_config["depth"] for a in sel})
        widths = sorted({a.group_config["width"] for a in sel})
        variants = sorted({a.variant for a in sel}, key=lambda v: (v != FP32, v))
        if len(depths) * len(widths) < 2:
            continue
        grid = {v: np.full((len(depths), len(widths)), np.nan) for v in variants}
        for a in sel:
            i, j = depths.index(a.group_config["depth"]), widths.index(a.group_config["width"])
            grid[a.variant][i, j] = 100 * a.mean()
        base = grid.get(FP32)
        rows = 2 if base is not None and len(variants) > 1 else 1
        fig, axes = plt.subplots(
            rows,
            len(variants),
            figsize=(2.3 * len(variants) + 0.6, 2.3 * rows + 0.4),
            squeeze=False,
        )
        diffs = {v: grid[v] - base for v in variants if base is not None}
        finite = [np.abs(d[np.isfinite(d)]).max() for d in diffs.values() if np.isfinite(d).any()]
        lim = max([1.0, *finite])  # one symmetric scale for every difference panel
        for k, v in enumerate(variants):
            title = f"{v}\nfinal test acc (%)"
            _heat(fig, axes[0, k], grid[v], depths, widths, title, "viridis", (0, 100))
            if rows == 2:
                if v == FP32:
                    axes[1, k].axis("off")
                    continue
                title = f"{v} - fp32 (pt)"
                _heat(fig, axes[1, k], diffs[v], depths, widths, title, "RdBu", (-lim, lim))
        label = _group_title(study, sel[0].group_config).replace(
            f" / depth {sel[0].group_config['depth']} width {sel[0].group_config['width']}", ""
        )
        title = f"{label}: final test accuracy, depth x width"
        fig.suptitle(title, fontsize=10)
        name = f"heatmap-{sheet + 1:02d}-{_slug(label)[:80]}.png"
        figs.append((_save(fig, out / name), title))
    return figs


def _heat(fig, ax, data, depths, widths, title, cmap, lim) -> None:
    im = ax.imshow(data, cmap=cmap, vmin=lim[0], vmax=lim[1], aspect="auto", origin="lower")
    ax.set_xticks(
        range(len(widths)), [str(w) for w in widths], rotation=45 if len(widths) > 3 else 0
    )
    ax.set_yticks(range(len(depths)), [str(d) for d in depths])
    ax.set(xlabel="width", ylabel="depth", title=title)
    ax.grid(False)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            v = data[i, j]
            if not np.isfinite(v):
                continue
            # white text on the dark ends of each colormap, black elsewhere
            dark = v < 45 if cmap == "viridis" else abs(v) > 0.6 * lim[1]
            txt = f"{v:.0f}" if abs(v) >= 10 else f"{v:.1f}"
            ax.text(
                j, i, txt, ha="center", va="center", fontsize=7, color="white" if dark else "black"
            )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


def fig_bits(study: Study, out: Path) -> list[tuple[str, str]]:
    """Accuracy against bits per weight, per model family: ``nlevel`` as a line over N, every
    other quantized layer kind as its own marker at its bits, fp32 as a dashed line."""
    plt = _plt()
    figs = []
    quant = [a for a in study.aggs if a.levels is not None]
    if not quant:
        return figs
    markers = dict(
        zip(
            sorted({a.variant for a in quant if not a.variant.startswith("nlevel")}),
            "s^vD<>phX*d" * 4,
            strict=False,
        )
    )
    for ds in sorted({a.group_config["dataset"] for a in study.aggs}):
        sel = [a for a in study.aggs if a.group_config["dataset"] == ds]
        fams = sorted({_family(a) for a in sel if a.levels is not None})
        if not fams:
            continue
        fig, axes = plt.subplots(
            1, len(fams), figsize=(max(5.5, 3.8 * len(fams)), 3.6), squeeze=False
        )
        for ax, fam in zip(axes[0], fams, strict=True):
            for aug, color in ((False, "tab:blue"), (True, "tab:red")):
                pts = [
                    a for a in sel if _family(a) == fam and bool(a.group_config["augment"]) == aug
                ]
                tag = " augmented" if aug else ""
                line = sorted(
                    (a for a in pts if a.variant.startswith("nlevel")), key=lambda a: a.bits
                )
                if line:
                    ax.errorbar(
                        [a.bits for a in line],
                        [100 * a.mean() for a in line],
                        yerr=[100 * np.nan_to_num(a.std()) for a in line],
                        color=color,
                        marker="o",
                        ms=4,
                        capsize=2,
                        label=f"nlevel{tag}",
                    )
                    for a in line:
                        ax.annotate(
                            str(a.levels),
                            (a.bits, 100 * a.mean()),
                            fontsize=6,
                            xytext=(2, 3),
                            textcoords="offset points",
                        )
                for a in pts:
                    if a.levels is not None and not a.variant.startswith("nlevel"):
                        ax.errorbar(
                            [a.bits],
                            [100 * a.mean()],
                            yerr=[100 * np.nan_to_num(a.std())],
                            color=color,
                            marker=markers[a.variant],
                            ms=6,
                            capsize=2,
                            ls="none",
                            mfc="none",
                            label=f"{a.variant}{tag}",
                        )
                fp = [a for a in pts if a.levels is None and a.variant == FP32]
                if fp:
                    ax.axhline(100 * fp[0].mean(), color=color, ls="--", lw=1, label=f"fp32{tag}")
            ax.set(
                xlabel="bits per weight (log2 N; labels: N)",
                ylabel="final test accuracy (%)",
                title=fam,
            )
            ax.legend(fontsize=6, loc="best")
        title = f"{ds}: accuracy against bits per weight"
        fig.suptitle(title, fontsize=10)
        figs.append((_save(fig, out / f"bits-{_slug(title)}.png"), title))
    return figs


def _family(a: Agg) -> str:
    c = a.group_config
    fam = c["model"]
    if c.get("depth") is not None:
        fam += f" d{c['depth']} w{c['width']}"
    if c.get("activation") == "relu" and c["model"] == "mlp":
        fam += " relu"
    if c.get("kernel_size") not in (None, 3):
        fam += f" {c['kernel_size']}x{c['kernel_size']}"
    return fam


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both smaller size and higher accuracy, by size."""
    front, best = [], -math.inf
    for s, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((s, acc))
            best = acc
    return front


def fig_size(study: Study, out: Path) -> list[tuple[str, str]]:
    plt = _plt()
    figs = []
    for ds in sorted({a.group_config["dataset"] for a in study.aggs}):
        for aug in sorted({a.group_config["augment"] for a in study.aggs}):
            sel = [
                a
                for a in study.aggs
                if a.group_config["dataset"] == ds
                and a.group_config["augment"] == aug
                and a.size_bytes
                and math.isfinite(a.mean())
            ]
            if len(sel) < 2:
                continue
            colors = _colors([a.variant for a in sel])
            fams = sorted({_family(a) for a in sel})
            markers = dict(zip(fams, "os^vD<>ph*Xd" * 10, strict=False))
            fig, ax = plt.subplots(figsize=(7.5, 4))
            for a in sel:
                ax.scatter(
                    a.size_bytes,
                    100 * a.mean(),
                    color=colors.get(a.variant),
                    marker=markers[_family(a)],
                    s=22,
                    alpha=0.85,
                )
            # the legend: colour = layer variant (round swatches), marker = network (grey)
            for v in sorted({a.variant for a in sel}, key=_vkey):
                ax.scatter([], [], color=colors.get(v), marker="o", s=22, label=v)
            front = pareto([(a.size_bytes, 100 * a.mean()) for a in sel])
            ax.step(
                [p[0] for p in front],
                [p[1] for p in front],
                where="post",
                color="gray",
                lw=1,
                ls="--",
                label="Pareto front",
            )
            for f in fams:
                ax.scatter([], [], color="gray", marker=markers[f], label=f)
            ax.set(
                xscale="log",
                xlabel="packed model size (bytes, log scale)",
                ylabel="final test accuracy (%)",
            )
            method = sorted({a.size_method for a in sel if a.size_method})
            aug_txt = " / augmented" if aug else ""
            title = f"{ds}{aug_txt}: accuracy against packed size ({', '.join(method)})"
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
            figs.append((_save(fig, out / f"size-{_slug(ds)}{'-aug' if aug else ''}.png"), title))
    return figs


def fig_stability(study: Study, out: Path) -> list[tuple[str, str]]:
    plt = _plt()
    figs = []
    keys = sorted(
        {(a.variant, a.group_config["augment"]) for a in study.aggs},
        key=lambda k: (k[1], k[0] != FP32, _vkey(k[0])),
    )
    if not keys:
        return figs
    labels = [f"{v}{' +aug' if aug else ''}" for v, aug in keys]
    std = [
        np.nanmean(
            [100 * a.std() for a in study.aggs if (a.variant, a.group_config["augment"]) == k]
            or [np.nan]
        )
        for k in keys
    ]
    drop = [
        np.nanmean(
            [
                100 * a.mean("max_drop")
                for a in study.aggs
                if (a.variant, a.group_config["augment"]) == k
            ]
        )
        for k in keys
    ]
    spread = any(a.n > 1 for a in study.aggs)  # one seed: no spread to show, no empty panel
    fig, axes = plt.subplots(
        1, 1 + spread, figsize=(max(4 + 3 * spread, 0.45 * len(keys) + 3), 3.6), squeeze=False
    )
    x = np.arange(len(keys))
    if spread:
        axes[0, 0].bar(x, np.nan_to_num(std), color="tab:blue")
        axes[0, 0].set(ylabel="std of final accuracy over seeds (pt)", title="spread over seeds")
    axes[0, -1].bar(x, drop, color="tab:red")
    axes[0, -1].set(ylabel="largest epoch-to-epoch drop (pt)", title="fluctuation")
    for ax in axes[0]:
        ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
    figs.append((_save(fig, out / "stability.png"), "Stability per layer variant"))

    for aug in sorted({a.group_config["augment"] for a in study.aggs}):
        sel = [
            a
            for a in study.aggs
            if a.group_config["augment"] == aug and any(v is not None for v in a.flip_ratio)
        ]
        if not sel:
            continue
        colors = _colors([a.variant for a in sel])
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
        for v in sorted({a.variant for a in sel}, key=_vkey):
            rows = [a for a in sel if a.variant == v]
            for key, ax in (("zero_share", ax1), ("flip_ratio", ax2)):
                curves = [[np.nan if x is None else x for x in getattr(a, key)] for a in rows]
                if not any(np.isfinite(c).any() for c in curves if c):
                    continue
                n = max(len(c) for c in curves)
                arr = np.array([c + [np.nan] * (n - len(c)) for c in curves])
                with np.errstate(all="ignore"):
                    import warnings

                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)
                        m = np.nanmean(arr, axis=0)
                ax.plot(np.arange(1, n + 1), 100 * m, color=colors.get(v), label=v, lw=1.3)
        ax1.set(xlabel="epoch", ylabel="weights at level 0 (%)", title="zero share (odd N only)")
        ax2.set(
            xlabel="epoch",
            ylabel="codes changed in the epoch (%)",
            title="flip ratio",
            yscale="log",
        )
        ax2.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        setting = "augmented" if aug else "no augmentation"
        title = f"Quantized-weight diagnostics ({setting}; mean over networks, seeds, layers)"
        fig.suptitle(title, fontsize=9)
        figs.append((_save(fig, out / f"diagnostics{'-aug' if aug else ''}.png"), title))
    return figs


def _vkey(v: str) -> tuple:
    if v.startswith("nlevel-"):
        return (1, int(v.split("-")[1]), v)
    return (0 if v == FP32 else 2, 0, v)


def _num(x: float, digits: int = 3) -> str:
    """A number of any size in ``digits`` significant figures (losses reach 1e6 and more)."""
    if not math.isfinite(x):
        return "n/a"
    return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:.{digits - 1}e}"


def _fmt(a: Agg, key: str = "final_acc", scale: float = 100.0, digits: int = 1) -> str:
    m, s = a.mean(key), a.std(key)
    if not math.isfinite(m):
        return "n/a"
    out = f"{scale * m:.{digits}f}"
    return out + (f" ± {scale * s:.{digits}f}" if math.isfinite(s) else "")


def _fmt_loss(a: Agg) -> str:
    m, s = a.mean("final_loss"), a.std("final_loss")
    return _num(m) + (f" ± {_num(s, 2)}" if math.isfinite(s) else "")


def _table(study: Study) -> tuple[list[str], list[list[str]]]:
    head = [
        "network",
        "variant",
        "n",
        "test acc (%)",
        "test loss",
        "max drop (pt)",
        "diverged",
        "size (bytes)",
    ]
    rows = []
    for _, aggs in study.groups().items():
        for a in sorted(aggs, key=lambda a: _vkey(a.variant)):
            rows.append(
                [
                    _group_title(study, a.group_config),
                    a.variant,
                    str(a.n),
                    _fmt(a),
                    _fmt_loss(a),
                    _fmt(a, "max_drop"),
                    str(a.diverged),
                    f"{a.size_bytes:,.0f}" if a.size_bytes else "n/a",
                ]
            )
    return head, rows


# --- the content, once; rendered to Markdown and HTML ------------------------------------------
#
# A report is a list of blocks: ("h", title) numbered in order, ("p", text), ("ul", [items]),
# ("table", head, rows) and ("fig", file, caption). "**x**" marks bold in any text.


def _md(blocks: list[tuple]) -> str:
    out = []
    for b in blocks:
        if b[0] == "title":
            out += [f"# {b[1]}", ""]
        elif b[0] == "h":
            out += [f"## {b[1]}", ""]
        elif b[0] == "p":
            out += [b[1], ""]
        elif b[0] == "ul":
            out += [f"- {x}" for x in b[1]] + [""]
        elif b[0] == "table":
            cells = [[c.replace("|", "\\|") for c in r] for r in b[2]]
            out += ["| " + " | ".join(b[1]) + " |", "|" + "---|" * len(b[1])]
            out += ["| " + " | ".join(r) + " |" for r in cells] + [""]
        elif b[0] == "fig":
            out += [f"![{b[2]}]({b[1]})", ""]
    return "\n".join(out) + "\n"


def _inline(text: str) -> str:
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))


def _html(blocks: list[tuple], name: str) -> str:
    body = []
    for b in blocks:
        if b[0] == "title":
            body.append(f"<h1>{_inline(b[1])}</h1>")
        elif b[0] == "h":
            body.append(f"<h2>{_inline(b[1])}</h2>")
        elif b[0] == "p":
            body.append(f"<p>{_inline(b[1])}</p>")
        elif b[0] == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in b[1]) + "</ul>")
        elif b[0] == "table":
            h = "".join(f"<th>{_inline(c)}</th>" for c in b[1])
            rows = "".join(
                "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in b[2]
            )
            body.append(f"<table><tr>{h}</tr>{rows}</table>")
        elif b[0] == "fig":
            body.append(
                f'<figure><img src="{html.escape(b[1])}" alt="{html.escape(b[2])}">'
                f"<figcaption>{html.escape(b[2])}</figcaption></figure>"
            )
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:auto}"
        "table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:2px 6px;vertical-align:top}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(name)} report"
        f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


def _numbered(blocks: list[tuple]) -> list[tuple]:
    """Number the section headings 1, 2, 3, ... in the order they appear."""
    out, k = [], 0
    for b in blocks:
        if b[0] == "h":
            k += 1
            b = ("h", f"{k}. {b[1]}")
        out.append(b)
    return out


def _last_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[-1] if lines else ""


STATISTICS = (
    "Verdicts: each claim is tested on one number per seed (arms paired by seed), with the 95% "
    "**Student t interval** of its mean over seeds. **supported**: every interval lies above its "
    "threshold; **contradicted**: an interval lies below it; **inconclusive**: an interval "
    "contains it (a tie is never supported), fewer than 3 seeds, an fp32 baseline not clearly "
    "above chance (lower bound not 5 points above), or the claim's networks are absent."
)


def _verdict_rows(verdicts: list[Verdict]) -> list[list[str]]:
    return [
        [
            v.claim,
            v.criterion,
            f"**{v.verdict}**" + (f" ({v.reason})" if v.reason else ""),
            v.interval or v.evidence,
            str(v.seeds),
            v.data,
            v.epochs,
        ]
        for v in verdicts
    ]


VERDICT_HEAD = ["claim", "criterion here", "verdict", "interval (95%, over seeds)", "seeds"]
VERDICT_HEAD += ["data", "epochs"]


def _linearity(study: Study) -> list[tuple]:
    rows = []
    for act in ("study", "relu"):
        sel = [
            a
            for a in study.aggs
            if a.group_config.get("activation") == act
            and any(c is not None for c in a.final_linear_cos)
        ]
        for v in sorted({a.variant for a in sel}, key=_vkey):
            vals = [c for a in sel if a.variant == v for c in a.final_linear_cos if c is not None]
            accs = [x for a in sel if a.variant == v for x in a.by_seed().values()]
            rule = "paper's (ReLU after fp32 only)" if act == "study" else "ReLU everywhere"
            rows.append(
                [
                    rule,
                    v,
                    f"{np.mean(vals):.5f}",
                    f"{np.min(vals):.5f}",
                    f"{100 * np.mean(accs):.1f}" if accs else "n/a",
                    str(len(vals)),
                ]
            )
    if not rows:
        return []
    return [
        ("h", "Linear-classifier property"),
        (
            "p",
            "Cosine between each MLP's logits and the affine map A x + c built from its layers' "
            "effective (quantized) weights with every non-linearity left out (mean over the first "
            "1,000 test images, final epoch). 1.00000 means the network is a linear classifier: "
            "depth adds no capacity. Under the paper's rule, ReLU follows only fp32 layers, so "
            "its quantized MLPs are linear; the ReLU-everywhere arm is the control.",
        ),
        (
            "table",
            ["activation rule", "variant", "mean cosine", "lowest", "mean acc (%)", "runs"],
            rows,
        ),
    ]


def _at_plateau(a: Agg, i: int) -> bool | None:
    """Whether seed ``i`` of ``a`` ended at its validation plateau (see ``_epochs_table``);
    None under an annealed learning rate, where one run cannot tell."""
    if a.group_config.get("lr_schedule", "constant") not in (None, "constant"):
        return None
    if a.group_config.get("patience") and a.epochs[i] < a.group_config["epochs"]:
        return True  # early stopping ended it: its patience ran out
    gain = a.late_val_gain[i]
    return gain is not None and gain < PLATEAU_GAIN


def _epochs_table(study: Study) -> list[tuple]:
    from lowbit.study.claims import BIN, BINARY_MODELS, LR, SVL

    rows = []
    by_model: dict[tuple, list[Agg]] = {}
    for a in study.aggs:
        key = (a.group_config["model"], bool(a.group_config.get("augment")))
        by_model.setdefault(key, []).append(a)
    for (model, aug), aggs in sorted(by_model.items()):
        paper = SVL if model == "mlp" else BIN if model in BINARY_MODELS else LR
        ran = [e for a in aggs for e in a.epochs]
        want = sorted({paper.epochs(a.group_config) for a in aggs})
        best = [b for a in aggs for b in a.best_val_epoch if b is not None]
        gains = [g for a in aggs for g in a.late_val_gain if g is not None]
        judged = [_at_plateau(a, i) for a in aggs for i in range(len(a.seeds))]
        settled = [p for p in judged if p is not None]
        annealed = len(judged) - len(settled)
        share = [e / paper.epochs(a.group_config) for a in aggs for e in a.epochs]
        rows.append(
            [
                model + (" +aug" if aug else ""),
                f"{min(ran)}-{max(ran)}" if min(ran) != max(ran) else str(ran[0]),
                "-".join(map(str, (want[0], want[-1]))) if len(want) > 1 else str(want[0]),
                f"{100 * min(share):.0f}-{100 * max(share):.0f}%"
                if round(100 * min(share)) != round(100 * max(share))
                else f"{100 * share[0]:.0f}%",
                f"{np.median(best):.0f} (of {max(ran)})" if best else "no validation split",
                f"{np.median(gains):+.2f} [{max(gains):+.2f}]" if gains else "-",
                (f"{sum(settled)}/{len(settled)}" if settled else "")
                + ("; " if settled and annealed else "")
                + (f"{annealed} annealed" if annealed else ""),
                str(len(ran)),
            ]
        )
    if not rows:
        return []
    return [
        ("h", "Epochs run against the paper's budget, and the validation plateau"),
        (
            "table",
            [
                "model",
                "epochs run",
                "paper's epochs",
                "share",
                "median best-val epoch",
                "last-quarter val gain (pt), median [max]",
                "runs at plateau",
                "runs",
            ],
            rows,
        ),
        (
            "p",
            "Best-val epoch: the epoch of the highest validation accuracy (median over runs). "
            "Last-quarter val gain: the last epoch's validation accuracy minus the best of the "
            "first three quarters of the epochs. At a constant learning rate a run is at its "
            f"plateau when that gain is below {PLATEAU_GAIN:g} point (the last quarter of its "
            "budget added almost nothing), or when early stopping ended it (no better validation "
            "accuracy for its patience's epochs). Under an annealed rate (lr_schedule cosine) "
            "the last quarter is where the rate falls to ~0 and the network settles, so a gain "
            "there is expected and says nothing about a longer budget: those runs are counted "
            "as annealed, and their plateau is read across budgets (the same cells trained "
            "longer).",
        ),
    ]


_FIGURE_PREFIXES = ("curves-", "heatmap-", "bits-", "size-", "stability", "diagnostics")


def _remove_stale_figures(rep: Path, current: set[str]) -> None:
    """Delete the figures an earlier rendering left in ``rep`` that this one did not write (a
    group renamed, a network gone); files of other names are not the report's and stay."""
    for f in rep.glob("*.png"):
        if f.name not in current and f.name.startswith(_FIGURE_PREFIXES):
            f.unlink()


def write_report(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Render ``out_dir/report/``; returns the paths written (``index``, ``markdown``,
    ``figures``) and the claims' verdicts. Figures of an earlier rendering that this one does
    not draw are removed."""
    study = load_study(out_dir)
    rep = Path(out_dir) / "report"
    rep.mkdir(parents=True, exist_ok=True)
    import warnings

    # means over seeds of cells with a single (or no) finite value are NaN by design: no warning
    warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
    warnings.filterwarnings("ignore", "Degrees of freedom", RuntimeWarning)
    figures = [
        ("Learning curves (mean over seeds, band = ±1 std)", fig_curves(study, rep)),
        ("Final accuracy over depth x width, and difference to fp32", fig_heatmaps(study, rep)),
        ("Accuracy against bits per weight", fig_bits(study, rep)),
        ("Accuracy against packed model size, with the Pareto front", fig_size(study, rep)),
        (
            "Stability: spread over seeds, fluctuation, zero share and flip ratio",
            fig_stability(study, rep),
        ),
    ]
    _remove_stale_figures(rep, {Path(f).name for _, figs in figures for f, _ in figs})
    verdicts = evaluate(study, study.meta.get("claims", []))
    readings = reading_verdicts(study)
    meta = study.meta
    statuses: dict[str, int] = {}
    for r in study.runs:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    versions = sorted(
        {
            (r["lowbit_version"], r["git_rev"], r["torch_version"], r["python_version"], r["host"])
            for r in study.runs
            if r["lowbit_version"]
        },
        key=lambda v: tuple(str(x or "") for x in v),  # a run outside git has no git_rev
    )
    devices = sorted({r.get("device") or "cpu" for r in study.runs if r["lowbit_version"]})
    wall = [r["ended"] - r["started"] for r in study.runs if r["ended"] and r["started"]]
    info = [
        f"Study: **{meta.get('name', '?')}**{' (--quick)' if meta.get('quick') else ''} — "
        f"{meta.get('title', '')}",
        f"Spec: `{meta.get('source', '')}`; database `{Path(out_dir) / 'results.sqlite'}`; "
        f"generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "Runs: "
        + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
        + f"; training time summed over runs {sum(wall) / 60:.1f} min; devices: "
        + (", ".join(devices) or "n/a")
        + ".",
        "Versions (lowbit, git, torch, python, host): "
        + "; ".join(", ".join(str(x) for x in v) for v in versions[:3])
        + (" ..." if len(versions) > 3 else ""),
    ]
    info += [f"Note: {n}" for n in meta.get("notes", [])]
    blocks: list[tuple] = [("title", f"Study report: {meta.get('name', '')}"), ("ul", info)]
    blocks += [("h", "Paper claims and what this run shows"), ("p", STATISTICS)]
    if verdicts:
        blocks.append(("table", VERDICT_HEAD, _verdict_rows(verdicts)))
        blocks.append(("ul", [f"{v.id}: {v.evidence}" for v in verdicts]))
    else:
        blocks.append(("p", "(the spec lists no claims)"))
    if readings:
        blocks += [
            ("h", "Which reading of the seed layers behaves as the paper describes"),
            (
                "p",
                "mybitlinear and myLittleMisborn were never published; each reading of their "
                "one-paragraph descriptions ran as an arm. **supported** = that reading "
                "reproduces the behaviour the paper describes; if no reading is supported, none "
                "does (on this data and budget).",
            ),
            ("table", VERDICT_HEAD, _verdict_rows(readings)),
        ]
    blocks += _linearity(study)
    blocks += _epochs_table(study)
    for title, figs in figures:
        if figs:
            blocks += [("h", title)] + [("fig", f, t) for f, t in figs]
    head, rows = _table(study)
    blocks += [("h", "Every cell: mean ± std over seeds (n seeds)"), ("table", head, rows)]
    if study.failed:
        blocks += [("h", "Failed runs")]
        blocks.append(
            (
                "ul",
                [f"`{r['run_id']}` {r['config']}: {_last_line(r['error'])}" for r in study.failed],
            )
        )
    pending = len(study.incomplete) - len(study.failed)
    if pending > 0:
        blocks.append(
            (
                "p",
                f"{pending} runs are not finished (pending or running); re-run the study to "
                "complete them.",
            )
        )
    blocks = _numbered(blocks)
    atomic_write(rep / "report.md", _md(blocks))
    atomic_write(rep / "index.html", _html(blocks, str(meta.get("name", "study"))))
    return {
        "index": str(rep / "index.html"),
        "markdown": str(rep / "report.md"),
        "figures": [str(rep / f) for _, figs in figures for f, _ in figs],
        "claims": [v.__dict__ for v in verdicts],
        "readings": [v.__dict__ for v in readings],
    }
