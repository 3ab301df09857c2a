"""Quantizer math pinned to hand-computed values (lowbit.quantizers)."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit import quantizers
from lowbit.quantizers import EPS, AbsMax8, Quantizer, level_values

LEVELS = (2, 3, 4, 5, 8, 9, 16, 17)

# mean|W| = 1 exactly, so with spread 1 the scale is 1 and s = W.
W = torch.tensor([-2.5, -1.25, -0.5, 0.0, 0.25, 0.75, 1.25, 1.5])

# Hand-computed levels of nlevel on W: odd N round half to even then clip to ±L; even N
# floor + 0.5 then clip. (spread, levels); N = 16, 17 use spread 2 (s = 2W, scale 0.5).
HAND = {
    2: (1.0, [-0.5, -0.5, -0.5, 0.5, 0.5, 0.5, 0.5, 0.5]),
    3: (1.0, [-1, -1, 0, 0, 0, 1, 1, 1]),
    4: (1.0, [-1.5, -1.5, -0.5, 0.5, 0.5, 0.5, 1.5, 1.5]),
    5: (1.0, [-2, -1, 0, 0, 0, 1, 1, 2]),
    8: (1.0, [-2.5, -1.5, -0.5, 0.5, 0.5, 0.5, 1.5, 1.5]),
    9: (1.0, [-2, -1, 0, 0, 0, 1, 1, 2]),
    16: (2.0, [-4.5, -2.5, -0.5, 0.5, 0.5, 1.5, 2.5, 3.5]),
    17: (2.0, [-5, -2, -1, 0, 0, 2, 2, 3]),
}


def _all_quantizers() -> list[Quantizer]:
    qs = [quantizers.get("nlevel", levels=n) for n in LEVELS]
    qs += [quantizers.get(name) for name in ("sign", "ternary", "ternary-median")]
    qs += [quantizers.get("sign", center=False), Quantizer(levels=2, fixed_scale=2.0)]
    return qs


ALL = _all_quantizers()
IDS = [
    f"{q.name}{q.levels}{'-c' if q.center else ''}{'-fixed' if q.fixed_scale else ''}" for q in ALL
]


@pytest.mark.parametrize("levels", LEVELS)
def test_level_set(levels):
    values = level_values(levels)
    assert values.shape == (levels,)
    assert torch.equal(values, -values.flip(0))  # symmetric
    assert torch.equal(values.diff(), torch.ones(levels - 1))  # unit steps, increasing
    assert (0.0 in values.tolist()) == (levels % 2 == 1)  # zero only for odd N
    assert values[-1].item() == (levels - 1) / 2


def test_level_set_hand():
    assert level_values(2).tolist() == [-0.5, 0.5]
    assert level_values(3).tolist() == [-1, 0, 1]
    assert level_values(4).tolist() == [-1.5, -0.5, 0.5, 1.5]
    assert level_values(5).tolist() == [-2, -1, 0, 1, 2]


@pytest.mark.parametrize("levels", LEVELS)
def test_nlevel_hand_values(levels):
    spread, expected = HAND[levels]
    q = quantizers.get("nlevel", levels=levels, spread=spread)
    assert q.levels == levels and q.bits == pytest.approx(math.log2(levels))
    level = torch.tensor(expected, dtype=torch.float32)
    assert torch.equal(q(W), level / spread)
    codes, scale = q.codes(W)
    assert scale.item() == 1 / spread
    assert codes.dtype == torch.uint8
    assert codes.tolist() == [int(v + (levels - 1) / 2) for v in expected]
    # every produced value is a scaled member of the level set
    assert set((q(W) * spread).tolist()) <= set(level_values(levels).tolist())


def test_sign_hand_values():
    w = torch.tensor([0.0, 0.2, 0.4, 3.4])  # mean 1, mean|w| 1
    centered = quantizers.get("sign")  # center=True by default (BitNet)
    assert centered.center and centered.levels == 2 and centered.bits == 1.0
    assert centered(w).tolist() == [-1, -1, -1, 1]
    plain = quantizers.get("sign", center=False)
    assert plain(w).tolist() == [1, 1, 1, 1]  # sign(0) = +1
    assert plain.codes(w)[0].tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="exactly 2 levels"):
        quantizers.get("sign", levels=3)


def test_ternary_and_median_hand_values():
    w = torch.tensor([-1.6, -0.4, 0.6, 1.4, 0.1])
    t = quantizers.get("ternary")  # alpha = mean|w| = 0.82
    alpha = w.abs().mean()
    assert torch.equal(t(w), torch.tensor([-1.0, 0, 1, 1, 0]) * alpha)
    assert t.codes(w)[0].tolist() == [0, 1, 2, 2, 1]
    m = quantizers.get("ternary-median")  # alpha = median|w| = 0.6
    assert torch.equal(m(w), torch.tensor([-1.0, -1, 1, 1, 0]) * torch.tensor(0.6))
    assert m.codes(w)[1].item() == pytest.approx(0.6)


def test_per_channel_scales():
    w = torch.tensor([[-1.6, -0.4, 0.6, 1.4], [0.1, 0.2, -0.3, 0.2]])
    q = quantizers.get("ternary", granularity="channel")
    codes, scale = q.codes(w)
    assert scale.shape == (2, 1)
    assert scale.flatten().tolist() == pytest.approx([1.0, 0.2])
    # row 2: s = [0.5, 1, -1.5, 1] -> round half to even [0, 1, -2 -> -1, 1]
    assert codes.tolist() == [[0, 1, 2, 2], [1, 2, 0, 2]]
    assert torch.equal(q(w), q.dequantize(codes, scale))
    conv = torch.randn(4, 3, 3, 3)
    codes, scale = quantizers.get("nlevel", levels=5, granularity="channel").codes(conv)
    assert scale.shape == (4, 1, 1, 1)
    assert torch.equal(
        scale.flatten(), conv.abs().mean(dim=(1, 2, 3)) / quantizers.default_spread(5)
    )
    # a per-tensor quantizer gives one scale for the whole tensor
    assert quantizers.get("ternary").codes(conv)[1].shape == ()


def test_absmax8_hand_values():
    x = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.0, 4.0, -2.0, 1.0]])
    q = quantizers.get("absmax8")
    assert isinstance(q, AbsMax8) and q.levels == 255
    # row 1: s = 127, x s = [127, -63.5, 31.75, 0] -> [127, -64, 32, 0]
    # row 2: s = 31.75, x s = [0, 127, -63.5, 31.75] -> [0, 127, -64, 32]
    ints = torch.tensor([[127.0, -64, 32, 0], [0, 127, -64, 32]])
    s = torch.tensor([[127.0], [31.75]])
    assert torch.equal(q(x), ints / s)
    codes, scale = q.codes(x)
    assert torch.equal(scale, s)
    assert codes.tolist() == [[254, 63, 159, 127], [127, 254, 63, 159]]
    assert torch.equal(q.dequantize(codes, scale), q(x))
    zero = q(torch.zeros(2, 4))
    assert torch.equal(zero, torch.zeros(2, 4))


ROUND_TRIP = [
    (Quantizer(**{**q.__dict__, "granularity": g}), f"{name}-{g}")
    for q, name in zip(ALL, IDS, strict=True)
    for g in (("tensor",) if q.fixed_scale else ("tensor", "channel"))
]


@pytest.mark.parametrize("q", [c[0] for c in ROUND_TRIP], ids=[c[1] for c in ROUND_TRIP])
def test_codes_round_trip_exact(q):
    g = torch.Generator().manual_seed(q.levels)
    for shape in [(16, 32), (8, 3, 3, 3), (7,)]:
        w = torch.randn(shape, generator=g) * 0.05
        codes, scale = q.codes(w)
        assert codes.dtype == torch.uint8 and codes.shape == w.shape
        assert int(codes.max()) <= q.levels - 1
        assert torch.equal(q.dequantize(codes, scale), q(w))
        # the straight-through path gives the same forward value, bit for bit
        assert torch.equal(q(w.clone().requires_grad_()).detach(), q(w))


@pytest.mark.parametrize("levels", LEVELS)
def test_ste_identity_gradient(levels):
    q = quantizers.get("nlevel", levels=levels)
    w = torch.randn(6, 5, requires_grad=True)
    g = torch.randn(6, 5)
    (q(w) * g).sum().backward()
    assert torch.equal(w.grad, g)


@pytest.mark.parametrize("levels", LEVELS)
def test_ste_clipped_gradient(levels):
    spread = HAND[levels][0]
    q = quantizers.get("nlevel", levels=levels, spread=spread, ste="clipped")
    w = W.clone().requires_grad_()
    q(w).sum().backward()
    # zero outside the outermost bin: |w| <= scale * N / 2 with scale = 1 / spread
    bound = levels / 2 / spread
    assert w.grad.tolist() == [float(abs(v) <= bound) for v in W.tolist()]


def test_ste_clipped_hand_values():
    w = W.clone().requires_grad_()
    quantizers.get("nlevel", levels=2, spread=1.0, ste="clipped")(w).sum().backward()
    assert w.grad.tolist() == [0, 0, 1, 1, 1, 1, 0, 0]  # |w| <= 1
    w = W.clone().requires_grad_()
    quantizers.get("nlevel", levels=3, spread=1.0, ste="clipped")(w).sum().backward()
    assert w.grad.tolist() == [0, 1, 1, 1, 1, 1, 1, 1]  # |w| <= 1.5


@pytest.mark.parametrize("q", ALL, ids=IDS)
def test_zero_weights_no_nan(q):
    w = torch.zeros(4, 3, requires_grad=True)
    out = q(w)
    assert torch.isfinite(out).all()
    if q.levels % 2 and q.fixed_scale is None:
        assert torch.equal(out, torch.zeros(4, 3))
    elif q.fixed_scale is None:
        assert out.abs().max().item() <= EPS
    codes, scale = q.codes(w.detach())
    assert torch.isfinite(scale).all() and scale.min() > 0
    assert torch.equal(q.dequantize(codes, scale), out.detach())
    out.sum().backward()
    assert torch.isfinite(w.grad).all()


def test_nlevel3_equals_ternary_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    for granularity in ("tensor", "channel"):
        n3 = quantizers.get("nlevel", levels=3, spread=1, granularity=granularity)
        t = quantizers.get("ternary", granularity=granularity)
        for _ in range(5):
            w = torch.randn(33, 17, generator=g)
            assert torch.equal(n3(w), t(w))
            assert all(torch.equal(a, b) for a, b in zip(n3.codes(w), t.codes(w), strict=True))
    assert quantizers.default_spread(3) == 1.0


def test_fixed_scale():
    q = Quantizer(levels=2, fixed_scale=2.0)
    w = torch.tensor([-0.3, 0.0, 5.0])
    assert q(w).tolist() == [-1, 1, 1]
    assert torch.equal(q.dequantize(*q.codes(w)), q(w))
    with pytest.raises(ValueError, match="fixed_scale"):
        Quantizer(levels=2, fixed_scale=0.0)


def test_get_errors_and_pass_through():
    with pytest.raises(ValueError, match="valid names: sign, ternary, ternary-median, nlevel"):
        quantizers.get("binary")
    with pytest.raises(ValueError, match="exactly 3 levels"):
        quantizers.get("ternary", levels=5)
    for bad in (1, 257, 3.5):
        with pytest.raises(ValueError, match="levels"):
            quantizers.get("nlevel", levels=bad)
    with pytest.raises(ValueError, match="ste must be one of identity, clipped"):
        quantizers.get("ternary", ste="tanh")
    with pytest.raises(ValueError, match="granularity"):
        quantizers.get("ternary", granularity="row")
    with pytest.raises(ValueError, match="spread"):
        quantizers.get("nlevel", levels=5, spread=0)
    with pytest.raises(ValueError, match="absmax8 takes no options"):
        quantizers.get("absmax8", levels=3)
    t = quantizers.get("ternary")
    assert quantizers.get(t) is t and quantizers.get(None) is None
    with pytest.raises(ValueError, match="options"):
        quantizers.get(t, levels=3)


# --- binary activations ------------------------------------------------------------------------

X_BIN = torch.tensor([-2.0, -1.0, -0.75, -0.25, 0.0, 0.5, 1.0, 3.0])


@pytest.mark.parametrize(
    ("name", "grad"),
    [
        # hard-tanh: 1 on |x| <= 1 (the ends included)
        ("sign", [0, 1, 1, 1, 1, 1, 1, 0]),
        # Bi-Real: 2 - 2|x| on |x| < 1
        ("approx-sign", [0, 0, 0.5, 1.5, 2, 1, 0, 0]),
    ],
)
def test_binary_activation_value_and_gradient(name: str, grad: list[float]) -> None:
    q = quantizers.get_activation(name)
    x = X_BIN.clone().requires_grad_(True)
    y = q(x)
    assert y.tolist() == [-1, -1, -1, -1, 1, 1, 1, 1]  # sign(0) = +1
    y.sum().backward()
    assert x.grad.tolist() == grad


def test_rsign_threshold_per_channel_and_its_gradient() -> None:
    q = quantizers.get_activation("rsign", channels=2, channel_dim=1)
    with torch.no_grad():
        q.threshold.copy_(torch.tensor([0.5, -1.0]))
    x = torch.tensor([[[[0.25, 0.5]], [[-1.0, -1.5]]]], requires_grad=True)  # (1, 2, 1, 2)
    y = q(x)
    assert y.flatten().tolist() == [-1, 1, 1, -1]  # x >= t gives +1, x = t included
    y.sum().backward()
    # u = x - t = [-0.25, 0, 0, -0.5]: g = 2 - 2|u| = [1.5, 2, 2, 1]; dL/dt = -sum per channel
    assert x.grad.flatten().tolist() == [1.5, 2, 2, 1]
    assert q.threshold.grad.tolist() == [-3.5, -3.0]
    assert quantizers.binary_threshold(q).tolist() == [0.5, -1.0]


def test_activation_registry_errors() -> None:
    with pytest.raises(ValueError, match="valid names: absmax8, sign, approx-sign, rsign"):
        quantizers.get_activation("tanh")
    with pytest.raises(ValueError, match="channels"):
        quantizers.get_activation("rsign")
    with pytest.raises(ValueError, match="ste must be one of htanh, approx"):
        quantizers.BinaryActivation(ste="identity")
    assert quantizers.is_binary(quantizers.get_activation("sign"))
    assert not quantizers.is_binary(quantizers.get_activation("absmax8"))


def test_a_parameter_is_quantized_once_per_version(monkeypatch: pytest.MonkeyPatch) -> None:
    q = quantizers.get("ternary")
    w = torch.nn.Parameter(torch.randn(16, 8))
    calls = []
    real_scale = quantizers.Quantizer.scale
    monkeypatch.setattr(
        quantizers.Quantizer, "scale", lambda self, t: calls.append(1) or real_scale(self, t)
    )
    first, second = q(w), q(w)
    assert len(calls) == 1 and torch.equal(first, second)
    (first.sum() + 2 * second.sum()).backward()  # the straight-through gradient, both calls
    assert torch.equal(w.grad, torch.full_like(w, 3.0))
    torch.optim.SGD([w], lr=0.5).step()  # in place: a new version
    third = q(w)
    assert len(calls) == 2 and torch.equal(third, q(w.detach().clone()))
    w.data = torch.randn(16, 8)  # new storage, same version counter
    assert torch.equal(q(w), q(w.detach().clone()))
    with torch.no_grad():
        w.mul_(-1)
    assert torch.equal(q(w), q(w.detach().clone()))
    frozen = torch.nn.Parameter(torch.randn(4, 4), requires_grad=False)
    out = q(frozen)
    out.zero_()  # the caller owns what it gets: the cache is not written through
    assert torch.equal(q(frozen), q(frozen.detach().clone())) and q(frozen).abs().sum() > 0
