"""XNOR-popcount kernels (lowbit.kernels.binary) against the reference, bit for bit, on every
ISA path this CPU runs; and the training layers against the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowbit.kernels import binary, reference
from lowbit.nn import QuantConv2d, QuantLinear

BEST = binary.best_isa()
ISAS = (
    ("portable", "avx2", "avx512")[: ("portable", "avx2", "avx512").index(BEST) + 1]
    if (BEST != "reference")
    else ()
)
needs_native = pytest.mark.skipif(not ISAS, reason="the compiled binary kernels are not built")

# (batch, N_out, K): K off the 64-bit words and N_out off the 8-row blocks on purpose
# and lone tokens over 16+ words (the AVX2 GEMV's carry-save tree, whole and with tail words)
SHAPES = ((1, 5, 1), (3, 17, 63), (7, 9, 65), (33, 100, 200), (2, 8, 4101), (5, 13, 128))
SHAPES += ((1, 11, 1100), (3, 9, 2113))


def _case(m: int, n: int, k: int, seed: int, per_channel: bool):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2, (n, k), generator=g, dtype=torch.uint8)
    scale = torch.rand(n if per_channel else (), generator=g) + 0.05
    x = torch.randn(m, k, generator=g)
    x[x.abs() < 0.1] = 0.0  # ties: sign(0) = +1 must be kept
    return codes, scale, torch.randn(n, generator=g), x


def test_reference_pinned_by_hand() -> None:
    x = torch.tensor([[0.5, -1.0, 0.0]])  # binarized: +1, -1, +1 (sign(0) = +1)
    codes = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.uint8)  # w_b: (+1 +1 -1), (-1 +1 +1)
    scale = torch.tensor([2.0, 4.0])  # alpha 1 and 2
    y = reference.binary_linear(x, codes, scale, torch.tensor([0.5, 0.0]))
    assert y.tolist() == [[(1 - 1 - 1) * 1 + 0.5, (-1 - 1 + 1) * 2.0]]
    t = torch.tensor([0.6, -2.0, 0.0])  # x < t: -1, +1, +1
    assert reference.binary_linear(x, codes, scale, None, t).tolist() == [[-1.0, 6.0]]


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("per_channel", [True, False])
def test_linear_equals_reference_exactly(isa: str, per_channel: bool) -> None:
    for i, (m, n, k) in enumerate(SHAPES):
        codes, scale, bias, x = _case(m, n, k, i, per_channel)
        w = binary.prepare(codes, scale, isa=isa)
        assert w.isa == isa
        t = torch.randn(k) * 0.5 if i % 2 else None
        for b in (bias, None):
            got = binary.linear(x, w, b, t, threads=1 + i % 2)
            want = reference.binary_linear(x, codes, scale, b, t)
            assert torch.equal(got, want), (isa, m, n, k, (got - want).abs().max())


@needs_native
def test_activation_bits_layout() -> None:
    """bit k % 64 of word k / 64 is (x_k < t_k); the tail stays zero."""
    import ctypes

    x = torch.randn(3, 70)
    t = torch.randn(70) * 0.3
    for isa in ISAS:
        out = torch.zeros(3, 2, dtype=torch.int64)
        lib = binary._lib()
        lib.lb_binary_pack_activations(
            ("portable", "avx2", "avx512").index(isa),
            x.data_ptr(),
            3,
            70,
            t.data_ptr(),
            ctypes.c_void_p(out.data_ptr()),
        )
        bits = (out.unsqueeze(-1) >> torch.arange(64)) & 1  # (3, 2, 64)
        bits = bits.reshape(3, 128)
        assert torch.equal(bits[:, :70].bool(), x < t), isa
        assert not bits[:, 70:].any()


# (C_in, C_out, H, W, kernel, stride, padding, dilation)
CONVS = (
    (3, 5, 9, 7, (3, 3), (1, 1), (1, 1), (1, 1)),
    (70, 9, 8, 8, (3, 3), (2, 2), (1, 1), (1, 1)),
    (64, 16, 10, 9, (3, 2), (1, 2), (2, 0), (2, 1)),
    (129, 3, 6, 6, (1, 1), (1, 1), (0, 0), (1, 1)),
    (16, 24, 7, 7, (5, 5), (1, 1), (2, 2), (1, 1)),
)


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_conv2d_equals_reference_exactly(isa: str) -> None:
    for i, (c, n, h, w_, ks, st, pad, dil) in enumerate(CONVS):
        g = torch.Generator().manual_seed(100 + i)
        codes = torch.randint(0, 2, (n, c * ks[0] * ks[1]), generator=g, dtype=torch.uint8)
        scale = torch.rand(n if i % 2 else (), generator=g) + 0.1
        bias = torch.randn(n, generator=g) if i % 3 else None
        x = torch.randn(2, c, h, w_, generator=g)
        t = torch.randn(c, generator=g) * 0.3 if i % 2 == 0 else None
        w = binary.prepare(codes, scale, isa=isa, conv=(c, ks))
        geo = {"kernel_size": ks, "stride": st, "padding": pad, "dilation": dil}
        got = binary.conv2d(x, w, bias, t, threads=2, **geo)
        want = reference.binary_conv2d(x, codes, scale, bias, t, **geo)
        assert got.shape == want.shape and torch.equal(got, want), (isa, i)


@pytest.mark.parametrize("activations", ["sign", "approx-sign", "rsign"])
def test_training_layers_equal_the_reference(activations: str) -> None:
    """What makes packed predictions identical: the trained layer's own forward is the spec."""
    torch.manual_seed(3)
    lin = QuantLinear(77, 10, weight_quantizer="sign", input_quantizer=activations)
    conv = QuantConv2d(
        5,
        6,
        3,
        stride=2,
        padding=1,
        dilation=2,
        weight_quantizer="sign",
        input_quantizer=activations,
    )
    for layer in (lin, conv):
        if activations == "rsign":
            torch.nn.init.uniform_(layer.input_quantizer.threshold, -0.3, 0.3)
    from lowbit.quantizers import binary_threshold

    x = torch.randn(4, 77)
    codes, scale = lin.weight_quantizer.codes(lin.weight)
    t = binary_threshold(lin.input_quantizer)
    with torch.no_grad():
        assert torch.equal(lin(x), reference.binary_linear(x, codes, scale, lin.bias, t))
        xc = torch.randn(2, 5, 11, 11)
        codes, scale = conv.weight_quantizer.codes(conv.weight)
        want = reference.binary_conv2d(
            xc,
            codes.reshape(6, -1),
            scale,
            conv.bias,
            binary_threshold(conv.input_quantizer),
            kernel_size=(3, 3),
            stride=(2, 2),
            padding=(1, 1),
            dilation=(2, 2),
        )
        assert torch.equal(conv(xc), want)


@needs_native
def test_registered_ops_match_the_eager_path() -> None:
    codes, scale, bias, x = _case(4, 12, 100, 7, True)
    t = torch.randn(100)
    op = torch.ops.lowbit.binary_linear(x, codes, scale, bias, t)
    assert torch.equal(op, binary.linear(x, binary.prepare(codes, scale), bias, t))
    xc = torch.randn(1, 8, 5, 5)
    codes = torch.randint(0, 2, (4, 72), dtype=torch.uint8)
    geometry = [3, 3, 1, 1, 1, 1, 1, 1]
    op = torch.ops.lowbit.binary_conv2d(xc, codes, scale[:4], None, None, geometry)
    wc = binary.prepare(codes, scale[:4], conv=(8, (3, 3)))
    assert torch.equal(op, binary.conv2d(xc, wc, kernel_size=(3, 3), padding=(1, 1)))


def test_prepare_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="binary codes must be 0 or 1"):
        binary.prepare(torch.full((2, 3), 2, dtype=torch.uint8), torch.tensor(1.0))
    with pytest.raises(ValueError, match="conv geometry"):
        binary.prepare(torch.zeros(2, 9, dtype=torch.uint8), torch.tensor(1.0), conv=(2, (3, 3)))
    w = binary.prepare(torch.zeros(2, 9, dtype=torch.uint8), torch.tensor(1.0))
    with pytest.raises(ValueError, match="expects 9"):
        binary.linear(torch.zeros(1, 8), w)


@needs_native
def test_empty_batches() -> None:
    codes, scale, bias, _ = _case(1, 5, 70, 0, True)
    w = binary.prepare(codes, scale)
    assert binary.linear(torch.zeros(0, 70), w, bias).shape == (0, 5)
    wc = binary.prepare(torch.zeros(4, 27, dtype=torch.uint8), scale[:4], conv=(3, (3, 3)))
    y = binary.conv2d(torch.zeros(0, 3, 5, 5), wc, kernel_size=(3, 3))
    assert y.shape == (0, 4, 3, 3)


def _epilogue(n: int, g: torch.Generator, residual: bool, prelu: bool) -> reference.BlockEpilogue:
    def vec() -> torch.Tensor:
        return torch.randn(n, generator=g)

    p = (vec(), vec().abs() * 0.5, vec()) if prelu else (None, None, None)
    return reference.BlockEpilogue(vec().abs() + 0.1, vec(), residual, *p)


# (C_in, C_out, H, W, batch): channels on and off the 8-channel blocks (the residual's gather
# path), outputs that repeat the input channels, fewer tokens than a token group
EPILOGUE_CONVS = ((16, 16, 7, 7, 1), (12, 24, 5, 6, 2), (64, 128, 4, 4, 1), (5, 15, 3, 2, 1))


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_conv2d_epilogue_equals_reference_exactly(isa: str) -> None:
    for i, (c, n, h, w_, b) in enumerate(EPILOGUE_CONVS):
        g = torch.Generator().manual_seed(300 + i)
        codes = torch.randint(0, 2, (n, c * 9), generator=g, dtype=torch.uint8)
        scale = torch.rand(n, generator=g) + 0.1
        x = torch.randn(b, c, h, w_, generator=g)
        t = torch.randn(c, generator=g) * 0.3
        w = binary.prepare(codes, scale, isa=isa, conv=(c, (3, 3)))
        geo = {"kernel_size": (3, 3), "padding": (1, 1)}
        for residual in (False, True):
            for prelu in (False, True):
                e = _epilogue(n, g, residual, prelu)
                got = binary.conv2d(x, w, None, t, epilogue=e, threads=1 + i % 2, **geo)
                want = reference.binary_conv2d(x, codes, scale, None, t, epilogue=e, **geo)
                assert torch.equal(got, want), (isa, i, residual, prelu)
                again = binary.conv2d(x, w, None, t, epilogue=e, **geo)  # the cached call
                assert torch.equal(again, want)


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_linear_epilogue_equals_reference_exactly(isa: str) -> None:
    for i, (m, k, n) in enumerate(((1, 70, 70), (9, 64, 128), (3, 20, 60), (17, 200, 200))):
        g = torch.Generator().manual_seed(400 + i)
        codes = torch.randint(0, 2, (n, k), generator=g, dtype=torch.uint8)
        scale = torch.rand(n, generator=g) + 0.1
        x = torch.randn(m, k, generator=g)
        w = binary.prepare(codes, scale, isa=isa)
        for residual in (False, True):
            e = _epilogue(n, g, residual, prelu=i % 2 == 0)
            bias = torch.randn(n, generator=g) if i % 2 else None
            got = binary.linear(x, w, bias, epilogue=e, threads=1 + i % 2)
            want = reference.binary_linear(x, codes, scale, bias, None, e)
            assert torch.equal(got, want), (isa, i, residual)


def test_epilogue_reference_is_the_block_arithmetic() -> None:
    """z = y * scale + shift; + [x, x]; RPReLU: written out by hand for one value per branch."""
    y = torch.tensor([[1.0, -2.0]])
    x = torch.tensor([[0.5]])
    e = reference.BlockEpilogue(
        torch.tensor([2.0, 3.0]),
        torch.tensor([1.0, 0.0]),
        True,
        torch.tensor([-1.0, -1.0]),
        torch.tensor([0.25, 0.5]),
        torch.tensor([10.0, 20.0]),
    )
    # channel 0: 1*2+1 = 3, +0.5 = 3.5, -1 = 2.5 >= 0, +10 = 12.5
    # channel 1: -2*3+0 = -6, +0.5 = -5.5, -1 = -6.5 < 0: *0.5 = -3.25, +20 = 16.75
    assert reference.binary_epilogue(y, x, e, -1).tolist() == [[12.5, 16.75]]


def test_epilogue_rejects_bad_input() -> None:
    v = torch.ones(4)
    with pytest.raises(ValueError, match="come together"):
        reference.BlockEpilogue(v, v, False, v, None, None)
    with pytest.raises(ValueError, match="contiguous float32"):
        reference.BlockEpilogue(v, torch.ones(5))
    with pytest.raises(ValueError, match="contiguous float32"):
        reference.BlockEpilogue(v, torch.ones(4, dtype=torch.float64))
    w = binary.prepare(torch.ones(6, 27, dtype=torch.uint8), torch.ones(6), conv=(3, (3, 3)))
    x = torch.randn(1, 3, 5, 5)
    with pytest.raises(ValueError, match="4 channels, the layer 6 outputs"):
        binary.conv2d(x, w, epilogue=reference.BlockEpilogue(v, v), kernel_size=(3, 3))
    six = torch.ones(6)
    with pytest.raises(ValueError, match="pixel grid"):
        binary.conv2d(x, w, epilogue=reference.BlockEpilogue(six, six, True), kernel_size=(3, 3))
    w4 = binary.prepare(torch.ones(4, 3, dtype=torch.uint8), torch.ones(4))
    with pytest.raises(ValueError, match="residual of 3 channels"):
        binary.linear(torch.randn(2, 3), w4, epilogue=reference.BlockEpilogue(v, v, True))


def test_custom_op_weights_are_prepared_once_per_codes_state() -> None:
    """The ops' eager bodies (what tracers call) pack a weight once, again after an edit."""
    import lowbit.kernels as kernels

    codes = torch.randint(0, 2, (16, 70), dtype=torch.uint8)
    scale = torch.rand(16) + 0.1
    for prepared in (
        lambda: binary._prepared_for(codes, scale),
        lambda: kernels._prepared_for(codes, scale, 2),
    ):
        first = prepared()
        assert prepared() is first
        codes[0, 0] ^= 1  # in place: a new version
        assert prepared() is not first


@pytest.mark.skipif("avx2" not in ISAS, reason="the CPU has no AVX2")
def test_avx2_convolutions_on_both_of_their_paths() -> None:
    """AVX2 convolutions look counts up in nibble tables (weight.nibbles) unless K is too long
    for its 16-bit counters or the image's tables too large; each path equals the reference."""
    geo = {"kernel_size": (3, 3), "padding": (1, 1)}
    # (batch, C_in, C_out, H, W, tables expected): the image of the third case has 4 * 66 * 66
    # words, past the tables' bound; the last has K = 7300 * 9 bits, past the counters' (and
    # its third token goes alone: the carry-save tree walking 9 taps of 115 words)
    # (C_out 200: two chunks of tiles, the second ending in half a tile; 35 tokens: the last of
    # the second chunk goes alone; C_in 520: a tap longer than one run between widenings)
    cases = ((1, 64, 40, 7, 5, True), (3, 130, 17, 4, 4, True), (4, 60, 9, 64, 64, True))
    cases += ((2, 70, 200, 5, 5, True), (1, 520, 20, 3, 3, True))
    cases += ((1, 7300, 3, 1, 3, False),)
    for i, (b, c, n, h, w_, nibbles) in enumerate(cases):
        g = torch.Generator().manual_seed(500 + i)
        codes = torch.randint(0, 2, (n, c * 9), generator=g, dtype=torch.uint8)
        scale = torch.rand(n, generator=g) + 0.1
        x = torch.randn(b, c, h, w_, generator=g)
        w = binary.prepare(codes, scale, isa="avx2", conv=(c, (3, 3)))
        assert (w.nibbles is not None) == nibbles, i
        for threads in (1, 2):
            got = binary.conv2d(x, w, None, None, threads=threads, **geo)
            assert torch.equal(got, reference.binary_conv2d(x, codes, scale, **geo)), (i, threads)


@needs_native
def test_native_pooling_equals_torch_and_writes_channels_last() -> None:
    """The NCHW -> channels-last 2x2 max-pool of MaxPool2x2's eval path: torch's values, NaN
    kept, odd sizes floored, rows shorter and longer than the AVX2 step of 8 outputs."""
    g = torch.Generator().manual_seed(7)
    for isa in ISAS:
        for shape in ((1, 64, 28, 28), (2, 3, 7, 9), (1, 5, 2, 3), (3, 13, 32, 37), (1, 2, 5, 1)):
            x = torch.randn(shape, generator=g)
            x.view(-1)[::11] = float("nan")
            got = binary.maxpool2x2_channels_last(x, isa=isa)
            assert got is not None and got.is_contiguous(memory_format=torch.channels_last)
            want = F.max_pool2d(x, 2) if min(shape[2:]) >= 2 else torch.empty(got.shape)
            assert got.shape == want.shape, (isa, shape)
            assert torch.equal(got.isnan(), want.isnan()), (isa, shape)
            assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0)), (isa, shape)
    assert binary.maxpool2x2_channels_last(torch.randn(1, 2, 4, 4, dtype=torch.float64)) is None
    assert binary.maxpool2x2_channels_last(torch.randn(1, 2, 4, 4), isa="reference") is None


@needs_native
def test_native_pooling_after_a_folded_batchnorm_equals_torch() -> None:
    """scale/shift: each pixel x * scale[c] + shift[c] (torch's mul then add, bit for bit), then
    the pooling; channels by 8 and the rest one at a time, rows of 8+ outputs whose last vector
    overlaps the previous one (W/2 = 14, 18), negative scales, NaN kept."""
    g = torch.Generator().manual_seed(8)
    for isa in ISAS:
        for shape in (
            (1, 64, 28, 28),
            (2, 13, 9, 17),
            (1, 16, 32, 36),
            (1, 8, 15, 31),
            (3, 4, 5, 5),
        ):
            x = torch.randn(shape, generator=g)
            x.view(-1)[::13] = float("nan")
            scale, shift = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
            got = binary.maxpool2x2_channels_last(x, isa=isa, scale=scale, shift=shift)
            want = F.max_pool2d(x * scale.reshape(-1, 1, 1) + shift.reshape(-1, 1, 1), 2)
            assert got is not None and got.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(got.isnan(), want.isnan()), (isa, shape)
            assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0)), (isa, shape)
    with pytest.raises(ValueError, match="one per channel"):
        binary.maxpool2x2_channels_last(torch.randn(1, 3, 4, 4), scale=torch.ones(2), shift=None)
    wide = torch.ones(3, dtype=torch.float64)  # not what the kernel reads: the caller pools
    assert binary.maxpool2x2_channels_last(torch.randn(1, 3, 4, 4), scale=wide, shift=wide) is None


@needs_native
def test_conv_geometry_given_as_lists() -> None:
    g = torch.Generator().manual_seed(9)
    codes = torch.randint(0, 2, (6, 45), generator=g, dtype=torch.uint8)
    scale, x = torch.rand(6, generator=g) + 0.1, torch.randn(1, 5, 7, 7, generator=g)
    w = binary.prepare(codes, scale, conv=(5, (3, 3)))
    got = binary.conv2d(x, w, kernel_size=[3, 3], padding=[1, 1], stride=[1, 1], dilation=[1, 1])
    want = reference.binary_conv2d(x, codes, scale, kernel_size=(3, 3), padding=(1, 1))
    assert torch.equal(got, want)
