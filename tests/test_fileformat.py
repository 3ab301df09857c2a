"""The .lowbit loader against crafted files: bounded work before validation, value checks, and
one-line FormatErrors that name the user's file."""

from __future__ import annotations

import json
import struct
import tracemalloc

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QATConfig, fileformat, pack, quantize_, schema
from lowbit.errors import FormatError


def _tree_model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4), nn.Linear(4, 3)
    )
    quantize_(net, QATConfig(levels=3), filter_fn=lambda m, fqn: fqn in ("0", "3"))
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    return net.eval()


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.lowbit"
    lowbit.save(_tree_model(), path)
    return path


def _rewrite(src, dst, edit_meta) -> None:
    """Copy a .lowbit file with its metadata edited (and its checksum recomputed)."""
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["lowbit"])
    edit_meta(meta)
    header["__metadata__"] = fileformat.metadata_strings(meta)
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)
    dst.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def _refused(path, match: str) -> str:
    with pytest.raises(FormatError, match=match) as info:
        lowbit.load(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
    return msg


def test_good_file_loads(good) -> None:
    model = lowbit.load(good)
    x = torch.randn(5, 12)
    with torch.no_grad():
        assert torch.allclose(model(x), _tree_model()(x), rtol=1e-5, atol=1e-5)


def test_only_the_header_is_read_before_validation(tmp_path) -> None:
    """A 256 MiB tensor (a sparse file): the reader maps the data instead of reading it."""
    path = tmp_path / "big.lowbit"
    size = 256 << 20
    text = json.dumps({"x": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    text += b" " * (-(8 + len(text)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + size)
    tracemalloc.start()
    try:
        _, entries = pack.read_container(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert entries["x"].shape == (size,)
    assert peak < 16 << 20, peak
    # a header that declares more data than the file holds is refused from the header alone
    with open(path, "r+b") as f:
        f.truncate(8 + len(text) + size - 1)
    with pytest.raises(FormatError, match="outside the"):
        pack.read_container(path)
    _refused(path, "outside the")


def test_tensor_count_is_capped(tmp_path) -> None:
    header = {
        f"t{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
        for i in range(pack.MAX_TENSORS + 1)
    }
    text = json.dumps(header).encode()
    path = tmp_path / "many.lowbit"
    path.write_bytes(struct.pack("<Q", len(text)) + text)
    _refused(path, f"more than the {pack.MAX_TENSORS}")


def test_tree_size_and_depth_are_capped(tmp_path, good) -> None:
    wide = tmp_path / "wide.lowbit"
    relu = {"type": "ReLU", "args": {}}

    def widen(meta):
        meta["model"]["root"]["children"] += [[f"r{i}", relu] for i in range(schema.MAX_NODES)]

    _rewrite(good, wide, widen)
    _refused(wide, f"more than {schema.MAX_NODES} modules")

    deep = tmp_path / "deep.lowbit"

    def deepen(meta):
        node = {"type": "Sequential", "args": {}, "children": []}
        for _ in range(schema.MAX_DEPTH + 2):
            node = {"type": "Sequential", "args": {}, "children": [["s", node]]}
        meta["model"]["root"]["children"].append(["deep", node])

    _rewrite(good, deep, deepen)
    _refused(deep, "nested deeper")


@pytest.mark.parametrize("name", ["forward", "eval", "training", "__class__", "_modules", ""])
def test_child_names_that_are_module_attributes(tmp_path, good, name) -> None:
    bad = tmp_path / "names.lowbit"

    def rename(meta):
        meta["model"]["root"]["children"][2][0] = name  # the ReLU

    _rewrite(good, bad, rename)
    _refused(bad, "child name")


def test_format_version_must_be_the_integer(tmp_path, good) -> None:
    for version in (True, 1.0, "1"):
        bad = tmp_path / "version.lowbit"
        _rewrite(good, bad, lambda meta, v=version: meta.update(format_version=v))
        _refused(bad, "format version")


def test_activation_mode_must_match_the_packed_table(tmp_path, good) -> None:
    bad = tmp_path / "mode.lowbit"

    def contradict(meta):
        meta["model"]["root"]["children"][0][1]["args"]["activations"] = "int8"  # table: fp32

    _rewrite(good, bad, contradict)
    _refused(bad, "activations")


@pytest.mark.parametrize(
    ("where", "value", "match"),
    [
        ("3.bias", float("nan"), "NaN or infinite"),  # a packed layer's bias
        ("4.bias", float("inf"), "NaN or infinite"),  # a plain layer's bias
        ("4.weight", float("-inf"), "NaN or infinite"),
        ("1.running_mean", float("nan"), "NaN or infinite"),
        ("1.running_var", float("nan"), "NaN or infinite"),
        ("1.running_var", -1.0, "variance is negative"),
    ],
)
def test_non_finite_and_negative_statistics_are_refused(tmp_path, where, value, match) -> None:
    model = lowbit.convert_(_tree_model())
    with torch.no_grad():
        module, _, attr = where.rpartition(".")
        getattr(model.get_submodule(module), attr)[0] = value
    bad = tmp_path / "values.lowbit"
    lowbit.save(model, bad)
    _refused(bad, match)
