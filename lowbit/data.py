"""Image datasets from local files in their official formats, plus batch augmentation.

``load(name)`` returns a :class:`Dataset` of normalised float32 images ``(N, C, H, W)`` and int64
labels ``(N,)``. Nothing is ever downloaded. When the caller names a folder (``data_dir``), that
folder is read or the load fails: the folder itself, ``data_dir/<name>`` and torchvision's layout
under it, nothing else. Without ``data_dir`` the files are looked for, in this order, under

1. ``$LOWBIT_DATA``, then ``~/.cache/lowbit`` (``ROOT/<name>``),
2. torchvision's layout under each of those roots (``ROOT/FashionMNIST/raw``,
   ``ROOT/cifar-10-batches-py``, ...),
3. Debian's ``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``).

MNIST and Fashion-MNIST share their file names: the official label files are recognised by
checksum (the published MD5s of the ``.gz`` files; for Fashion-MNIST also of the uncompressed
content), and a load of one name from the other's files is refused. ``Dataset.digest`` is a
SHA-256 over the content of every file read, which a training run records with the folder.

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
array/dtype reconstruction that format needs, and nothing else (no arbitrary code runs). Even
those are stand-ins: an array is only made from its pickled bytes once its dtype (plain numbers
only), shape and byte count agree, so a pickle can neither read uninitialised memory nor ask for
an allocation larger than itself.

Files are read with bounds: an IDX file's header declares its size and nothing more is read or
inflated; a ``.gz`` file may not declare more than ``_MAX_INFLATE`` times its own size (real image
data compresses a few times, a gzip bomb a thousand), and no file more than ``_MAX_FILE`` bytes.

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

import contextlib
import functools
import gzip
import hashlib
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
# MD5s of the official label files, as stored: the published ones of the .gz files, and of the
# uncompressed Fashion-MNIST files (computed from Debian's dataset-fashion-mnist, whose .gz files
# are recompressed copies of the same content).
_OFFICIAL_LABELS = {
    "d53e105ee54ea40749a09fcbcd1e9432": "mnist",  # train-labels-idx1-ubyte.gz
    "ec29112dd5afa0611ce80d1b7f02629c": "mnist",  # t10k-labels-idx1-ubyte.gz
    "25c81989df183df01b3e8a0aad5dffbe": "fashion-mnist",  # train-labels-idx1-ubyte.gz
    "bb300cfdad3c16e7a12a480ee83cd310": "fashion-mnist",  # t10k-labels-idx1-ubyte.gz
    "9018921c3c673c538a1fc5bad174d6f9": "fashion-mnist",  # train-labels-idx1-ubyte
    "15d484375f8d13e6eb1aabb0c3f46965": "fashion-mnist",  # t10k-labels-idx1-ubyte
}
_MAX_FILE = 1 << 31  # bytes: no dataset file lowbit reads is larger (CIFAR batches are 30 MB)
_MAX_INFLATE = 200  # a .gz file may inflate to at most this many times its size
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
    digest: str = ""

    def __post_init__(self) -> None:
        """Refuse data a model cannot train on: raises DataError saying what is wrong."""
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if not isinstance(x, torch.Tensor) or x.dim() != 4 or min(x.shape[1:]) < 1:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise DataError(f"{self.name}: {split}_x must be images (N, C, H, W), got {got}")
            if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.dtype != torch.int64:
                got = (y.dtype, tuple(y.shape)) if isinstance(y, torch.Tensor) else type(y)
                raise DataError(f"{self.name}: {split}_y must be int64 labels (N,), got {got}")
            if len(x) != len(y):
                raise DataError(f"{self.name}: {len(x)} {split} images but {len(y)} labels")
            if len(y) == 0:
                raise DataError(f"{self.name}: the {split} set is empty")
            if int(y.min()) < 0 or int(y.max()) >= self.classes:
                raise DataError(
                    f"{self.name}: {split} labels must lie in 0..{self.classes - 1}, found "
                    f"{int(y.min())}..{int(y.max())}"
                )
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise DataError(
                f"{self.name}: train images are {tuple(self.train_x.shape[1:])} but test images "
                f"{tuple(self.test_x.shape[1:])}; both splits need one image shape"
            )

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


def _folder_arg(data_dir: Any) -> Path | None:
    """``data_dir`` as a Path (None stays None); a clear error for anything else."""
    if data_dir is None:
        return None
    if not isinstance(data_dir, (str, os.PathLike)) or not str(data_dir).strip():
        raise ValueError(f"data_dir must be a folder path (str or os.PathLike), got {data_dir!r}")
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise DataError(f"{folder}: {what}; --data-dir must name the folder holding the data")
    return folder


def _roots(data_dir: Path | None) -> list[Path]:
    if data_dir is not None:
        return [data_dir]
    roots = []
    if os.environ.get("LOWBIT_DATA"):
        roots.append(Path(os.environ["LOWBIT_DATA"]).expanduser())
    roots.append(Path.home() / ".cache" / "lowbit")
    return roots


def _candidates(name: str, data_dir: Path | None) -> list[Path]:
    """Folders that may hold ``name``'s files, in search order (only under ``data_dir`` when
    the caller named it)."""
    out: list[Path] = []
    if data_dir is not None:
        out.append(data_dir)  # the user pointed at the folder itself
    for root in _roots(data_dir):
        out.extend(root / folder for folder in _FOLDERS[name])
    if name == "fashion-mnist" and data_dir is None:
        out.append(DEBIAN_FASHION_MNIST)
    seen: set[Path] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


def _find_file(folder: Path, stem: str, suffixes: tuple[str, ...]) -> Path | None:
    for suffix in suffixes:
        p = folder / (stem + suffix)
        if p.is_file():
            return p
    return None


def _locate(name: str, folder: Path) -> tuple[str | None, dict[str, list[Path]], list[str]]:
    """The format and files of ``name`` in ``folder``: (format, files, []) when all are there,
    else (None, {}, the names missing — empty when ``folder`` holds none of them)."""
    if not folder.is_dir():
        return None, {}, []
    if name in ("mnist", "fashion-mnist"):
        files = {k: _find_file(folder, stem, ("", ".gz")) for k, stem in _IDX_FILES.items()}
        if all(files.values()):
            return "idx", {k: [v] for k, v in files.items()}, []  # type: ignore[misc]
        missing = [f"{_IDX_FILES[k]}[.gz]" for k, v in files.items() if v is None]
        return None, {}, missing if len(missing) < len(files) else []
    train, test = _CIFAR_FILES[name]
    partial: list[str] = []
    for fmt, suffixes in (("cifar-bin", (".bin",)), ("cifar-py", ("",))):
        tr = [_find_file(folder, s, suffixes) for s in train]
        te = [_find_file(folder, s, suffixes) for s in test]
        if all(tr) and all(te):
            return fmt, {"train": tr, "test": te}, []  # type: ignore[dict-item]
        missing = [s + suffixes[0] for s, p in zip(train + test, tr + te, strict=True) if p is None]
        if len(missing) < len(train + test) and not partial:
            partial = missing
    return None, {}, partial


def _resolve(name: str, data_dir: Path | None):
    """(folder, format, files, searched, partial): the first folder holding all of ``name``'s
    files, and ``partial`` = (folder, missing names) for the first that holds only some."""
    searched = _candidates(name, data_dir)
    partial = None
    for folder in searched:
        fmt, files, missing = _locate(name, folder)
        if fmt is not None:
            return folder, fmt, files, searched, None
        if missing and partial is None:
            partial = (folder, missing)
    return None, None, None, searched, partial


# --- file formats ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _reader(path: Path):
    """The file's content as a stream (inflated for ``.gz``), errors as DataError naming it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as raw:
            if path.suffix == ".gz":
                with gzip.GzipFile(fileobj=raw) as f:
                    yield f, max(_MAX_INFLATE * size, 1 << 20)
            else:
                yield raw, size
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read ({exc}); the file is corrupt, replace it") from exc


def _read_exact(path: Path, f: Any, n: int, limit: int, what: str) -> bytes:
    """``n`` bytes of ``f``, refusing before reading when ``n`` exceeds what the file may hold."""
    if n > min(limit, _MAX_FILE):
        raise DataError(
            f"{path}: {what} declares {n:,} bytes, more than this file can honestly hold "
            f"({min(limit, _MAX_FILE):,}); the file is corrupt or crafted"
        )
    return f.read(n)


def _read_bytes(path: Path) -> bytes:
    """The whole (bounded) content of a file."""
    with _reader(path) as (f, limit):
        raw = f.read(min(limit, _MAX_FILE) + 1)
    if len(raw) > min(limit, _MAX_FILE):
        raise DataError(f"{path}: larger than any dataset file ({_MAX_FILE:,} bytes); refused")
    return raw


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes: magic ``00 00 08 ndim``, ndim big-endian uint32 sizes, data.

    Returns a uint8 array of the stored shape; raises DataError on any inconsistency. Reads (and
    inflates) no more than the header declares, plus one byte to detect trailing data."""
    with _reader(path) as (f, limit):
        magic = f.read(4)
        if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] != 0x08:
            raise DataError(
                f"{path}: not an IDX file of unsigned bytes (magic {magic.hex() or 'missing'}, "
                "expected 0000080N); the file is corrupt or of another format"
            )
        if magic[3] != ndim:
            raise DataError(f"{path}: IDX file has {magic[3]} dimensions, expected {ndim}")
        dims = f.read(4 * ndim)
        if len(dims) < 4 * ndim:
            raise DataError(f"{path}: truncated IDX header ({4 + len(dims)} bytes)")
        shape = struct.unpack(f">{ndim}I", dims)
        if ndim == 3 and min(shape[1:]) < 1:
            raise DataError(f"{path}: images of {shape[1]}x{shape[2]} pixels; the file is corrupt")
        n = math.prod(shape)
        body = _read_exact(path, f, n + 1, limit, f"its header (shape {shape})")
    header = 4 + 4 * ndim
    if len(body) != n:
        what = "truncated" if len(body) < n else "has trailing bytes"
        got = f"{header + len(body)}" if len(body) < n else "more"
        raise DataError(
            f"{path}: {what}: header says shape {shape} ({header + n} bytes), file has {got}"
        )
    return np.frombuffer(body, dtype=np.uint8).reshape(shape).copy()  # writable


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
    Python 3 (latin-1 only: another codec name would import a module). None of the numpy names
    resolves to numpy itself: each is a stand-in (``_PendingArray``, ``_PendingDtype``) that makes
    the real object only from checked pieces; :func:`_unpickle` swaps the stand-ins out."""

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
        return {
            "dtype": _PendingDtype,
            "encode": _codecs_encode,
            "_frombuffer": _frombuffer,
            "_reconstruct": _reconstruct,
            "ndarray": _NDARRAY,
        }[name]


class _NdarrayToken:
    """What the name ``numpy.ndarray`` stands for in a pickle: an argument of ``_reconstruct``,
    never callable (``ndarray(shape)`` would hand back uninitialised memory of any size)."""

    def __call__(self, *args: Any) -> Any:
        raise pickle.UnpicklingError("refused numpy.ndarray(...): arrays come only from bytes")


_NDARRAY = _NdarrayToken()
_PLAIN_DTYPES = ("u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f4", "f8", "b1")


class _PendingDtype:
    """``numpy.dtype(spec, align, copy)`` of a plain number type, then its pickled state
    ``(version, byteorder, None, None, None, elsize, alignment, flags)`` (byte order only)."""

    def __init__(self, spec: Any, *args: Any) -> None:
        spec = spec.decode("ascii", "replace") if isinstance(spec, bytes) else spec
        if spec not in _PLAIN_DTYPES or not all(a in (0, 1) for a in args) or len(args) > 2:
            raise pickle.UnpicklingError(f"refused dtype {spec!r} (plain numbers only)")
        self.dtype = np.dtype(spec)

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (8, 9) or state[2:5] != (None,) * 3:
            raise pickle.UnpicklingError("refused dtype state (structured or sub-array dtype)")
        order = state[1].decode("ascii", "replace") if isinstance(state[1], bytes) else state[1]
        if order not in ("<", ">", "|", "="):
            raise pickle.UnpicklingError(f"refused dtype byte order {order!r}")
        if order in "<>":
            self.dtype = self.dtype.newbyteorder(order)


class _PendingArray:
    """``_reconstruct(ndarray, shape, dtype)`` allocates nothing: the array is made by
    ``__setstate__((version, shape, dtype, is_fortran, data))`` from ``data`` once checked."""

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise pickle.UnpicklingError("refused array state")
        _, shape, dtype, fortran, data = state
        self.array = _checked_array(data, dtype, shape, "F" if fortran else "C")


def _reconstruct(cls: Any, shape: Any, dtype: Any) -> _PendingArray:
    if cls is not _NDARRAY:
        raise pickle.UnpicklingError("refused _reconstruct of anything but numpy.ndarray")
    return _PendingArray()


def _checked_array(data: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """An array of ``shape`` from ``data`` (bytes), after checking every piece."""
    if isinstance(dtype, _PendingDtype):
        dtype = dtype.dtype
    if not isinstance(dtype, np.dtype):
        raise pickle.UnpicklingError("refused array: its dtype is not a plain dtype")
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError(f"refused array data of type {type(data).__name__}")
    ok = isinstance(shape, tuple) and len(shape) <= 8
    if not (ok and all(type(n) is int and n >= 0 for n in shape)) or order not in ("C", "F"):
        raise pickle.UnpicklingError(f"refused array shape {shape!r}")
    if math.prod(shape) * dtype.itemsize != len(data):
        raise pickle.UnpicklingError(
            f"array of shape {shape} needs {math.prod(shape) * dtype.itemsize} bytes, the pickle "
            f"holds {len(data)}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape, order=order).copy()


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused _codecs.encode(..., {encoding!r})")
    return text.encode("latin-1")


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    return _checked_array(buf, dtype, shape, order)


def _unpickle(raw: bytes) -> Any:
    """The restricted unpickler's result with the array stand-ins replaced by their arrays."""

    def real(v: Any, depth: int = 0) -> Any:
        if isinstance(v, _PendingArray):
            if v.array is None:
                raise pickle.UnpicklingError("an array without its data")
            return v.array
        if isinstance(v, _PendingDtype):
            return v.dtype
        if isinstance(v, dict) and depth < 4:
            return {k: real(x, depth + 1) for k, x in v.items()}
        if isinstance(v, list) and depth < 4:
            return [real(x, depth + 1) for x in v]
        return v

    return real(_RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load())


def _labels(path: Path, key: str, y: Any) -> np.ndarray:
    """CIFAR labels as int64 (N,): a list of Python ints or a 1-D integer array."""
    if isinstance(y, np.ndarray):
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise DataError(f"{path}: '{key}' must be a 1-D integer array, got {y.dtype} {y.shape}")
    elif not isinstance(y, list) or not all(type(v) is int for v in y):
        raise DataError(f"{path}: '{key}' must be a list of integers")
    try:
        return np.asarray(y, dtype=np.int64)
    except OverflowError:
        raise DataError(f"{path}: '{key}' holds integers beyond int64") from None


def _read_cifar_py(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    raw = _read_bytes(path)
    try:
        obj = _unpickle(raw)
    except Exception as exc:  # any malformed or refused pickle is a data problem
        raise DataError(f"{path}: not a CIFAR python batch ({exc})") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR python batch (a {type(obj).__name__}, not a dict)")
    d = {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    x, y = d.get("data"), d.get(label_key)
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072)")
    if y is None or not hasattr(y, "__len__") or len(y) != len(x):
        n = "missing" if y is None else len(y) if hasattr(y, "__len__") else "no"
        raise DataError(f"{path}: {len(x)} images but {n} '{label_key}' labels")
    return x.reshape(-1, 3, 32, 32), _labels(path, label_key, y)


def _stat(paths: list[Path]) -> tuple:
    return tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)


def _refuse_other_dataset(name: str, path: Path, labels: np.ndarray) -> None:
    """DataError when ``path`` is an official label file of the other IDX dataset."""
    content = bytes([0, 0, 0x08, 1]) + struct.pack(">I", len(labels)) + labels.tobytes()
    digests = {hashlib.md5(content, usedforsecurity=False).hexdigest()}
    if path.suffix == ".gz" and path.stat().st_size < (1 << 20):  # label files are small
        digests.add(hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest())
    for d in digests:
        other = _OFFICIAL_LABELS.get(d)
        if other is not None and other != name:
            raise DataError(
                f"{path}: these are the official {other} files, not {name}; point --data-dir "
                f"at the {name} files (or use --dataset {other})"
            )


def _digest(arrays: tuple[np.ndarray, ...]) -> str:
    """SHA-256 of the decoded content (shapes and bytes), the same for .gz and plain files."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(repr(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


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
        train_x, test_x = paths["train_x"][0], paths["test_x"][0]
        for split in ("train", "test"):
            if len(parts[f"{split}_y"]) == 0:
                raise DataError(f"{paths[f'{split}_x'][0]}: holds no images; the file is corrupt")
        if parts["train_x"].shape[1:] != parts["test_x"].shape[1:]:
            raise DataError(
                f"{train_x}: images are {parts['train_x'].shape[1:]} but {test_x} has "
                f"{parts['test_x'].shape[1:]}; the files do not belong together"
            )
        for k in ("train_y", "test_y"):
            _refuse_other_dataset(name, paths[k][0], parts[k])
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
    digest = _digest((train_x, train_y, test_x, test_y))
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
        digest,
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
    folder_arg = _folder_arg(data_dir)
    folder, fmt, files, searched, partial = _resolve(name, folder_arg)
    if folder is None:
        if partial is not None:
            raise DataError(
                f"{partial[0]}: {name} is incomplete, missing {', '.join(partial[1])}; "
                "add the missing files"
            )
        where = "under the folder you named" if folder_arg is not None else "anywhere lowbit looks"
        raise DataError(
            f"{name} not found {where}; searched: {', '.join(map(str, searched))}. To get it: "
            + _HOW_TO_GET[name].replace("DIR", str(_roots(folder_arg)[0]))
            + ("" if folder_arg is not None else " (or pass --data-dir / set LOWBIT_DATA)")
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
        folder, fmt, files, searched, _ = _resolve(name, _folder_arg(data_dir))
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
