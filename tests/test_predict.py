"""``lowbit predict`` end to end: train -> pack -> predict on raw IDX / .npy / PNG images.

The data are small generated files in Fashion-MNIST's IDX layout (learnable: a pattern per class
plus noise), found through ``LOWBIT_DATA``; nothing here normalises the images by hand.
"""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

import lowbit
from lowbit import cli, data, predict

N_TRAIN, N_TEST = 600, 200


def _idx(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    folder = root / "fashion-mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    protos = rng.integers(0, 256, (10, 28, 28))

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 10, n)
        x = np.clip(protos[y] * 0.2 + rng.integers(0, 205, (n, 28, 28)), 0, 255)
        return x.astype(np.uint8), y.astype(np.uint8)

    for prefix, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        x, y = split(n)
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(x)))
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(y))
    return root


@pytest.fixture(scope="module")
def packed_run(fmnist_dir, tmp_path_factory):
    """A short `lowbit train` run on the generated data and its `lowbit pack` file."""
    out = tmp_path_factory.mktemp("run")
    mp = pytest.MonkeyPatch()
    mp.setenv("LOWBIT_DATA", str(fmnist_dir))
    argv = ["--model", "mlp", "--depth", "1", "--width", "32", "--layer", "ternary"]
    assert cli.main(["train", *argv, "--epochs", "2", "--out", str(out / "run"), "--json"]) == 0
    assert cli.main(["pack", str(out / "run"), "-o", str(out / "m.lowbit")]) == 0
    mp.undo()
    result = json.loads((out / "run" / "result.json").read_text())
    return out / "m.lowbit", result["test_acc"]


def _predict(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(["predict", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_on_raw_idx_reproduces_the_runs_accuracy(fmnist_dir, packed_run, capsys):
    path, run_acc = packed_run
    folder = fmnist_dir / "fashion-mnist"
    images, labels = folder / "t10k-images-idx3-ubyte.gz", folder / "t10k-labels-idx1-ubyte"
    code, out, err = _predict(capsys, path, images, "--labels", labels, "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["count"] == N_TEST and rep["dataset"] == "fashion-mnist"
    assert rep["accuracy"] == run_acc == rep["saved_test_accuracy"]
    assert 0.3 < run_acc < 1.0  # learnable, not trivial: not two chance levels, not two 100%s
    assert rep["predictions"][0]["top"][0]["name"] in data.CLASS_NAMES["fashion-mnist"]
    # Bit for bit what the packed model gives on lowbit's own normalised test set.
    model = lowbit.load(path)
    pred = predict.run(model, predict.read_images([images]))
    with torch.inference_mode():
        want = model(data.load("fashion-mnist", fmnist_dir).test_x)
    assert torch.equal(pred.logits, want)


def test_text_output_top_k_and_output_file(fmnist_dir, packed_run, capsys, tmp_path):
    path, run_acc = packed_run
    folder = fmnist_dir / "fashion-mnist"
    images, labels = folder / "t10k-images-idx3-ubyte.gz", folder / "t10k-labels-idx1-ubyte"
    code, out, _ = _predict(capsys, path, images, "--top", "3", "--labels", labels)
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == N_TEST + 1 and lines[0].startswith("0\t") and lines[0].count(",") == 2
    assert lines[-1].startswith(f"accuracy {run_acc:.4f}")
    target = tmp_path / "p.json"
    code, out, err = _predict(capsys, path, images, "--json", "-o", target)
    assert code == 0 and out == "" and "wrote 200 predictions" in err
    assert json.loads(target.read_text())["count"] == N_TEST


def test_npy_and_png_inputs_give_the_idx_predictions(fmnist_dir, packed_run, tmp_path):
    from PIL import Image

    path, _ = packed_run
    model = lowbit.load(path)
    raw = data.read_idx(fmnist_dir / "fashion-mnist" / "t10k-images-idx3-ubyte.gz", 3)[:5]
    np.save(tmp_path / "x.npy", raw)
    pngs = []
    for i, img in enumerate(raw):
        Image.fromarray(img, mode="L").save(tmp_path / f"{i}.png")
        pngs.append(tmp_path / f"{i}.png")
    want = predict.run(model, raw).logits
    assert torch.equal(predict.run(model, predict.read_images([tmp_path / "x.npy"])).logits, want)
    assert torch.equal(predict.run(model, predict.read_images(pngs, channels=1)).logits, want)
    # NHWC .npy of floats in 0..255 is accepted too
    np.save(tmp_path / "f.npy", raw[..., None].astype(np.float32))
    assert torch.equal(predict.run(model, predict.read_images([tmp_path / "f.npy"])).logits, want)


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: np.save(p, np.array([{"a": 1}], dtype=object)), "not a readable .npy"),
        (lambda p: np.save(p, np.zeros((2, 5, 5), np.uint8)), "do not fit"),
        (lambda p: np.save(p, np.full((2, 28, 28), 999.0)), "outside"),
        (lambda p: p.write_bytes(b"garbage"), "not a readable .npy"),
    ],
)
def test_bad_inputs_are_one_line_errors(packed_run, capsys, tmp_path, make, needle):
    path, _ = packed_run
    bad = tmp_path / "bad.npy"
    make(bad)
    code, out, err = _predict(capsys, path, bad)
    assert code == 2 and out == ""
    assert err.startswith("lowbit predict: error:") and needle in err and err.count("\n") == 1


def test_progress_lines_in_a_pipe(fmnist_dir, packed_run, capsys):
    path, _ = packed_run
    images = fmnist_dir / "fashion-mnist" / "t10k-images-idx3-ubyte.gz"
    code, _, err = _predict(capsys, path, images, "--batch-size", "20")
    assert code == 0
    progress = [ln for ln in err.splitlines() if ln.startswith("predict:")]
    assert progress[-1] == f"predict: {N_TEST}/{N_TEST} images" and 2 <= len(progress) <= 11


def test_old_file_without_metadata(fmnist_dir, packed_run, capsys, tmp_path, monkeypatch):
    path, run_acc = packed_run
    model = lowbit.load(path)
    del model.lowbit_meta  # as a file written before the metadata existed
    old = tmp_path / "old.lowbit"
    lowbit.save(model, old)
    assert lowbit.load(old).lowbit_meta is None
    folder = fmnist_dir / "fashion-mnist"
    images, labels = folder / "t10k-images-idx3-ubyte.gz", folder / "t10k-labels-idx1-ubyte"
    code, out, err = _predict(capsys, old, images)
    assert code == 2 and "carries no preprocessing" in err and "--dataset" in err
    monkeypatch.setenv("LOWBIT_DATA", str(fmnist_dir))
    code, out, err = _predict(capsys, old, images, "--dataset", "fashion-mnist", "--labels", labels)
    assert code == 0 and "note: no saved normalisation" in err
    assert out.splitlines()[-1].startswith(f"accuracy {run_acc:.4f}")
