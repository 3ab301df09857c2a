r"""Codecs that store N-level codes near the entropy bound, and the .lowbit container.

Codes are integers ``c in 0..N-1`` (uint8, ``N = levels``, 2..256, see ``lowbit.quantizers``). A
codec turns a flat sequence of ``n`` codes into a byte payload and back, losslessly.

Mixed-radix blocks
------------------
Every codec groups ``k`` consecutive codes into one block, the base-N number::

    v = c[0] + c[1] N + c[2] N^2 + ... + c[k-1] N^(k-1)        0 <= v < N^k <= 2^b

and stores each block in ``b`` bits. Blocks are concatenated into one little-endian bit stream:
block ``i`` occupies stream bits ``i b .. i b + b - 1`` (its least significant bit first), and
stream bit ``t`` is bit ``t mod 8`` (LSB = 0) of payload byte ``t div 8``. N = 5 (k = 3, b = 7)::

    codes   c0 c1 c2 | c3 c4 c5 | c6 ...
    blocks  v0 = c0 + 5 c1 + 25 c2,   v1 = c3 + 5 c4 + 25 c5, ...            (each < 125 <= 2^7)

    byte 0  [v1.0 | v0.6 v0.5 v0.4 v0.3 v0.2 v0.1 v0.0]      (bit 7 ... bit 0)
    byte 1  [v2.1 v2.0 | v1.6 v1.5 v1.4 v1.3 v1.2 v1.1]
    byte 2  [v3.2 v3.1 v3.0 | v2.6 ... v2.2]  ...

For a power of two (N = 2^m) the block is a single code in m bits (k = 1, b = m), which is plain
little-endian bit packing; e.g. N = 4, two bits per code, four codes per byte::

    byte j  [c(4j+3) | c(4j+2) | c(4j+1) | c(4j)]           (2 bits each, bit 7 ... bit 0)

and N = 2 is one bit per code, ``c(8j)`` in bit 0 of byte j. N = 3 has k = 5, b = 8: one block
per byte, ``byte = c0 + 3 c1 + 9 c2 + 27 c3 + 81 c4 <= 242``.

The last block is filled with zero codes, the last byte with zero bits; both must be zero on
reading (the encoding is canonical: ``pack(unpack(p)) == p``). The payload of ``n`` codes has
``ceil(ceil(n / k) * b / 8)`` bytes.

Two layouts choose (k, b):

* ``"dense"`` (the default): the smallest block size ``b`` (1..64 bits, so a block fits a uint64)
  whose ``b / k`` is within 1% of log2 N, with ``k`` the largest count with ``N^k <= 2^b``; where
  no block up to 64 bits gets within 1%, the block with the least ``b / k``. Small blocks decode
  with narrow integers and table lookups. Result: exactly log2 N for powers of two; N = 3: 5 codes
  in 8 bits (1.600 bits/code, 1.0095 x log2 3), N = 5: 3 in 7 (2.333, 1.005 x), N = 9: 5 in 16
  (3.200, 1.0095 x), N = 17: 8 in 33 (4.125, 1.009 x); the worst N in 2..256 is N = 60 at
  1.016 x log2 N (``efficiency`` gives every N; tests check all of them against 1.02).
* ``"byte"``: the byte-aligned layout of the Low-Resolution paper's Table 3, ``b = 8`` and
  ``k = floor(8 / log2 N)`` codes per byte (the largest k with N^k <= 256): 8 per byte for N = 2,
  5 for N = 3, 3 for N = 5, 2 for N = 8, 9 and 16, 1 for N = 17..256.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
import torch

from lowbit.errors import FormatError
from lowbit.files import atomic_open
from lowbit.quantizers import MAX_LEVELS, check_levels

LAYOUTS = ("dense", "byte")
MAX_BLOCK_BITS = 64
"""The bound on a block: one block is one uint64."""
DENSE_TOLERANCE = 0.01
"""A dense block is accepted once its bits per code are within this fraction of log2 N."""
_LUT_MAX_BITS = 16  # blocks of up to 16 bits decode through a (2^b, k) table


def _max_codes(levels: int, bits: int) -> int:
    """The largest k with levels^k <= 2^bits, in exact integer arithmetic."""
    k, power = 0, levels
    while power <= 1 << bits:
        k, power = k + 1, power * levels
    return k


@dataclass(frozen=True)
class Codec:
    """k codes of ``levels`` values per b-bit block (see the module docstring for the layout)."""

    levels: int
    layout: str
    k: int
    b: int

    @property
    def bits_per_code(self) -> float:
        """Stored bits per code, b / k (the payload rounds up to whole bytes once)."""
        return self.b / self.k

    @property
    def efficiency(self) -> float:
        """(b / k) / log2 N: 1.0 is the entropy bound of uniformly used levels."""
        return self.bits_per_code / math.log2(self.levels)

    def nbytes(self, n: int) -> int:
        """Payload bytes for ``n`` codes: ceil(ceil(n / k) * b / 8)."""
        return (-(-n // self.k) * self.b + 7) // 8

    def to_json(self) -> dict:
        return {"layout": self.layout, "k": self.k, "b": self.b}

    def pack(self, codes: np.ndarray | torch.Tensor) -> np.ndarray:
        """codes (any shape, integers in 0..N-1) -> payload, uint8 (nbytes(codes.size),)."""
        c = _as_numpy(codes).reshape(-1)
        n = c.size
        if n and int(c.max()) >= self.levels:
            raise ValueError(f"codes must lie in 0..{self.levels - 1}, found {int(c.max())}")
        if self.k == 1:  # powers of two and N > 128: the code is the block (b <= 8)
            return _blocks_to_bytes(c.astype(np.uint8), self.b)
        blocks = -(-n // self.k)
        digits = np.zeros(blocks * self.k, dtype=np.uint64)
        digits[:n] = c
        digits = digits.reshape(blocks, self.k)
        v = digits[:, self.k - 1].copy()
        for j in range(self.k - 2, -1, -1):  # Horner: v = ((c[k-1] N + c[k-2]) N + ...) + c[0]
            v *= np.uint64(self.levels)
            v += digits[:, j]
        return _blocks_to_bytes(v, self.b)[: self.nbytes(n)]

    def unpack(self, payload: np.ndarray | torch.Tensor | bytes, n: int) -> np.ndarray:
        """payload (uint8, exactly nbytes(n) bytes) -> codes, uint8 (n,).

        Raises ``FormatError`` when the payload has the wrong length, a block's value is not
        below N^k, or the padding after the last code is not zero."""
        p = np.frombuffer(payload, dtype=np.uint8) if isinstance(payload, bytes) else payload
        p = _as_numpy(p).reshape(-1)
        if p.dtype != np.uint8 or p.size != self.nbytes(n):
            raise FormatError(
                f"payload of {p.size} bytes does not hold {n} codes of {self.levels} levels "
                f"({self.nbytes(n)} bytes expected)"
            )
        blocks = -(-n // self.k)
        v = _bytes_to_blocks(p, blocks, self.b)
        if blocks and self.levels**self.k < 1 << 64 and int(v.max()) >= self.levels**self.k:
            raise FormatError(f"a block value is not below {self.levels}^{self.k}: corrupt codes")
        if self.k == 1:
            digits = v.astype(np.uint8)
        elif self.b <= _LUT_MAX_BITS:
            digits = _digit_table(self.levels, self.k, self.b)[v.astype(np.intp)]
        else:
            digits = np.empty((blocks, self.k), dtype=np.uint8)
            for j in range(self.k):
                digits[:, j] = v % np.uint64(self.levels)
                v = v // np.uint64(self.levels)
        digits = digits.reshape(-1)
        if digits[n:].any() or (p.size and _trailing_bits(p, blocks * self.b)):
            raise FormatError("non-zero padding after the last code: corrupt codes")
        return digits[:n].copy()


@cache
def codec(levels: int, layout: str = "dense") -> Codec:
    """The codec of ``layout`` ("dense" or "byte") for ``levels`` in 2..256."""
    check_levels(levels)
    if layout == "byte":
        return Codec(levels, layout, _max_codes(levels, 8), 8)
    if layout != "dense":
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    bound = math.log2(levels) * (1 + DENSE_TOLERANCE)
    best: tuple[int, int] | None = None
    for b in range(1, MAX_BLOCK_BITS + 1):
        k = _max_codes(levels, b)
        if k == 0:
            continue
        if b / k <= bound:
            return Codec(levels, layout, k, b)
        if best is None or b * best[0] < best[1] * k:  # b/k < best_b/best_k, exactly
            best = (k, b)
    assert best is not None
    return Codec(levels, layout, *best)


def efficiency(layout: str = "dense") -> dict[int, float]:
    """(stored bits per code) / log2 N for every N in 2..256."""
    return {n: codec(n, layout).efficiency for n in range(2, MAX_LEVELS + 1)}


# --- bit stream ----------------------------------------------------------------------------------


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().contiguous().numpy()
    return np.asarray(x)


@lru_cache(maxsize=64)
def _digit_table(levels: int, k: int, b: int) -> np.ndarray:
    """(2^b, k) uint8: the base-N digits of every block value (values >= N^k give junk)."""
    v = np.arange(1 << b, dtype=np.int64)
    table = np.empty((1 << b, k), dtype=np.uint8)
    for j in range(k):
        table[:, j] = v % levels
        v //= levels
    table.flags.writeable = False
    return table


def _blocks_to_bytes(v: np.ndarray, b: int) -> np.ndarray:
    """uint64 blocks (m,) of b bits each -> the little-endian bit stream, uint8 (ceil(m b/8),)."""
    m = v.size
    if b == 8:
        return v.astype(np.uint8)
    if b % 8 == 0:  # whole bytes: the low b/8 bytes of each little-endian uint64
        return v.astype("<u8").view(np.uint8).reshape(m, 8)[:, : b // 8].reshape(-1).copy()
    if 8 % b == 0:  # 1, 2 or 4 bits: 8 / b whole blocks per byte
        per = 8 // b
        g = np.zeros(-(-m // per) * per, dtype=np.uint8)
        g[:m] = v
        g = g.reshape(-1, per)
        out = g[:, 0].copy()
        for i in range(1, per):
            out |= g[:, i] << np.uint8(i * b)
        return out
    # 8 blocks = b bytes exactly; each output byte takes bits from the blocks it overlaps.
    groups = -(-m // 8)
    g = np.zeros(groups * 8, dtype=np.uint64)
    g[:m] = v
    g = g.reshape(groups, 8)
    out = np.zeros((groups, b), dtype=np.uint64)
    for byte in range(b):
        lo = 8 * byte
        for i in range(lo // b, min(8, -(-(lo + 8) // b))):
            shift = i * b - lo  # where block i's bit 0 lands relative to this byte's bit 0
            part = g[:, i] << np.uint64(shift) if shift >= 0 else g[:, i] >> np.uint64(-shift)
            out[:, byte] |= part
    return (out & np.uint64(0xFF)).astype(np.uint8).reshape(-1)[: (m * b + 7) // 8]


def _bytes_to_blocks(p: np.ndarray, m: int, b: int) -> np.ndarray:
    """The inverse of ``_blocks_to_bytes``: uint8 stream -> blocks (m,), uint64 (uint8 for b <= 8
    with whole blocks per byte)."""
    if b == 8:
        return p[:m]
    if b % 8 == 0:
        w = b // 8
        padded = np.zeros((m, 8), dtype=np.uint8)
        padded[:, :w] = p[: m * w].reshape(m, w)
        return padded.view("<u8").reshape(m).astype(np.uint64)
    if 8 % b == 0:
        per, mask = 8 // b, np.uint8((1 << b) - 1)
        g = np.empty((p.size, per), dtype=np.uint8)
        for i in range(per):
            g[:, i] = (p >> np.uint8(i * b)) & mask
        return g.reshape(-1)[:m]  # uint8: these blocks are single codes (k = 1)
    groups = -(-m // 8)
    buf = np.zeros(groups * b, dtype=np.uint64)
    buf[: p.size] = p
    buf = buf.reshape(groups, b)
    g = np.zeros((groups, 8), dtype=np.uint64)
    mask = np.uint64((1 << b) - 1)
    for i in range(8):
        lo = i * b
        for byte in range(lo // 8, -(-(lo + b) // 8)):
            shift = 8 * byte - lo  # where this byte's bit 0 lands relative to block i's bit 0
            part = (
                buf[:, byte] << np.uint64(shift)
                if shift >= 0
                else buf[:, byte] >> np.uint64(-shift)
            )
            g[:, i] |= part
        g[:, i] &= mask
    return g.reshape(-1)[:m]


def _trailing_bits(p: np.ndarray, used_bits: int) -> bool:
    """Whether any bit after the first ``used_bits`` bits of the stream is set."""
    if used_bits % 8 == 0:
        return False
    return bool(int(p[-1]) >> (used_bits % 8))


# --- the container: safetensors layout, written and read strictly ---------------------------------
#
# A .lowbit file is a valid safetensors file (any safetensors reader opens it)::
#
#     [u64 little-endian: n] [n bytes: JSON header, space-padded so 8 + n is a multiple of 8] [data]
#
#     header = {"__metadata__": {str: str}, "<tensor>": {"dtype": "F32", "shape": [...],
#               "data_offsets": [begin, end]}, ...}          offsets relative to the data start
#
# lowbit writes and reads it itself rather than through the safetensors package so that the file
# size is known exactly before writing (``container_size``, which ``lowbit summary`` predicts) and
# every declared size is checked against the file's size before anything is allocated. Every
# container lowbit writes goes through here: .lowbit files, training checkpoints
# (``write_tensors``), the study's per-epoch codes.

DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
_DTYPE_NAMES = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}
MAX_HEADER_BYTES = 64 << 20
"""Largest JSON header accepted on reading (a model description is a few kB)."""
MAX_TENSORS = 1 << 16
"""Most tensors a container may hold on reading (a seed model has a few dozen; a training
checkpoint three per parameter)."""


@dataclass(frozen=True)
class Entry:
    """One tensor of a container: name, dtype name ("F32", "U8", ...), shape, data bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview | np.ndarray

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]

    def tensor(self) -> torch.Tensor:
        """A new tensor (copied out of the file buffer) of this entry's dtype and shape."""
        dtype = DTYPES[self.dtype][0]
        raw = np.frombuffer(self.data, dtype=np.uint8).copy()
        return torch.from_numpy(raw).view(dtype).reshape(self.shape)


def tensor_entry(name: str, t: torch.Tensor) -> Entry:
    """The entry of tensor ``t`` (copied to CPU, contiguous, its bytes as stored)."""
    c = t.detach().to("cpu").contiguous()
    data = c.reshape(-1).view(torch.uint8).numpy() if c.numel() else b""
    return Entry(name, dtype_name(c.dtype), tuple(c.shape), data)


def storage_order(name: str, dtype: str) -> tuple[int, str]:
    """The order tensors are stored in: wider dtypes first (every tensor then starts at a
    multiple of its element size, as safetensors readers expect), then by name."""
    return (-DTYPES[dtype][1], name)


def write_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict) -> int:
    """Write named tensors and string metadata as a container (atomically); returns its size."""
    entries = [tensor_entry(k, v) for k, v in tensors.items()]
    entries.sort(key=lambda e: storage_order(e.name, e.dtype))
    return write_container(path, entries, metadata)


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, {name: tensor}) of a container written by ``write_tensors`` (strict reader)."""
    metadata, entries = read_container(path)
    return metadata, {name: e.tensor() for name, e in entries.items()}


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"tensors of dtype {dtype} cannot be stored in a .lowbit file")
    return _DTYPE_NAMES[dtype]


def _header(layout: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]) -> bytes:
    """The padded JSON header for tensors (name, dtype, shape, nbytes) stored in this order."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, nbytes in layout:
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    return text + b" " * (-(8 + len(text)) % 8)


def container_size(
    layout: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]
) -> int:
    """Exact size in bytes of the file ``write_container`` writes for this layout and metadata."""
    return 8 + len(_header(layout, metadata)) + sum(item[3] for item in layout)


def write_container(path: str | os.PathLike, entries: list[Entry], metadata: dict[str, str]) -> int:
    """Write ``entries`` (in this order) atomically to ``path``; returns the file size."""
    for e in entries:
        if len(memoryview(e.data).cast("B")) != e.nbytes:
            raise ValueError(f"tensor {e.name}: {e.nbytes} bytes declared, data differs")
    header = _header([(e.name, e.dtype, e.shape, e.nbytes) for e in entries], metadata)
    with atomic_open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for e in entries:
            f.write(memoryview(e.data).cast("B"))
    return Path(path).stat().st_size


def read_container(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, Entry]]:
    """Read and validate a safetensors container: (metadata, {name: Entry}).

    Raises ``FormatError`` (naming the file and, where it applies, the tensor) unless: the header
    length fits the file, the header is a JSON object of at most ``MAX_TENSORS`` well-formed
    entries, every dtype is known, every ``shape`` product times the dtype size equals its
    ``data_offsets`` span, and the spans tile the data section exactly (no gaps, overlaps or
    trailing bytes). Only the header is read; the entries' data are views of the file mapped
    read-only into memory, so a large or forged file costs no memory until a tensor is used."""
    path = Path(path)

    def bad(msg: str) -> FormatError:
        return FormatError(f"{path}: {msg}")

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise bad(f"truncated: {size} bytes, not even a header length")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise bad(
                    f"header of {n} bytes declared but the file has {size - 8} after its length"
                )
            text = f.read(n)
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + n else b""
    except OSError as exc:
        raise FormatError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad(
            f"header is not valid JSON ({type(exc).__name__}): corrupt or not a .lowbit file"
        ) from exc
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if len(header) > MAX_TENSORS:
        raise bad(f"{len(header)} tensors: more than the {MAX_TENSORS} a file may hold")
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise bad("__metadata__ must map strings to strings")
    data = memoryview(mapped)[8 + n :]
    spans: list[tuple[int, int, str]] = []
    entries: dict[str, Entry] = {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name!r}: entry must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise bad(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or len(shape) > 32 or not all(_is_count(s) for s in shape):
            raise bad(f"tensor {name!r}: shape must be a list of up to 32 non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_count(o) for o in offsets)
            or not offsets[0] <= offsets[1] <= len(data)
        ):
            raise bad(
                f"tensor {name!r}: data_offsets {offsets!r} outside the {len(data)}-byte data"
            )
        nbytes = math.prod(shape) * DTYPES[dtype][1]
        if nbytes != offsets[1] - offsets[0]:
            raise bad(
                f"tensor {name!r}: shape {shape} of {dtype} needs {nbytes} bytes but its data "
                f"holds {offsets[1] - offsets[0]}"
            )
        spans.append((offsets[0], offsets[1], name))
        entries[name] = Entry(name, dtype, tuple(shape), data[offsets[0] : offsets[1]])
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise bad(
                f"tensor {name!r}: data does not follow the previous tensor's (gap or overlap)"
            )
        end = stop
    if end != len(data):
        raise bad(f"{len(data) - end} bytes after the last tensor: corrupt or appended data")
    return metadata, entries


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 62


def sha256(data: bytes | memoryview | np.ndarray) -> str:
    return hashlib.sha256(memoryview(data).cast("B")).hexdigest()
