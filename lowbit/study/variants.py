"""What a study cell's layer is: its label, its weight levels and the options of its reading.

A cell's *variant* is its layer kind, plus its level count for ``nlevel`` and its reading for the
seed layers whose paper text admits several (``lowbit.nn.SignLinear.READINGS``,
``MisbornLinear.READINGS``)::

    linear (fp32)   ternary   nlevel-5   misborn   misborn/weight-ste   mybitlinear/raw-sign

A layer's default reading (the first of its ``READINGS``) keeps the bare kind as its label, so
studies made before readings existed read the same.

It also knows the grid keys added after studies were first stored (``LATER_KEYS``): the values
at which a cell id leaves them out, and ``completed`` fills them into an older stored config.

This module sits below ``spec`` (grids), ``aggregate`` (reading a store) and ``claims``; it
imports none of them.
"""

from __future__ import annotations

from typing import Any

from lowbit import bnn, models
from lowbit.nn import MisbornLinear, SignLinear
from lowbit.quantizers import FIXED_LEVELS

# Weight levels each layer kind stores (None = fp32). bitlinear8, mybitlinear and misborn all use
# binary weights (kyegomez's 0.2.5 BitLinear included, see SEEDS.md).
LAYER_LEVELS: dict[str, int | None] = {
    "linear": None,
    "bitlinear8": 2,
    "mybitlinear": 2,
    "misborn": 2,
    **FIXED_LEVELS,
    **{m: 2 for m in bnn.BINARY_METHODS},  # the binary models' methods (lowbit.bnn)
}

# layer kind -> {reading name: the layer's keyword options}; the first reading is the default.
READINGS: dict[str, dict[str, dict[str, Any]]] = {
    "mybitlinear": SignLinear.READINGS,
    "misborn": MisbornLinear.READINGS,
}
DEFAULT_READING = "default"
READING_NAMES = (DEFAULT_READING, *sorted({r for rs in READINGS.values() for r in rs}))


def resolve_reading(layer: str, reading: str | None) -> str | None:
    """The reading a cell of kind ``layer`` runs: None for kinds without readings; the kind's
    default for ``"default"`` or a reading that belongs to another kind (so such grid points
    collapse into the default cell instead of multiplying it)."""
    readings = READINGS.get(layer)
    if not readings:
        return None
    return reading if reading in readings else next(iter(readings))


def reading_options(config: dict[str, Any]) -> dict[str, Any]:
    """The layer keyword options of a cell's reading ({} for none or an old config)."""
    reading = config.get("reading")
    return dict(READINGS.get(config["layer"], {}).get(reading, {})) if reading else {}


def variant_label(config: dict[str, Any]) -> str:
    """``linear (fp32)``, ``ternary``, ``nlevel-5``, ``misborn``, ``misborn/weight-ste``."""
    if config["layer"] == "nlevel":
        return f"nlevel-{config['levels']}"
    if config["layer"] == "linear":
        return "linear (fp32)"
    reading = config.get("reading")
    readings = READINGS.get(config["layer"], {})
    if reading and readings and reading != next(iter(readings)):
        return f"{config['layer']}/{reading}"
    return config["layer"]


def weight_levels(config: dict[str, Any]) -> int | None:
    """Number of weight values of a cell's quantized layers (None for fp32)."""
    if config["layer"] == "nlevel":
        return config["levels"]
    return LAYER_LEVELS[config["layer"]]


# Grid keys added after studies were first stored, with the values at which a cell does not use
# them: spec.cell_id leaves a key out of the id at these values (a cell stored before the key
# existed keeps its id and resumes), and completed() fills a stored config that lacks the key.
LATER_KEYS: dict[str, tuple] = {
    "reading": (None,),
    "val_split": (0.0,),
    "patch_size": (None, models.ViTConfig.patch_size),
    "lr_schedule": ("constant",),
    "patience": (0,),
}


def completed(config: dict[str, Any]) -> dict[str, Any]:
    """A stored cell config with every ``LATER_KEYS`` key, at the value it ran with where the
    config predates the key: cells stored before and after a key existed then group together."""
    out = dict(config)
    for key, (value, *_) in LATER_KEYS.items():
        out.setdefault(key, value)
    if "patch_size" not in config and str(out.get("model", "")).startswith("vit"):
        out["patch_size"] = models.ViTConfig.patch_size  # what a ViT cell ran with before
    return out
