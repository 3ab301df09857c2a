"""Device plumbing without a GPU: --device on train and study, the data moved once, bf16
autocast, the validation split."""

from __future__ import annotations

import json

import pytest
import torch

from lowbit import data, models
from lowbit.errors import ConfigError
from lowbit.train import TrainConfig, fit, resolve_device, split_validation


def _model():
    torch.manual_seed(0)
    return models.get("mlp", depth=1, width=16, input_shape=(1, 8, 8), classes=4)


@pytest.mark.parametrize("name", ["cuda:7", "bogus", "meta"])
def test_unusable_device_is_a_config_error(name):
    if name.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 CUDA devices")
    with pytest.raises(ConfigError, match="device"):
        resolve_device(name)
    assert resolve_device("cpu") == torch.device("cpu")


def test_data_moves_to_the_device_once(monkeypatch):
    # every Tensor.to in the loop is recorded: no mini-batch is moved (the whole set was, once)
    ds = data.synthetic(n_train=200, n_test=50)
    calls = []
    real_to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        calls.append(tuple(self.shape))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    fit(_model(), ds, TrainConfig(epochs=2, batch_size=32, device="cpu"), progress=False)
    batch_moves = [s for s in calls if s and s[0] == 32]
    assert not batch_moves
    assert (200, 1, 8, 8) in calls  # the training images, moved before the first epoch


def test_amp_runs_the_forward_in_bfloat16():
    ds = data.synthetic(n_train=128, n_test=32)
    model = _model()
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    res = fit(model, ds, TrainConfig(epochs=1, amp=True), progress=False)
    assert res.status == "finished" and torch.isfinite(torch.tensor(res.test_loss))
    assert set(seen) == {torch.bfloat16}
    assert model[1].weight.dtype == torch.float32  # latent weights stay fp32


def test_validation_split_is_fixed_disjoint_and_recorded(tmp_path):
    ds = data.synthetic(n_train=200, n_test=50)
    tx, ty, vx, vy = split_validation(ds.train_x, ds.train_y, 0.1)
    assert len(vy) == 20 and len(ty) == 180
    rows = {tuple(r.flatten().tolist()) for r in tx}
    assert not any(tuple(r.flatten().tolist()) in rows for r in vx)
    again = split_validation(ds.train_x, ds.train_y, 0.1)
    assert torch.equal(again[2], vx)  # the same images whatever the training seed
    cfg = TrainConfig(epochs=2, val_split=0.1, seed=3)
    res = fit(_model(), ds, cfg, run_dir=tmp_path / "r", progress=False)
    assert all(0 <= m["val_acc"] <= 1 and m["val_loss"] > 0 for m in res.history)
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["train"]["val_split"] == 0.1 and saved["data"]["val_size"] == 20
    assert saved["train"]["device"] == "cpu"
    with pytest.raises(ValueError, match="val_split"):
        TrainConfig(val_split=1.0)


def test_cli_device_flags(tmp_path, capsys):
    from lowbit.cli import main

    out = tmp_path / "t"
    args = ["train", "--dataset", "synthetic", "--epochs", "1", "--out", str(out), "--json"]
    assert main([*args, "--device", "cuda:9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cuda" in err[0]
    assert main([*args, "--device", "cpu", "--val-split", "0.2"]) == 0
    capsys.readouterr()
    assert json.loads((out / "config.json").read_text())["train"]["device"] == "cpu"

    spec = tmp_path / "s.toml"
    spec.write_text(
        '[grid]\nlayer = ["ternary"]\ndataset = "synthetic"\nepochs = 1\nwidth = 8\ndepth = 1\n'
    )
    study = ["study", str(spec), "--out", str(tmp_path / "o"), "--workers", "1"]
    assert main([*study, "--device", "bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main([*study, "--device", "cpu", "--json"]) == 0
    from lowbit.study.store import Store

    with Store(tmp_path / "o" / "results.sqlite", readonly=True) as s:
        (run,) = s.runs()
    assert run["device"] == "cpu" and run["classes"] == 4
