"""Packed models behave as torch modules: copies, pickles, state_dict, dtype moves and tracers
(torch.compile, torch.export, jit.trace) all give the original outputs."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from lowbit import QATConfig, quantize_
from lowbit.packed import PackedConv2d, PackedLayer, PackedLinear, convert_


def _packed_net(levels: int = 3, activations: str | None = None) -> nn.Module:
    """Conv + linear layers, int8 (absmax8-trained) or fp32 activations, per-channel scales."""
    torch.manual_seed(levels)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 16),
        nn.LayerNorm(16),
        nn.Linear(16, 5),
    )
    cfg = QATConfig(levels=levels, granularity="channel", activations=activations)
    return convert_(quantize_(net, cfg).eval())


NETS = [(3, None), (5, "absmax8"), (33, None)]  # 33 levels: the reference kernels


def _x() -> torch.Tensor:
    return torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))


def _zero_buffers(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, PackedLayer):
                m.codes.zero_()
                m.scale.fill_(1.0)


@pytest.mark.parametrize(("levels", "act"), NETS)
def test_deepcopy_owns_its_state(levels: int, act: str | None) -> None:
    model = _packed_net(levels, act)
    x = _x()
    y = model(x)
    twin = copy.deepcopy(model)
    assert torch.equal(twin(x), y)
    _zero_buffers(model)  # the original changes; the copy must not
    assert not torch.equal(model(x), y)
    assert torch.equal(twin(x), y)


def test_in_place_edits_and_reassignment_rebuild_the_compute_layout() -> None:
    model = _packed_net()
    x = _x()
    y = model(x)
    layer = model[3]
    with torch.no_grad():
        layer.scale.mul_(2)  # in place: the version counter moves
    y2 = model(x)
    assert not torch.equal(y2, y)
    layer.scale = layer.scale / 2  # another tensor of the old values
    assert torch.equal(model(x), y)


_CHILD = """
import sys, torch
model = torch.load(sys.argv[1], weights_only=False)
x = torch.load(sys.argv[2], weights_only=True)
torch.save(model(x), sys.argv[3])
"""


@pytest.mark.parametrize(("levels", "act"), NETS)
def test_torch_save_whole_module_loads_in_a_new_process(tmp_path, levels, act) -> None:
    model = _packed_net(levels, act)
    x = _x()
    y = model(x)  # the compute layout is built; it must not be pickled
    torch.save(model, tmp_path / "model.pt")
    torch.save(x, tmp_path / "x.pt")
    subprocess.run(
        [sys.executable, "-c", _CHILD, *(str(tmp_path / f) for f in ("model.pt", "x.pt", "y.pt"))],
        check=True,
        timeout=300,
    )
    assert torch.equal(torch.load(tmp_path / "y.pt", weights_only=True), y)
    # and in this process, where the library is already loaded
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=False)(x), y)


@pytest.mark.parametrize(("levels", "act"), NETS)
def test_state_dict_round_trip_weights_only(tmp_path, levels: int, act: str | None) -> None:
    model = _packed_net(levels, act)
    x = _x()
    y = model(x)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    other = _packed_net(levels, act)
    _zero_buffers(other)
    other.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    assert torch.equal(other(x), y)
    assert {k for k in model.state_dict() if k.endswith("codes")} == {
        "0.codes",
        "3.codes",
        "5.codes",
    }


def test_to_dtype_keeps_the_packed_format_and_follows_the_input_dtype() -> None:
    model = _packed_net(5, "absmax8")
    x = _x()
    y = model(x)
    model64 = copy.deepcopy(model).to(torch.float64)
    for m in model64.modules():
        if isinstance(m, PackedLayer):
            assert m.codes.dtype == torch.uint8 and m.scale.dtype == torch.float32
            assert m.bias.dtype == torch.float32
    y64 = model64(x.double())
    assert y64.dtype == torch.float64
    # packed layers compute exactly as before; the LayerNorm between them now runs in float64
    torch.testing.assert_close(y64, y.double(), rtol=1e-5, atol=1e-5)
    layer = model64[0]
    assert torch.equal(layer(x.double()), model[0](x).double())
    half = copy.deepcopy(model).half()
    assert half[0].scale.dtype == torch.float32  # a float16 scale would change the weights


@pytest.mark.parametrize(("levels", "act"), NETS)
def test_torch_compile(levels: int, act: str | None) -> None:
    model = _packed_net(levels, act)
    x = _x()
    y = model(x)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), y)


@pytest.mark.parametrize(("levels", "act"), NETS)
def test_torch_export(levels: int, act: str | None) -> None:
    model = _packed_net(levels, act)
    x = _x()
    y = model(x)
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"lowbit.packed_linear.default", "lowbit.packed_conv2d.default"} <= targets
    assert torch.equal(program.module()(x), y)


def test_jit_trace_records_the_ops() -> None:
    model = _packed_net(5, "absmax8")
    x = _x()
    y = model(x)
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,), check_trace=False)
    assert "lowbit::packed_linear" in str(traced.inlined_graph)
    assert torch.equal(traced(x), y)
    assert torch.equal(traced(x * 2), model(x * 2))  # not a recorded constant


def test_layers_have_no_stashed_state() -> None:
    model = _packed_net()
    model(_x())
    for m in model.modules():
        if isinstance(m, (PackedLinear, PackedConv2d)):
            tensors = [v for v in vars(m).values() if isinstance(v, torch.Tensor)]
            assert tensors == []  # everything torch must see is a buffer or a parameter
            assert set(dict(m.named_buffers())) == {"codes", "scale"}
