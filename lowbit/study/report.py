"""``lowbit report DIR``: figures (PNG, matplotlib Agg), ``report.md`` and ``index.html``.

Everything lands in ``DIR/report/`` and reads without lowbit installed. Figures:

1. ``curves-*.png``   per network (group): test accuracy and test loss (log axis) per epoch, one
                      line per layer variant, mean over seeds with a ±1 std band.
2. ``heatmap-*.png``  MLP grids: final test accuracy over depth x width per layer variant, and
                      its difference to fp32 ``linear``.
3. ``bits-*.png``     accuracy against bits per weight (log2 N) per model, with and without
                      augmentation; fp32 as a dashed reference line.
4. ``size-*.png``     accuracy against packed model size (bytes; ``lowbit.summary``'s .lowbit
                      file size when that module was present at run time, else log2(N) bits per
                      quantized weight + 4 bytes per other parameter; the run table says which),
                      with the Pareto front.
5. ``stability.png``  std over seeds and the largest epoch-to-epoch accuracy drop per variant;
   ``diagnostics-*.png`` zero-level share and flip ratio per epoch.
6. Tables (in the markdown/HTML): mean ± std (n) for every cell, and the paper claims with the
   verdict this run gives.
"""

from __future__ import annotations

import html
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.files import atomic_open, atomic_write
from lowbit.study.aggregate import Agg, Study, group_label, load_study
from lowbit.study.claims import evaluate

DPI = 80


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
        "linear (fp32)": "black",
        "bitlinear8": "tab:blue",
        "mybitlinear": "tab:orange",
        "misborn": "tab:red",
        "ternary": "tab:green",
        "sign": "tab:purple",
        "ternary-median": "tab:olive",
    }
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


def _band(ax: Any, curve: np.ndarray, color: Any, label: str) -> None:
    x = np.arange(1, curve.shape[1] + 1)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(curve, axis=0)
            std = np.nanstd(curve, axis=0, ddof=1) if curve.shape[0] > 1 else np.zeros_like(mean)
    ax.plot(x, mean, color=color, label=label, lw=1.5, marker="o" if len(x) < 8 else None, ms=3)
    if curve.shape[0] > 1:
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, lw=0)


def fig_curves(study: Study, out: Path) -> list[tuple[str, str]]:
    plt = _plt()
    figs = []
    for _, aggs in study.groups().items():
        colors = _colors([a.variant for a in aggs])
        cfg = aggs[0].group_config
        title = group_label(cfg)
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
        for a in aggs:
            lab = f"{a.variant} (n={a.n})"
            _band(ax1, a.curve_acc * 100, colors.get(a.variant), lab)
            _band(ax2, a.curve_loss, colors.get(a.variant), lab)
        from matplotlib.ticker import MaxNLocator

        for ax in (ax1, ax2):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax1.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
        ax2.set(xlabel="epoch", ylabel="test loss (log scale)", title="test loss", yscale="log")
        ax2.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.suptitle(title, fontsize=10)
        figs.append((_save(fig, out / f"curves-{_slug(title)}.png"), title))
    return figs


def fig_heatmaps(study: Study, out: Path) -> list[tuple[str, str]]:
    plt = _plt()
    figs = []
    mlp = [a for a in study.aggs if a.group_config["model"] == "mlp"]
    for ds in sorted({a.group_config["dataset"] for a in mlp}):
        for aug in sorted({a.group_config["augment"] for a in mlp}):
            sel = [
                a
                for a in mlp
                if a.group_config["dataset"] == ds and a.group_config["augment"] == aug
            ]
            depths = sorted({a.group_config["depth"] for a in sel})
            widths = sorted({a.group_config["width"] for a in sel})
            variants = sorted({a.variant for a in sel}, key=lambda v: (v != "linear (fp32)", v))
            if len(depths) * len(widths) < 2:
                continue
            grid = {v: np.full((len(depths), len(widths)), np.nan) for v in variants}
            for a in sel:
                i, j = depths.index(a.group_config["depth"]), widths.index(a.group_config["width"])
                grid[a.variant][i, j] = 100 * a.mean()
            base = grid.get("linear (fp32)")
            rows = 2 if base is not None and len(variants) > 1 else 1
            fig, axes = plt.subplots(
                rows,
                len(variants),
                figsize=(2.3 * len(variants) + 0.6, 2.3 * rows + 0.4),
                squeeze=False,
            )
            diffs = {v: grid[v] - base for v in variants if base is not None}
            finite = [
                np.abs(d[np.isfinite(d)]).max() for d in diffs.values() if np.isfinite(d).any()
            ]
            lim = max([1.0, *finite])  # one symmetric scale for every difference panel
            for k, v in enumerate(variants):
                title = f"{v}\nfinal test acc (%)"
                _heat(fig, axes[0, k], grid[v], depths, widths, title, "viridis", (0, 100))
                if rows == 2:
                    if v == "linear (fp32)":
                        axes[1, k].axis("off")
                        continue
                    title = f"{v} - fp32 (pt)"
                    _heat(fig, axes[1, k], diffs[v], depths, widths, title, "RdBu", (-lim, lim))
            title = f"{ds}{' / augmented' if aug else ''}: final test accuracy, depth x width"
            fig.suptitle(title, fontsize=10)
            figs.append((_save(fig, out / f"heatmap-{_slug(title)}.png"), title))
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
    plt = _plt()
    figs = []
    aggs = [a for a in study.aggs if a.variant.startswith("nlevel") or a.variant == "linear (fp32)"]
    if not any(a.variant.startswith("nlevel") for a in aggs):
        return figs
    for ds in sorted({a.group_config["dataset"] for a in aggs}):
        sel = [a for a in aggs if a.group_config["dataset"] == ds]
        fams = sorted({_family(a) for a in sel if a.variant.startswith("nlevel")})
        fig, axes = plt.subplots(
            1, len(fams), figsize=(max(5.5, 3.6 * len(fams)), 3.4), squeeze=False
        )
        for ax, fam in zip(axes[0], fams, strict=True):
            for aug, color in ((False, "tab:blue"), (True, "tab:red")):
                pts = sorted(
                    (a for a in sel if _family(a) == fam and a.group_config["augment"] == aug),
                    key=lambda a: a.bits,
                )
                q = [a for a in pts if a.levels is not None]
                if q:
                    ax.errorbar(
                        [a.bits for a in q],
                        [100 * a.mean() for a in q],
                        yerr=[100 * np.nan_to_num(a.std()) for a in q],
                        color=color,
                        marker="o",
                        ms=4,
                        capsize=2,
                        label="augmented" if aug else "no augmentation",
                    )
                    for a in q:
                        ax.annotate(
                            str(a.levels),
                            (a.bits, 100 * a.mean()),
                            fontsize=6,
                            xytext=(2, 3),
                            textcoords="offset points",
                        )
                fp = [a for a in pts if a.levels is None]
                if fp:
                    ax.axhline(
                        100 * fp[0].mean(),
                        color=color,
                        ls="--",
                        lw=1,
                        label=f"fp32{' augmented' if aug else ''}",
                    )
            ax.set(
                xlabel="bits per weight (log2 N; labels: N)",
                ylabel="final test accuracy (%)",
                title=fam,
            )
            ax.legend(fontsize=7)
        title = f"{ds}: accuracy against bits per weight"
        fig.suptitle(title, fontsize=10)
        figs.append((_save(fig, out / f"bits-{_slug(title)}.png"), title))
    return figs


def _family(a: Agg) -> str:
    c = a.group_config
    fam = c["model"]
    if c.get("depth") is not None:
        fam += f" d{c['depth']} w{c['width']}"
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
            seen = set()
            for a in sel:
                lab = a.variant if a.variant not in seen else None
                seen.add(a.variant)
                ax.scatter(
                    a.size_bytes,
                    100 * a.mean(),
                    color=colors.get(a.variant),
                    marker=markers[_family(a)],
                    s=22,
                    label=lab,
                    alpha=0.85,
                )
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
            if len(fams) > 1:
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
        key=lambda k: (k[1], k[0] != "linear (fp32)", _vkey(k[0])),
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
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(7, 0.45 * len(keys) + 3), 3.6))
    x = np.arange(len(keys))
    ax1.bar(x, np.nan_to_num(std), color="tab:blue")
    ax1.set(
        ylabel="std of final accuracy over seeds (pt)",
        title="spread over seeds",
    )
    ax2.bar(x, drop, color="tab:red")
    ax2.set(
        ylabel="largest epoch-to-epoch drop (pt)",
        title="fluctuation",
    )
    for ax in (ax1, ax2):
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
    return (0 if v == "linear (fp32)" else 2, 0, v)


def _fmt(a: Agg, key: str = "final_acc", scale: float = 100.0, digits: int = 1) -> str:
    m, s = a.mean(key), a.std(key)
    if not math.isfinite(m):
        return "n/a"
    out = f"{scale * m:.{digits}f}"
    return out + (f" ± {scale * s:.{digits}f}" if math.isfinite(s) else "")


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
                    group_label(a.group_config),
                    a.variant,
                    str(a.n),
                    _fmt(a),
                    _fmt(a, "final_loss", 1.0, 3),
                    _fmt(a, "max_drop"),
                    str(a.diverged),
                    f"{a.size_bytes:,.0f}" if a.size_bytes else "n/a",
                ]
            )
    return head, rows


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><tr>{h}</tr>{body}</table>"


def _last_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[-1] if lines else ""


def write_report(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Render ``out_dir/report/``; returns the paths written (``index``, ``markdown``,
    ``figures``) and the claims' verdicts."""
    study = load_study(out_dir)
    rep = Path(out_dir) / "report"
    rep.mkdir(parents=True, exist_ok=True)
    import warnings

    # means over seeds of cells with a single (or no) finite value are NaN by design: no warning
    warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
    warnings.filterwarnings("ignore", "Degrees of freedom", RuntimeWarning)
    sections: list[tuple[str, list[tuple[str, str]]]] = [
        ("1. Learning curves (mean over seeds, band = ±1 std)", fig_curves(study, rep)),
        ("2. Final accuracy over depth x width, and difference to fp32", fig_heatmaps(study, rep)),
        ("3. Accuracy against bits per weight", fig_bits(study, rep)),
        ("4. Accuracy against packed model size, with the Pareto front", fig_size(study, rep)),
        (
            "5. Stability: spread over seeds, fluctuation, zero share and flip ratio",
            fig_stability(study, rep),
        ),
    ]
    verdicts = evaluate(study, study.meta.get("claims", []))
    head, rows = _table(study)
    meta = study.meta
    statuses: dict[str, int] = {}
    for r in study.runs:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    versions = sorted(
        {
            (r["lowbit_version"], r["git_rev"], r["torch_version"], r["python_version"], r["host"])
            for r in study.runs
            if r["lowbit_version"]
        }
    )
    wall = [r["ended"] - r["started"] for r in study.runs if r["ended"] and r["started"]]
    info = [
        f"Study: **{meta.get('name', '?')}**{' (--quick)' if meta.get('quick') else ''} — "
        f"{meta.get('title', '')}",
        f"Spec: `{meta.get('source', '')}`; database `{Path(out_dir) / 'results.sqlite'}`; "
        f"generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "Runs: "
        + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
        + f"; training time summed over runs {sum(wall) / 60:.1f} min.",
        "Versions (lowbit, git, torch, python, host): "
        + "; ".join(", ".join(str(x) for x in v) for v in versions[:3])
        + (" ..." if len(versions) > 3 else ""),
    ]
    info += [f"Note: {n}" for n in meta.get("notes", [])]
    md = [f"# Study report: {meta.get('name', '')}", "", *[f"- {x}" for x in info], ""]
    md += ["## 6. Paper claims and what this run shows", ""]
    md += (
        [
            _md_table(
                ["claim", "criterion here", "verdict", "numbers"],
                [[v.claim, v.criterion, f"**{v.verdict}**", v.evidence] for v in verdicts],
            )
        ]
        if verdicts
        else ["(the spec lists no claims)"]
    )
    md += [""]
    for title, figs in sections:
        if figs:
            md += [f"## {title}", ""] + [f"![{t}]({f})" for f, t in figs] + [""]
    md += ["## 6. Every cell: mean ± std over seeds (n seeds)", "", _md_table(head, rows), ""]
    if study.failed:
        md += ["## Failed runs", ""]
        md += [f"- `{r['run_id']}` {r['config']}: {_last_line(r['error'])}" for r in study.failed]
    if study.incomplete and len(study.incomplete) > len(study.failed):
        md += [
            "",
            f"{len(study.incomplete) - len(study.failed)} runs are not finished (pending or "
            "running); re-run the study to complete them.",
        ]
    md_text = "\n".join(md) + "\n"
    atomic_write(rep / "report.md", md_text)

    body = [f"<h1>Study report: {html.escape(str(meta.get('name', '')))}</h1><ul>"]
    body += [f"<li>{html.escape(x).replace('**', '')}</li>" for x in info] + ["</ul>"]
    if verdicts:
        body += [
            "<h2>6. Paper claims and what this run shows</h2>",
            _html_table(
                ["claim", "criterion here", "verdict", "numbers"],
                [[v.claim, v.criterion, v.verdict, v.evidence] for v in verdicts],
            ),
        ]
    for title, figs in sections:
        if figs:
            body += [f"<h2>{html.escape(title)}</h2>"] + [
                f'<figure><img src="{f}" alt="{html.escape(t)}">'
                f"<figcaption>{html.escape(t)}</figcaption></figure>"
                for f, t in figs
            ]
    body += ["<h2>6. Every cell: mean ± std over seeds (n seeds)</h2>", _html_table(head, rows)]
    if study.failed:
        body += (
            ["<h2>Failed runs</h2><pre>"]
            + [html.escape(f"{r['run_id']} {r['config']}\n{r['error']}\n") for r in study.failed]
            + ["</pre>"]
        )
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:auto}"
        "table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}"
    )
    name = html.escape(str(meta.get("name", "study")))
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{name} report</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )
    atomic_write(rep / "index.html", page)
    return {
        "index": str(rep / "index.html"),
        "markdown": str(rep / "report.md"),
        "figures": [str(rep / f) for _, figs in sections for f, _ in figs],
        "claims": [v.__dict__ for v in verdicts],
    }
