"""The ``lowbit data`` and ``lowbit train`` commands: JSON output, one-line errors, exit codes."""

from __future__ import annotations

import json

import pytest

from lowbit import cli, data


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse's own errors and --help
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_train_json_on_synthetic(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = _run(
        capsys,
        "train",
        "--dataset", "synthetic",
        "--layer", "ternary",
        "--depth", "1",
        "--width", "16",
        "--epochs", "2",
        "--out", str(out_dir),
        "--json",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)  # stdout is exactly one JSON object
    assert set(result) == {
        "test_acc",
        "test_loss",
        "train_acc",
        "train_loss",
        "epochs",
        "status",
        "run_dir",
        "stopped_early",
    }
    assert result["status"] == "finished" and result["epochs"] == 2
    assert result["stopped_early"] is False
    assert 0 <= result["test_acc"] <= 1 and result["run_dir"] == str(out_dir)
    assert (out_dir / "checkpoint.safetensors").exists()
    config = json.loads((out_dir / "config.json").read_text())
    assert config["model"]["name"] == "mlp"
    assert config["model"]["kwargs"]["layer"] == "ternary"
    assert config["model"]["kwargs"]["width"] == 16


def test_train_binary_models_take_their_own_sizes(tmp_path, capsys):
    for name, flags in (("binary_mlp", ["--depth", "2", "--width", "24"]), ("binary_cnn", [])):
        out_dir = tmp_path / name
        argv = ["train", "--model", name, "--layer", "reactnet", "--dataset", "synthetic"]
        code, _, err = _run(capsys, *argv, *flags, "--epochs", "1", "--out", str(out_dir))
        assert code == 0, err
        kwargs = json.loads((out_dir / "config.json").read_text())["model"]["kwargs"]
        assert kwargs["layer"] == "reactnet"
        if flags:
            assert kwargs["depth"] == 2 and kwargs["width"] == 24


def test_train_prints_epochs_without_json(tmp_path, capsys):
    code, out, err = _run(
        capsys, "train", "--dataset", "synthetic", "--epochs", "1", "--out", str(tmp_path)
    )
    assert code == 0
    assert "epoch 1/1" in err and "finished" in out  # progress on stderr, the result on stdout


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--dataset", "synthetic"], "--out"),
        (["train", "--out", "X", "--epochs", "many"], "--epochs"),
        (["train", "--out", "X", "--epochs", "0"], "epochs"),
        (["train", "--out", "X", "--optimizer", "lbfgs"], "--optimizer"),
        (["train", "--out", "X", "--dataset", "imagenet"], "imagenet"),
        (["train", "--out", "X", "--dataset", "synthetic", "--layer", "nlevel"], "levels"),
        (["train", "--out", "X", "--dataset", "synthetic", "--layer", "fivebit"], "fivebit"),
        (["train", "--out", "X", "--model", "cvnn1", "--depth", "3"], "--depth"),
        (["train", "--out", "X", "--model", "binary_cnn", "--depth", "3"], "--depth"),
        (["train", "--out", "X", "--model", "nosuch"], "nosuch"),
        (["train", "--out", "X", "--no-such-flag"], "no-such-flag"),
    ],
)
def test_bad_flags_give_one_line_errors_exit_2(tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(("lowbit train: error:", "lowbit: error:"))
    assert needle in lines[0]


def test_missing_dataset_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("LOWBIT_DATA", raising=False)
    code, _, err = _run(
        capsys, "train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", "X"
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "cifar10 not found" in err and str(tmp_path) in err


def test_data_json(tmp_path, capsys):
    code, out, _ = _run(capsys, "data", "--data-dir", str(tmp_path), "--json")
    assert code == 0
    found = json.loads(out)
    assert set(found) == set(data.NAMES)
    assert found["synthetic"]["format"] == "generated"
    assert str(tmp_path) in found["mnist"]["searched"][0]


def test_data_plain(capsys):
    code, out, _ = _run(capsys, "data")
    assert code == 0
    assert {line.split()[0] for line in out.splitlines()} == set(data.NAMES)


@pytest.mark.parametrize("cmd", ["train", "data"])
def test_help_has_examples(capsys, cmd):
    code, out, _ = _run(capsys, cmd, "--help")
    assert code == 0 and "examples:" in out and f"lowbit {cmd}" in out
