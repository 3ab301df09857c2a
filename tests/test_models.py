"""Model registry, parameter counts, shapes, layer kinds and spec rebuild (lowbit.models)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lowbit import models
from lowbit.nn import BitLinear8, MisbornLinear, QuantConv2d, QuantLinear, SignLinear

CIFAR = (3, 32, 32)
MNIST = (1, 28, 28)

# The seed papers' counts (CVNN, VIT) and our documented choices (FCNN, MLP), 10 classes.
COUNTS = {
    ("cvnn1", CIFAR): 896_522,
    ("cvnn2", CIFAR): 8_776_330,
    ("vit1", CIFAR): 4_766_282,
    ("vit2", CIFAR): 10_573_770,
    ("fcnn1", CIFAR): 855_050,
    ("fcnn2", CIFAR): 8_401_930,
}


def _kw(kind: str) -> dict:
    return {"layer": kind, "levels": 5 if kind == "nlevel" else None}


@pytest.mark.parametrize(("name", "shape"), list(COUNTS))
def test_parameter_counts(name, shape):
    model = models.get(name, input_shape=shape, classes=10)
    assert models.count_parameters(model) == COUNTS[name, shape]
    assert sum(p.numel() for p in model.parameters()) == COUNTS[name, shape]


def test_parameter_counts_by_hand():
    # 784*256+256 + 2*(256*256+256) + 256*10+10
    assert models.count_parameters(models.get("mlp", depth=3, width=256)) == 335_114
    # 5x5 CVNN1: 3*25*64+64 + 64*25*128+128 + 128*25*256+256 + 4096*128+128 + 128*10+10
    assert models.count_parameters(models.get("cvnn1", kernel_size=5)) == 1_554_954
    # CVNN1 on 28x28x1: pools 28 -> 14 -> 7 -> 3, flatten 3*3*256
    expected = (9 * 64 + 64) + 73_856 + 295_168 + (2304 * 128 + 128) + 1290
    assert models.count_parameters(models.get("cvnn1", input_shape=MNIST)) == expected
    # the same count with any quantized kind: quantizers add no parameters
    assert models.count_parameters(models.get("cvnn2", layer="ternary")) == 8_776_330


@pytest.mark.parametrize("name", models.NAMES)
@pytest.mark.parametrize("shape", [MNIST, CIFAR])
def test_forward_shapes(name, shape):
    patch = {"patch_size": 7} if name.startswith("vit") and shape == MNIST else {}
    model = models.get(name, input_shape=shape, classes=7, **patch).eval()
    with torch.no_grad():
        y = model(torch.randn(2, *shape))
    assert y.shape == (2, 7) and torch.isfinite(y).all()


@pytest.mark.parametrize("kind", models.LAYERS)
def test_every_layer_kind_builds_and_backprops_mlp(kind):
    torch.manual_seed(0)
    model = models.get("mlp", depth=2, width=16, input_shape=MNIST, **_kw(kind))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3
    expected = {
        "linear": nn.Linear,
        "bitlinear8": BitLinear8,
        "mybitlinear": SignLinear,
        "misborn": MisbornLinear,
    }.get(kind, QuantLinear)
    assert all(type(m) is expected for m in linears)
    y = model(torch.randn(4, *MNIST))
    nn.functional.cross_entropy(y, torch.tensor([0, 1, 2, 3])).backward()
    assert all(m.weight.grad is not None and torch.isfinite(m.weight.grad).all() for m in linears)
    if kind == "nlevel":
        assert all(m.weight_quantizer.levels == 5 for m in linears)


@pytest.mark.parametrize("kind", models.CONV_LAYERS)
@pytest.mark.parametrize("name", ["cvnn1", "vit1"])
def test_every_conv_kind_builds_and_backprops(name, kind):
    torch.manual_seed(0)
    patch = {"patch_size": 7} if name == "vit1" else {}
    model = models.get(name, input_shape=MNIST, classes=3, **_kw(kind), **patch)
    y = model(torch.randn(2, *MNIST))
    y.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if kind != "linear":
        quantized = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d))]
        assert quantized and all(m.weight_quantizer.name == kind for m in quantized)


@pytest.mark.parametrize("kind", ["bitlinear8", "mybitlinear", "misborn"])
def test_seed_layers_on_conv_models_raise(kind):
    with pytest.raises(ValueError, match="no convolutional form.*linear, sign, ternary"):
        models.get("cvnn1", layer=kind)
    # fully connected models and the ViT take them
    models.get("fcnn1", layer=kind, input_shape=MNIST)
    vit = models.get("vit1", layer=kind, input_shape=MNIST, patch_size=7)
    assert type(vit.embed) is nn.Linear  # the patch embedding stays fp32


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        (
            "mlp",
            {"depth": 1, "width": 4, "activation": "study", "layer": "misborn", "mask": "weight"},
        ),
        ("cvnn2", {"layer": "nlevel", "levels": 9, "spread": 2.0, "kernel_size": 5}),
        (
            "vit2",
            {
                "layer": "sign",
                "quantize_patch": True,
                "input_shape": MNIST,
                "patch_size": 14,
                "classes": 100,
                "blocks": 2,
                "head_units": (64,),
            },
        ),
        ("fcnn2", {"layer": "ternary-median", "granularity": "channel", "quantize_head": False}),
    ],
)
def test_lowbit_spec_rebuilds_the_architecture(name, kwargs):
    model = models.get(name, **kwargs)
    spec = json.loads(json.dumps(model.lowbit_spec))  # what a file stores
    assert spec["name"] == name
    for key, value in kwargs.items():
        assert spec["kwargs"][key] == (list(value) if isinstance(value, tuple) else value)
    assert {"layer", "levels", "input_shape", "classes"} <= set(spec["kwargs"])
    rebuilt = models.get(spec["name"], **spec["kwargs"])
    assert rebuilt.lowbit_spec == spec
    assert [type(m) for m in rebuilt.modules()] == [type(m) for m in model.modules()]
    assert repr(rebuilt) == repr(model)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, *spec["kwargs"]["input_shape"])
    model.eval(), rebuilt.eval()
    assert torch.equal(rebuilt(x), model(x))


def test_vit_patches_must_tile_the_image():
    with pytest.raises(ValueError, match=r"28x28 image does not tile into 8x8.*patch_size.*7"):
        models.get("vit1", input_shape=MNIST)
    vit = models.get("vit1", input_shape=MNIST, patch_size=7)
    assert vit.grid == (4, 4) and vit.position.shape == (16, 64)
    with pytest.raises(ValueError, match="not the 28x28 image"):
        vit(torch.randn(1, 1, 32, 32))  # an input of another size is not cropped either


def test_families_are_frozen_configs():
    import dataclasses

    cfg = models.config("cvnn2", kernel_size=5)
    assert isinstance(cfg, models.CVNNConfig) and cfg.dense == 512 and cfg.kernel_size == 5
    assert cfg.channels == (128, 256, 512) and cfg.convs == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dense = 3
    # a JSON spec's lists come back as the config's tuples
    assert models.config("fcnn1", hidden=[64, 32], input_shape=[1, 8, 8]).hidden == (64, 32)
    assert models.config("vit2") == models.ViTConfig(blocks=11, head_units=(3392, 1920))
    assert models.get("fcnn1", hidden=(32,), input_shape=MNIST)[1].out_features == 32


def test_direct_builders_carry_the_spec_too():
    model = models.mlp(depth=2, width=8, layer="ternary")
    assert model.lowbit_spec["name"] == "mlp"
    assert model.lowbit_spec["kwargs"]["depth"] == 2
    assert model.lowbit_spec["kwargs"]["width"] == 8


def test_mlp_activation_and_fp32_flags():
    relu = models.get("mlp", depth=3, width=8, layer="ternary")
    assert sum(isinstance(m, nn.ReLU) for m in relu) == 3
    study = models.get("mlp", depth=3, width=8, layer="ternary", activation="study")
    assert not any(isinstance(m, nn.ReLU) for m in study)
    fp32 = models.get("mlp", depth=3, width=8, activation="study")  # fp32 layers keep ReLU
    assert sum(isinstance(m, nn.ReLU) for m in fp32) == 3
    mixed = models.get(
        "mlp",
        depth=2,
        width=8,
        layer="sign",
        activation="study",
        quantize_first=False,
        quantize_head=False,
    )
    kinds = [type(m).__name__ for m in mixed]
    assert kinds == ["Flatten", "Linear", "ReLU", "QuantLinear", "Linear"]
    assert models.get("mlp", depth=0, width=8)[1].in_features == 784
    assert models.get("mlp", in_features=20, depth=1, width=4)(torch.randn(3, 20)).shape == (3, 10)


def test_bias_defaults_follow_the_layer_kind():
    for kind in models.LAYERS:
        model = models.get("mlp", depth=1, width=4, **_kw(kind))
        has_bias = [m.bias is not None for m in model.modules() if isinstance(m, nn.Linear)]
        assert has_bias == [kind not in ("bitlinear8", "mybitlinear")] * 2
        assert models.default_bias(kind) == has_bias[0]
    with_bias = models.get("mlp", depth=1, width=4, layer="bitlinear8", bias=True)
    assert with_bias[1].bias is not None and with_bias.lowbit_spec["kwargs"]["bias"] is True
    no_bias = models.get("cvnn1", layer="ternary", bias=False, quantize_head=False)
    assert no_bias[0].bias is None and no_bias[-1].bias is not None  # fp32 head keeps its bias
    with pytest.raises(ValueError, match="bias must be"):
        models.get("mlp", bias="yes")


def test_vit_structure():
    vit = models.get("vit1", layer="ternary")
    assert not any(isinstance(m, nn.MultiheadAttention) for m in vit.modules())
    assert type(vit.embed) is nn.Linear and isinstance(vit.position, nn.Parameter)
    attn = vit.blocks[0].attn
    assert all(isinstance(getattr(attn, n), QuantLinear) for n in ("q", "k", "v", "proj"))
    assert isinstance(vit.head[-1], QuantLinear)
    assert all(not isinstance(m, QuantLinear) for m in vit.modules() if isinstance(m, nn.LayerNorm))
    assert len(vit.blocks) == 3 and len(models.get("vit2").blocks) == 11
    fp32_head = models.get("vit1", layer="ternary", quantize_head=False, quantize_patch=True)
    assert type(fp32_head.head[-1]) is nn.Linear and isinstance(fp32_head.embed, QuantLinear)
    # patch order: (B, C, H, W) -> (B, N, p*p*C), row-major patches, channels last
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    small = models.get("vit", input_shape=(2, 4, 4), patch_size=2, dim=4, heads=2, blocks=1)
    patches = small.patches(x)
    assert patches.shape == (1, 4, 8)
    assert patches[0, 1].tolist() == [2, 18, 3, 19, 6, 22, 7, 23]


def test_attention_matches_the_written_out_formula():
    torch.manual_seed(0)
    attn = models.Attention(8, 2, dropout=0.0, linear=nn.Linear).eval()
    x = torch.randn(3, 5, 8)  # (B, T, D)
    q, k, v = (m(x).view(3, 5, 2, 4).transpose(1, 2) for m in (attn.q, attn.k, attn.v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)  # sqrt(head dim 4) = 2
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(3, 5, 8))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)


def test_glorot_init_zero_biases():
    model = models.get("cvnn1")
    assert all(
        torch.equal(m.bias, torch.zeros_like(m.bias))
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    )
    mlp = models.get("mlp")  # PyTorch's default init: non-zero biases
    assert mlp[1].bias.abs().sum() > 0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: models.get("resnet"), "unknown model 'resnet'; valid models: mlp, fcnn1"),
        (lambda: models.get("mlp", layer="xnor"), "unknown layer kind 'xnor'; valid kinds"),
        (lambda: models.get("mlp", layer="nlevel"), "needs levels=N"),
        (lambda: models.get("mlp", levels=3), "layer 'linear' is fp32"),
        (lambda: models.get("mlp", layer="bitlinear8", levels=3), "2 levels"),
        (lambda: models.get("mlp", layer="ternary", levels=5), "exactly 3 levels"),
        (lambda: models.get("mlp", layer="nlevel", levels=300), "levels"),
        (lambda: models.get("mlp", widht=3), "no argument.*widht.*width"),
        (lambda: models.get("mlp", mask="grad"), "does not take option.*mask"),
        (lambda: models.get("mlp", layer="misborn", mask="tanh"), "mask must be one of"),
        (lambda: models.get("mlp", activation="gelu"), "activation must be one of relu, study"),
        (lambda: models.get("mlp", depth=-1), "depth"),
        (lambda: models.get("cvnn1", kernel_size=4), "kernel_size must be 3 or 5"),
        (lambda: models.get("cvnn1", input_shape=(3, 4, 4)), "too small"),
        (lambda: models.get("cvnn1", input_shape=(32, 32)), r"\(C, H, W\)"),
        (lambda: models.get("vit1", heads=5), "divisible by heads"),
        (lambda: models.get("vit1", pool="max"), "pool must be one of"),
        (lambda: models.get("fcnn1", init="he"), "init must be one of torch, glorot"),
    ],
)
def test_errors_are_clear(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    ("kind", "levels", "qat"),
    [
        ("ternary", None, {"levels": 3, "quantizer": "ternary"}),
        ("nlevel", 5, {"levels": 5}),
        ("sign", None, {"levels": 2, "quantizer": "sign"}),
    ],
)
def test_layer_kinds_default_to_one_scale_per_tensor(kind, levels, qat):
    """``layer="ternary"`` is BitNet b1.58's per-tensor absmean layer and ``"nlevel"`` the
    Low-Resolution study's mean|W| scaling: the same quantizer as ``quantizers.get(kind)`` and
    ``QATConfig``, one scale per weight matrix. Per-output-channel scales stay an option
    (``granularity="channel"``): a model spec saved without ``granularity`` must rebuild the
    quantizer it was trained with (docs/results/accuracy.md says why the default stays)."""
    from lowbit import QATConfig, quantizers

    model = models.get("mlp", depth=1, width=8, layer=kind, levels=levels)
    expected = quantizers.get(kind, **({"levels": levels} if levels else {}))
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 2
    assert all(m.weight_quantizer == expected for m in layers)
    assert QATConfig(**qat).weight_quantizer() == expected
    assert "granularity" not in model.lowbit_spec["kwargs"]
    for m in layers:
        assert m.weight_quantizer.granularity == "tensor"
        _, scale = m.weight_quantizer.codes(m.weight.detach())
        assert scale.numel() == 1
    per_channel = models.get(
        "mlp", depth=1, width=8, layer=kind, levels=levels, granularity="channel"
    )
    _, scale = per_channel[1].weight_quantizer.codes(per_channel[1].weight.detach())
    assert scale.numel() == 8  # one per output row of Linear(784, 8)
