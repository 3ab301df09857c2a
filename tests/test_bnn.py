"""The binary networks' pieces and models (lowbit.bnn, registered in lowbit.models)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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


def _train_a_little(net: torch.nn.Module, shape: tuple[int, ...], steps: int = 3) -> None:
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(steps):
        x = torch.randn(16, *shape, generator=g)
        y = torch.randint(0, 10, (16,), generator=g)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()


@pytest.mark.parametrize("activations", ["sign", "approx-sign", "rsign"])
def test_qat_binary_trains_converts_and_predicts_identically(tmp_path, activations: str) -> None:
    """QATConfig(levels=2, activations=...) -> train -> convert_ -> save/load: the packed model's
    outputs are the trained model's, bit for bit (so its predictions are identical)."""
    import copy

    from lowbit import QATConfig, convert_, load, quantize_, save
    from lowbit.packed import PackedConv2d, PackedLinear

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),  # 3 channels: a binary conv off the 64-bit words
        torch.nn.BatchNorm2d(8),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=2, dilation=2),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 8 * 8, 10),
    )
    quantize_(net, QATConfig(levels=2, quantizer="sign", activations=activations))
    _train_a_little(net, (3, 16, 16))
    if activations == "rsign":
        assert net[0].input_quantizer.threshold.abs().sum() > 0  # the thresholds learned
    x = torch.randn(64, 3, 16, 16)
    with torch.no_grad():
        want = net(x)
        packed = convert_(copy.deepcopy(net))
        assert isinstance(packed[0], PackedConv2d) and isinstance(packed[4], PackedLinear)
        assert packed[0].activations == "binary"
        assert torch.equal(packed(x), want)
        save(net, tmp_path / "m.lowbit")  # the fake-quant model, stored packed
        loaded = load(tmp_path / "m.lowbit")
        assert torch.equal(loaded(x), want)
        assert torch.equal(loaded[0].threshold, packed[0].threshold)


@pytest.mark.parametrize("method", bnn.BINARY_METHODS)
def test_binary_models_convert_and_round_trip_identically(tmp_path, method: str) -> None:
    import copy

    from lowbit import convert_, load, save

    for name, kw, shape in (
        ("binary_cnn", {"width": 8, "input_shape": (3, 32, 32)}, (3, 32, 32)),
        ("binary_mlp", {"width": 70, "depth": 2}, (1, 28, 28)),
    ):
        torch.manual_seed(1)
        net = models.get(name, layer=method, **kw)
        _train_a_little(net, shape)
        x = torch.randn(32, *shape)
        with torch.no_grad():
            want = net(x)
            assert torch.equal(convert_(copy.deepcopy(net))(x), want), (name, method)
            save(net, tmp_path / f"{name}.lowbit")
            assert torch.equal(load(tmp_path / f"{name}.lowbit")(x), want), (name, method)


def test_summary_counts_bops_beside_macs() -> None:
    from lowbit import convert_, summary

    net = models.get("binary_mlp", layer="bireal", width=64, depth=2)
    for model in (net, convert_(net)):
        s = summary(model)
        rows = {r.name: r for r in s.rows}
        assert rows["blocks.0.layer"].bops == 64 * 64 and rows["blocks.0.layer"].macs == 0
        assert rows["stem.1"].macs == 784 * 64 and rows["stem.1"].bops is None
        assert s.bops == 2 * 64 * 64 and s.macs == 784 * 64 + 64 * 10
        assert "BOPs          8,192" in str(s)
        # a binary layer stores its 1-bit codes, scale, and the threshold (64 fp32 values)
        assert rows["blocks.0.layer"].params == 64 * 64 + 64
    cnn = models.get("binary_cnn", layer="reactnet", width=8)
    for model in (cnn, convert_(cnn)):  # the eval-mode paths still call every counted layer
        s = summary(model)
        assert s.macs == 28 * 28 * 8 * 9 + 32 * 10  # the fp32 stem conv and the head
        assert s.bops == 14 * 14 * 9 * (8 * 8 + 8 * 16) + 7 * 7 * 9 * (16 * 16 + 16 * 32)


def test_rprelu_channel_last_3d_matches_the_formula() -> None:
    m = bnn.RPReLU(3)
    with torch.no_grad():
        m.slope.copy_(torch.tensor([0.5, 0.1, 2.0]))
    x = torch.randn(2, 4, 3)
    assert torch.equal(m(x), torch.where(x >= 0, x, x * m.slope))


def test_onnx_export_refuses_binary_layers_clearly() -> None:
    pytest.importorskip("onnx")
    from lowbit import QATConfig, export, quantize_
    from lowbit.errors import LowbitError

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    quantize_(net, QATConfig(levels=2, quantizer="sign", activations="sign"))
    with pytest.raises(LowbitError, match="binary \\(XNOR-popcount\\) layer"):
        export.to_onnx(net.eval(), input_shape=(1, 4, 4))


def _unfused(block: bnn.Block, x: torch.Tensor) -> torch.Tensor:
    """The block's training-mode formula with the BatchNorm on its running statistics."""
    h = torch.nn.functional.batch_norm(
        block.layer(x),
        block.norm.running_mean,
        block.norm.running_var,
        block.norm.weight,
        block.norm.bias,
        False,
        0.0,
        block.norm.eps,
    )
    if block.shortcut is not None:
        h = h + block.shortcut(x)
    return block.act(h)


@pytest.mark.parametrize("method", bnn.BINARY_METHODS)
def test_eval_blocks_fold_batchnorm_into_the_same_function(method: str) -> None:
    torch.manual_seed(3)
    net = models.get("binary_cnn", layer=method, width=8)
    _train_a_little(net, (1, 28, 28))
    net.eval()
    h = net.blocks[0](net.stem(torch.randn(4, 1, 28, 28)))
    with torch.no_grad():
        for block in [b for b in net.blocks if isinstance(b, bnn.Block)][:2]:
            got, want = block(h), _unfused(block, h)
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()
            h = got


def test_eval_epilogue_follows_in_place_changes_and_keeps_gradients() -> None:
    torch.manual_seed(4)
    net = models.get("binary_mlp", layer="reactnet", width=16, depth=1)
    _train_a_little(net, (1, 28, 28))
    net.eval()
    block = net.blocks[0]
    x = torch.randn(5, 16)
    with torch.no_grad():
        before = block(x)
        block.norm.running_var.mul_(4.0)  # in place: the cached epilogue must notice
        block.act.zeta.add_(1.0)
        after = block(x)
    assert not torch.equal(before, after)
    assert torch.allclose(after, _unfused(block, x).detach(), rtol=1e-5, atol=1e-5)
    block(x).sum().backward()  # eval mode with gradients: BN and RPReLU parameters still learn
    assert block.norm.weight.grad is not None and block.act.slope.grad is not None


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_eval_stem_folds_batchnorm_into_the_pooling(shape: tuple[int, int, int]) -> None:
    """The binary CNN's eval stem: conv, BatchNorm folded (y * scale + shift), 2x2 max-pool. The
    same function as the unfolded stem up to float rounding; the pooling kernel gives torch's
    bits for the folded map; BatchNorm edits in place reach it; gradients still flow."""
    torch.manual_seed(5)
    net = models.get("binary_cnn", layer="reactnet", width=8, input_shape=shape)
    _train_a_little(net, shape)
    x = torch.randn(3, *shape)
    with torch.no_grad():
        got = net(x)
        h = net.blocks[0](net.stem(x))  # unfolded: torch's BatchNorm, then the pooling
        for block in list(net.blocks)[1:]:
            h = block(h)
        want = net.head(h)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()
        conv = net.stem[0](x)
        scale, shift = bnn.fold_batchnorm(net.stem[1])
        folded = conv * scale.reshape(-1, 1, 1) + shift.reshape(-1, 1, 1)
        assert torch.equal(bnn.max_pool2x2(conv, scale, shift), F.max_pool2d(folded, 2))
        net.stem[1].running_mean.add_(1.0)
        assert not torch.equal(net(x), got)
    net(x).sum().backward()  # eval mode with gradients: the fold stays differentiable
    assert net.stem[1].weight.grad is not None


def test_maxpool2x2_gives_max_pool2d_values_in_every_layout() -> None:
    pool, ref = bnn.MaxPool2x2().eval(), torch.nn.MaxPool2d(2)
    for shape in ((2, 3, 8, 8), (1, 5, 7, 9), (1, 1, 3, 2)):
        x = torch.randn(shape)
        x[..., 0, :] = x[..., 1, :]  # ties
        for layout in (torch.contiguous_format, torch.channels_last):
            got = pool(x.contiguous(memory_format=layout))
            assert torch.equal(got, ref(x)), (shape, layout)
    pool.train()
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    pool(x).sum().backward()
    assert x.grad.sum().item() == 8  # one input per window takes the gradient, as max_pool2d


def test_binary_cnn_traces_to_the_same_function() -> None:
    """jit.trace of the eval-mode binary CNN, trained and packed: the native pooling is a ctypes
    call a tracer cannot see (it recorded an empty tensor), so under a tracer it pools in torch."""
    import copy
    import warnings

    from lowbit.packed import convert_

    torch.manual_seed(6)
    net = models.get("binary_cnn", layer="reactnet", width=8).eval()
    x, other = torch.randn(2, 1, 28, 28), torch.randn(2, 1, 28, 28)
    for model in (net, convert_(copy.deepcopy(net)).eval()):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # jit.trace's deprecation
            traced = torch.jit.trace(model, (x,), check_trace=False)
            assert torch.equal(traced(x), model(x))
            assert torch.equal(traced(other), model(other))
