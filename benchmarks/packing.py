"""Packing benchmark: what lowbit stores, measured on real files.

Claims checked (issue "Packed models"), on this machine, one run:

1. A trained ternary CVNN2 packs to <= 1.02 x (weights x 1.6 bits + fp32 parts) bytes, and a
   trained 5-level MLP to within 1% of weights x 2.333 bits + fp32 parts; all verify with
   identical test-set predictions (fake-quant vs packed); the summary's size is the file's.
2. The Low-Resolution paper's Table 3 (byte-aligned storage, floor(8 / log2 N) weights per byte)
   next to lowbit's dense layout, both measured on saved CVNN2 files for N = 2,3,4,5,8,9,16,17.
3. The memory ``convert_`` frees (latent fp32 weights -> packed codes) and the codec speed on
   CVNN2-sized code arrays (median of 5, interleaved with a safetensors save of the fp32 weights).

Training is brief on purpose (this is about storage, not accuracy): CVNN2 for one epoch on a
synthetic 32x32x3 set (CIFAR-10 is not installed on this machine; the script uses it when
``lowbit data`` finds it), the MLP for one epoch on a Fashion-MNIST subset. Run:

    nice -n 10 .venv/bin/python benchmarks/packing.py        # writes docs/results/packing.md
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import environment  # noqa: E402

import lowbit  # noqa: E402
from lowbit import checkpoint, data, kernels, models, pack, train  # noqa: E402
from lowbit.packed import PackedConv2d, PackedLinear, convert_  # noqa: E402
from lowbit.verify import verify  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "results" / "packing.md"
LEVELS = (2, 3, 4, 5, 8, 9, 16, 17)
PAPER_TABLE3 = {
    2: (8, 32),
    3: (5, 20),
    4: (4, 16),
    5: (3, 12),
    8: (2, 8),
    9: (2, 8),
    16: (2, 8),
    17: (1, 4),
}  # N: (weights per byte, memory reduction), the paper's Table 3


def _weights_and_fp32_parts(model: torch.nn.Module) -> tuple[int, int, int]:
    """(quantized weights, bytes of every other stored tensor incl. scales, packed layers)."""
    meta, items = lowbit.fileformat.plan(model)
    codes = {f"{fqn}.codes" if fqn else "codes": info for fqn, info in meta["packed"].items()}
    weights = sum(math.prod(info["shape"]) for info in codes.values())
    fp32_bytes = sum(it.nbytes for it in items if it.name not in codes)
    return weights, fp32_bytes, len(codes)


def _held_bytes(model: torch.nn.Module) -> int:
    """Bytes of tensors the model keeps: parameters, buffers (codes included) and the
    prepared kernel layouts."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    for m in model.modules():
        if isinstance(m, (PackedLinear, PackedConv2d)):
            w = m.prepared()
            held = w.data if getattr(w, "data", None) is not None else w.codes
            total += held.numel() * held.element_size()
    return total


def _train(name: str, kw: dict, ds: data.Dataset, subset: int, run_dir: Path) -> float:
    torch.manual_seed(0)
    model = models.get(name, input_shape=ds.input_shape, classes=ds.classes, **kw)
    cfg = train.TrainConfig(epochs=1, batch_size=64, train_subset=subset, seed=0)
    t = time.perf_counter()
    train.fit(model, ds, cfg, run_dir=run_dir, progress=False)
    return time.perf_counter() - t


def _claim(run_dir: Path, ds: data.Dataset, bits: float, tol: float, tmp: Path) -> dict:
    fake, _ = checkpoint.load_trained(run_dir)
    weights, fp32_parts, layers = _weights_and_fp32_parts(fake)
    predicted = lowbit.summary(fake).total_bytes
    held_fp32 = _held_bytes(fake)
    path = tmp / f"{run_dir.name}.lowbit"
    t = time.perf_counter()
    size = lowbit.save(convert_(fake), path)
    save_s = time.perf_counter() - t
    held_packed = _held_bytes(fake)
    report = verify(path, against=run_dir, dataset=ds)
    bound = weights * bits / 8 + fp32_parts
    header = lowbit.summary(path).header_bytes
    return {
        "header": header,
        "payload_ratio": (size - header) / bound,
        "weights": weights,
        "layers": layers,
        "fp32_parts": fp32_parts,
        "bound": bound,
        "size": size,
        "predicted": predicted,
        "ratio": size / bound,
        "ok_size": size <= (1 + tol) * bound,
        "save_s": save_s,
        "held_fp32": held_fp32,
        "held_packed": held_packed,
        "verify": report,
    }


def _table3(tmp: Path, input_shape: tuple[int, int, int]) -> list[dict]:
    rows = []
    for n in LEVELS:
        torch.manual_seed(n)
        model = models.get("cvnn2", layer="nlevel", levels=n, input_shape=input_shape)
        weights, fp32_parts, _ = _weights_and_fp32_parts(model)
        sizes, codes_bytes = {}, {}
        for layout in pack.LAYOUTS:
            path = tmp / f"t3-{n}-{layout}.lowbit"
            sizes[layout] = lowbit.save(model, path, layout=layout)
            _, entries = pack.read_container(path)
            codes_bytes[layout] = sum(e.nbytes for k, e in entries.items() if k.endswith("codes"))
            assert lowbit.summary(path).total_bytes == sizes[layout]
        rows.append(
            {
                "n": n,
                "weights": weights,
                "fp32_parts": fp32_parts,
                "sizes": sizes,
                "codes": codes_bytes,
                "codec": pack.codec(n),
                "fp32_model": lowbit.summary(model).fp32_bytes,
            }
        )
    return rows


def _codec_speed(repeats: int = 5) -> list[tuple[int, float, float, float]]:
    """(N, pack s, unpack s, fp32 safetensors save s) medians, CVNN2-sized, interleaved."""
    n_weights = 8_776_330
    out = []
    with tempfile.TemporaryDirectory() as d:
        fp32 = {"w": torch.randn(n_weights)}
        for n in (2, 3, 5, 9, 17):
            codes = torch.randint(0, n, (n_weights,), dtype=torch.uint8).numpy()
            c = pack.codec(n)
            tp, tu, tb = [], [], []
            for _ in range(repeats):
                t = time.perf_counter()
                payload = c.pack(codes)
                tp.append(time.perf_counter() - t)
                t = time.perf_counter()
                back = c.unpack(payload, n_weights)
                tu.append(time.perf_counter() - t)
                t = time.perf_counter()
                save_file(fp32, f"{d}/w.safetensors")
                tb.append(time.perf_counter() - t)
            assert (back == codes).all()
            out.append((n, statistics.median(tp), statistics.median(tu), statistics.median(tb)))
    return out


def main() -> None:
    torch.set_num_threads(1)
    info = environment.describe()
    found = data.discover()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if found.get("cifar10", {}).get("path"):
            cifar, cifar_note = data.load("cifar10"), "CIFAR-10 (2,000-image training subset)"
        else:
            cifar = data.load(
                "synthetic", n_train=2000, n_test=1000, shape=(3, 32, 32), classes=10, noise=3.0
            )
            cifar_note = (
                "synthetic 32x32x3, 10 classes (CIFAR-10 is not installed here): "
                "2,000 training and 1,000 test images"
            )
        fmnist = data.load("fashion-mnist")
        t_cvnn = _train("cvnn2", {"layer": "ternary"}, cifar, 2000, tmp / "cvnn2-ternary")
        t_mlp = {
            w: _train(
                "mlp",
                {"depth": 3, "width": w, "layer": "nlevel", "levels": 5},
                fmnist,
                20000,
                tmp / f"mlp-5-w{w}",
            )
            for w in (1024, 256)
        }
        cvnn = _claim(tmp / "cvnn2-ternary", cifar, 1.6, 0.02, tmp)
        mlp = _claim(tmp / "mlp-5-w1024", fmnist, 7 / 3, 0.01, tmp)
        small = _claim(tmp / "mlp-5-w256", fmnist, 7 / 3, 0.01, tmp)
        table = _table3(tmp, (3, 32, 32))
    speed = _codec_speed()

    models_ = (
        ("ternary CVNN2 (1.6 bits)", cvnn),
        ("5-level MLP, width 1024 (2.333 bits)", mlp),
        ("5-level MLP, width 256 (2.333 bits)", small),
    )
    identical = all(r["verify"]["identical_predictions"] for _, r in models_)
    same_size = all(r["predicted"] == r["size"] for _, r in models_)
    lines = [
        "# Packing: near-entropy storage, measured on real files",
        "",
        environment.markdown(info),
        f"- kernel backend for the packed layers: {kernels.backend()}",
        "- script: `benchmarks/packing.py`",
        "",
    ]
    lines += [
        "## Trained models: file size against the bound, and verification",
        "",
        f"- ternary CVNN2: 1 epoch ({t_cvnn:.0f} s) on {cifar_note}.",
        f"- 5-level MLPs (depth 3, width 1024 and 256): 1 epoch ({t_mlp[1024]:.0f} s, "
        f"{t_mlp[256]:.0f} s) on a 20,000-image Fashion-MNIST subset, tested on the full "
        "10,000-image test set.",
        "- bound = quantized weights x bits / 8 + fp32 parts (biases, scales and any other "
        "fp32 tensor). The file also holds its header (safetensors index + JSON metadata with "
        "the model spec and a SHA-256 per tensor, about 3-5 kB), included in the file size; "
        "'payload / bound' leaves it out.",
        "- One short epoch leaves CVNN2 near chance on this data: the rows show storage and "
        "packed == fake-quant, not accuracy (see docs/results for trained accuracies).",
        "",
        "| model | weights | fp32 parts (B) | bound (B) | file (B) | header (B) | "
        "file / bound | payload / bound | summary predicted (B) | test images | packed acc | "
        "fake-quant acc | different predictions | max abs logit diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in models_:
        v = r["verify"]
        lines.append(
            f"| {name} | {r['weights']:,} | {r['fp32_parts']:,} | {r['bound']:,.0f} | "
            f"{r['size']:,} | {r['header']:,} | {r['ratio']:.4f} | {r['payload_ratio']:.4f} | "
            f"{r['predicted']:,} | {v['test_size']:,} | {v['accuracy']:.4f} | "
            f"{v['fake_quant_accuracy']:.4f} | {v['prediction_mismatches']} | "
            f"{v['max_abs_logit_diff']:.2e} |"
        )
    lines += [
        "",
        f"Claims: CVNN2 file <= 1.02 x bound: **{cvnn['ok_size']}** ({cvnn['ratio']:.4f}); "
        f"MLP (width 1024) within 1% of its bound: **{abs(mlp['ratio'] - 1) <= 0.01}** "
        f"({mlp['ratio']:.4f}); width 256: **{abs(small['ratio'] - 1) <= 0.01}** "
        f"({small['ratio']:.4f}: its {small['header']:,}-byte header is "
        f"{small['header'] / small['size']:.1%} of a {small['size']:,}-byte file; without the "
        f"header {small['payload_ratio']:.4f}); identical predictions: **{identical}**; "
        f"summary size == file size: **{same_size}**.",
        "",
    ]
    lines += [
        "## convert_: memory held by the model",
        "",
        "Bytes of the tensors each model keeps (parameters, buffers, and for packed layers "
        "the kernel backend's prepared weight layout); the fake-quant model holds latent fp32 "
        "weights.",
        "",
        "| model | fake-quant (B) | packed (B) | reduction | time to convert_ + save (s) |",
        "|---|---|---|---|---|",
    ]
    for name, r in models_:
        lines.append(
            f"| {name} | {r['held_fp32']:,} | {r['held_packed']:,} | "
            f"{r['held_fp32'] / r['held_packed']:.1f}x | {r['save_s']:.2f} |"
        )
    lines += [
        "",
        "## Table 3 of the Low-Resolution paper next to lowbit's dense layout",
        "",
        f"CVNN2 (32x32x3 input, {table[0]['weights']:,} quantized weights, random weights: "
        "storage does not depend on training) saved with each layout; codes bytes read from "
        "the real "
        "files' headers. Reduction = fp32 weight bytes / stored code bytes (weights only, "
        "as the paper's table); the last column is for the whole file (fp32 parts and "
        "header included).",
        "",
        "| N | log2 N | paper: weights/byte | paper: reduction | lowbit byte layout: "
        "reduction (measured) | lowbit dense: k codes in b bits | dense bits/weight "
        "(measured) | dense: reduction (measured) | dense file (B) | byte file (B) | "
        "whole-file reduction, dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        n, w = row["n"], row["weights"]
        per_byte, paper_red = PAPER_TABLE3[n]
        fp32 = 4 * w
        c = row["codec"]
        whole = row["fp32_model"]
        lines.append(
            f"| {n} | {math.log2(n):.2f} | {per_byte} | {paper_red}x | "
            f"{fp32 / row['codes']['byte']:.2f}x | {c.k} in {c.b} | "
            f"{8 * row['codes']['dense'] / w:.4f} | {fp32 / row['codes']['dense']:.2f}x | "
            f"{row['sizes']['dense']:,} | {row['sizes']['byte']:,} | "
            f"{whole / row['sizes']['dense']:.2f}x |"
        )
    lines += [
        "",
        "The paper's extracted table lists 1 weight per byte for N = 2 but a reduction "
        "of 32x, which needs 8 per byte; 8 per byte is what floor(8 / log2 2) gives and what "
        "is shown here.",
        "",
        "## Codec speed (CVNN2-sized: 8,776,330 codes, one thread, median of 5)",
        "",
        "Baseline: safetensors `save_file` of the same number of fp32 weights to a "
        "temporary file, timed interleaved with the codec.",
        "",
        "| N | pack (s) | unpack (s) | fp32 safetensors save (s) | pack / fp32 save |",
        "|---|---|---|---|---|",
    ]
    for n, tp, tu, tb in speed:
        lines.append(f"| {n} | {tp:.3f} | {tu:.3f} | {tb:.3f} | {tp / tb:.2f} |")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = OUT.with_suffix(".md.tmp")
    tmp_out.write_text("\n".join(lines) + "\n")
    tmp_out.replace(OUT)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
