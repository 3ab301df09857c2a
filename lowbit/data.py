"""Image datasets from local files in their official formats, plus batch augmentation.

``load(name)`` returns a :class:`Dataset` of normalised float32 images ``(N, C, H, W)`` and int64
labels ``(N,)``. Nothing is ever downloaded: the files are looked for, in this order, under

1. ``data_dir`` (the argument; the folder itself and ``data_dir/<name>``),
2. ``$LOWBIT_DATA``, then ``~/.cache/lowbit`` (``ROOT/<name>``),
3. torchvision's layout under each of those roots (``ROOT/FashionMNIST/raw``,
   ``ROOT/cifar-10-batches-py``, ...),
4. Debian's ``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``).

=================  ==========================================================  =====  ========
name               files                                                       shape  classes
=================  ==========================================================  =====  ========
``mnist``          ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` (IDX)  1x28x28  10
``fashion-mnist``  same names as MNIST                                         1x28x28  10
``cifar10``        ``data_batch_{1..5}[.bin]``, ``test_batch[.bin]``          3x32x32  10
``cifar100``       ``train[.bin]``, ``test[.bin]`` (fine labels)               3x32x32  100
``synthetic``      generated (for tests): class prototypes + noise             1x8x8    4
=================  ==========================================================  =====  ========

CIFAR comes in the official binary version (``cifar-10-batches-bin``, ``cifar-100-binary``) or the
python version (``cifar-10-batches-py``, ``cifar-100-python``), which is a pickle: it is read by a
restricted unpickler that admits plain containers, bytes, str, numbers and the numpy
array/dtype reconstruction that format needs, and nothing else (no arbitrary code runs).

Normalisation: ``x = (pixel / 255 - mean_c) / std_c`` with the per-channel mean and standard
deviation of the *training* images, so the training set has zero mean and unit variance per
channel and the test set uses the same affine map. Measured against plain ``pixel / 255`` and
``2 pixel / 255 - 1`` on the Fashion-MNIST MLP, it is the best of the three
(docs/results/accuracy-fp32-explore.md).

Decoded uint8 arrays are cached per process (keyed on the resolved file paths and their size and
modification time), so a study that loads the same dataset for many runs parses it once. The
returned tensors are shared between loads: treat them as read-only.
"""

from __future__ import annotations

import functools
import gzip
import io
import math
import os
import pickle
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lowbit.errors import DataError
from lowbit.meta import normalise

NAMES = ("mnist", "fashion-mnist", "cifar10", "cifar100", "synthetic")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
# Folder names per dataset: lowbit's own first, then torchvision's.
_FOLDERS = {
    "mnist": ["mnist", "MNIST/raw"],
    "fashion-mnist": ["fashion-mnist", "FashionMNIST/raw"],
    "cifar10": ["cifar10", "cifar-10-batches-bin", "cifar-10-batches-py"],
    "cifar100": ["cifar100", "cifar-100-binary", "cifar-100-python"],
}
_CIFAR_FILES = {
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
    "cifar100": (["train"], ["test"]),
}
_CLASSES = {"mnist": 10, "fashion-mnist": 10, "cifar10": 10, "cifar100": 100}
# Label index -> name, as each dataset's documentation lists them (saved in .lowbit files).
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "mnist": tuple(str(d) for d in range(10)),
    "fashion-mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    "cifar10": (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ),
    "cifar100": tuple(
        """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
        butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch
        crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo
        keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain
        mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain
        plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk
        skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank
        telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree
        wolf woman worm""".split()
    ),
}
_HOW_TO_GET = {
    "mnist": "put the four IDX files (train-images-idx3-ubyte[.gz], ...) in DIR/mnist",
    "fashion-mnist": "run 'sudo apt-get install dataset-fashion-mnist', or put the four IDX files "
    "(train-images-idx3-ubyte[.gz], ...) in DIR/fashion-mnist",
    "cifar10": "unpack cifar-10-binary.tar.gz or cifar-10-python.tar.gz into DIR "
    "(giving DIR/cifar-10-batches-bin or DIR/cifar-10-batches-py)",
    "cifar100": "unpack cifar-100-binary.tar.gz or cifar-100-python.tar.gz into DIR "
    "(giving DIR/cifar-100-binary or DIR/cifar-100-python)",
}


@dataclass
class Dataset:
    """A train/test split of images. Shapes: ``train_x`` (N, C, H, W) float32, ``train_y`` (N,)
    int64 in 0..classes-1; the same for ``test_x``/``test_y``. ``source`` is the folder read."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: int
    source: str = ""
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={len(self.train_y)}, test={len(self.test_y)}, "
            f"input_shape={self.input_shape}, classes={self.classes}, source={self.source!r})"
        )


# --- where to look -------------------------------------------------------------------------------


def _roots(data_dir: str | os.PathLike | None) -> list[Path]:
    roots = []
    if data_dir is not None:
        roots.append(Path(data_dir).expanduser())
    if os.environ.get("LOWBIT_DATA"):
        roots.append(Path(os.environ["LOWBIT_DATA"]).expanduser())
    roots.append(Path.home() / ".cache" / "lowbit")
    return roots


def _candidates(name: str, data_dir: str | os.PathLike | None) -> list[Path]:
    """Folders that may hold ``name``'s files, in search order."""
    out: list[Path] = []
    if data_dir is not None:
        out.append(Path(data_dir).expanduser())  # the user pointed at the folder itself
    for root in _roots(data_dir):
        out.extend(root / folder for folder in _FOLDERS[name])
    if name == "fashion-mnist":
        out.append(DEBIAN_FASHION_MNIST)
    seen: set[Path] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


def _find_file(folder: Path, stem: str, suffixes: tuple[str, ...]) -> Path | None:
    for suffix in suffixes:
        p = folder / (stem + suffix)
        if p.is_file():
            return p
    return None


def _locate(name: str, folder: Path) -> tuple[str, dict[str, list[Path]]] | None:
    """The format and files of ``name`` in ``folder`` if all of them are there, else None."""
    if not folder.is_dir():
        return None
    if name in ("mnist", "fashion-mnist"):
        files = {k: _find_file(folder, stem, ("", ".gz")) for k, stem in _IDX_FILES.items()}
        if all(files.values()):
            return "idx", {k: [v] for k, v in files.items()}  # type: ignore[misc]
        return None
    train, test = _CIFAR_FILES[name]
    for fmt, suffixes in (("cifar-bin", (".bin",)), ("cifar-py", ("",))):
        tr = [_find_file(folder, s, suffixes) for s in train]
        te = [_find_file(folder, s, suffixes) for s in test]
        if all(tr) and all(te):
            return fmt, {"train": tr, "test": te}  # type: ignore[dict-item]
    return None


def _resolve(name: str, data_dir: str | os.PathLike | None):
    searched = _candidates(name, data_dir)
    for folder in searched:
        found = _locate(name, folder)
        if found is not None:
            return folder, found[0], found[1], searched
    return None, None, None, searched


# --- file formats ---------------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read ({exc}); the file is corrupt, replace it") from exc


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes: magic ``00 00 08 ndim``, ndim big-endian uint32 sizes, data.

    Returns a uint8 array of the stored shape; raises DataError on any inconsistency."""
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(
            f"{path}: not an IDX file of unsigned bytes (magic {raw[:4].hex() or 'missing'}, "
            "expected 0000080N); the file is corrupt or of another format"
        )
    if raw[3] != ndim:
        raise DataError(f"{path}: IDX file has {raw[3]} dimensions, expected {ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + math.prod(shape)
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataError(
            f"{path}: {what}: header says shape {shape} ({expected} bytes), file has {len(raw)}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()  # writable


def _read_cifar_bin(path: Path, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Records of ``label_bytes`` label bytes + 3072 pixel bytes (R, G, B planes of 32x32).

    CIFAR-100 records are (coarse, fine, pixels); the fine label (the last label byte) is used."""
    raw = _read_bytes(path)
    record = label_bytes + 3 * 32 * 32
    if len(raw) == 0 or len(raw) % record:
        raise DataError(
            f"{path}: {len(raw)} bytes is not a whole number of {record}-byte CIFAR records; "
            "the file is truncated or of another format"
        )
    arr = np.frombuffer(raw, dtype=np.uint8).reshape(-1, record)
    return arr[:, label_bytes:].reshape(-1, 3, 32, 32), arr[:, label_bytes - 1].copy()


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: every global outside the list is refused.

    The CIFAR python batches are dicts of bytes/str keys, lists of ints and one uint8 array,
    pickled by Python 2 (``numpy.core.multiarray._reconstruct`` + ``ndarray`` + ``dtype``) or by
    newer numpy (``_frombuffer``). ``_codecs.encode`` is how protocol 2 stores bytes under
    Python 3. Object arrays (dtype "O") are refused by the dtype guard below."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        if name == "dtype":
            return _plain_dtype
        if name == "encode":
            return _codecs_encode
        if name == "_frombuffer":
            return _frombuffer
        if name == "_reconstruct":
            return _reconstruct
        return getattr(np, name)  # ndarray


try:  # numpy >= 2 moved the module; the pickles name either path
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct


def _plain_dtype(spec: Any, *args: Any) -> np.dtype:
    dt = np.dtype(spec.decode() if isinstance(spec, bytes) else spec, *args)
    if dt.hasobject:
        raise pickle.UnpicklingError("refused object dtype")
    return dt


def _codecs_encode(text: str, encoding: str = "utf-8") -> bytes:
    return text.encode(encoding)


def _frombuffer(buf: Any, dtype: np.dtype, shape: tuple, order: str) -> np.ndarray:
    dt = _plain_dtype(dtype)
    return np.frombuffer(bytes(buf), dtype=dt).reshape(shape, order=order).copy()


def _read_cifar_py(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    raw = _read_bytes(path)
    try:
        obj = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # any malformed or refused pickle is a data problem
        raise DataError(f"{path}: not a CIFAR python batch ({exc})") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR python batch (a {type(obj).__name__}, not a dict)")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
    x, y = d.get("data"), d.get(label_key)
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072)")
    if y is None or len(y) != len(x):
        n = "missing" if y is None else len(y)
        raise DataError(f"{path}: {len(x)} images but {n} '{label_key}' labels")
    try:
        labels = np.asarray(y, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: '{label_key}' are not integers") from exc
    return x.reshape(-1, 3, 32, 32), labels


def _stat(paths: list[Path]) -> tuple:
    return tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)


def _decode(name: str, fmt: str, key: tuple) -> tuple[np.ndarray, ...]:
    """uint8 images (N, C, H, W) and int64 labels, train then test."""
    paths = {k: [Path(p) for p, _, _ in v] for k, v in key}
    if fmt == "idx":
        parts = {k: read_idx(v[0], 3 if k.endswith("_x") else 1) for k, v in paths.items()}
        for split in ("train", "test"):
            x, y = parts[f"{split}_x"], parts[f"{split}_y"]
            if len(x) != len(y):
                raise DataError(
                    f"{paths[f'{split}_x'][0]}: {len(x)} images but {paths[f'{split}_y'][0]} has "
                    f"{len(y)} labels; the files do not belong together"
                )
        out = []
        for split in ("train", "test"):
            out += [parts[f"{split}_x"][:, None], parts[f"{split}_y"].astype(np.int64)]
        return tuple(out)
    out = []
    for split in ("train", "test"):
        xs, ys = [], []
        for p in paths[split]:
            if fmt == "cifar-bin":
                x, y = _read_cifar_bin(p, 1 if name == "cifar10" else 2)
            else:
                x, y = _read_cifar_py(p, "labels" if name == "cifar10" else "fine_labels")
            xs.append(x)
            ys.append(y.astype(np.int64))
        out += [np.concatenate(xs), np.concatenate(ys)]
    return tuple(out)


def _check_labels(name: str, files: dict[str, list[Path]], ys: tuple, classes: int) -> None:
    for split, y in zip(("train", "test"), ys, strict=True):
        if len(y) and (y.min() < 0 or y.max() >= classes):
            where = files.get(f"{split}_y", files.get(split))
            raise DataError(
                f"{where[0]}: labels must lie in 0..{classes - 1}, found {y.min()}..{y.max()}"
            )


# --- public API -----------------------------------------------------------------------------------


def _normalise(train: np.ndarray, test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Both splits through ``lowbit.meta.normalise`` with the training images' mean/std (of
    pixel / 255, per channel), the map a saved model's preprocessing repeats."""
    unit = torch.from_numpy(train).to(torch.float32).div_(255.0)
    mean = unit.mean(dim=(0, 2, 3), dtype=torch.float64)
    std = unit.std(dim=(0, 2, 3)).to(torch.float64).clamp_min(1e-6)
    del unit
    stats = (tuple(mean.tolist()), tuple(std.tolist()))
    tr = normalise(torch.from_numpy(train), 255.0, *stats)
    te = normalise(torch.from_numpy(test), 255.0, *stats)
    return tr, te, stats


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, fmt: str, key: tuple, source: str) -> Dataset:
    train_x, train_y, test_x, test_y = _decode(name, fmt, key)
    files = {k: [Path(p) for p, _, _ in v] for k, v in key}
    _check_labels(name, files, (train_y, test_y), _CLASSES[name])
    tr, te, (mean, std) = _normalise(train_x, test_x)
    return Dataset(
        name,
        tr,
        torch.from_numpy(train_y),
        te,
        torch.from_numpy(test_y),
        _CLASSES[name],
        source,
        mean,
        std,
    )


def synthetic(
    n_train: int = 512,
    n_test: int = 256,
    shape: tuple[int, int, int] = (1, 8, 8),
    classes: int = 4,
    noise: float = 3.0,
    seed: int = 0,
) -> Dataset:
    """A small learnable dataset shaped like images: ``x = prototype[y] + noise * N(0, 1)``.

    The prototypes are fixed random patterns (unit variance per pixel); with ``noise=3`` a linear
    classifier reaches well above chance but not 100%. Deterministic for a given ``seed``."""
    if n_train < 1 or n_test < 1 or classes < 2 or len(shape) != 3 or min(shape) < 1:
        raise ValueError("synthetic needs n_train, n_test >= 1, classes >= 2 and a (C, H, W) shape")
    rng = np.random.default_rng(seed)
    protos = rng.standard_normal((classes, *shape)).astype(np.float32)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = rng.integers(0, classes, size=n)
        x = protos[y] + noise * rng.standard_normal((n, *shape)).astype(np.float32)
        return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))

    (trx, tr_y), (tex, te_y) = split(n_train), split(n_test)
    return Dataset("synthetic", trx, tr_y, tex, te_y, classes, "(generated)")


def load(name: str, data_dir: str | os.PathLike | None = None, **kw: Any) -> Dataset:
    """Load ``name`` (see the module docstring) from local files; ``kw`` go to :func:`synthetic`.

    Raises DataError naming every folder searched when the files are missing, or naming the file
    when one is corrupt."""
    if name == "synthetic":
        return synthetic(**kw)
    if name not in _FOLDERS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(NAMES)}")
    if kw:
        raise ValueError(f"dataset {name} takes no options, got {', '.join(kw)}")
    folder, fmt, files, searched = _resolve(name, data_dir)
    if folder is None:
        raise DataError(
            f"{name} not found; searched: {', '.join(map(str, searched))}. To get it: "
            + _HOW_TO_GET[name].replace("DIR", str(_roots(data_dir)[0]))
            + " (or pass --data-dir / set LOWBIT_DATA)"
        )
    key = tuple((k, _stat(v)) for k, v in sorted(files.items()))
    return _load_cached(name, fmt, key, str(folder))


def discover(data_dir: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """What :func:`load` would find, without reading the data: per dataset ``path`` (folder or
    None), ``format`` (``idx``, ``cifar-bin``, ``cifar-py``, ``generated`` or None), ``files``
    and ``searched`` (the folders looked at, in order)."""
    out: dict[str, dict[str, Any]] = {}
    for name in NAMES:
        if name == "synthetic":
            out[name] = {"path": "(generated)", "format": "generated", "files": [], "searched": []}
            continue
        folder, fmt, files, searched = _resolve(name, data_dir)
        out[name] = {
            "path": str(folder) if folder else None,
            "format": fmt,
            "files": sorted(str(p) for ps in (files or {}).values() for p in ps),
            "searched": [str(p) for p in searched],
        }
    return out


# --- augmentation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Augment:
    """Random per-image affine transform of a batch, the Low-Resolution study's augmentation.

    The magnitudes were lost from the paper's text (it says "minor transformations"); these are
    our documented choices, each drawn uniformly and independently per image:

    * horizontal and vertical shift: ``±shift`` of the image size (0.1 = up to 10%),
    * zoom in/out: scale factor in ``[1 - zoom, 1 + zoom]``,
    * horizontal flip with probability ``flip``,
    * rotation: ``±rotation`` degrees.

    Pixels coming from outside the image are 0, the dataset mean after normalisation.
    """

    shift: float = 0.1
    zoom: float = 0.1
    flip: float = 0.5
    rotation: float = 10.0

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W), same dtype and device."""
        b = x.shape[0]

        def u(lo: float, hi: float) -> torch.Tensor:
            return torch.rand(b, generator=generator) * (hi - lo) + lo

        angle = u(-self.rotation, self.rotation) * (math.pi / 180)
        zoom = u(1 - self.zoom, 1 + self.zoom)
        flip = torch.where(torch.rand(b, generator=generator) < self.flip, -1.0, 1.0)
        # affine_grid maps output coords (in [-1, 1]) to input coords: theta = R(a) / zoom, with
        # the x column negated for a flip; a shift of f image widths is 2f in these units.
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack(
            [
                torch.stack([cos * flip, -sin, u(-self.shift, self.shift) * 2], dim=1),
                torch.stack([sin * flip, cos, u(-self.shift, self.shift) * 2], dim=1),
            ],
            dim=1,
        ).to(x)  # (B, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, order: torch.Tensor | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches ``(x[idx], y[idx])`` in ``order`` (natural order when None); the last may be
    short."""
    n = len(y)
    for start in range(0, n, batch_size):
        if order is None:
            yield x[start : start + batch_size], y[start : start + batch_size]
        else:
            idx = order[start : start + batch_size]
            yield x[idx], y[idx]
