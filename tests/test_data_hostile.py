"""Crafted and wrong dataset files: every one is refused with a DataError naming the file, within
bounded memory, and without running or importing anything on the file's say-so."""

from __future__ import annotations

import gzip
import pickle
import shutil
import struct
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from lowbit import data
from lowbit.errors import DataError

IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte")
IDX += ("t10k-labels-idx1-ubyte",)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LOWBIT_DATA", raising=False)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "debian")


def _idx_bytes(arr: np.ndarray, shape: tuple[int, ...] | None = None) -> bytes:
    shape = arr.shape if shape is None else shape
    return bytes([0, 0, 8, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + arr.tobytes()


def _write_idx(folder: Path, train=(10, 28, 28), test=(5, 28, 28), labels=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = [
        rng.integers(0, 256, train, dtype=np.uint8),
        rng.integers(0, 10, train[0], dtype=np.uint8) if labels is None else labels[0],
        rng.integers(0, 256, test, dtype=np.uint8),
        rng.integers(0, 10, test[0], dtype=np.uint8) if labels is None else labels[1],
    ]
    for name, arr in zip(IDX, arrays, strict=True):
        (folder / name).write_bytes(_idx_bytes(arr))
    return folder


# --- IDX -----------------------------------------------------------------------------------------


def test_train_and_test_shapes_differ(tmp_path):
    folder = _write_idx(tmp_path / "mnist", train=(10, 32, 32))
    with pytest.raises(DataError, match="do not belong together") as err:
        data.load("mnist", data_dir=folder)
    assert str(folder / IDX[0]) in str(err.value)


def test_images_of_zero_pixels(tmp_path):
    folder = _write_idx(tmp_path / "mnist", train=(10, 0, 0), test=(5, 0, 0))
    with pytest.raises(DataError, match="0x0 pixels"):
        data.load("mnist", data_dir=folder)


def test_empty_training_set(tmp_path):
    folder = _write_idx(tmp_path / "mnist", train=(0, 28, 28))
    with pytest.raises(DataError, match="holds no images") as err:
        data.load("mnist", data_dir=folder)
    assert str(folder / IDX[0]) in str(err.value)


@pytest.mark.parametrize("type_code", [0x0D, 0x0E, 0x09, 0x0B, 0x0C])  # float, double, i8, ...
def test_labels_of_another_type_are_refused(tmp_path, type_code):
    folder = _write_idx(tmp_path / "mnist")
    raw = bytearray((folder / IDX[1]).read_bytes())
    raw[2] = type_code
    (folder / IDX[1]).write_bytes(bytes(raw))
    with pytest.raises(DataError, match="not an IDX file of unsigned bytes"):
        data.load("mnist", data_dir=folder)


def test_header_declaring_more_than_the_file_holds_reads_nothing_more(tmp_path):
    folder = _write_idx(tmp_path / "mnist")
    huge = bytes([0, 0, 8, 3]) + struct.pack(">3I", 60000, 10000, 10000) + b"\0" * 100
    (folder / IDX[0]).write_bytes(huge)
    with pytest.raises(DataError, match="declares"):
        data.load("mnist", data_dir=folder)


def test_gzip_bomb_is_refused_without_inflating_it(tmp_path):
    """A ~0.2 MB .gz whose IDX header honestly declares 240 MB of zeros: refused from the header
    and the file size, with a few MB of memory."""
    folder = _write_idx(tmp_path / "mnist")
    n, h, w = 300_000, 28, 28
    header = bytes([0, 0, 8, 3]) + struct.pack(">3I", n, h, w)
    comp = gzip.compress(header + bytes(n * h * w), compresslevel=9)
    assert len(comp) < 400_000
    (folder / IDX[0]).unlink()
    (folder / (IDX[0] + ".gz")).write_bytes(comp)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="more than this file can honestly hold"):
            data.load("mnist", data_dir=folder)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def test_gzip_larger_than_its_idx_header_says_stops_at_the_header(tmp_path):
    folder = _write_idx(tmp_path / "mnist")
    arr = np.zeros((10, 28, 28), np.uint8)
    (folder / IDX[0]).unlink()
    (folder / (IDX[0] + ".gz")).write_bytes(gzip.compress(_idx_bytes(arr) + bytes(50 << 20)))
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="trailing bytes"):
            data.load("mnist", data_dir=folder)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # the 50 MB tail is never inflated


# --- MNIST vs Fashion-MNIST ---------------------------------------------------------------------

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (DEBIAN / "train-labels-idx1-ubyte.gz").exists(), reason="no Debian copy")
@pytest.mark.parametrize("gz", [True, False])
def test_mnist_pointed_at_fashion_mnist_files_is_refused(tmp_path, gz):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in IDX:
        src = DEBIAN / f"{name}.gz"
        if gz:
            shutil.copy(src, folder / src.name)
        else:
            (folder / name).write_bytes(gzip.decompress(src.read_bytes()))
    with pytest.raises(DataError, match="official fashion-mnist files, not mnist"):
        data.load("mnist", data_dir=folder)
    assert data.load("fashion-mnist", data_dir=folder).train_y.shape == (60000,)


def test_mnist_gz_checksums_are_the_published_ones():
    # the table holds exactly the four published .gz MD5s of the label files (two per dataset)
    # and the two Fashion-MNIST uncompressed label files
    assert sorted(data._OFFICIAL_LABELS.values()).count("mnist") == 2
    assert sorted(data._OFFICIAL_LABELS.values()).count("fashion-mnist") == 4


# --- CIFAR python pickles ------------------------------------------------------------------------


def _cifar_py(folder: Path, batch: object, protocol: int = 2) -> Path:
    """A cifar-10-batches-py folder whose data_batch_1 is ``batch`` (pickled bytes or object)."""
    folder.mkdir(parents=True, exist_ok=True)
    good = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps(good, protocol=2))
    raw = batch if isinstance(batch, bytes) else pickle.dumps(batch, protocol=protocol)
    (folder / "data_batch_1").write_bytes(raw)
    return folder / "data_batch_1"


@pytest.mark.parametrize(
    "labels, needle",
    [
        (np.zeros((2, 1), np.int64), "1-D integer array"),
        ([0, 2**70], "beyond int64"),
        ([0.0, 1.0], "list of integers"),
        ([True, False], "list of integers"),
        ([b"cat", b"dog"], "list of integers"),
        (np.array([0.5, 1.0]), "1-D integer array"),
    ],
)
def test_cifar_labels_of_the_wrong_kind(tmp_path, labels, needle):
    bad = _cifar_py(tmp_path / "cifar-10-batches-py", {b"data": np.zeros((2, 3072), np.uint8),
                                                        b"labels": labels})  # fmt: skip
    with pytest.raises(DataError, match=needle) as err:
        data.load("cifar10", data_dir=tmp_path)
    assert str(bad) in str(err.value)


def _g(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def test_ndarray_is_not_callable_from_a_pickle(tmp_path):
    """``numpy.ndarray((2**40,), 'u1')``: the classic uninitialised-memory / huge-allocation
    pickle. The name resolves to an inert token, so the call fails before anything allocates."""
    payload = (
        b"\x80\x02}q\x00(C\x04dataq\x01"
        + _g("numpy", "ndarray")
        + b"\x8a\x06\x00\x00\x00\x00\x00\x01\x85C\x02u1\x86R"
        + b"C\x06labelsq\x02]q\x03u."
    )
    assert len(payload) < 134
    bad = _cifar_py(tmp_path / "cifar-10-batches-py", payload)
    with pytest.raises(DataError, match=r"refused numpy.ndarray\(...\)") as err:
        data.load("cifar10", data_dir=tmp_path)
    assert str(bad) in str(err.value)


def test_reconstruct_without_state_is_refused(tmp_path):
    """``_reconstruct(ndarray, (10**6, 3072), 'B')`` with no BUILD: numpy would hand back
    uninitialised memory; here there is no array without its checked bytes."""
    shape = b"J\x40\x42\x0f\x00J\x00\x0c\x00\x00\x86"  # (1000000, 3072)
    payload = (
        b"\x80\x02}(C\x04data"
        + _g("numpy.core.multiarray", "_reconstruct")
        + _g("numpy", "ndarray")
        + shape
        + b"C\x01B\x87R"
        + b"C\x06labels]u."
    )
    bad = _cifar_py(tmp_path / "cifar-10-batches-py", payload)
    with pytest.raises(DataError, match="an array without its data") as err:
        data.load("cifar10", data_dir=tmp_path)
    assert str(bad) in str(err.value)


def test_array_state_whose_shape_exceeds_its_bytes_is_refused(tmp_path):
    real = pickle.dumps(np.zeros((2, 3072), np.uint8), protocol=2)
    # the same array pickle, its declared shape (2, 3072) rewritten to (2000000, 3072)
    forged = real.replace(b"K\x02M\x00\x0c\x86", b"J\x80\x84\x1e\x00M\x00\x0c\x86", 1)
    assert forged != real
    payload = b"\x80\x02}(C\x04data" + forged[2:-1] + b"C\x06labels]u."
    _cifar_py(tmp_path / "cifar-10-batches-py", payload)
    with pytest.raises(DataError, match="needs 6144000000 bytes, the pickle holds 6144"):
        data.load("cifar10", data_dir=tmp_path)


def test_no_codec_module_is_imported_on_a_pickle_s_say_so(tmp_path):
    codec = "encodings.mac_farsi"
    sys.modules.pop(codec, None)
    payload = (
        b"\x80\x02"
        + _g("_codecs", "encode")
        + b"X\x01\x00\x00\x00aX\x09\x00\x00\x00mac_farsi\x86R."
    )
    _cifar_py(tmp_path / "cifar-10-batches-py", payload)
    with pytest.raises(DataError, match="refused _codecs.encode"):
        data.load("cifar10", data_dir=tmp_path)
    assert codec not in sys.modules


@pytest.mark.parametrize("dtype", ["O", "V8", "<U4", "M8[s]"])
def test_only_plain_number_dtypes(tmp_path, dtype):
    arr = np.zeros(2, dtype=dtype) if dtype != "O" else np.array([None, None], dtype=object)
    _cifar_py(tmp_path / "cifar-10-batches-py",
              {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"x": arr})  # fmt: skip
    with pytest.raises(DataError, match="refused"):
        data.load("cifar10", data_dir=tmp_path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_plain_arrays_of_every_protocol_still_load(tmp_path, protocol):
    x = np.random.default_rng(1).integers(0, 256, (2, 3072), dtype=np.uint8)
    _cifar_py(tmp_path / "cifar-10-batches-py", {b"data": x, b"labels": np.array([3, 4])},
              protocol)  # fmt: skip
    ds = data.load("cifar10", data_dir=tmp_path)
    assert ds.train_y.tolist()[:2] == [3, 4]


def test_discover_refuses_a_named_folder_that_does_not_exist(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.discover(tmp_path / "nope")
    with pytest.raises(DataError, match="is not a folder"):
        data.discover(Path(__file__))
