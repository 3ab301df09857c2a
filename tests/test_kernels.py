"""The compiled kernels against the reference (the spec), on every ISA path this CPU can run.

int8 activations must equal the reference bit for bit (integer dot products, the same float64
rescale); fp32 activations agree within float32 summation error.
"""

from __future__ import annotations

import math
import threading
import warnings

import pytest
import torch

from lowbit import kernels
from lowbit.errors import ConfigError
from lowbit.kernels import native, reference

LEVELS = (2, 3, 4, 5, 8, 9, 16, 17)
HAVE_NATIVE = native.load() is not None
ISAS = native.ISAS[: native.ISAS.index(native.best_isa()) + 1] if HAVE_NATIVE else ()
needs_native = pytest.mark.skipif(
    not HAVE_NATIVE, reason=f"no compiled kernels: {native.load_error()}"
)

# (batch, N_out, K): K and N_out off the 64/256/512 blocks and the 8-row blocks on purpose
SHAPES = ((1, 37, 300), (3, 16, 513), (5, 9, 1000), (32, 70, 777), (1, 8, 1))


def _case(levels: int, m: int, n: int, k: int, seed: int, per_channel: bool = True):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, levels, (n, k), generator=g, dtype=torch.uint8)
    scale = torch.rand(n if per_channel else (), generator=g) + 0.05
    bias = torch.randn(n, generator=g)
    x = torch.randn(m, k, generator=g) * 3
    return codes, scale, bias, x


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("levels", LEVELS)
def test_int8_equals_reference_exactly(isa: str, levels: int) -> None:
    for i, (m, n, k) in enumerate(SHAPES):
        codes, scale, bias, x = _case(
            levels, m, n, k, seed=100 * levels + i, per_channel=i % 2 == 0
        )
        w = kernels.prepare(codes, scale, levels, isa=isa)
        assert w.backend == f"native-{isa}"
        want = reference.linear(x, codes, scale, levels, bias, "int8")
        got = kernels.linear(x, w, bias, "int8")
        assert torch.equal(got, want), (isa, levels, m, n, k, (got - want).abs().max())
        got_nb = kernels.linear(x, w, None, "int8", threads=1)
        assert torch.equal(got_nb, reference.linear(x, codes, scale, levels, None, "int8"))


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("levels", [2, 3, 4, 5, 16, 17])
def test_int8_at_the_int16_bounds(isa: str, levels: int) -> None:
    """Every code at its largest and every activation at +-127, the products' and the AVX2 GEMV's
    int16 group sums at their bounds (see dots_256), over K with whole groups and a tail, at
    batch 1 (the GEMV) and 5."""
    k, n = 2 * 1024 + 77, 12
    codes = torch.full((n, k), levels - 1, dtype=torch.uint8)
    codes[1::2, ::3] = 0  # alternating rows with some codes at the bottom level too
    scale = torch.tensor(0.01)
    w = kernels.prepare(codes, scale, levels, isa=isa)
    for m in (1, 5):
        for sign in (1.0, -1.0):
            x = torch.full((m, k), sign)
            x[:, ::5] = -sign  # |x| the same everywhere: every value quantizes to +-127
            want = reference.linear(x, codes, scale, levels, None, "int8")
            got = kernels.linear(x, w, None, "int8", threads=1)
            assert torch.equal(got, want), (isa, levels, m, sign, (got - want).abs().max())


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("levels", LEVELS)
def test_fp32_matches_reference(isa: str, levels: int) -> None:
    for i, (m, n, k) in enumerate(SHAPES):
        codes, scale, bias, x = _case(levels, m, n, k, seed=7 * levels + i, per_channel=i % 2 == 1)
        w = kernels.prepare(codes, scale, levels, isa=isa)
        want = reference.linear(x, codes, scale, levels, bias, "fp32")
        got = kernels.linear(x, w, bias, "fp32")
        # float32 sums of K terms in another order: error ~ K * eps * sum |x w|
        bound = 1e-6 * k * (x.abs() @ reference.dequantize(codes, scale, levels).abs().T) + 1e-6
        assert (got - want).abs().le(bound).all(), (isa, levels, m, n, k)


@needs_native
@pytest.mark.parametrize("levels", (2, 3, 5, 17))
def test_large_batch_threads_and_shapes(levels: int) -> None:
    codes, scale, bias, x = _case(levels, 67, 131, 1100, seed=levels)
    w = kernels.prepare(codes, scale, levels)
    want = reference.linear(x, codes, scale, levels, bias, "int8")
    for threads in (1, 2, 3):
        assert torch.equal(kernels.linear(x, w, bias, "int8", threads=threads), want)
    # leading dimensions are kept, like F.linear
    y = kernels.linear(x.reshape(1, 67, 1100), w, bias, "int8")
    assert y.shape == (1, 67, 131) and torch.equal(y[0], want)


LUT_ISAS = tuple(isa for isa in ISAS if isa in native.LUT_ISAS)


def _lut_bound(x: torch.Tensor, scale: torch.Tensor, bias, levels: int, k: int) -> torch.Tensor:
    """The error bound the C header states for the lookup-table kernel, (M, N_out):
    (g + G + P + 4) u |s| A sum_k |x| + |b| u, A = sum_p 2^p (D-1)/2 + |corr|."""
    base, group, planes = native.lut_shape(levels)
    corr = abs((2**planes - levels) / 2) if base == 2 else 0.0
    a = (2**planes - 1) * (base - 1) / 2 + corr
    u = 2.0**-24
    terms = group + math.ceil(k / group) + planes + 4
    s = scale.double().abs().reshape(1, -1) if scale.dim() else scale.double().abs()
    b = 0.0 if bias is None else bias.double().abs().reshape(1, -1) * u
    return terms * u * a * s * x.double().abs().sum(1, keepdim=True) + b


@needs_native
@pytest.mark.parametrize("isa", LUT_ISAS)
@pytest.mark.parametrize("levels", range(2, 18))
def test_lut_kernel_within_its_stated_bound(isa: str, levels: int) -> None:
    gen = torch.Generator().manual_seed(levels)
    for i in range(4):
        m, n, k = (int(v) for v in torch.randint(1, 90, (3,), generator=gen))
        m, k = (m if i else 1), k * (7 if i % 2 else 1)  # batch 1, and K beyond one word
        codes, scale, bias, x = _case(levels, m, n, k, seed=31 * levels + i, per_channel=i < 2)
        bias = bias if i != 3 else None
        w = kernels.prepare(codes, scale, levels, isa=isa)
        got = kernels.linear(x, w, bias, "fp32")
        assert w.lut is not None and w.lut.dtype == torch.int32
        exact = x.double() @ reference.dequantize(codes, scale.double(), levels).double().T
        exact = exact if bias is None else exact + bias.double()
        err = (got.double() - exact).abs()
        assert err.le(_lut_bound(x, scale, bias, levels, k)).all(), (isa, levels, m, n, k)
        for threads in (1, 2, 3):  # the split over threads does not change any row's sum
            assert torch.equal(kernels.linear(x, w, bias, "fp32", threads=threads), got)


def _check_lut_conv(isa, levels, gen, cin, cout, ks, stride, padding, b, h, w) -> None:
    """One packed convolution against the float64 one, within the header's bound."""
    codes = torch.randint(0, levels, (cout, cin * ks[0] * ks[1]), generator=gen)
    codes = codes.to(torch.uint8)
    scale = torch.rand(cout, generator=gen) + 0.1
    bias = torch.randn(cout, generator=gen)
    x = torch.randn(b, cin, h, w, generator=gen)
    weight = kernels.prepare(codes, scale, levels, isa=isa, conv=(cin, ks))
    kw = dict(kernel_size=ks, stride=stride, padding=padding)
    got = kernels.conv2d(x, weight, bias, **kw)
    w64 = reference.dequantize(codes, scale.double(), levels).double().reshape(cout, cin, *ks)
    exact = torch.nn.functional.conv2d(x.double(), w64, bias.double(), stride, padding)
    # the bound's sum_k |x| over a patch, from the convolution of |x| with ones
    ones = torch.ones(1, cin, *ks, dtype=torch.float64)
    patch = torch.nn.functional.conv2d(x.double().abs(), ones, None, stride, padding)
    base, group, planes = native.lut_shape(levels)
    taps = ks[0] * ks[1]
    # tables per pixel: each tap's channels in whole groups; per gathered patch: K's groups
    groups = taps * math.ceil(cin / group) if cin >= 16 else math.ceil(cin * taps / group)
    corr = abs((2**planes - levels) / 2) if base == 2 else 0.0
    a = (2**planes - 1) * (base - 1) / 2 + corr
    terms = group + groups + planes + 4
    bound = terms * 2.0**-24 * a * scale.double().reshape(1, -1, 1, 1) * patch
    bound = bound + bias.double().abs().reshape(1, -1, 1, 1) * 2.0**-24
    assert ((got.double() - exact).abs() <= bound).all(), (isa, levels, cin)


@needs_native
@pytest.mark.parametrize("isa", LUT_ISAS)
@pytest.mark.parametrize("levels", range(2, 18))
def test_lut_conv_within_its_stated_bound(isa: str, levels: int) -> None:
    """Tables per pixel (C_in >= 16, each tap's channels whole groups), per gathered patch
    (fewer channels) and direct products (K <= 9), against the float64 convolution, within
    the header's bound."""
    gen = torch.Generator().manual_seed(levels)
    for cin, ks, stride, padding in (
        (19, (3, 2), (2, 1), (1, 0)),
        (5, (3, 3), (1, 1), (1, 1)),
        (1, (3, 3), (1, 1), (1, 1)),  # K = 9: direct products (LUT_DIRECT_MAX_K)
        (2, (2, 2), (2, 1), (0, 1)),
    ):
        _check_lut_conv(isa, levels, gen, cin, 21, ks, stride, padding, b=2, h=7, w=6)


@needs_native
@pytest.mark.parametrize("isa", LUT_ISAS)
@pytest.mark.parametrize("levels", (2, 3, 5, 17))
def test_lut_conv_in_bands_of_rows(isa: str, levels: int) -> None:
    """Wide pixels (many channels) make the tables of a band of output rows fill the window
    (LUT_CONV_WINDOW): an image in several bands, whose shared rows are built twice."""
    gen = torch.Generator().manual_seed(50 + levels)
    for ks, stride, padding, h in (((3, 3), (1, 1), (1, 1), 11), ((3, 2), (2, 1), (2, 0), 13)):
        _check_lut_conv(isa, levels, gen, 390, 19, ks, stride, padding, b=2, h=h, w=12)


@needs_native
@pytest.mark.skipif("avx512" not in ISAS, reason="this CPU has no AVX-512")
@pytest.mark.parametrize("levels", LEVELS)
def test_lut_avx512_equals_the_portable_loop_bit_for_bit(levels: int) -> None:
    for i, (m, n, k) in enumerate(SHAPES):
        codes, scale, bias, x = _case(levels, m, n, k, seed=levels + i)
        fast = kernels.prepare(codes, scale, levels, isa="avx512")
        slow = kernels.prepare(codes, scale, levels, isa="portable")
        assert torch.equal(kernels.linear(x, fast, bias), kernels.linear(x, slow, bias))


@needs_native
@pytest.mark.skipif("avx512" not in ISAS, reason="this CPU has no AVX-512")
@pytest.mark.parametrize("levels", LEVELS)
def test_lut_conv_avx512_equals_the_portable_loop_bit_for_bit(levels: int) -> None:
    """The AVX-512 tiles (token pairs, lone border tokens that skip their padded taps, row
    blocks in 8s / 4s / 1s) against the portable loop (one token, one row block, every tap)."""
    gen = torch.Generator().manual_seed(100 + levels)
    geometries = (  # C_in, C_out, kernel, stride, padding, dilation, H, W, batch
        (16, 70, (3, 3), (1, 1), (1, 1), (1, 1), 7, 5, 2),
        (21, 131, (3, 2), (2, 1), (2, 1), (1, 1), 6, 9, 1),
        (17, 9, (5, 5), (1, 1), (2, 2), (2, 1), 5, 7, 3),
        (40, 33, (1, 1), (1, 1), (1, 1), (1, 1), 3, 4, 1),  # border tokens read only padding
        (1, 130, (3, 3), (1, 1), (1, 1), (1, 1), 6, 5, 2),  # K = 9: direct products
    )
    for cin, cout, ks, stride, padding, dilation, h, w, b in geometries:
        codes = torch.randint(0, levels, (cout, cin * ks[0] * ks[1]), generator=gen)
        codes, scale = codes.to(torch.uint8), torch.rand(cout, generator=gen) + 0.1
        bias = torch.randn(cout, generator=gen)
        x = torch.relu(torch.randn(b, cin, h, w, generator=gen))
        kw = dict(kernel_size=ks, stride=stride, padding=padding, dilation=dilation)
        got = {
            isa: kernels.conv2d(
                x, kernels.prepare(codes, scale, levels, isa=isa, conv=(cin, ks)), bias, **kw
            )
            for isa in ("avx512", "portable")
        }
        assert torch.equal(got["avx512"], got["portable"]), (levels, cin, ks)
        want = reference.conv2d(x, codes, scale, levels, bias, **kw)  # float32, another order
        assert torch.allclose(got["avx512"], want, rtol=1e-4, atol=1e-4), (levels, cin, ks)


@needs_native
@pytest.mark.parametrize("levels", LEVELS)
def test_lut_index_layout(levels: int) -> None:
    """Decode the index layout as the C header draws it: (blocks, P, W, 16) words, six 5-bit
    base-D group indices a word, digit p of a code = bit p (D = 2) or the code (one plane)."""
    n, k = 21, 40
    codes, _, _, _ = _case(levels, 1, n, k, seed=levels)
    base, group, planes = native.lut_shape(levels)
    groups = math.ceil(k / group)
    lut = native.lut_pack(codes, levels).view(-1, planes, math.ceil(groups / 6), 16)
    back = torch.zeros(lut.shape[0] * 16, k, dtype=torch.int64)
    for p in range(planes):
        w = lut[:, p].long() & 0xFFFFFFFF  # (blocks, W, 16)
        for i in range(groups):
            e = (w[:, i // 6, :] >> (5 * (i % 6))) & 31  # (blocks, 16)
            for q in range(group):
                if i * group + q < k:
                    digit = (e // base**q) % base
                    back[:, i * group + q] += digit.reshape(-1) * (2**p if base == 2 else 1)
    assert torch.equal(back[:n], codes.long()) and not back[n:].any()
    assert (lut.long() & 0xFFFFFFFF).lt(1 << 30).all()  # bits 30-31 stay zero


@needs_native
@pytest.mark.parametrize("levels", LEVELS)
def test_layout_round_trip(levels: int) -> None:
    codes, scale, _, _ = _case(levels, 1, 13, 1031, seed=levels)
    w = kernels.prepare(codes, scale, levels)
    assert w.data.dtype == torch.uint8 and w.data.shape == (2, 8 * w.kp * w.bits // 8)
    assert w.kp % (512 if w.bits == 5 else 512 // w.bits) == 0 and w.kp >= 1031
    assert torch.equal(w.codes, codes)
    assert w.bits == {2: 1, 3: 2, 4: 2, 5: 4, 8: 4, 9: 4, 16: 4, 17: 5}[levels]


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_activation_quantization_is_the_reference(isa: str) -> None:
    x = torch.randn(9, 300) * torch.logspace(-3, 3, 9).unsqueeze(1)
    x[3] = 0.0  # all-zero token: the 1e-5 clamp
    x[4, :7] = torch.tensor([0.5, -0.5, 1.5, 2.5, -2.5, 127.0, -127.0])  # ties round to even
    q, a, sq = native.quantize_i8(x, 512, isa)
    want_q, want_a = reference.quantize_activations(x)
    assert torch.equal(a, want_a.squeeze(1))
    assert torch.equal(q[:, :300].float(), want_q) and not q[:, 300:].any()
    assert torch.equal(sq, want_q.sum(1).int())


@needs_native
def test_zero_input_and_hand_computed_values() -> None:
    # ternary levels -1, 0, +1 (codes 0, 1, 2), scale 0.5; x = [1, 2, 4]
    codes = torch.tensor([[2, 1, 0], [0, 0, 0]], dtype=torch.uint8)
    w = kernels.prepare(codes, torch.tensor(0.5), 3)
    x = torch.tensor([[1.0, 2.0, 4.0], [0.0, 0.0, 0.0]])
    y = kernels.linear(x, w, torch.tensor([0.25, 0.0]), "fp32")
    torch.testing.assert_close(y, torch.tensor([[0.5 * (1 - 4) + 0.25, -3.5], [0.25, 0.0]]))
    # int8: a = 127/4, q = [32, 64, 127] (31.75 -> 32, 63.5 -> 64), acc = 2*(32*2 + 64) - 2*223
    yi = kernels.linear(x, w, None, "int8")
    assert yi[0, 0].item() == pytest.approx((2 * (64 + 64) - 2 * 223) * 0.5 / (2 * 127 / 4))
    assert yi[1].abs().sum().item() == 0.0


# (C_in, C_out, H, W, kernel, stride, padding, dilation): C_in a multiple of 64 takes the
# direct (in-place patches) path, others the gathered-rows path; odd sizes everywhere
CONVS = (
    (64, 9, 7, 6, 3, (1, 1), (1, 1), (1, 1)),
    (128, 20, 5, 9, 3, (2, 1), (1, 0), (1, 1)),
    (64, 8, 9, 9, (3, 1), (1, 2), (0, 1), (2, 1)),
    (3, 17, 11, 9, 3, (2, 1), (1, 1), (1, 1)),
    (5, 7, 6, 8, (2, 3), (1, 1), (0, 2), (1, 2)),
    (70, 4, 4, 4, 1, (1, 1), (0, 0), (1, 1)),
)


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("levels", (2, 3, 5, 16, 17))
def test_conv2d_matches_reference(isa: str, levels: int) -> None:
    for i, (cin, cout, h, wd, k, stride, padding, dilation) in enumerate(CONVS):
        g = torch.Generator().manual_seed(10 * levels + i)
        ks = (k, k) if isinstance(k, int) else k
        codes = torch.randint(
            0, levels, (cout, cin * ks[0] * ks[1]), generator=g, dtype=torch.uint8
        )
        scale = torch.rand(cout if i % 2 else (), generator=g) + 0.1
        bias = torch.randn(cout, generator=g) if i % 3 else None
        x = torch.randn(2, cin, h, wd, generator=g) * 2
        w = kernels.prepare(codes, scale, levels, isa=isa, conv=(cin, ks))
        assert torch.equal(w.codes, codes)  # the tap-major compute layout unpacks to storage order
        kw = dict(kernel_size=ks, stride=stride, padding=padding, dilation=dilation)
        want8 = reference.conv2d(x, codes, scale, levels, bias, activations="int8", **kw)
        want32 = reference.conv2d(x, codes, scale, levels, bias, activations="fp32", **kw)
        # float32 sums of K terms in another order: error ~ K * eps * sum |x w|
        w_abs = reference.dequantize(codes, scale, levels).abs().reshape(cout, cin, *ks)
        bound = (
            1e-6
            * codes.shape[1]
            * torch.nn.functional.conv2d(x.abs(), w_abs, None, stride, padding, dilation)
            + 1e-6
        )
        for xin in (x, x.contiguous(memory_format=torch.channels_last)):
            for threads in (1, 2):
                got = kernels.conv2d(xin, w, bias, activations="int8", threads=threads, **kw)
                assert got.shape == want8.shape and torch.equal(got, want8), (isa, levels, i)
            got = kernels.conv2d(xin, w, bias, activations="fp32", **kw)
            assert (got - want32).abs().le(bound).all(), (isa, levels, i)


def test_int8_conv_quantizes_per_image() -> None:
    """The int8 convolution is the fake-quant QuantConv2d with absmax8 inputs (per image)."""
    from lowbit.nn import QuantConv2d

    layer = QuantConv2d(4, 6, 3, padding=1, weight_quantizer="ternary", input_quantizer="absmax8")
    x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    x[1] *= 100  # a per-token (or per-batch) scale would change the other images' integers
    codes, scale = layer.weight_quantizer.codes(layer.weight.detach())
    got = reference.conv2d(
        x,
        codes.reshape(6, -1),
        scale,
        3,
        layer.bias.detach(),
        kernel_size=(3, 3),
        padding=(1, 1),
        activations="int8",
    )
    with torch.no_grad():
        torch.testing.assert_close(got, layer(x), rtol=1e-5, atol=1e-5)


@needs_native
def test_conv_weight_must_be_prepared_for_the_conv() -> None:
    codes = torch.zeros(4, 27, dtype=torch.uint8)
    w = kernels.prepare(codes, torch.tensor(1.0), 3)  # a linear weight
    with pytest.raises(ValueError, match="prepare"):
        kernels.conv2d(torch.zeros(1, 3, 4, 4), w, kernel_size=(3, 3))
    with pytest.raises(ValueError, match="conv geometry"):
        kernels.prepare(codes, torch.tensor(1.0), 3, conv=(4, (3, 3)))


def _linear_in_child(x, w, want, queue) -> None:
    queue.put(bool(torch.equal(kernels.linear(x, w, None, "int8", threads=2), want)))


@needs_native
def test_a_forked_child_runs_the_kernels() -> None:
    # GNU OpenMP hangs a child forked after the parent used a team; the kernels then run on
    # the child's calling thread instead
    import multiprocessing

    codes, scale, _, x = _case(3, 8, 256, 1000, seed=5)
    w = kernels.prepare(codes, scale, 3)
    want = kernels.linear(x, w, None, "int8", threads=2)  # the parent's team has run
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_linear_in_child, args=(x, w, want, queue))
    child.start()
    child.join(60)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0 and queue.get(timeout=5)


@pytest.mark.parametrize("levels", [3, 33])  # the compiled kernels and the reference
def test_torch_library_op(levels: int) -> None:
    codes, scale, bias, x = _case(levels, 4, 24, 100, seed=1)
    args = (x, codes, scale, bias, levels, "int8")
    torch.library.opcheck(torch.ops.lowbit.packed_linear.default, args)
    want = reference.linear(x, codes, scale, levels, bias, "int8")
    assert torch.equal(torch.ops.lowbit.packed_linear(*args), want)
    # torch.compile sees one op (fullgraph: no graph break on the ctypes call)
    fn = torch.compile(
        lambda t: torch.ops.lowbit.packed_linear(t, codes, scale, bias, levels, "int8"),
        backend="eager",
        fullgraph=True,
    )
    assert torch.equal(fn(x), want)


def test_torch_library_op_follows_in_place_edits_of_its_codes() -> None:
    codes, scale, bias, x = _case(3, 4, 24, 100, seed=2)
    before = torch.ops.lowbit.packed_linear(x, codes, scale, bias, 3, "fp32")
    codes.fill_(1)  # the cached compute layout must not survive this
    scale.mul_(2)
    after = torch.ops.lowbit.packed_linear(x, codes, scale, bias, 3, "fp32")
    assert not torch.equal(before, after)
    assert torch.equal(after, bias.expand_as(after))  # level 0 everywhere: W = 0


@pytest.mark.parametrize("levels", [3, 33])
def test_torch_library_conv_op(levels: int) -> None:
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(0, levels, (8, 64 * 9), generator=g, dtype=torch.uint8)
    scale, bias = torch.tensor(0.3), torch.randn(8, generator=g)
    x = torch.randn(2, 64, 5, 6, generator=g)
    geometry = [3, 3, 1, 1, 1, 1, 1, 1]
    args = (x, codes, scale, bias, levels, geometry, "int8")
    torch.library.opcheck(torch.ops.lowbit.packed_conv2d.default, args)
    kw = dict(kernel_size=(3, 3), padding=(1, 1))
    want = reference.conv2d(x, codes, scale, levels, bias, activations="int8", **kw)
    fn = torch.compile(
        lambda t: torch.ops.lowbit.packed_conv2d(t, codes, scale, bias, levels, geometry, "int8"),
        backend="eager",
        fullgraph=True,
    )
    assert torch.equal(fn(x), want)


def test_more_than_17_levels_uses_the_reference() -> None:
    codes, scale, bias, x = _case(33, 2, 5, 40, seed=3)
    w = kernels.prepare(codes, scale, 33)
    assert w.backend == "reference"
    assert torch.equal(
        kernels.linear(x, w, bias, "int8"), reference.linear(x, codes, scale, 33, bias, "int8")
    )


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="2-D uint8"):
        kernels.prepare(torch.zeros(3, dtype=torch.uint8), torch.tensor(1.0), 3)
    with pytest.raises(ValueError, match="scale must have"):
        kernels.prepare(torch.zeros(3, 4, dtype=torch.uint8), torch.ones(2), 3)
    w = kernels.prepare(torch.zeros(3, 4, dtype=torch.uint8), torch.tensor(1.0), 3)
    with pytest.raises(ValueError, match="features"):
        kernels.linear(torch.zeros(2, 5), w)
    with pytest.raises(ValueError, match="activations"):
        kernels.linear(torch.zeros(2, 4), w, activations="int4")
    if HAVE_NATIVE:
        with pytest.raises(ValueError, match="codes must be < levels"):
            kernels.prepare(torch.full((3, 4), 3, dtype=torch.uint8), torch.tensor(1.0), 3)


def test_backend_choice_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOWBIT_KERNELS", "reference")
    assert kernels.backend() == "reference"
    assert (
        kernels.prepare(torch.zeros(2, 3, dtype=torch.uint8), torch.tensor(1.0), 3).backend
        == "reference"
    )
    monkeypatch.setenv("LOWBIT_KERNELS", "gpu")
    with pytest.raises(ConfigError, match="LOWBIT_KERNELS"):
        kernels.backend()


def test_missing_library_falls_back_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOWBIT_KERNELS_LIB", "/nonexistent/_native.so")
    monkeypatch.setattr(kernels, "_warned", False)
    native.reset()
    try:
        codes, scale, bias, x = _case(3, 3, 8, 50, seed=5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            w1 = kernels.prepare(codes, scale, 3)
            w2 = kernels.prepare(codes, scale, 5 - 2)
            y = kernels.linear(x, w1, bias, "int8")
        msgs = [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)]
        assert len(msgs) == 1 and "reference kernels" in msgs[0], msgs
        assert w1.backend == w2.backend == "reference" and kernels.backend() == "reference"
        assert torch.equal(y, reference.linear(x, codes, scale, 3, bias, "int8"))
    finally:
        monkeypatch.delenv("LOWBIT_KERNELS_LIB")
        native.reset()


@needs_native
def test_concurrent_callers_and_empty_inputs() -> None:
    codes, scale, bias, x = _case(3, 7, 300, 500, seed=11)
    w = kernels.prepare(codes, scale, 3)
    want = reference.linear(x, codes, scale, 3, bias, "int8")
    bad: list[int] = []

    def work() -> None:  # the thread pool runs one job at a time; others run serially
        bad.extend(
            i for i in range(30) if not torch.equal(kernels.linear(x, w, bias, "int8"), want)
        )

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad
    assert kernels.linear(torch.zeros(0, 500), w, bias, "int8").shape == (0, 300)
    assert kernels.linear(torch.zeros(2, 0, 500), w, None, "fp32").shape == (2, 0, 300)
