"""ONNX export: onnxruntime's outputs against the packed model's, layer by layer and model by model.

int8 (absmax8) layers must agree bit for bit (the graph repeats the kernels' integer arithmetic);
fp32 (weight-only) layers up to float32 summation order, with identical predictions.
"""

from __future__ import annotations

import copy
import sys

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import lowbit
from lowbit import cli, export, meta, models, train
from lowbit.errors import LowbitError
from lowbit.kernels import reference
from lowbit.nn import QATConfig, quantize_
from lowbit.packed import convert_

LEVELS = (2, 3, 4, 5, 8, 9, 16, 17, 255, 256)


def _run_onnx(model: nn.Module, x: torch.Tensor, **kw) -> np.ndarray:
    kw.setdefault("input_shape", tuple(x.shape[1:]))
    sess = export.session(export.to_onnx(model, **kw))
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _compare(packed: nn.Module, x: torch.Tensor, exact: bool) -> float:
    """max |onnxruntime - packed| over x; asserts equality (exact) or a float32-order bound."""
    with torch.no_grad():
        want = packed(x).numpy()
    got = _run_onnx(packed, x)
    assert got.shape == want.shape
    delta = float(np.abs(got - want).max())
    if exact:
        assert delta == 0.0
    else:
        assert delta <= 1e-4 * max(1.0, float(np.abs(want).max()))
        assert (got.argmax(1) == want.argmax(1)).all()
    return delta


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_integer_weight_is_the_dequantized_weight_bit_for_bit(levels, granularity) -> None:
    g = torch.Generator().manual_seed(levels)
    codes = torch.randint(0, levels, (7, 40), generator=g, dtype=torch.uint8)
    scale = torch.rand(7 if granularity == "channel" else (), generator=g) + 0.01
    q, z, t = export.integer_weight(codes, scale, levels)
    assert q.min() >= 0 and z >= 0
    w = (q - z).astype(np.float32) * (t.reshape(-1, 1) if t.ndim else t)
    assert np.array_equal(w, reference.dequantize(codes, scale, levels).numpy())


def _layer_net(kind: str, levels: int, act: str | None, granularity: str) -> nn.Module:
    torch.manual_seed(levels)
    cfg = QATConfig(levels=levels, granularity=granularity, activations=act)
    if kind == "linear":
        net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 5 * 5, 37), nn.ReLU(), nn.Linear(37, 6))
    else:
        net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 5, 3, stride=2, padding="valid", bias=False),
            nn.Flatten(),
        )
    return convert_(quantize_(net, cfg)).eval()


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("act", [None, "absmax8"])
def test_packed_layers_every_level_count_both_modes(levels, kind, act) -> None:
    x = torch.randn(6, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    granularity = "channel" if levels % 2 else "tensor"
    net = _layer_net(kind, levels, act, granularity)
    _compare(net, x, exact=act == "absmax8")


@pytest.mark.parametrize("compact", [False, True])
def test_weight_only_linear_uses_matmulnbits_with_the_smallest_bits(compact) -> None:
    bits = {}
    for levels in (2, 3, 4, 5, 16, 17, 129, 130):
        net = _layer_net("linear", levels, None, "tensor")
        proto = export.to_onnx(net, input_shape=(3, 5, 5), compact=compact)
        ops = [n for n in proto.graph.node if n.op_type in ("MatMulNBits", "DequantizeLinear")]
        bits[levels] = [
            next(a.i for a in n.attribute if a.name == "bits")
            if n.op_type == "MatMulNBits"
            else "dq"
            for n in ops
        ]
    # odd N: codes 0..N-1; even N: 2c in 0..2N-2 (half-integer levels doubled)
    small = 2 if compact else 4
    assert bits == {
        2: [small, small],
        3: [small, small],
        4: [4, 4],
        5: [4, 4],
        16: [8, 8],
        17: [8, 8],
        129: [8, 8],
        130: ["dq", "dq"],
    }


@pytest.mark.parametrize("levels", [2, 3])
def test_compact_two_bit_matmulnbits(levels) -> None:
    net = _layer_net("linear", levels, None, "channel")
    x = torch.randn(4, 3, 5, 5)
    with torch.no_grad():
        want = net(x).numpy()
    got = _run_onnx(net, x, compact=True)
    assert np.abs(got - want).max() <= 1e-4 and (got.argmax(1) == want.argmax(1)).all()


def _trained(model: nn.Module, steps_data) -> nn.Module:
    """A few training steps on synthetic images shaped like the model's input."""
    train.fit(model, steps_data, train.TrainConfig(epochs=1, batch_size=32, seed=0), progress=False)
    return model.eval()


SEED_MODELS = {
    "mlp": {"depth": 2, "width": 48},
    "fcnn1": {},
    "cvnn1": {},
    "vit1": {"patch_size": 4, "head_units": (64, 32)},
}


@pytest.mark.parametrize("name", sorted(SEED_MODELS))
@pytest.mark.parametrize("act", [None, "absmax8"])
def test_seed_models_after_training_steps(name, act) -> None:
    shape = (1, 8, 8)
    data = lowbit.data.load("synthetic", n_train=96, n_test=16, shape=shape, classes=4)
    torch.manual_seed(0)
    model = models.get(name, input_shape=shape, classes=4, **SEED_MODELS[name])
    quantize_(model, QATConfig(levels=3, quantizer="ternary", activations=act))
    model = _trained(model, data)
    packed = convert_(copy.deepcopy(model)).eval()
    # float ops (LayerNorm, attention, GELU) sit between a ViT's integer layers: close, not exact
    _compare(packed, data.test_x, exact=act == "absmax8" and name != "vit1")


@pytest.mark.parametrize("layer", ["bitlinear8", "mybitlinear", "misborn"])
def test_sign_vs_linear_layers(layer) -> None:
    torch.manual_seed(0)
    model = models.get("mlp", depth=2, width=32, input_shape=(1, 6, 6), classes=5, layer=layer)
    packed = convert_(model).eval()
    _compare(packed, torch.randn(9, 1, 6, 6), exact=False)


def test_fake_quant_model_is_converted_on_a_copy() -> None:
    torch.manual_seed(0)
    fake = models.get("mlp", depth=1, width=16, input_shape=(1, 4, 4), classes=3, layer="ternary")
    got = _run_onnx(fake.eval(), torch.randn(4, 1, 4, 4))
    assert got.shape == (4, 3)
    assert isinstance(fake[1], lowbit.QuantLinear)  # the model itself is untouched


def test_embedded_preprocessing_takes_raw_pixels(tmp_path) -> None:
    torch.manual_seed(0)
    net = convert_(
        models.get(
            "mlp", depth=1, width=16, input_shape=(1, 6, 6), classes=3, layer="nlevel", levels=5
        )
    ).eval()
    info = meta.ModelMeta(
        input_shape=(1, 6, 6),
        input_dtype="uint8",
        input_range=(0.0, 255.0),
        normalisation=meta.Normalisation(255.0, (0.3,), (0.35,)),
    )
    net.lowbit_meta = info
    path = tmp_path / "m.onnx"
    size = lowbit.export_onnx(net, path, embed_preprocessing=True)
    assert path.stat().st_size == size
    pixels = torch.randint(0, 256, (7, 1, 6, 6), dtype=torch.uint8)
    sess = export.session(path)
    assert sess.get_inputs()[0].name == "pixels"
    got = sess.run(None, {"pixels": pixels.numpy()})[0]
    with torch.no_grad():
        want = net(meta.preprocess(info, pixels)).numpy()
    assert np.abs(got - want).max() <= 1e-5
    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert meta.from_json(__import__("json").loads(props["lowbit_meta"])) == info


def test_embedding_needs_saved_preprocessing() -> None:
    net = convert_(
        models.get("mlp", depth=1, width=8, input_shape=(1, 4, 4), classes=3, layer="ternary")
    ).eval()
    with pytest.raises(ValueError, match="no preprocessing"):
        export.to_onnx(net, embed_preprocessing=True)


def test_missing_onnx_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(LowbitError, match=r"lowbit\[onnx\]"):
        export.to_onnx(net, input_shape=(1, 2, 2))


def test_unsupported_module_is_named() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2), nn.ELU())
    with pytest.raises(LowbitError, match="ELU"):
        export.to_onnx(net, input_shape=(1, 2, 2))


def test_cli_export_round_trip(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    net = models.get("cvnn1", input_shape=(1, 8, 8), classes=4, layer="ternary")
    src = tmp_path / "m.lowbit"
    lowbit.save(convert_(net), src)
    out = tmp_path / "m.onnx"
    assert cli.main(["export", str(src), "-o", str(out), "--json"]) == 0
    report = __import__("json").loads(capsys.readouterr().out)
    assert report["bytes"] == out.stat().st_size
    x = torch.randn(3, 1, 8, 8)
    sess = export.session(out)
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = lowbit.load(src)(x).numpy()
    assert np.abs(got - want).max() <= 1e-4


def test_cli_export_bad_input_is_one_line(tmp_path, capsys) -> None:
    bad = tmp_path / "x.lowbit"
    bad.write_bytes(b"not a model")
    assert cli.main(["export", str(bad), "-o", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit export: error:") and err.count("\n") == 1
    assert not (tmp_path / "x.onnx").exists()
