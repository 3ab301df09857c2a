"""The kernel benchmark harness (not its timings): shape list parsing, rows, ratios, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowbit import cli
from lowbit.kernels import bench, native

CSV = """# a comment
name,kind,out_features,in_features,c_in,h,w,kernel,padding,batches,threads
tiny,linear,24,100,,,,,,1;3,all
tinyconv,conv2d,8,18,2,6,5,3,1,2,1
"""


@pytest.fixture()
def shapes(tmp_path: Path) -> Path:
    p = tmp_path / "shapes.csv"
    p.write_text(CSV)
    return p


def test_read_shapes(shapes: Path) -> None:
    lin, conv = bench.read_shapes(shapes)
    assert (lin.name, lin.kind, lin.out_features, lin.in_features, lin.batches) == (
        "tiny",
        "linear",
        24,
        100,
        (1, 3),
    )
    assert (conv.c_in, conv.h, conv.w, conv.kernel, conv.padding, conv.threads) == (
        2,
        6,
        5,
        3,
        1,
        1,
    )
    with pytest.raises(FileNotFoundError, match="shape list"):
        bench.read_shapes(shapes.parent / "missing.csv")


def test_run_rows_and_ratios(shapes: Path, tmp_path: Path) -> None:
    info, rows = bench.run(shapes, quick=True, stream=False, rounds=(0.0, 3, 3))
    assert {"cpu", "torch", "date", "backend"} <= set(info)
    # per (shape, batch): fp32 + bf16 + 3 levels x 2 activation modes; then the call overhead
    calls = [r for r in rows if r["regime"] == "call"]
    rows = [r for r in rows if r["regime"] != "call"]
    assert len(rows) == (2 + 1) * (2 + 3 * 2)
    assert {r["variant"] for r in calls} == {
        "module-int8",
        "kernel-int8",
        "module-fp32",
        "kernel-fp32",
    }
    claims = [c for c, _, _ in bench.targets(calls)]
    assert "packed layer call <= 5 us above the kernel (int8, square-1024 b1)" in claims
    for r in rows:
        base = next(
            b
            for b in rows
            if (b["shape"], b["batch"], b["variant"]) == (r["shape"], r["batch"], "fp32")
        )
        assert r["speedup_vs_fp32"] == pytest.approx(
            base["median_us"] / r["median_us"], rel=0.02, abs=0.01
        )
        macs = r["tokens"] * r["out_features"] * r["in_features"]
        assert r["gmacs"] == pytest.approx(macs / r["median_us"] / 1e3, rel=0.02, abs=0.01)
    conv = [r for r in rows if r["shape"] == "tinyconv"]
    assert conv and all(r["tokens"] == 2 * 6 * 5 and r["threads"] == 1 for r in conv)
    out = tmp_path / "r.csv"
    bench.write_csv(out, info, rows)
    text = out.read_text()
    assert text.startswith("# cpu: ") and "speedup_vs_bf16" in text
    assert "| tiny | 1 | cache | L3-int8 |" in bench.markdown(info, rows)


def test_thread_clock_runs_every_shape_on_one_thread(shapes: Path) -> None:
    info, rows = bench.run(shapes, quick=True, stream=False, rounds=(0.0, 3, 3), clock="thread")
    assert info["clock"].startswith("thread") and {r["threads"] for r in rows} == {1}
    assert all(r["median_us"] >= 0 for r in rows)
    with pytest.raises(ValueError, match="clock"):
        bench.run(shapes, quick=True, clock="sundial")


def test_cli_json(shapes: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "kernels", "--quick", "--shapes", str(shapes), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows"] and out["machine"]["backend"]
    assert cli.main(["bench", "kernels", "--shapes", str(shapes.parent / "nope.csv")]) == 2


def test_cli_table(shapes: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "kernels", "--quick", "--shapes", str(shapes)]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "module-int8" in out and "kernel-fp32" in out
    assert "packed layer call <= 5 us above the kernel" in out


@pytest.mark.skipif(native.load() is None, reason="no compiled kernels")
def test_packed_bytes_count_the_weight_not_the_block_padding() -> None:
    # 2 bits a weight for ternary, 5 for 17 levels, K padded to whole groups (256 / 512 codes)
    assert bench._packed_bytes(4096, 4096, 3) == 4096 * 4096 // 4
    assert bench._packed_bytes(3, 4096, 17) == 3 * 4096 * 5 // 8
    assert bench._packed_bytes(1, 300, 3) == 512 // 4
    # the lookup-table layout (fp32 activations): ternary 5 bits for 3 weights, six 5-bit
    # indices a 32-bit word: ceil(ceil(4096 / 3) / 6) = 228 words a row
    lut = native.best_isa() in native.LUT_ISAS
    want = 4096 * 228 * 4 if lut else 4096 * 4096 // 4
    assert bench._packed_bytes(4096, 4096, 3, "fp32") == want


def test_cpu_names_the_core_and_the_isa_extensions(tmp_path: Path) -> None:
    """A VM that names its CPU just "AMD EPYC" is told apart by family and model."""
    info = tmp_path / "cpuinfo"
    first = "vendor_id\t: AuthenticAMD\ncpu family\t: {}\nmodel\t\t: {}\nmodel name\t: AMD EPYC\n"
    first += "flags\t\t: fpu sse2 {}\n\nprocessor\t: 1\nflags\t\t: avx512f\n"
    info.write_text(first.format(23, 49, "avx avx2 fma"))
    assert bench.cpu(info) == "AMD EPYC (Zen 2, family 23 model 49; AVX2)"
    info.write_text(first.format(25, 17, "avx2 avx512f avx512_vnni avx512_vpopcntdq"))
    assert bench.cpu(info) == "AMD EPYC (Zen 4, family 25 model 17; AVX2, AVX-512, VNNI, VPOPCNTDQ)"
    info.write_text(first.format(26, 2, "sse4_2"))  # an unknown kind: no core named
    assert bench.cpu(info) == "AMD EPYC (family 26 model 2; no AVX2)"
    assert bench.cpu(tmp_path / "missing")  # no cpuinfo: the platform's name
