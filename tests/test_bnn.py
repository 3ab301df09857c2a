"""The binary networks' pieces and models (lowbit.bnn, registered in lowbit.models)."""

from __future__ import annotations

import pytest
import torch

from lowbit import bnn, models
from lowbit.nn import QuantConv2d, QuantLinear


def test_rprelu_pinned() -> None:
    m = bnn.RPReLU(2)
    with torch.no_grad():
        m.bias.copy_(torch.tensor([-1.0, 0.0]))  # gamma = 1, 0
        m.slope.copy_(torch.tensor([0.5, 0.25]))
        m.zeta.copy_(torch.tensor([0.0, 2.0]))
    x = torch.tensor([[3.0, -4.0], [0.0, 4.0]])
    # channel 0: x - 1 = 2 -> 2; -1 -> -0.5.  channel 1: -4 -> -1 + 2 = 1; 4 -> 6
    assert m(x).tolist() == [[2.0, 1.0], [-0.5, 6.0]]


def test_shortcut_duplicates_channels() -> None:
    x = torch.arange(4.0).reshape(1, 2, 1, 2)
    y = bnn.Shortcut(2, 4, channel_dim=1)(x)
    assert y.shape == (1, 4, 1, 2) and torch.equal(y[:, 2:], x)
    with pytest.raises(ValueError, match="cannot map 3 to 4"):
        bnn.Shortcut(3, 4)


@pytest.mark.parametrize("method", list(bnn.METHODS))
@pytest.mark.parametrize("name", ["binary_mlp", "binary_cnn"])
def test_models_build_train_and_have_fp32_ends(name: str, method: str) -> None:
    torch.manual_seed(0)
    kw = {"width": 8} if name == "binary_cnn" else {"width": 16, "depth": 2}
    shape = (3, 32, 32) if name == "binary_cnn" else (1, 28, 28)
    net = models.get(name, layer=method, input_shape=shape, classes=10, **kw)
    assert net.lowbit_spec["kwargs"]["layer"] == method
    quant = [m for m in net.modules() if isinstance(m, (QuantLinear, QuantConv2d))]
    m = bnn.METHODS[method]
    assert len(quant) == (4 if name == "binary_cnn" else 2)
    assert all(q.is_binary() == (m.activations is not None) for q in quant)
    assert all((q.weight_quantizer is None) == (m.weights is None) for q in quant)
    # first and last layers are plain fp32
    assert type(net.stem[1] if name == "binary_mlp" else net.stem[0]) in (
        torch.nn.Linear,
        torch.nn.Conv2d,
    )
    assert type(net.head[-1] if name == "binary_cnn" else net.head) is torch.nn.Linear
    x = torch.randn(4, *shape)
    out = net(x)
    assert out.shape == (4, 10)
    out.logsumexp(1).sum().backward()
    assert all(q.weight.grad is not None and q.weight.grad.abs().sum() > 0 for q in quant)


def test_binary_models_reject_bad_options() -> None:
    with pytest.raises(ValueError, match="unknown binary method 'misborn'"):
        models.get("binary_mlp", layer="misborn")
    with pytest.raises(ValueError, match="leave levels unset"):
        models.get("binary_cnn", layer="bnn", levels=2)
