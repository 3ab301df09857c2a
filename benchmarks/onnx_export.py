"""ONNX export checked end to end: onnxruntime against lowbit's packed model on Fashion-MNIST.

Claims checked (issue 10): ``lowbit export`` output runs in onnxruntime with 100% prediction
agreement with the packed model on the full 10,000-image test set for mlp (ternary, 5-level,
absmax8) and cvnn2 (ternary), max |delta logit| stated; the ONNX file's size against the
``.lowbit`` file's; onnxruntime's latency against the packed model at batch 1 and 64. Also:
``lowbit predict`` on the raw test images (IDX, uint8) gives the run's test accuracy.

Models (short budgets: the claims are about agreement, size and speed, not accuracy):

* ``mlp ternary`` / ``mlp 5-level``: ``lowbit train --model mlp --layer ternary|nlevel
  [--levels 5] --epochs 2 --threads 1`` (depth 3, width 256, fp32 activations);
* ``mlp absmax8``: the same mlp, ``quantize_(QATConfig(levels=3, quantizer="ternary",
  activations="absmax8"))``, 2 epochs (int8 activations per token);
* ``cvnn2 ternary``: ``lowbit train --model cvnn2 --layer ternary --epochs 1 --train-subset 4000
  --threads 1`` (a subset: one thread of a shared 2-core machine trains ~10 images/s).

Runs live in ``--runs`` (default ``/work/runs/i10-ship``) and resume (or are reused) there; each
is packed with its metadata (``lowbit.meta.from_dataset``), loaded back, exported, and compared.
Latency: one thread each (torch and onnxruntime), rounds of every (engine, batch) pair in a fresh
random order, median over rounds of the per-call time.

    python benchmarks/onnx_export.py [--rounds 30] [--runs DIR]

writes ``docs/results/onnx.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import lowbit
from lowbit import data as lbdata
from lowbit import export, meta, models, predict
from lowbit.kernels import bench
from lowbit.nn import QATConfig, quantize_
from lowbit.train import TrainConfig, fit

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")

# name -> (model builder, layer kind / levels for models.get, train config)
RUNS = {
    "mlp ternary": ("mlp-ternary", dict(layer="ternary"), None, 2, None),
    "mlp 5-level": ("mlp-5level", dict(layer="nlevel", levels=5), None, 2, None),
    "mlp absmax8": ("mlp-absmax8", {}, "absmax8", 2, None),
    "cvnn2 ternary": ("cvnn2-ternary", dict(layer="ternary"), None, 1, 4000),
}


def trained(label: str, runs: Path, ds: lbdata.Dataset) -> tuple[torch.nn.Module, float]:
    """The run's model (trained now if the run dir lacks it; resumed or reused otherwise)."""
    folder, layer_kw, act, epochs, subset = RUNS[label]
    arch = label.split()[0]
    torch.manual_seed(0)  # the CLI seeds the initialisation the same way
    kw = {"input_shape": ds.input_shape, "classes": ds.classes}
    if arch == "mlp":
        kw.update(depth=3, width=256)
    model = models.get(arch, **layer_kw, **kw)
    if act:
        quantize_(model, QATConfig(levels=3, quantizer="ternary", activations=act))
    cfg = TrainConfig(epochs=epochs, seed=0, threads=1, train_subset=subset)
    res = fit(model, ds, cfg, run_dir=runs / folder, progress=False)
    if act:
        # quantize_ kept the fp32 mlp's registry spec; the file must describe the module tree
        del model.lowbit_spec
    return model.eval(), res.test_acc


def logits_of(fn, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch]) for i in range(0, len(x), batch)])


def latency(engines: dict, xs: dict[int, torch.Tensor], rounds: int) -> dict:
    """Median seconds per call of each (engine, batch), pairs interleaved in a fresh random
    order every round (after one warm-up round)."""
    pairs = [(e, b) for e in engines for b in xs]
    times: dict = {p: [] for p in pairs}
    for r in range(rounds + 1):
        random.shuffle(pairs)
        for e, b in pairs:
            t = time.perf_counter()
            engines[e](xs[b])
            if r:
                times[(e, b)].append(time.perf_counter() - t)
    return {p: statistics.median(v) for p, v in times.items()}


def machine() -> list[str]:
    import onnx
    import onnxruntime

    return [
        f"- cpu: {bench.cpu()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"python {platform.python_version()}, lowbit kernels {lowbit.kernels.backend()}",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; load average "
        f"{' / '.join(f'{x:.2f}' for x in os.getloadavg())} (1/5/15 min) at the end: the "
        "machine is shared with other jobs, so latencies are noisy; the ratios come from one "
        "interleaved run",
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, default=Path("/work/runs/i10-ship"))
    p.add_argument("--rounds", type=int, default=30, help="latency rounds")
    p.add_argument("--only", choices=sorted(RUNS), action="append", help="a subset of models")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "onnx.md")
    args = p.parse_args()
    torch.set_num_threads(1)
    random.seed(0)
    ds = lbdata.load("fashion-mnist")
    raw_x = lbdata.read_idx(FMNIST / "t10k-images-idx3-ubyte.gz", 3)
    raw_y = lbdata.read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz", 1).astype(np.int64)
    out_dir = args.runs / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    agree_rows, lat_rows = [], []
    for label in args.only or RUNS:
        print(f"{label}: train / reuse", file=sys.stderr)
        model, run_acc = trained(label, args.runs, ds)
        stem = out_dir / RUNS[label][0]
        lb_bytes = lowbit.save(
            model, stem.with_suffix(".lowbit"), meta=meta.from_dataset(ds, run_acc)
        )
        packed = lowbit.load(stem.with_suffix(".lowbit"))
        onnx_bytes = export.export_onnx(packed, stem.with_suffix(".onnx"))
        raw_bytes = export.export_onnx(
            packed, stem.with_name(stem.name + "-raw.onnx"), embed_preprocessing=True
        )
        compact_path = stem.with_name(stem.name + "-compact.onnx")
        compact_bytes = export.export_onnx(packed, compact_path, compact=True)
        sess = export.session(stem.with_suffix(".onnx"), threads=1)
        sess_raw = export.session(stem.with_name(stem.name + "-raw.onnx"), threads=1)
        sess_compact = export.session(compact_path, threads=1)

        def ort(x: torch.Tensor, s=sess) -> torch.Tensor:
            return torch.from_numpy(s.run(None, {"input": x.numpy()})[0])

        def ort_compact(x: torch.Tensor, s=sess_compact) -> torch.Tensor:
            return ort(x, s)

        with torch.inference_mode():
            print(f"{label}: agreement on {len(ds.test_y)} images", file=sys.stderr)
            want = logits_of(packed, ds.test_x)
            got = logits_of(ort, ds.test_x)
            # the compact graph is the default one unless a weight-only layer has <= 3 levels
            same = compact_bytes == onnx_bytes
            got_compact = got if same else logits_of(ort_compact, ds.test_x)
            got_raw = torch.from_numpy(
                np.concatenate(
                    [
                        sess_raw.run(None, {"pixels": raw_x[i : i + 500, None]})[0]
                        for i in range(0, len(raw_x), 500)
                    ]
                )
            )
            pred = predict.run(packed, raw_x)
        y = torch.from_numpy(raw_y)
        agree = (got.argmax(1) == want.argmax(1)).float().mean().item()
        agree_raw = (got_raw.argmax(1) == want.argmax(1)).float().mean().item()
        agree_compact = (got_compact.argmax(1) == want.argmax(1)).float().mean().item()
        agree_rows.append(
            f"| {label} | {run_acc:.4f} | {(pred.logits.argmax(1) == y).float().mean():.4f} | "
            f"{(want.argmax(1) == y).float().mean():.4f} | "
            f"{(got.argmax(1) == y).float().mean():.4f} | {agree:.2%} | "
            f"{(got - want).abs().max().item():.3g} | {agree_raw:.2%} | "
            f"{(got_raw - want).abs().max().item():.3g} | {agree_compact:.2%} | "
            f"{(got_compact - want).abs().max().item():.3g} | {lb_bytes:,} | {onnx_bytes:,} | "
            f"{onnx_bytes / lb_bytes:.2f}x | {compact_bytes:,} | {raw_bytes:,} |"
        )
        print(agree_rows[-1], file=sys.stderr)
        xs = {1: ds.test_x[:1], 64: ds.test_x[64:128]}
        with torch.inference_mode():
            engines = {"lowbit": packed, "onnxruntime": ort}
            if not same:
                engines["compact"] = ort_compact
            lat = latency(engines, xs, args.rounds)
        for b in xs:
            lb, ox = lat[("lowbit", b)], lat[("onnxruntime", b)]
            cx = lat.get(("compact", b))
            compact = "same graph" if cx is None else f"{cx * 1e3:.3f}"
            lat_rows.append(
                f"| {label} | {b} | {lb * 1e3:.3f} | {ox * 1e3:.3f} | {lb / ox:.2f}x | {compact} |"
            )
            print(lat_rows[-1], file=sys.stderr)
    lines = [
        "# ONNX export: onnxruntime against lowbit's packed model (Fashion-MNIST)",
        "",
        "Written by `python benchmarks/onnx_export.py` (the models, budgets and method are in its "
        "docstring).",
        "",
        *machine(),
        "- `lowbit predict`: `predict.run` on the raw test images read from "
        "`t10k-images-idx3-ubyte.gz` (uint8, no normalisation by the caller), labels from the "
        "IDX labels file. `run acc`: the training run's own final test accuracy (the fake-quant "
        "model on lowbit's normalised test set).",
        "- agreement: argmax of onnxruntime vs argmax of the packed model loaded from the "
        "`.lowbit` file, all 10,000 test images; `raw graph`: the export with "
        "`--embed-preprocessing` fed the uint8 pixels; `compact`: the export with `--compact` "
        "(2-bit MatMulNBits for the weight-only ternary linear layers; the same graph as the "
        "default for the other models).",
        "",
        "| model | run acc | predict (raw IDX) acc | packed acc | onnx acc | agreement | "
        "max abs dlogit | raw graph agreement | raw graph max abs dlogit | compact agreement | "
        "compact max abs dlogit | .lowbit bytes | .onnx bytes | onnx / lowbit | compact .onnx "
        "bytes | raw graph bytes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *agree_rows,
        "",
        f"## Latency (ms a call, median of {args.rounds} interleaved rounds, one thread each)",
        "",
        "| model | batch | lowbit packed ms | onnxruntime ms | lowbit ms / onnxruntime ms "
        "(< 1: lowbit faster) | onnxruntime compact ms |",
        "|---|---|---|---|---|---|",
        *lat_rows,
        "",
    ]
    md = args.out
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, md)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
