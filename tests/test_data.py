"""lowbit.data: loaders on small generated files in the official formats, corrupt inputs,
the restricted unpickler, discovery, the synthetic set and batch augmentation."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit import data
from lowbit.errors import DataError

IDX_NAMES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No real dataset may leak in: empty HOME, no $LOWBIT_DATA, no Debian folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LOWBIT_DATA", raising=False)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "debian" / "fashion-mnist")


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write(path: Path, raw: bytes, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def _make_idx(folder: Path, n_train=20, n_test=10, gz=False, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for key, arr in arrays.items():
        _write(folder / IDX_NAMES[key], _idx_bytes(arr), gz)
    return arrays


def _expected(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Independent re-derivation of the normalisation: per channel over the training images."""
    tr = train.astype(np.float64) / 255
    axes = (0, 2, 3)
    mean = tr.mean(axis=axes, keepdims=True)
    std = tr.std(axis=axes, ddof=1, keepdims=True)
    return (tr - mean) / std, (test.astype(np.float64) / 255 - mean) / std


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_loads_exact_values(tmp_path, gz, name):
    arrays = _make_idx(tmp_path / "root" / name, gz=gz)
    ds = data.load(name, data_dir=tmp_path / "root")
    assert ds.name == name and ds.classes == 10 and ds.input_shape == (1, 28, 28)
    assert ds.train_x.dtype == torch.float32 and ds.train_x.shape == (20, 1, 28, 28)
    assert ds.train_y.dtype == torch.int64 and ds.test_x.shape == (10, 1, 28, 28)
    tr, te = _expected(arrays["train_x"][:, None], arrays["test_x"][:, None])
    np.testing.assert_allclose(ds.train_x.numpy(), tr, atol=1e-5)
    np.testing.assert_allclose(ds.test_x.numpy(), te, atol=1e-5)
    np.testing.assert_array_equal(ds.train_y.numpy(), arrays["train_y"])
    np.testing.assert_array_equal(ds.test_y.numpy(), arrays["test_y"])


def test_data_dir_itself_holds_the_files(tmp_path):
    arrays = _make_idx(tmp_path / "flat")
    ds = data.load("fashion-mnist", data_dir=tmp_path / "flat")
    np.testing.assert_array_equal(ds.test_y.numpy(), arrays["test_y"])
    assert ds.source == str(tmp_path / "flat")


def test_torchvision_layout_under_env_root(tmp_path, monkeypatch):
    arrays = _make_idx(tmp_path / "tv" / "FashionMNIST" / "raw", seed=3)
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path / "tv"))
    ds = data.load("fashion-mnist")
    np.testing.assert_array_equal(ds.train_y.numpy(), arrays["train_y"])
    assert ds.source.endswith(os.path.join("FashionMNIST", "raw"))


def test_search_order_data_dir_before_env_before_cache_before_debian(tmp_path, monkeypatch):
    _make_idx(tmp_path / "debian" / "fashion-mnist", n_train=11)
    assert len(data.load("fashion-mnist").train_y) == 11
    _make_idx(tmp_path / "home" / ".cache" / "lowbit" / "fashion-mnist", n_train=12)
    assert len(data.load("fashion-mnist").train_y) == 12
    _make_idx(tmp_path / "env" / "fashion-mnist", n_train=13)
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path / "env"))
    assert len(data.load("fashion-mnist").train_y) == 13
    _make_idx(tmp_path / "arg" / "fashion-mnist", n_train=14)
    assert len(data.load("fashion-mnist", data_dir=tmp_path / "arg").train_y) == 14


def test_missing_data_error_names_every_path_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path / "env"))
    with pytest.raises(DataError) as err:
        data.load("fashion-mnist")
    msg = str(err.value)
    searched = data.discover()["fashion-mnist"]["searched"]
    assert len(searched) >= 5
    for path in searched:
        assert path in msg
    assert str(tmp_path / "debian" / "fashion-mnist") in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "\n" not in msg


def test_a_named_data_dir_is_read_or_the_load_fails(tmp_path, monkeypatch):
    # the data exist elsewhere (the system copy, $LOWBIT_DATA): a named folder never falls back
    _make_idx(tmp_path / "debian" / "fashion-mnist")
    _make_idx(tmp_path / "env" / "fashion-mnist")
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path / "env"))
    with pytest.raises(DataError, match="does not exist") as err:
        data.load("fashion-mnist", data_dir=tmp_path / "typo")
    assert str(tmp_path / "typo") in str(err.value)
    (tmp_path / "mine").mkdir()
    with pytest.raises(DataError, match="not found under the folder you named") as err:
        data.load("fashion-mnist", data_dir=tmp_path / "mine")
    assert str(tmp_path / "debian") not in str(err.value)
    assert str(tmp_path / "env") not in str(err.value)
    _make_idx(tmp_path / "mine")
    (tmp_path / "mine" / IDX_NAMES["test_y"]).unlink()
    with pytest.raises(DataError, match="incomplete, missing t10k-labels-idx1-ubyte"):
        data.load("fashion-mnist", data_dir=tmp_path / "mine")
    found = data.discover(tmp_path / "mine")["fashion-mnist"]
    assert found["path"] is None and str(tmp_path / "debian") not in found["searched"]


@pytest.mark.parametrize("bad", [3, "", b"dir", ["a"]])
def test_data_dir_must_be_a_path(bad):
    with pytest.raises(ValueError, match="data_dir must be a folder path"):
        data.load("mnist", data_dir=bad)


def test_unknown_dataset_is_a_value_error():
    with pytest.raises(ValueError, match="valid names: mnist"):
        data.load("imagenet")


def _corrupt_case(folder: Path, case: str) -> Path:
    arrays = _make_idx(folder)
    images = folder / IDX_NAMES["train_x"]
    labels = folder / IDX_NAMES["train_y"]
    raw = _idx_bytes(arrays["train_x"])
    if case == "magic":
        images.write_bytes(b"\x00\x00\x09\x03" + raw[4:])
        return images
    if case == "truncated":
        images.write_bytes(raw[:-100])
        return images
    if case == "trailing":
        images.write_bytes(raw + b"\x00")
        return images
    if case == "dims":
        images.write_bytes(_idx_bytes(arrays["train_x"].reshape(20, 784)))
        return images
    if case == "count":
        labels.write_bytes(_idx_bytes(arrays["train_y"][:19]))
        return images
    if case == "label-range":
        labels.write_bytes(_idx_bytes(np.full(20, 10, dtype=np.uint8)))
        return labels
    if case in ("gzip", "gzip-garbled"):
        images.unlink()
        bad = images.with_name(images.name + ".gz")
        packed = bytearray(gzip.compress(raw))
        if case == "gzip":
            packed = packed[:50]  # truncated stream
        else:
            packed[30:40] = b"\xff" * 10  # corrupt deflate data
        bad.write_bytes(bytes(packed))
        return bad
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    ["magic", "truncated", "trailing", "dims", "count", "label-range", "gzip", "gzip-garbled"],
)
def test_corrupt_idx_names_the_file(tmp_path, case):
    bad = _corrupt_case(tmp_path / "fashion-mnist", case)
    with pytest.raises(DataError) as err:
        data.load("fashion-mnist", data_dir=tmp_path)
    assert str(bad) in str(err.value)


def test_cache_reuses_tensors_and_notices_changed_files(tmp_path):
    folder = tmp_path / "mnist"
    _make_idx(folder)
    a = data.load("mnist", data_dir=tmp_path)
    b = data.load("mnist", data_dir=tmp_path)
    assert a.train_x is b.train_x  # parsed once per process
    arrays = _make_idx(folder, n_train=21, seed=7)
    os.utime(folder / IDX_NAMES["train_x"], ns=(1, 1))  # a different mtime even on coarse clocks
    c = data.load("mnist", data_dir=tmp_path)
    np.testing.assert_array_equal(c.train_y.numpy(), arrays["train_y"])


# --- CIFAR ---------------------------------------------------------------------------------------


def _cifar_arrays(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    return x, rng.integers(0, classes, n), rng.integers(0, 20, n)


def _make_cifar_bin(root: Path, name: str) -> tuple[np.ndarray, ...]:
    folder = root / ("cifar-10-batches-bin" if name == "cifar10" else "cifar-100-binary")
    folder.mkdir(parents=True)
    splits = {}
    files = (
        {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        if name == "cifar10"
        else {"train": ["train"], "test": ["test"]}
    )
    for split, stems in files.items():
        xs, ys = [], []
        for j, stem in enumerate(stems):
            x, fine, coarse = _cifar_arrays(
                4, 10 if name == "cifar10" else 100, seed=j + len(split)
            )
            if name == "cifar10":
                rec = np.concatenate([fine[:, None].astype(np.uint8), x], axis=1)
            else:
                rec = np.concatenate(
                    [coarse[:, None].astype(np.uint8), fine[:, None].astype(np.uint8), x], axis=1
                )
            (folder / f"{stem}.bin").write_bytes(rec.tobytes())
            xs.append(x)
            ys.append(fine)
        splits[split] = (np.concatenate(xs), np.concatenate(ys))
    return splits["train"] + splits["test"]


def _make_cifar_py(root: Path, name: str, protocol: int) -> tuple[np.ndarray, ...]:
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True)
    key = b"labels" if name == "cifar10" else b"fine_labels"
    files = (
        {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        if name == "cifar10"
        else {"train": ["train"], "test": ["test"]}
    )
    splits = {}
    for split, stems in files.items():
        xs, ys = [], []
        for j, stem in enumerate(stems):
            x, fine, coarse = _cifar_arrays(3, 10 if name == "cifar10" else 100, seed=j)
            batch = {b"data": x, key: [int(v) for v in fine], b"batch_label": b"x"}
            if name == "cifar100":
                batch[b"coarse_labels"] = [int(v) for v in coarse]
            (folder / stem).write_bytes(pickle.dumps(batch, protocol=protocol))
            xs.append(x)
            ys.append(fine)
        splits[split] = (np.concatenate(xs), np.concatenate(ys))
    return splits["train"] + splits["test"]


def _check_cifar(ds, arrays, classes: int) -> None:
    tr_x, tr_y, te_x, te_y = arrays
    assert ds.input_shape == (3, 32, 32) and ds.classes == classes
    exp_tr, exp_te = _expected(tr_x.reshape(-1, 3, 32, 32), te_x.reshape(-1, 3, 32, 32))
    np.testing.assert_allclose(ds.train_x.numpy(), exp_tr, atol=1e-5)
    np.testing.assert_allclose(ds.test_x.numpy(), exp_te, atol=1e-5)
    np.testing.assert_array_equal(ds.train_y.numpy(), tr_y)
    np.testing.assert_array_equal(ds.test_y.numpy(), te_y)
    assert ds.train_y.dtype == torch.int64


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_binary(tmp_path, name):
    arrays = _make_cifar_bin(tmp_path, name)
    _check_cifar(data.load(name, data_dir=tmp_path), arrays, 10 if name == "cifar10" else 100)


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_python_through_restricted_unpickler(tmp_path, name, protocol):
    arrays = _make_cifar_py(tmp_path, name, protocol)
    _check_cifar(data.load(name, data_dir=tmp_path), arrays, 10 if name == "cifar10" else 100)


def test_cifar_binary_truncated_names_the_file(tmp_path):
    _make_cifar_bin(tmp_path, "cifar10")
    bad = tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin"
    bad.write_bytes(bad.read_bytes()[:-1])
    with pytest.raises(DataError, match="data_batch_3.bin"):
        data.load("cifar10", data_dir=tmp_path)


def test_cifar_python_label_count_mismatch(tmp_path):
    _make_cifar_py(tmp_path, "cifar10", 2)
    bad = tmp_path / "cifar-10-batches-py" / "test_batch"
    bad.write_bytes(pickle.dumps({b"data": np.zeros((3, 3072), np.uint8), b"labels": [1, 2]}))
    with pytest.raises(DataError, match="test_batch.*3 images but 2"):
        data.load("cifar10", data_dir=tmp_path)


class _Evil:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


@pytest.mark.parametrize("payload", ["reduce", "eval", "object-array"])
def test_restricted_unpickler_rejects_malicious_pickle(tmp_path, payload):
    _make_cifar_py(tmp_path, "cifar10", 2)
    target = tmp_path / "pwned"
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    if payload == "reduce":
        obj = {b"data": _Evil(target), b"labels": [0]}
    elif payload == "eval":
        obj = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _EvalPayload()}
    else:
        obj = {b"data": np.array([_Evil(target)], dtype=object), b"labels": [0]}
    bad.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(DataError, match="data_batch_1"):
        data.load("cifar10", data_dir=tmp_path)
    assert not target.exists()


class _EvalPayload:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_restricted_unpickler_allows_only_the_listed_globals():
    evil = pickle.dumps(_EvalPayload(), protocol=2)
    with pytest.raises(
        pickle.UnpicklingError, match=r"refused global (__builtin__|builtins)\.eval"
    ):
        data._RestrictedUnpickler(io.BytesIO(evil)).load()


# --- discovery, synthetic, augmentation ----------------------------------------------------------


def test_discover_reports_found_and_missing(tmp_path):
    _make_idx(tmp_path / "mnist", gz=True)
    found = data.discover(tmp_path)
    assert set(found) == set(data.NAMES)
    assert found["mnist"]["path"] == str(tmp_path / "mnist")
    assert found["mnist"]["format"] == "idx" and len(found["mnist"]["files"]) == 4
    assert found["cifar10"]["path"] is None and found["cifar10"]["searched"]
    assert found["synthetic"]["format"] == "generated"


def test_synthetic_is_deterministic_learnable_shape():
    a, b = data.load("synthetic"), data.load("synthetic")
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    c = data.load("synthetic", seed=1)
    assert not torch.equal(a.train_x, c.train_x)
    assert a.train_x.shape == (512, 1, 8, 8) and a.train_y.dtype == torch.int64
    assert set(a.train_y.tolist()) == {0, 1, 2, 3}
    # Learnable: the nearest class mean (from the training set) beats chance by far on test.
    means = torch.stack([a.train_x[a.train_y == k].mean(0) for k in range(4)]).flatten(1)
    pred = torch.cdist(a.test_x.flatten(1), means).argmin(1)
    assert (pred == a.test_y).float().mean() > 0.7


def test_augment_identity_flip_and_determinism():
    x = torch.randn(6, 3, 8, 8)
    still = data.Augment(shift=0, zoom=0, flip=0, rotation=0)
    torch.testing.assert_close(still(x), x, atol=1e-5, rtol=0)
    flipped = data.Augment(shift=0, zoom=0, flip=1, rotation=0)
    torch.testing.assert_close(flipped(x), x.flip(-1), atol=1e-5, rtol=0)
    aug = data.Augment()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    y1, y2 = aug(x, g1), aug(x, g2)
    assert torch.equal(y1, y2) and y1.shape == x.shape
    assert not torch.allclose(y1, x)


def test_augment_shift_stays_within_the_documented_fraction():
    x = torch.zeros(64, 1, 20, 20)
    x[:, :, 8:12, 8:12] = 1.0  # a centred blob; its centre of mass moves with the shift
    y = data.Augment(shift=0.1, zoom=0, flip=0, rotation=0)(x, torch.Generator().manual_seed(0))
    coords = torch.arange(20, dtype=torch.float32)
    mass = y.sum(dim=(1, 2, 3))
    cx = (y.sum(dim=(1, 2)) * coords).sum(-1) / mass - 9.5
    cy = (y.sum(dim=(1, 3)) * coords).sum(-1) / mass - 9.5
    # Up to 10% of 20 pixels = 2 pixels either way, and the range is used.
    assert cx.abs().max() <= 2.0 + 1e-4 and cy.abs().max() <= 2.0 + 1e-4
    assert cx.abs().max() > 1.5 and cy.abs().max() > 1.5


def _py2_batch(x: np.ndarray, labels: list[int]) -> bytes:
    """A CIFAR batch as Python 2's cPickle wrote it: py2 ``str`` (SHORT_BINSTRING / BINSTRING)
    keys and array bytes, ``numpy.core.multiarray._reconstruct`` and a dtype with BUILD state."""

    def s(b: bytes) -> bytes:
        if len(b) < 256:
            return b"U" + bytes([len(b)]) + b
        return b"T" + struct.pack("<I", len(b)) + b

    def k(i: int) -> bytes:
        return b"K" + bytes([i]) if i < 256 else b"M" + struct.pack("<H", i)

    n = x.shape[0]
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
        + k(0) + b"\x85" + s(b"b") + b"\x87R"  # _reconstruct(ndarray, (0,), 'b')
        + b"(" + k(1) + k(n) + k(3072) + b"\x86"  # state: (1, (n, 3072),
        + b"cnumpy\ndtype\n" + s(b"u1") + k(0) + k(1) + b"\x87R"  # dtype('u1', 0, 1)
        + b"(" + k(3) + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xff" + k(0) + b"tb"
        + b"\x89" + s(x.tobytes()) + b"tb"  # False, raw bytes)
    )  # fmt: skip
    label_list = b"](" + b"".join(k(v) for v in labels) + b"e"
    return (
        b"\x80\x02}(" + s(b"data") + array + s(b"labels") + label_list + s(b"batch_label")
        + s(b"training batch 1 of 5") + b"u."
    )  # fmt: skip


def test_cifar_python_batches_written_by_python2(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for stem in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, 2)]
        (folder / stem).write_bytes(_py2_batch(x, y))
        xs.append(x)
        ys.append(y)
    ds = data.load("cifar10", data_dir=tmp_path)
    assert ds.train_y.tolist() == sum(ys[:5], []) and ds.test_y.tolist() == ys[5]
    exp_tr, exp_te = _expected(
        np.concatenate(xs[:5]).reshape(-1, 3, 32, 32), xs[5].reshape(-1, 3, 32, 32)
    )
    np.testing.assert_allclose(ds.train_x.numpy(), exp_tr, atol=1e-5)
    np.testing.assert_allclose(ds.test_x.numpy(), exp_te, atol=1e-5)
