"""Drop-in layers, quantize_, QATConfig and the sign-vs-linear study's layers (lowbit.nn)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit import quantizers
from lowbit.nn import (
    BitLinear8,
    MisbornLinear,
    QATConfig,
    QuantConv2d,
    QuantLinear,
    SignLinear,
    quantize_,
    simple_rms_norm,
)

LEVELS = (2, 3, 4, 5, 8, 9, 16, 17)


def _pair_linear(seed: int = 0) -> tuple[nn.Linear, QuantLinear]:
    torch.manual_seed(seed)
    ref = nn.Linear(12, 7)
    torch.manual_seed(seed)
    return ref, QuantLinear(12, 7)


def test_quantlinear_without_quantizers_equals_linear():
    ref, q = _pair_linear()
    assert torch.equal(ref.weight, q.weight) and torch.equal(ref.bias, q.bias)
    x = torch.randn(5, 3, 12)
    assert torch.equal(q(x), ref(x))
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    ref(x1).square().sum().backward()
    q(x2).square().sum().backward()
    assert torch.equal(x1.grad, x2.grad) and torch.equal(ref.weight.grad, q.weight.grad)


def test_quantconv_without_quantizers_equals_conv():
    torch.manual_seed(1)
    ref = nn.Conv2d(3, 8, 3, stride=2, padding=1, groups=1, bias=True)
    torch.manual_seed(1)
    q = QuantConv2d(3, 8, 3, stride=2, padding=1, groups=1, bias=True)
    x = torch.randn(2, 3, 9, 9)
    assert torch.equal(q(x), ref(x))
    torch.manual_seed(2)
    ref = nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False, padding_mode="reflect")
    torch.manual_seed(2)
    q = QuantConv2d(4, 4, 3, padding=1, groups=2, bias=False, padding_mode="reflect")
    x = torch.randn(1, 4, 6, 6)
    assert torch.equal(q(x), ref(x))


@pytest.mark.parametrize("levels", LEVELS)
def test_quantlinear_forward_uses_quantized_weight(levels):
    q = QuantLinear(10, 4, weight_quantizer=quantizers.get("nlevel", levels=levels))
    x = torch.randn(3, 10)
    w_hat = q.weight_quantizer(q.weight.detach())
    assert torch.equal(q(x), F.linear(x, w_hat, q.bias))
    assert len(torch.unique(q.quantized_weight())) <= levels
    assert f"levels={levels}" in repr(q)


def test_from_float_shares_parameters_and_to_float():
    ref = nn.Linear(6, 3)
    q = QuantLinear.from_float(ref, weight_quantizer="ternary")
    assert q.weight is ref.weight and q.bias is ref.bias
    assert "ternary(levels=3" in q.extra_repr() and "input=fp32" in q.extra_repr()
    back = q.to_float()
    assert type(back) is nn.Linear and torch.equal(back.weight, ref.weight)
    assert back.weight is not ref.weight
    baked = q.to_float(quantized=True)
    x = torch.randn(4, 6)
    assert torch.equal(baked(x), q(x))
    conv = nn.Conv2d(2, 5, 3, padding=1)
    qc = QuantConv2d.from_float(conv, weight_quantizer="sign")
    assert qc.weight is conv.weight and qc.padding == conv.padding
    xb = torch.randn(1, 2, 5, 5)
    assert torch.equal(qc.to_float(quantized=True)(xb), qc(xb))
    assert torch.equal(qc.to_float().weight, conv.weight)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(4 * 5 * 5, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.body(self.conv(x)))


def test_quantize_keeps_weights_and_honours_filter():
    torch.manual_seed(0)
    net = _Net()
    params = {name: p for name, p in net.named_parameters()}
    x = torch.randn(2, 1, 5, 5)
    quantize_(net, QATConfig(levels=5), filter_fn=lambda m, fqn: fqn != "head")
    assert isinstance(net.conv, QuantConv2d) and isinstance(net.body[1], QuantLinear)
    assert type(net.head) is nn.Linear
    assert net.body[1].weight_quantizer.levels == 5
    for name, p in net.named_parameters():  # the very same Parameter objects
        assert p is params[name]
    q5 = quantizers.get("nlevel", levels=5)
    h = F.conv2d(x, q5(net.conv.weight), net.conv.bias, padding=1)
    h = F.relu(F.linear(h.flatten(1), q5(net.body[1].weight), net.body[1].bias))
    assert torch.equal(net(x), net.head(h))
    # a second pass leaves already-quantized layers alone
    quantize_(net, QATConfig(levels=3))
    assert net.conv.weight_quantizer.levels == 5 and isinstance(net.head, QuantLinear)
    with pytest.raises(ValueError, match="root module"):
        quantize_(nn.Linear(2, 2), QATConfig())


def test_qatconfig_builds_quantizers():
    cfg = QATConfig(levels=2, quantizer="sign", granularity="channel", ste="clipped")
    wq = cfg.weight_quantizer()
    assert (wq.name, wq.levels, wq.center, wq.granularity, wq.ste) == (
        "sign",
        2,
        True,
        "channel",
        "clipped",
    )
    assert cfg.input_quantizer() is None
    assert QATConfig(activations="absmax8").input_quantizer().name == "absmax8"
    assert QATConfig(levels=9, spread=2.0).weight_quantizer().spread == 2.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"levels": 1}, "QATConfig.levels"),
        ({"levels": 257}, "QATConfig.levels"),
        ({"levels": 2.5}, "QATConfig.levels"),
        ({"levels": True}, "QATConfig.levels"),
        ({"quantizer": "binary"}, "QATConfig.quantizer"),
        ({"quantizer": "sign", "levels": 3}, "QATConfig.quantizer"),
        ({"quantizer": "ternary", "spread": 1.0}, "QATConfig.spread"),
        ({"spread": -1.0}, "QATConfig.spread"),
        ({"granularity": "row"}, "QATConfig.granularity"),
        ({"ste": "tanh"}, "QATConfig.ste"),
        ({"activations": "int4"}, "QATConfig.activations"),
    ],
)
def test_qatconfig_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        QATConfig(**kwargs)


# --- the sign-vs-linear study's layers -----------------------------------------------------------


def _bitnet_v025_forward(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """kyegomez/BitNet 0.2.5's BitLinear forward, re-derived with plain torch ops (no bias)."""
    d = x.shape[-1]
    x_norm = x / x.norm(p=2, dim=-1, keepdim=True).clamp_min(1e-12) * d**-0.5  # SimpleRMSNorm
    gamma = 127.0 / x_norm.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
    x_quant = (x_norm * gamma).round().clamp(-128, 127) / gamma
    w_quant = (w - w.mean()).sign() * w.abs().mean()
    return x_quant @ w_quant.t(), x_quant, w_quant


def test_bitlinear8_matches_bitnet_v025_without_bias():
    torch.manual_seed(0)
    layer = BitLinear8(32, 16, bias=False)
    x = torch.randn(4, 5, 32) * 3
    y_ref, x_ref, w_ref = _bitnet_v025_forward(x, layer.weight.detach())
    assert torch.equal(layer.quantize_input(x), x_ref)
    assert torch.equal(layer.quantized_weight().detach(), w_ref)
    torch.testing.assert_close(layer(x), y_ref, rtol=1e-6, atol=1e-6)
    assert len(torch.unique(w_ref)) == 2  # binary, whatever the README says


def test_bitlinear8_applies_bias_and_backward_twice():
    torch.manual_seed(1)
    layer = BitLinear8(8, 3)
    nn.init.uniform_(layer.bias, 1.0, 2.0)
    x = torch.randn(6, 8)
    y_ref, _, _ = _bitnet_v025_forward(x, layer.weight.detach())
    torch.testing.assert_close(layer(x), y_ref + layer.bias, rtol=1e-6, atol=1e-6)
    # 0.1.x failed on the second backward; two full training steps must work
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    before = layer.weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        layer(x).square().mean().backward()
        assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0
        opt.step()
    assert not torch.equal(before, layer.weight)
    # identity STE: dL/dW = dL/dW_q = g^T x_q
    layer.zero_grad()
    g = torch.randn(6, 3)
    (layer(x) * g).sum().backward()
    torch.testing.assert_close(layer.weight.grad, g.t() @ layer.quantize_input(x))


def test_simple_rms_norm_keeps_negative_exponent():
    x = torch.tensor([[3.0, 4.0, 0.0, 0.0]])  # L2 norm 5, d = 4
    assert torch.allclose(simple_rms_norm(x), x / 5 * 0.5)


def test_signlinear_defaults_and_flags():
    torch.manual_seed(2)
    layer = SignLinear(10, 4)
    x = torch.randn(3, 10)
    w = layer.weight.detach()
    w_q = (w - w.mean()).sign() * w.abs().mean()
    assert torch.equal(layer.quantized_weight().detach(), w_q)
    torch.testing.assert_close(layer(x), F.linear(simple_rms_norm(x), w_q, layer.bias))
    assert layer.input_quantizer is None
    raw = SignLinear(10, 4, norm=False, center=False, scale="none")
    assert set(raw.quantized_weight().detach().unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(raw.quantize_input(x), x)
    with pytest.raises(ValueError, match="scale must be one of absmean, none"):
        SignLinear(4, 4, scale="max")


def test_misborn_weights_are_exactly_pm1_and_codes_exact():
    torch.manual_seed(3)
    for norm in MisbornLinear.NORMS:
        layer = MisbornLinear(20, 6, norm=norm)
        w_q = layer.quantized_weight().detach()
        assert set(w_q.unique().tolist()) <= {-1.0, 1.0}
        c = layer.weight.mean() if norm == "standardize" else 0.0
        assert torch.equal(w_q, torch.where(layer.weight >= c, 1.0, -1.0).detach())
        codes, scale = layer.weight_quantizer.codes(layer.weight)
        assert torch.equal(layer.weight_quantizer.dequantize(codes, scale), w_q)
        x = torch.randn(2, 20)
        assert torch.equal(layer(x), F.linear(x, w_q, layer.bias))


@pytest.mark.parametrize("mask", ["grad", "weight"])
def test_misborn_masked_straight_through(mask):
    torch.manual_seed(4)
    layer = MisbornLinear(5, 3, bias=False, mask=mask, norm="none")
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -2.0, 0.1, 1.5, -0.3]] * 3))
    x = torch.tensor([[3.0, -0.2, 0.4, 0.9, -5.0]])
    g = torch.tensor([[1.0, -0.1, 0.5]])
    (layer(x) * g).sum().backward()
    grad_wq = g.t() @ x  # dL/dw_q, shape (3, 5)
    if mask == "grad":
        expected = grad_wq * (grad_wq.abs() < 1)
    else:
        expected = grad_wq * (layer.weight.detach().abs() <= 1)
    assert torch.equal(layer.weight.grad, expected)
    assert (expected == 0).any() and (expected != 0).any()  # the mask really masks


def test_misborn_standardize_gradient_finite_on_zero_weights():
    layer = MisbornLinear(4, 2)
    with torch.no_grad():
        layer.weight.zero_()
    layer(torch.randn(3, 4)).sum().backward()
    assert torch.isfinite(layer.weight.grad).all()
    with pytest.raises(ValueError, match="mask must be one of grad, weight"):
        MisbornLinear(2, 2, mask="tanh")
    with pytest.raises(ValueError, match="norm must be one of"):
        MisbornLinear(2, 2, norm="batch")


@pytest.mark.parametrize("cls", [BitLinear8, SignLinear, MisbornLinear])
def test_seed_layers_follow_the_generic_interface(cls):
    torch.manual_seed(5)
    ref = nn.Linear(9, 4)
    layer = cls.from_float(ref)
    assert isinstance(layer, QuantLinear)
    assert layer.weight is ref.weight and layer.bias is ref.bias
    x = torch.randn(7, 9, requires_grad=True)
    y = layer(x)
    expected = F.linear(layer.quantize_input(x), layer.quantized_weight(), layer.bias)
    assert torch.equal(y, expected)
    assert layer.weight_quantizer.levels == 2 and "levels=2" in repr(layer)
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(ref.weight.grad).all()
    # packing reads codes from the latent weight and reproduces the forward weight exactly
    codes, scale = layer.weight_quantizer.codes(layer.weight)
    assert torch.equal(
        layer.weight_quantizer.dequantize(codes, scale), layer.quantized_weight().detach()
    )


# --- binary (XNOR-popcount) layers ---------------------------------------------------------------


@pytest.mark.parametrize("activations", ["sign", "approx-sign", "rsign"])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_binary_layers_are_the_scaled_sign_product(activations: str, granularity: str) -> None:
    """y = (sign(x - t) @ sign(w - c).T) * alpha + b, the sum an exact integer, and a binary conv
    pads its binarized input with +1."""
    torch.manual_seed(0)
    cfg = QATConfig(levels=2, quantizer="sign", granularity=granularity, activations=activations)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, stride=2), nn.Flatten(), nn.Linear(80, 4))
    quantize_(net, cfg)
    conv, lin = net[0], net[2]
    assert conv.is_binary() and lin.is_binary()
    if activations == "rsign":
        with torch.no_grad():
            conv.input_quantizer.threshold.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 8, 8)
    t = 0 if activations != "rsign" else conv.input_quantizer.threshold.reshape(-1, 1, 1)
    xb = torch.where(x < t, -1.0, 1.0)
    w = conv.weight
    wc = w - w.mean(dim=(1, 2, 3), keepdim=True) if granularity == "channel" else w - w.mean()
    wb = torch.where(wc < 0, -1.0, 1.0)
    alpha = conv.weight_quantizer.scale(w).reshape(-1) / 2
    dot = F.conv2d(F.pad(xb, (1, 1, 1, 1), value=1.0), wb, stride=2)
    assert dot.eq(dot.round()).all()
    want = dot * alpha.reshape(-1, 1, 1) + conv.bias.reshape(-1, 1, 1)
    assert torch.equal(conv(x), want)
    # the value is the unfactored layer's up to float rounding
    loose = F.conv2d(F.pad(xb, (1, 1, 1, 1), value=1.0), conv.quantized_weight(), conv.bias, 2)
    assert torch.allclose(conv(x), loose, atol=1e-5)
    # gradients reach the latent weights, the input and rsign's threshold
    net(x).square().sum().backward()
    assert conv.weight.grad.abs().sum() > 0 and lin.weight.grad.abs().sum() > 0
    if activations == "rsign":
        assert conv.input_quantizer.threshold.grad.abs().sum() > 0


def test_binary_layer_gradient_equals_the_unfactored_layer() -> None:
    torch.manual_seed(1)
    a = QuantLinear(6, 3, weight_quantizer="sign", input_quantizer="sign")
    x = torch.randn(4, 6)
    a(x).pow(2).sum().backward()
    g_factored = a.weight.grad.clone()
    a.weight.grad = None
    F.linear(a.quantize_input(x), a.quantized_weight(), a.bias).pow(2).sum().backward()
    assert torch.allclose(a.weight.grad, g_factored, rtol=1e-5, atol=1e-6)


def test_qatconfig_accepts_the_binary_activations() -> None:
    for name in ("sign", "approx-sign", "rsign"):
        assert QATConfig(levels=2, quantizer="sign", activations=name).activations == name
    with pytest.raises(ValueError, match="QATConfig.activations must be one of"):
        QATConfig(activations="relu")
    # rsign gets one threshold per input channel of each layer
    net = quantize_(nn.Sequential(nn.Linear(7, 3)), QATConfig(levels=2, activations="rsign"))
    assert net[0].input_quantizer.threshold.shape == (7,)
    assert "0.input_quantizer.threshold" in dict(net.named_parameters())
