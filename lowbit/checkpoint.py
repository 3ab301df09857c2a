"""Training checkpoints: the fake-quant model of a run directory (``lowbit.train.fit`` writes
``config.json`` + ``checkpoint.safetensors``), read without pickle for ``lowbit pack``,
``verify`` and ``summary``. The packed .lowbit file is ``lowbit.fileformat``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit import pack
from lowbit.errors import FormatError


def load_trained(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The fake-quant model of a training run: ``path`` is a run directory (config.json +
    checkpoint.safetensors, as ``lowbit.train.fit`` writes) or the checkpoint file itself.

    Returns (model in eval mode, the run's config.json content or {}). The checkpoint is read
    with the strict container reader (no pickle); the model is rebuilt by ``lowbit.models.get``
    from the spec the run recorded. ``model.lowbit_meta`` is what ``lowbit pack`` saves with it
    (``lowbit.meta.from_run``), so a summary of the run predicts the packed file's size."""
    from lowbit import meta, models

    path = Path(path)
    config: dict[str, Any] = {}
    ckpt = path
    if path.is_dir():
        ckpt = path / "checkpoint.safetensors"
        cfg = path / "config.json"
        if cfg.exists():
            try:
                config = json.loads(cfg.read_text())
            except (OSError, ValueError) as exc:
                raise FormatError(f"{cfg}: not valid JSON ({exc})") from exc
        if not ckpt.exists():
            raise FormatError(
                f"{path}: no checkpoint.safetensors (is this a lowbit run directory?)"
            )
    elif not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    strings, entries = pack.read_container(ckpt)
    if strings.get("format") != "lowbit-checkpoint":
        raise FormatError(f"{ckpt}: not a lowbit training checkpoint")
    try:
        spec = json.loads(strings.get("model_spec", "null"))
    except ValueError as exc:
        raise FormatError(f"{ckpt}: model_spec is not valid JSON") from exc
    spec = spec or config.get("model")
    if not isinstance(spec, dict) or not isinstance(spec.get("kwargs"), dict):
        raise FormatError(
            f"{ckpt}: the run recorded no model spec (a model built outside "
            "lowbit.models cannot be rebuilt from a checkpoint)"
        )
    # Bounded like the .lowbit loader: plain, bounded arguments, then the model on the meta device
    # (no memory) must match the checkpoint's tensor shapes before the real one is allocated.
    from lowbit.fileformat import check_registry_args

    check_registry_args(ckpt, spec.get("name"), spec["kwargs"])
    try:
        with torch.device("meta"):
            skeleton = models.get(spec["name"], **spec["kwargs"])
    except (ValueError, TypeError, KeyError, RuntimeError, OverflowError) as exc:
        raise FormatError(f"{ckpt}: cannot rebuild the model ({exc})") from exc
    shapes = {k[len("model.") :]: e.shape for k, e in entries.items() if k.startswith("model.")}
    for key, t in skeleton.state_dict().items():
        if shapes.get(key) != tuple(t.shape):
            raise FormatError(
                f"{ckpt}: checkpoint does not fit its model spec ({key}: the spec needs "
                f"{tuple(t.shape)}, the file holds {shapes.get(key, 'nothing')})"
            )
    del skeleton
    model = models.get(spec["name"], **spec["kwargs"])
    state = {k[len("model.") :]: e.tensor() for k, e in entries.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise FormatError(
            f"{ckpt}: checkpoint does not fit its model ({str(exc).splitlines()[0]})"
        ) from exc
    if not config:
        try:
            config = {"train": json.loads(strings.get("config", "{}")), "model": spec}
        except ValueError:
            config = {"model": spec}
    model.lowbit_meta, _ = meta.from_run(path, config)
    return model.eval(), config
