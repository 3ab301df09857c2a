"""Studies: sweeps over layer kind, levels, depth and width, a SQLite store, reports with plots.

    spec (TOML grid)  ->  runner (local pool | Ray)  ->  store (DIR/results.sqlite)  ->  report

``lowbit study PRESET_OR_SPEC --out DIR`` runs a spec; ``lowbit report DIR`` renders its report.
"""

from lowbit.study.spec import Cell, Spec, cell_id, load, parse, presets

__all__ = ["Cell", "Spec", "cell_id", "load", "parse", "presets"]
