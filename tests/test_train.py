"""lowbit.train: config validation, determinism, bit-exact resume, run directories, divergence."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from lowbit import data, models, train
from lowbit.errors import ConfigError
from lowbit.nn import QuantLinear


@pytest.fixture(scope="module")
def ds():
    return data.load("synthetic", n_train=256, n_test=128)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(),
        QuantLinear(64, 32, weight_quantizer="ternary"),
        nn.ReLU(),
        nn.Linear(32, 4),
    )


def _strip(history):
    return [{k: v for k, v in m.items() if k != "wall_s"} for m in history]


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"lr": 0}, "lr"),
        ({"momentum": 0.9}, "momentum"),
        ({"optimizer": "sgd", "momentum": 1.5}, "momentum"),
        ({"batch_size": 0}, "batch_size"),
        ({"epochs": 1.5}, "epochs"),
        ({"seed": -1}, "seed"),
        ({"train_subset": 0}, "train_subset"),
        ({"augment": "yes"}, "augment"),
        ({"lr_schedule": "step"}, "lr_schedule"),
        ({"patience": -1, "val_split": 0.1}, "patience"),
        ({"patience": 3}, "patience needs a validation split"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        train.TrainConfig(**kw)


def test_config_defaults_follow_the_studies():
    adam, sgd = train.TrainConfig(), train.TrainConfig(optimizer="sgd")
    assert adam.resolved_lr == 1e-3 and adam.resolved_momentum is None
    assert sgd.resolved_lr == 1e-3 and sgd.resolved_momentum == 0.92
    opt = train._make_optimizer(_model(), sgd)
    assert opt.param_groups[0]["momentum"] == 0.92
    with pytest.raises(AttributeError):
        adam.epochs = 3  # frozen


def test_fit_is_deterministic_and_learns(ds):
    cfg = train.TrainConfig(epochs=3, batch_size=32, seed=1, lr=1e-2)
    m1, m2 = _model(), _model()
    r1, r2 = train.fit(m1, ds, cfg), train.fit(m2, ds, cfg)
    assert _strip(r1.history) == _strip(r2.history)
    assert _same_weights(m1, m2)
    assert r1.status == "finished" and r1.epochs == 3 and r1.run_dir is None
    assert [m["epoch"] for m in r1.history] == [1, 2, 3]
    assert set(r1.history[0]) == {
        "epoch",
        "train_loss",
        "train_acc",
        "test_loss",
        "test_acc",
        "wall_s",
    }
    assert r1.test_acc > 0.6  # chance is 0.25
    assert r1.history[-1]["train_loss"] < r1.history[0]["train_loss"]
    r3 = train.fit(_model(), ds, train.TrainConfig(epochs=3, batch_size=32, seed=2, lr=1e-2))
    assert _strip(r3.history) != _strip(r1.history)  # the seed matters (shuffling)


def test_fit_with_lowbit_mlp(ds):
    torch.manual_seed(0)
    model = models.get("mlp", depth=1, width=16, layer="nlevel", levels=5, input_shape=(1, 8, 8),
                       classes=4)  # fmt: skip
    result = train.fit(model, ds, train.TrainConfig(epochs=2, batch_size=64))
    assert result.status == "finished" and 0 <= result.test_acc <= 1


class _StopAt:
    def __init__(self, epoch: int):
        self.epoch, self.seen = epoch, []

    def __call__(self, metrics, model):
        self.seen.append(metrics["epoch"])
        if metrics["epoch"] == self.epoch:
            raise KeyboardInterrupt


@pytest.mark.parametrize(
    "cfg",
    [
        train.TrainConfig(epochs=4, batch_size=48, seed=3),
        train.TrainConfig(epochs=4, batch_size=48, seed=3, optimizer="sgd", augment=True),
        train.TrainConfig(epochs=4, batch_size=48, seed=3, lr_schedule="cosine"),
    ],
    ids=["adam", "sgd-augment", "adam-cosine"],
)
def test_resume_equals_uninterrupted_run(tmp_path, ds, cfg):
    full_model = _model()
    full = train.fit(full_model, ds, cfg)

    stop = _StopAt(3)
    first = train.fit(_model(), ds, cfg, run_dir=tmp_path, on_epoch=stop)
    assert first.status == "interrupted" and first.epochs == 2  # epoch 3 was never checkpointed
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((tmp_path / "result.json").read_text())["status"] == "interrupted"

    resumed_model = _model(seed=99)  # a different init: everything must come from the checkpoint
    seen = []
    resumed = train.fit(
        resumed_model, ds, cfg, run_dir=tmp_path, on_epoch=lambda m, _: seen.append(m)
    )
    assert [m["epoch"] for m in seen] == [3, 4]
    assert resumed.status == "finished"
    assert _strip(resumed.history) == _strip(full.history)
    assert _same_weights(resumed_model, full_model)

    again = train.fit(_model(), ds, cfg, run_dir=tmp_path)  # finished: nothing left to do
    assert again.epochs == 4 and _strip(again.history) == _strip(full.history)


def test_more_epochs_continue_a_finished_run(tmp_path, ds):
    cfg2, cfg3 = (train.TrainConfig(epochs=e, batch_size=64) for e in (2, 3))
    full = train.fit(_model(), ds, cfg3)
    train.fit(_model(), ds, cfg2, run_dir=tmp_path)
    more = train.fit(_model(), ds, cfg3, run_dir=tmp_path)
    assert _strip(more.history) == _strip(full.history)


def test_resume_with_a_different_config_is_refused(tmp_path, ds):
    train.fit(_model(), ds, train.TrainConfig(epochs=1), run_dir=tmp_path)
    with pytest.raises(ConfigError, match="lr"):
        train.fit(_model(), ds, train.TrainConfig(epochs=1, lr=0.1), run_dir=tmp_path)
    train.fit(_model(), ds, train.TrainConfig(epochs=2), run_dir=tmp_path)  # epochs may grow
    other = data.load("synthetic", n_train=256, n_test=128, seed=5)
    other.name = "other"
    with pytest.raises(ConfigError, match="other data"):
        train.fit(_model(), other, train.TrainConfig(epochs=2), run_dir=tmp_path)
    with pytest.raises(ConfigError, match="more than epochs"):
        train.fit(_model(), ds, train.TrainConfig(epochs=1), run_dir=tmp_path)


def test_cosine_schedule_anneals_per_step_and_resumes_only_with_its_epochs(
    tmp_path, ds, monkeypatch
):
    cfg = train.TrainConfig(epochs=2, batch_size=64, lr=0.01, lr_schedule="cosine")
    steps = 2 * 4  # 256 images / 64
    lrs = [train.scheduled_lr(cfg, t, steps) for t in range(steps)]
    assert lrs[0] == pytest.approx(0.01) and lrs[steps // 2] == pytest.approx(0.005)
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False)) and lrs[-1] < 0.001
    seen = []

    class Spy(torch.optim.Adam):
        def step(self, closure=None):
            seen.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(train, "_make_optimizer", lambda m, c: Spy(m.parameters(), lr=c.lr))
    train.fit(_model(), ds, cfg, run_dir=tmp_path)
    assert seen == pytest.approx(lrs)  # the optimizer stepped at the scheduled rates
    constant = train.TrainConfig(epochs=2, lr=0.01)
    assert {train.scheduled_lr(constant, t, steps) for t in range(steps)} == {0.01}
    with pytest.raises(ConfigError, match="cosine run of epochs=2, not 3"):
        train.fit(_model(), ds, dataclasses.replace(cfg, epochs=3), run_dir=tmp_path)


def test_early_stopping_ends_at_the_plateau_and_stays_stopped(tmp_path, ds):
    assert not train.plateaued([{"val_acc": 0.5}, {"val_acc": 0.6}], 1)
    assert train.plateaued([{"val_acc": 0.6}, {"val_acc": 0.6}], 1)  # a tie is no progress
    assert not train.plateaued([{"val_acc": 0.6}, {"val_acc": 0.5}], 2)
    assert not train.plateaued([{"val_acc": 0.6}, {"val_acc": 0.5}], 0)  # 0: never
    # a learning rate too small to move the weights: the best is epoch 1, then 2 epochs without
    cfg = train.TrainConfig(epochs=10, lr=1e-12, val_split=0.25, patience=2)
    res = train.fit(_model(), ds, cfg, run_dir=tmp_path)
    assert res.status == "finished" and res.stopped_early and res.epochs == 3
    assert json.loads((tmp_path / "result.json").read_text())["stopped_early"] is True
    again = train.fit(_model(), ds, dataclasses.replace(cfg, epochs=20), run_dir=tmp_path)
    assert again.epochs == 3 and again.stopped_early  # resumed: still at its plateau
    full = train.fit(_model(), ds, dataclasses.replace(cfg, epochs=3))
    assert full.epochs == 3 and not full.stopped_early  # the budget ended it, not the plateau


def test_run_dir_contents(tmp_path, ds):
    cfg = train.TrainConfig(epochs=2, batch_size=64, seed=4)
    model = _model()
    result = train.fit(model, ds, cfg, run_dir=tmp_path / "run")
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint.safetensors",
        "config.json",
        "metrics.jsonl",
        "result.json",
    ]  # no temp files left behind
    config = json.loads((run / "config.json").read_text())
    assert train.TrainConfig.from_dict(config["train"]) == cfg
    assert config["data"]["name"] == "synthetic" and config["data"]["classes"] == 4
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines == [dict(m) for m in result.history]
    stored = json.loads((run / "result.json").read_text())
    assert stored["status"] == "finished" and stored["test_acc"] == result.test_acc
    with safe_open(str(run / "checkpoint.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        for name, value in model.state_dict().items():
            assert torch.equal(f.get_tensor(f"model.{name}"), value)  # latent weights
    assert {"rng.torch", "rng.shuffle"} <= keys
    assert any(k.startswith("optim.") and k.endswith(".exp_avg_sq") for k in keys)
    assert json.loads(meta["config"]) == cfg.to_dict() and meta["epoch"] == "2"


class _Explodes(nn.Module):
    """Finite for the first ``after`` training batches, then NaN logits."""

    def __init__(self, after: int):
        super().__init__()
        self.lin = nn.Linear(64, 4)
        self.after, self.calls = after, 0

    def forward(self, x):
        out = self.lin(x.flatten(1))
        if self.training:
            self.calls += 1
            if self.calls > self.after:
                return out * float("nan")
        return out


def test_nan_loss_ends_the_run_as_diverged(tmp_path, ds):
    cfg = train.TrainConfig(epochs=5, batch_size=64)  # 4 batches per epoch
    torch.manual_seed(0)
    result = train.fit(_Explodes(after=6), ds, cfg, run_dir=tmp_path)
    assert result.status == "diverged" and result.epochs == 2
    assert result.history[-1]["train_loss"] != result.history[-1]["train_loss"]  # NaN recorded
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and lines[1]["train_loss"] is None  # JSON null, not a bare NaN
    assert json.loads((tmp_path / "result.json").read_text())["status"] == "diverged"
    with safe_open(str(tmp_path / "checkpoint.safetensors"), framework="pt") as f:
        assert f.metadata()["epoch"] == "1"  # the last good epoch
    again = train.fit(_Explodes(after=6), ds, cfg, run_dir=tmp_path)
    assert again.status == "diverged" and again.epochs == 2


def test_huge_finite_losses_are_recorded_not_stopped(ds):
    class Huge(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 4)

        def forward(self, x):
            return self.lin(x.flatten(1)) * 1e6

    torch.manual_seed(0)
    result = train.fit(Huge(), ds, train.TrainConfig(epochs=2))
    assert result.status == "finished" and result.train_loss > 1e3


def test_train_subset_is_the_same_for_every_seed(ds):
    picked = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 4)

        def forward(self, x):
            if self.training:
                picked.append(x.detach().clone())
            return self.lin(x.flatten(1))

    for seed in (0, 1):
        train.fit(
            Spy(), ds, train.TrainConfig(epochs=1, batch_size=1000, seed=seed, train_subset=50)
        )
    a, b = picked
    assert a.shape[0] == 50
    key = lambda t: sorted(map(tuple, t.flatten(1)[:, :3].tolist()))  # noqa: E731
    assert key(a) == key(b)


def test_ctrl_c_mid_epoch_leaves_the_last_checkpoint(tmp_path, ds):
    class Interrupts(nn.Module):
        """Raises KeyboardInterrupt on the 6th training batch (epoch 2 of 4-batch epochs)."""

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 4)
            self.calls = 0

        def forward(self, x):
            if self.training:
                self.calls += 1
                if self.calls == 6:
                    raise KeyboardInterrupt
            return self.lin(x.flatten(1))

    torch.manual_seed(0)
    result = train.fit(Interrupts(), ds, train.TrainConfig(epochs=3), run_dir=tmp_path)
    assert result.status == "interrupted" and result.epochs == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    with safe_open(str(tmp_path / "checkpoint.safetensors"), framework="pt") as f:
        assert f.metadata()["epoch"] == "1"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_conv_training_leaves_the_standard_layout(ds):
    """Images train channels-last on the CPU; the model's 4-D tensors come back contiguous, as
    checkpoints, evaluation and packing expect, and the run still learns."""
    from lowbit.bnn import binary_cnn

    torch.manual_seed(0)
    c, h, w = ds.input_shape
    model = binary_cnn(method="reactnet", width=4, input_shape=(c, h, w), classes=ds.classes)
    result = train.fit(model, ds, train.TrainConfig(epochs=2, batch_size=32, lr=1e-2))
    assert result.status == "finished"
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous() for p in convs)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
