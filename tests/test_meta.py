"""Model metadata: validation, the preprocessing helper, and where the metadata comes from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lowbit
from lowbit import data, meta

FULL = meta.ModelMeta(
    input_shape=(1, 4, 4),
    input_dtype="uint8",
    input_range=(0.0, 255.0),
    normalisation=meta.Normalisation(255.0, (0.25,), (0.5,)),
    class_names=("a", "b", "c"),
    dataset="fashion-mnist",
    test_accuracy=0.75,
)


def test_json_round_trip_and_missing() -> None:
    assert meta.from_json(FULL.to_json()) == FULL
    assert FULL.missing() == []
    assert meta.ModelMeta().missing() == list(FULL.to_json())


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("input_shape", [1, 4], "input_shape"),
        ("input_shape", [1, 4, 0], "input_shape"),
        ("input_shape", [1, 4, 4.5], "input_shape"),
        ("input_shape", [True, 4, 4], "input_shape"),
        ("input_dtype", "int16", "input_dtype"),
        ("input_range", [255, 0], "input_range"),
        ("input_range", [0, float("inf")], "input_range"),
        ("normalisation", {"divide": 255, "mean": [0.1, 0.2], "std": [1, 1]}, "mean"),
        ("normalisation", {"divide": 255, "mean": [0.1], "std": [0]}, "std"),
        ("normalisation", {"divide": 0, "mean": [0.1], "std": [1]}, "divide"),
        ("normalisation", {"mean": [0.1], "std": [1]}, "normalisation"),
        ("class_names", ["a", 3], "class_names"),
        ("class_names", [], "class_names"),
        ("dataset", "", "dataset"),
        ("test_accuracy", 1.5, "test_accuracy"),
        ("test_accuracy", "0.9", "test_accuracy"),
    ],
)
def test_bad_fields_are_named(field, value, needle) -> None:
    obj = FULL.to_json() | {field: value}
    with pytest.raises(ValueError, match=needle):
        meta.from_json(obj)


def test_unknown_or_missing_keys_are_rejected() -> None:
    with pytest.raises(ValueError, match="exactly the keys"):
        meta.from_json(FULL.to_json() | {"extra": 1})
    obj = FULL.to_json()
    del obj["dataset"]
    with pytest.raises(ValueError, match="exactly the keys"):
        meta.from_json(obj)


def test_api_construction_is_validated() -> None:
    with pytest.raises(ValueError, match="test_accuracy"):
        meta.ModelMeta(test_accuracy=2.0)


def test_preprocess_is_the_dataset_normalisation_bit_for_bit(tmp_path) -> None:
    # Small generated IDX files in Fashion-MNIST's layout; lowbit.data normalises them.
    rng = np.random.default_rng(0)
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 30, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 12, dtype=np.uint8),
    }
    for name, arr in arrays.items():
        header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
        (folder / name).write_bytes(header + arr.tobytes())
    ds = data.load("fashion-mnist", tmp_path)
    info = meta.from_dataset(ds, test_accuracy=0.5)
    assert info.input_shape == (1, 28, 28) and info.input_dtype == "uint8"
    assert info.class_names == data.CLASS_NAMES["fashion-mnist"]
    assert info.dataset == "fashion-mnist" and info.test_accuracy == 0.5
    raw = arrays["t10k-images-idx3-ubyte"]
    assert torch.equal(lowbit.preprocess(info, raw), ds.test_x)  # (N, H, W) uint8
    assert torch.equal(lowbit.preprocess(info, raw[:, None].astype(np.float64)), ds.test_x)
    assert torch.equal(lowbit.preprocess(info, torch.from_numpy(raw[..., None])), ds.test_x)


def test_preprocess_does_not_modify_its_input() -> None:
    x = torch.full((2, 1, 4, 4), 100.0)
    lowbit.preprocess(FULL, x)
    assert bool((x == 100.0).all())


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (np.zeros((2, 5, 5), np.uint8), "do not fit"),
        (np.full((2, 4, 4), 300.0), "outside"),
        (np.full((2, 4, 4), -1.0), "outside"),
        (np.full((2, 4, 4), np.nan), "NaN"),
    ],
)
def test_preprocess_rejects_what_does_not_fit(raw, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        lowbit.preprocess(FULL, raw)


def test_preprocess_without_normalisation_casts_only() -> None:
    info = meta.ModelMeta(input_shape=(1, 2, 2), input_dtype="float32")
    x = np.arange(8, dtype=np.float64).reshape(2, 2, 2)
    assert torch.equal(lowbit.preprocess(info, x), torch.from_numpy(x).float()[:, None])
    with pytest.raises(ValueError, match="input shape"):
        lowbit.preprocess(meta.ModelMeta(), x)


def test_from_data_info_of_an_old_run_config() -> None:
    # config.json written before mean/std were recorded: no normalisation, the rest known
    info = meta.from_data_info(
        {"name": "fashion-mnist", "input_shape": [1, 28, 28], "classes": 10}, 0.8
    )
    assert info.normalisation is None and info.class_names == data.CLASS_NAMES["fashion-mnist"]
    assert info.missing() == ["normalisation"]
    synthetic = meta.from_data_info({"name": "synthetic", "input_shape": [1, 8, 8], "classes": 4})
    assert synthetic.input_dtype == "float32" and synthetic.class_names is None


# --- in the .lowbit file -------------------------------------------------------------------------


def _small_packed():
    torch.manual_seed(0)
    net = lowbit.models.get(
        "mlp", depth=1, width=8, input_shape=(1, 4, 4), classes=3, layer="ternary"
    )
    return lowbit.convert_(net).eval()


def test_save_and_load_carry_the_metadata(tmp_path) -> None:
    net = _small_packed()
    size = lowbit.save(net, tmp_path / "m.lowbit", meta=FULL)
    assert size == lowbit.fileformat.predicted_size(net, meta=FULL)
    loaded = lowbit.load(tmp_path / "m.lowbit")
    assert loaded.lowbit_meta == FULL
    # a loaded model saves back with its metadata; the JSON form is accepted too
    lowbit.save(loaded, tmp_path / "again.lowbit")
    assert lowbit.load(tmp_path / "again.lowbit").lowbit_meta == FULL
    lowbit.save(net, tmp_path / "dict.lowbit", meta=FULL.to_json())
    assert lowbit.load(tmp_path / "dict.lowbit").lowbit_meta == FULL
    with pytest.raises(ValueError, match="test_accuracy"):
        lowbit.save(net, tmp_path / "bad.lowbit", meta=FULL.to_json() | {"test_accuracy": 7})


def _edited(tmp_path, edit) -> object:
    from test_packed import _rewrite  # the header rewriter of the format tests

    lowbit.save(_small_packed(), tmp_path / "m.lowbit", meta=FULL)
    _rewrite(tmp_path / "m.lowbit", tmp_path / "e.lowbit", edit_meta=edit)
    return tmp_path / "e.lowbit"


def test_version_1_files_load_without_metadata(tmp_path) -> None:
    def to_v1(m):
        m["format_version"] = 1
        del m["meta"]

    assert lowbit.load(_edited(tmp_path, to_v1)).lowbit_meta is None


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda m: m.update(format_version=1), "not part of format version 1"),
        (lambda m: m.pop("meta"), "'meta' is missing"),
        (lambda m: m["meta"].update(test_accuracy=2), "meta.test_accuracy"),
        (lambda m: m["meta"].update(class_names="abc"), "meta.class_names"),
        (lambda m: m["meta"]["normalisation"].update(std=[0]), "meta.normalisation.std"),
        (lambda m: m["meta"].update(surprise=1), "exactly the keys"),
        (lambda m: m.update(meta=[1, 2]), "exactly the keys"),
        (lambda m: m.update(format_version=3), "format version 3"),
    ],
)
def test_bad_metadata_in_a_file_is_a_format_error_naming_it(tmp_path, edit, needle) -> None:
    path = _edited(tmp_path, edit)
    with pytest.raises(lowbit.errors.FormatError, match=needle) as err:
        lowbit.load(path)
    assert str(err.value).startswith(str(path))
