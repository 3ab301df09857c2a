"""Codecs (layouts pinned by hand, round trips for every level count, efficiency bounds) and the
strict safetensors container."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import pack
from lowbit.errors import FormatError

LEVELS = (2, 3, 4, 5, 8, 9, 16, 17)


@pytest.mark.parametrize(
    ("levels", "k", "b"), [(3, 5, 8), (5, 3, 7), (9, 5, 16), (17, 8, 33), (2, 1, 1), (4, 1, 2)]
)
def test_dense_block_sizes(levels: int, k: int, b: int) -> None:
    c = pack.codec(levels)
    assert (c.k, c.b) == (k, b)


def test_efficiency_bounds_for_every_level_count() -> None:
    eff = pack.efficiency("dense")
    assert set(eff) == set(range(2, 257))
    for n, e in eff.items():
        c = pack.codec(n)
        assert n**c.k <= 2**c.b and c.b <= pack.MAX_BLOCK_BITS
        assert 1.0 - 1e-12 <= e <= 1.02, n
        if n & (n - 1) == 0:
            assert e == 1.0 and c.k == 1, n
    for n in (3, 5, 9, 17):
        assert eff[n] <= 1.01


def test_byte_layout_is_the_papers_table_3() -> None:
    # Low-Resolution paper, Table 3: weights stored per byte (and 32 / bits = reduction).
    table = {2: 8, 3: 5, 4: 4, 5: 3, 8: 2, 9: 2, 16: 2, 17: 1}
    for n, per_byte in table.items():
        c = pack.codec(n, "byte")
        assert (c.k, c.b) == (per_byte, 8)
        assert c.k == math.floor(8 / math.log2(n))
    for n in range(2, 257):
        c = pack.codec(n, "byte")
        assert n**c.k <= 256 < n ** (c.k + 1)


@pytest.mark.parametrize(
    ("levels", "codes", "payload"),
    [
        (3, [1, 2, 0, 1, 2], [1 + 2 * 3 + 0 * 9 + 1 * 27 + 2 * 81]),
        (3, [2, 2], [2 + 2 * 3]),  # partial block: the missing codes are zeros
        # N=5: v0 = 1 + 2*5 + 3*25 = 86 in bits 0..6, v1 = 4 in bits 7..13
        (5, [1, 2, 3, 4], [86 | (4 & 1) << 7, 4 >> 1]),
        (2, [1, 0, 1, 1, 0, 0, 0, 1, 1], [0b10001101, 0b1]),  # LSB first
        (4, [1, 2, 3, 0, 3], [1 | 2 << 2 | 3 << 4, 3]),
        (16, [0xA, 0x5, 0xF], [0x5A, 0x0F]),
        (256, [7, 255], [7, 255]),
    ],
)
def test_layouts_pinned_by_hand(levels: int, codes: list[int], payload: list[int]) -> None:
    c = pack.codec(levels)
    got = c.pack(np.array(codes, dtype=np.uint8))
    assert got.tolist() == payload
    assert c.unpack(got, len(codes)).tolist() == codes


def test_n17_block_spans_bytes() -> None:
    c = pack.codec(17)  # 8 codes in 33 bits
    codes = np.arange(17, dtype=np.uint8)[:16]  # two blocks
    v0 = sum(int(x) * 17**j for j, x in enumerate(codes[:8]))
    v1 = sum(int(x) * 17**j for j, x in enumerate(codes[8:]))
    stream = v0 | v1 << 33
    want = [(stream >> (8 * i)) & 0xFF for i in range(c.nbytes(16))]
    assert c.pack(codes).tolist() == want


@settings(max_examples=150, deadline=None)
@given(
    levels=st.integers(2, 256),
    layout=st.sampled_from(pack.LAYOUTS),
    data=st.data(),
)
def test_round_trip_property(levels: int, layout: str, data: st.DataObject) -> None:
    n = data.draw(st.integers(0, 200))
    codes = np.array(data.draw(st.lists(st.integers(0, levels - 1), min_size=n, max_size=n)))
    codes = codes.astype(np.uint8)
    c = pack.codec(levels, layout)
    payload = c.pack(codes)
    assert payload.dtype == np.uint8 and payload.size == c.nbytes(n)
    assert payload.size == -(-(-(-n // c.k) * c.b) // 8)
    back = c.unpack(payload, n)
    assert back.dtype == np.uint8 and np.array_equal(back, codes)
    assert np.array_equal(c.pack(back), payload)  # canonical


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 4099])
def test_round_trip_lengths(levels: int, n: int) -> None:
    rng = np.random.default_rng(levels * 1000 + n)
    codes = torch.from_numpy(rng.integers(0, levels, n).astype(np.uint8))
    for layout in pack.LAYOUTS:
        c = pack.codec(levels, layout)
        assert np.array_equal(c.unpack(c.pack(codes), n), codes.numpy())


def test_pack_rejects_codes_outside_the_level_set() -> None:
    with pytest.raises(ValueError, match="0..2"):
        pack.codec(3).pack(np.array([0, 3], dtype=np.uint8))
    with pytest.raises(ValueError, match="levels"):
        pack.codec(1)
    with pytest.raises(ValueError, match="layout"):
        pack.codec(3, "sparse")


def test_unpack_rejects_corrupt_payloads() -> None:
    c3 = pack.codec(3)
    with pytest.raises(FormatError, match="bytes"):
        c3.unpack(np.zeros(3, dtype=np.uint8), 5)  # 5 codes need 1 byte
    with pytest.raises(FormatError, match="block value"):
        c3.unpack(np.array([243], dtype=np.uint8), 5)  # 243 = 3^5 is not a base-3 block
    with pytest.raises(FormatError, match="padding"):
        c3.unpack(np.array([81], dtype=np.uint8), 4)  # fifth (padding) code is 1
    with pytest.raises(FormatError, match="padding"):
        pack.codec(2).unpack(np.array([0b1000], dtype=np.uint8), 3)
    with pytest.raises(FormatError, match="padding"):
        pack.codec(5).unpack(np.array([0, 0x80], dtype=np.uint8), 4)  # bit 15: after 2 blocks


# --- container -----------------------------------------------------------------------------------


def _entries() -> list[pack.Entry]:
    f = np.arange(6, dtype=np.float32).reshape(2, 3)
    u = np.array([1, 2, 3], dtype=np.uint8)
    return [pack.Entry("a", "F32", (2, 3), f), pack.Entry("b", "U8", (3,), u)]


def test_container_round_trip_and_exact_size(tmp_path) -> None:
    path = tmp_path / "x.lowbit"
    entries = _entries()
    size = pack.write_container(path, entries, {"k": "v"})
    layout = [(e.name, e.dtype, e.shape, e.nbytes) for e in entries]
    assert size == path.stat().st_size == pack.container_size(layout, {"k": "v"})
    meta, got = pack.read_container(path)
    assert meta == {"k": "v"}
    assert torch.equal(got["a"].tensor(), torch.arange(6.0).reshape(2, 3))
    assert got["b"].tensor().tolist() == [1, 2, 3]
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert (8 + n) % 8 == 0


def test_container_is_a_safetensors_file(tmp_path) -> None:
    from safetensors import safe_open

    path = tmp_path / "x.lowbit"
    pack.write_container(path, _entries(), {"k": "v"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"k": "v"}
        assert torch.equal(f.get_tensor("a"), torch.arange(6.0).reshape(2, 3))


def _write_raw(path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize(
    ("header", "data", "match"),
    [
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "outside"),
        ({"a": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 8]}}, b"\0" * 8, "needs"),
        ({"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "dtype"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, b"\0" * 8, "shape"),
        ({"a": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}}, b"\0" * 8, "gap"),
        ({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 8, "after the last"),
        ({"__metadata__": {"k": 1}}, b"", "strings"),
        ([1, 2], b"", "object"),
    ],
)
def test_container_rejects_inconsistent_headers(tmp_path, header, data, match) -> None:
    path = tmp_path / "bad.lowbit"
    _write_raw(path, header, data)
    with pytest.raises(FormatError, match=match):
        pack.read_container(path)


def test_container_rejects_truncation_and_huge_header(tmp_path) -> None:
    path = tmp_path / "x.lowbit"
    pack.write_container(path, _entries(), {})
    raw = path.read_bytes()
    for cut in (0, 5, 8, 20, len(raw) - 1):
        path.write_bytes(raw[:cut])
        with pytest.raises(FormatError):
            pack.read_container(path)
    path.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    with pytest.raises(FormatError, match="header"):
        pack.read_container(path)
