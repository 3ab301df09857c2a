"""lowbit.summary: per-layer rows pinned by hand, and the predicted size equal to the file's."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QATConfig, models, pack, quantize_
from lowbit.packed import convert_

LEVELS = (2, 3, 4, 5, 8, 9, 16, 17)


def _net(levels: int) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 10),
        nn.LayerNorm(10),
    )
    return quantize_(net, QATConfig(levels=levels))


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("layout", pack.LAYOUTS)
def test_predicted_size_is_the_file_size(tmp_path, levels: int, layout: str) -> None:
    net = _net(levels)
    fake = lowbit.summary(net, layout=layout)
    path = tmp_path / "m.lowbit"
    size = lowbit.save(convert_(net), path, layout=layout)
    assert fake.total_bytes == size == path.stat().st_size
    assert lowbit.summary(net, layout=layout).total_bytes == size  # packed model: same
    from_file = lowbit.summary(path)
    assert from_file.file_bytes == size and from_file.total_bytes == size


def test_rows_pinned_by_hand() -> None:
    s = lowbit.summary(_net(5), input_shape=(3, 6, 6))
    conv, linear, norm = s.rows
    c5 = pack.codec(5)
    assert (conv.name, conv.type, conv.levels) == ("0", "QuantConv2d", 5)
    assert conv.params == 4 * 3 * 9 + 4
    assert conv.packed_bytes == c5.nbytes(108) + 4 + 4 * 4  # codes + scale + bias
    assert conv.stored_bits == 8 * c5.nbytes(108) / 108
    assert conv.macs == 4 * 6 * 6 * (3 * 9)
    assert linear.macs == 144 * 10 and linear.params == 1450
    assert linear.nominal_bits == pytest.approx(math.log2(5))
    assert (norm.type, norm.levels, norm.nominal_bits, norm.params) == ("LayerNorm", None, 32, 20)
    assert norm.packed_bytes == 80 and norm.stored_bits == 32
    assert s.params == sum(r.params for r in s.rows) == 112 + 1450 + 20
    assert s.fp32_bytes == 4 * s.params
    assert s.total_bytes == s.header_bytes + sum(r.packed_bytes for r in s.rows)
    assert s.compression == pytest.approx(s.fp32_bytes / s.total_bytes)
    assert s.bits_per_weight == pytest.approx(8 * s.total_bytes / s.params)
    assert s.macs == conv.macs + linear.macs


def test_str_is_the_table_and_json_round_trips() -> None:
    s = lowbit.summary(models.get("mlp", depth=1, width=32, layer="ternary"))
    text = str(s)
    assert text.splitlines()[0].split()[:3] == ["layer", "type", "levels"]
    assert f"{s.total_bytes:,} bytes" in text and "compression" in text
    d = json.loads(json.dumps(s.to_dict()))
    assert d["total_bytes"] == s.total_bytes and len(d["rows"]) == len(s.rows)
    assert s.macs == 784 * 32 + 32 * 10  # input shape from the model spec


def test_ternary_storage_near_1_6_bits() -> None:
    s = lowbit.summary(models.get("mlp", depth=2, width=512, layer="ternary"))
    weights = 784 * 512 + 512 * 512 + 512 * 10
    fp32_parts = 4 * (512 + 512 + 10 + 3)  # biases + per-tensor scales
    bound = weights * 1.6 / 8 + fp32_parts
    assert s.total_bytes <= 1.02 * bound


def test_summary_of_a_run_dir_and_cli(tmp_path, capsys) -> None:
    from lowbit import data, train
    from lowbit.cli import main

    ds = data.load("synthetic", n_train=32, n_test=16, shape=(1, 8, 8))
    model = models.get(
        "mlp", depth=1, width=8, layer="nlevel", levels=9, input_shape=(1, 8, 8), classes=4
    )
    rd = tmp_path / "run"
    train.fit(model, ds, train.TrainConfig(epochs=1, batch_size=16), run_dir=rd, progress=False)
    s = lowbit.summary(rd)
    assert [r.levels for r in s.rows] == [9, 9]
    assert main(["summary", str(rd), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total_bytes"] == s.total_bytes
    assert main(["pack", str(rd), "-o", str(tmp_path / "m.lowbit")]) == 0
    capsys.readouterr()
    assert (tmp_path / "m.lowbit").stat().st_size == s.total_bytes
    assert main(["summary", str(tmp_path / "m.lowbit")]) == 0
    assert "file on disk" in capsys.readouterr().out
