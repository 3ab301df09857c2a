"""``lowbit predict``: class predictions of a saved model on a user's raw images.

Inputs (``read_images``): an IDX file of images (``.gz`` or not; MNIST's format), a ``.npy``
array of raw images (read without pickle), or PNG files (through Pillow). Images are (N, H, W),
(N, C, H, W) or (N, H, W, C) with the values the file's ``lowbit_meta`` declares (raw pixels,
0..255); ``lowbit.meta.preprocess`` applies the saved normalisation, batch by batch.

A file without metadata (saved before it was recorded) still runs where what is missing can be
assumed, each assumption stated as a note: the input shape comes from the model's spec or the
images, class names become indices. Without a saved normalisation it needs ``dataset=`` (that
dataset's normalisation, computed from its local training images) and refuses otherwise.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit import data
from lowbit.errors import DataError
from lowbit.meta import ModelMeta, Normalisation, preprocess


def _read_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: not a readable .npy array ({first})") from exc
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "uif":
        raise DataError(f"{path}: expected an array of numbers, got dtype {arr.dtype}")
    return arr


def _read_png(paths: list[Path], channels: int | None) -> np.ndarray:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:
        raise DataError("reading PNG files needs Pillow: pip install pillow") from exc
    mode = "L" if channels == 1 else "RGB"
    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                images.append(np.asarray(im.convert(mode)))
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"{p}: not a readable image ({exc})") from exc
        if images[-1].shape != images[0].shape:
            raise DataError(
                f"{p}: {images[-1].shape} pixels, but {paths[0]} has {images[0].shape}; "
                "all images must have one size"
            )
    return np.stack(images)  # (N, H, W) or (N, H, W, 3)


def read_images(paths: list[str | Path], channels: int | None = None) -> np.ndarray:
    """Raw images from one IDX or .npy file or from PNG files; DataError naming the file."""
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file")
    suffixes = {p.suffix.lower() for p in paths}
    if suffixes <= {".png"}:
        return _read_png(paths, channels)
    if len(paths) > 1:
        raise DataError("give one IDX or .npy file, or PNG files only")
    path = paths[0]
    if path.suffix.lower() == ".npy":
        return _read_npy(path)
    return data.read_idx(path, 3)  # MNIST-style (N, H, W); the reader checks the magic


def read_labels(path: str | Path) -> np.ndarray:
    """Integer labels (N,) from an IDX1 file (.gz or not) or a .npy array."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    labels = _read_npy(path) if path.suffix.lower() == ".npy" else data.read_idx(path, 1)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: labels must be a 1-d array of integers")
    return np.asarray(labels, dtype=np.int64)


@dataclass
class Prediction:
    """Logits (N, classes) of the images, the metadata used and notes on what was assumed."""

    logits: torch.Tensor
    meta: ModelMeta
    notes: list[str] = field(default_factory=list)

    def top(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities (N, k), classes (N, k)), most likely first."""
        probs = torch.softmax(self.logits.double(), dim=1)
        return probs.topk(min(k, probs.shape[1]), dim=1)

    def class_name(self, c: int) -> str:
        names = self.meta.class_names
        return names[c] if names is not None and c < len(names) else str(c)


def _resolve_meta(model: nn.Module, images: np.ndarray, dataset: str | None) -> tuple:
    """The metadata to run with, filling what an old file lacks (with a note each) or refusing."""
    meta = getattr(model, "lowbit_meta", None) or ModelMeta()
    notes = []
    missing = meta.missing()
    if meta.normalisation is None:
        if dataset is None:
            raise DataError(
                "the model file carries no preprocessing (saved without metadata): pass "
                "--dataset NAME to normalise as lowbit does for that dataset, or re-pack it "
                "with 'lowbit pack RUN_DIR'"
            )
        ds = data.load(dataset)
        if not ds.mean:
            raise DataError(f"dataset {dataset} has no normalisation to apply")
        meta = replace(meta, normalisation=Normalisation(255.0, ds.mean, ds.std))
        if meta.input_range is None:
            meta = replace(meta, input_dtype="uint8", input_range=(0.0, 255.0))
        notes.append(f"no saved normalisation: using {dataset}'s (mean {ds.mean}, std {ds.std})")
        if meta.class_names is None and dataset in data.CLASS_NAMES:
            meta = replace(meta, class_names=data.CLASS_NAMES[dataset])
            notes.append(f"no saved class names: using {dataset}'s")
    if meta.input_shape is None:
        spec = (getattr(model, "lowbit_spec", None) or {}).get("kwargs", {})
        shape = spec.get("input_shape")
        if shape is None:
            shape = (1, *images.shape[1:3]) if images.ndim == 3 else images.shape[1:]
            notes.append(f"no saved input shape: assuming the images' {tuple(shape)}")
        meta = replace(meta, input_shape=tuple(int(s) for s in shape))
    if meta.class_names is None:
        notes.append("no saved class names: printing class indices")
    if missing and not notes:
        notes.append(f"the model file does not record: {', '.join(missing)}")
    return meta, notes


def run(
    model: nn.Module,
    images: np.ndarray,
    *,
    batch_size: int = 500,
    dataset: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Prediction:
    """Logits of ``model`` on raw ``images`` (preprocessed as saved), ``batch_size`` at a time;
    ``progress(done, total)`` after each batch."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    meta, notes = _resolve_meta(model, images, dataset)
    if images.dtype.kind == "f" and images.size and float(np.max(images)) <= 1.0:
        notes.append("all values are <= 1: expected raw pixels (0..255), not pixel/255 images")
    n = len(images)
    out = []
    model.eval()
    with torch.inference_mode():
        for i in range(0, n, batch_size):
            x = preprocess(meta, np.ascontiguousarray(images[i : i + batch_size]))
            out.append(model(x).float())
            if progress is not None:
                progress(min(i + batch_size, n), n)
    if not out:
        raise DataError("no images to predict")
    return Prediction(torch.cat(out), meta, notes)


def progress_printer(total: int, batch: int) -> Callable[[int, int], None] | None:
    """A bar on a terminal; plain lines (about ten) in a pipe; nothing for one batch."""
    if total <= batch:
        return None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", file=sys.stderr, leave=False)

        def tick(done: int, _total: int) -> None:
            bar.update(done - bar.n)
            if done >= _total:
                bar.close()

        return tick
    step = max(batch, math.ceil(total / 10))
    mark = [step]

    def line(done: int, _total: int) -> None:
        if done >= mark[0] or done >= _total:
            print(f"predict: {done}/{_total} images", file=sys.stderr, flush=True)
            mark[0] = (done // step + 1) * step

    return line


def report(pred: Prediction, k: int, labels: np.ndarray | None) -> dict[str, Any]:
    """The JSON form: per image its top-k (class, name, probability); accuracy with labels."""
    probs, classes = pred.top(k)
    rows = [
        {
            "index": i,
            "top": [
                {"class": int(c), "name": pred.class_name(int(c)), "prob": round(float(p), 6)}
                for p, c in zip(probs[i], classes[i], strict=True)
            ],
        }
        for i in range(len(classes))
    ]
    out: dict[str, Any] = {
        "count": len(rows),
        "predictions": rows,
        "notes": pred.notes,
        "saved_test_accuracy": pred.meta.test_accuracy,
        "dataset": pred.meta.dataset,
    }
    if labels is not None:
        if len(labels) != len(rows):
            raise DataError(f"{len(labels)} labels for {len(rows)} images")
        correct = int((pred.logits.argmax(1).numpy() == labels).sum())
        out["correct"] = correct
        out["accuracy"] = correct / len(rows)
    return out


def text(rep: dict[str, Any]) -> str:
    """One line an image, ``index<TAB>name prob[, name prob ...]``, then the accuracy line."""
    lines = [
        f"{r['index']}\t" + ", ".join(f"{t['name']} {t['prob']:.3f}" for t in r["top"])
        for r in rep["predictions"]
    ]
    if "accuracy" in rep:
        saved = rep["saved_test_accuracy"]
        also = "" if saved is None else f" (saved test accuracy {saved:.4f})"
        lines.append(f"accuracy {rep['accuracy']:.4f} ({rep['correct']}/{rep['count']}){also}")
    return "\n".join(lines) + "\n"
