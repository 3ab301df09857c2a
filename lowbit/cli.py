"""The ``lowbit`` command: data, train, study, report, pack, summary, verify, bench.

Each subcommand is an ``_add_<name>(subparsers)`` that declares its flags and a
``_cmd_<name>(args)`` that runs it and returns the exit code. Bad input (a ``LowbitError``, a
``ValueError``, or an ``OSError`` on a path the user gave) is printed as one line, ``lowbit <cmd>:
error: ...``, exit code 2, no traceback; the concepts validate themselves (data, models, files)
and this module only maps their errors to that line, in ``main``. Ctrl-C exits 130; a closed
stdout (``| head``) ends quietly, as Unix tools do.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from lowbit.errors import LowbitError


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks; shows a flag's default where it says something."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help = action.help or ""
        default = action.default
        if "default" in help or default in (None, False, argparse.SUPPRESS):
            return help
        return f"{help} (default: %(default)s)"


class _ArgParser(argparse.ArgumentParser):
    """Bad flags are one line, ``lowbit <cmd>: error: ...`` (exit 2), like every other error."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _parser(sub: argparse._SubParsersAction, name: str, help: str, examples: str):
    p = sub.add_parser(
        name,
        help=help,
        description=help,
        epilog=f"examples:\n{examples}",
        formatter_class=_Formatter,
    )
    return p


# --- data ---------------------------------------------------------------------------------------


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = _parser(
        sub,
        "data",
        "List the datasets lowbit finds and where it looked.",
        "  lowbit data\n  lowbit data --data-dir ~/datasets --json",
    )
    p.add_argument("--data-dir", help="a folder to search first")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_data)


def _cmd_data(args: argparse.Namespace) -> int:
    from lowbit import data

    found = data.discover(args.data_dir)
    if args.json:
        _print_json(found)
    else:
        for name, info in found.items():
            if info["format"] == "generated":
                print(f"{name:14s} generated on demand")
            elif info["path"]:
                print(f"{name:14s} {info['path']}  ({info['format']})")
            else:
                print(f"{name:14s} not found; searched {', '.join(info['searched'])}")
    return 0


# --- train --------------------------------------------------------------------------------------


_HELP = {
    "device": "where to train: cpu, cuda, cuda:N or mps (the data moves there once; packed "
    "inference stays on the CPU)",
    "amp": "bfloat16 autocast for the forward pass (fp32 latent weights, optimizer and loss)",
    "val_split": "hold out this share of the training images as a validation set (per-epoch "
    "val_loss/val_acc)",
}


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = _parser(
        sub,
        "train",
        "Train one model (quantization-aware) and write a run directory.",
        "  lowbit train --model mlp --depth 3 --width 256 --layer ternary "
        "--dataset fashion-mnist --epochs 5 --out runs/t3\n"
        "  lowbit train --layer nlevel --levels 5 --out runs/n5 --json\n"
        "  lowbit train --model cvnn1 --layer ternary --dataset cifar10 --optimizer sgd "
        "--batch-size 256 --augment --out runs/c1\n"
        "  lowbit train --dataset synthetic --epochs 2 --out /tmp/smoke --json\n"
        "  lowbit train --model cvnn1 --dataset cifar10 --device cuda --amp --out runs/gpu\n"
        "Run again with the same --out (and flags) to resume after an interruption; a larger\n"
        "--epochs continues a finished run.",
    )
    p.add_argument(
        "--model",
        default="mlp",
        help="mlp, fcnn1, fcnn2, cvnn1, cvnn2, vit1, vit2, binary_mlp, binary_cnn",
    )
    p.add_argument("--depth", type=int, help="hidden layers (mlp: default 3; binary_mlp)")
    p.add_argument(
        "--width", type=int, help="units or channels (mlp: default 256; binary_mlp, binary_cnn)"
    )
    p.add_argument(
        "--layer",
        default="linear",
        help="linear, bitlinear8, mybitlinear, misborn, sign, ternary, ternary-median, nlevel; "
        "binary models: bnn, xnor, bireal, reactnet, sign, ternary, linear",
    )
    p.add_argument("--levels", type=int, help="number of weight values N (--layer nlevel)")
    p.add_argument(
        "--patch-size", type=int, help="vit models: patch side, must tile the image (28x28: 7)"
    )
    p.add_argument(
        "--dataset",
        default="fashion-mnist",
        help="mnist, fashion-mnist, cifar10, cifar100, synthetic",
    )
    p.add_argument("--data-dir", help="a folder to search first for the dataset")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--out", required=True, metavar="DIR", help="run directory (created; resumed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--lr", type=float, help="learning rate (default: 1e-3 for both optimizers)")
    p.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        default="constant",
        help="constant, or cosine annealing per step from --lr to ~0 over --epochs",
    )
    p.add_argument(
        "--batch-size", type=int, help="mini-batch size (default: TrainConfig's, as in studies)"
    )
    p.add_argument("--augment", action="store_true", help="shift/zoom/flip/rotate each batch")
    p.add_argument("--train-subset", type=int, metavar="N", help="train on N images only")
    p.add_argument("--val-split", type=float, default=0.0, metavar="SHARE", help=_HELP["val_split"])
    p.add_argument(
        "--patience",
        type=int,
        default=0,
        metavar="EPOCHS",
        help="stop after EPOCHS epochs without a better validation accuracy (needs --val-split; "
        "--epochs is then the most it trains)",
    )
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help=_HELP["device"])
    p.add_argument("--amp", action="store_true", help=_HELP["amp"])
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    config_kw = dict(
        optimizer=args.optimizer,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        epochs=args.epochs,
        seed=args.seed,
        augment=args.augment,
        train_subset=args.train_subset,
        threads=args.threads,
        device=args.device,
        amp=args.amp,
        val_split=args.val_split,
        patience=args.patience,
    )
    if args.batch_size is not None:
        config_kw["batch_size"] = args.batch_size
    import torch

    from lowbit import data, models, train

    config = train.TrainConfig(**config_kw)  # validate flags before loading any data
    if not args.out.strip():
        raise ValueError("--out must name a folder, got an empty string")
    fields = models.config_fields(args.model)  # (ValueError naming the models if unknown)
    for flag in ("depth", "width"):
        if getattr(args, flag) is not None and flag not in fields:
            raise ValueError(f"--{flag} does not apply to --model {args.model}")
    dataset = data.load(args.dataset, args.data_dir)
    model_kw = {"input_shape": dataset.input_shape, "classes": dataset.classes}
    if args.patch_size is not None:
        model_kw["patch_size"] = args.patch_size
    if args.model == "mlp":  # the command's defaults (the study's network)
        model_kw.update(depth=3, width=256)
    model_kw.update({k: v for k in ("depth", "width") if (v := getattr(args, k)) is not None})
    torch.manual_seed(args.seed)  # the model's initialisation
    model = models.get(args.model, layer=args.layer, levels=args.levels, **model_kw)

    result = train.fit(model, dataset, config, run_dir=args.out)  # epoch lines go to stderr
    if args.json:
        _print_json(result.to_dict())
    else:
        print(
            f"{result.status}: test acc {result.test_acc:.4f} after {result.epochs} epochs; "
            f"run dir {result.run_dir}"
        )
    return 130 if result.status == "interrupted" else 0


# --- pack, summary, verify ----------------------------------------------------------------------


def _add_pack(sub: argparse._SubParsersAction) -> None:
    p = _parser(
        sub,
        "pack",
        "Pack a trained model (run directory or checkpoint) into a .lowbit file.",
        "  lowbit pack runs/t3 -o t3.lowbit\n"
        "  lowbit pack runs/t3/checkpoint.safetensors -o t3.lowbit --layout byte --json",
    )
    p.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT", help="a training run to pack")
    p.add_argument("-o", "--output", required=True, help="the .lowbit file to write")
    p.add_argument("--layout", choices=("dense", "byte"), default="dense", help="code layout")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_pack)


def _cmd_pack(args: argparse.Namespace) -> int:
    from lowbit import checkpoint, fileformat, meta
    from lowbit.packed import convert_

    model, config = checkpoint.load_trained(args.source)
    _, notes = meta.from_run(args.source, config)  # model.lowbit_meta is its first part
    predicted = fileformat.predicted_size(model, args.layout)
    size = fileformat.save(convert_(model), args.output, layout=args.layout)
    result = {"output": args.output, "bytes": size, "predicted_bytes": predicted, "notes": notes}
    if args.json:
        _print_json(result)
    else:
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        print(f"wrote {args.output}: {size:,} bytes (summary predicted {predicted:,})")
    return 0


def _add_summary(sub: argparse._SubParsersAction) -> None:
    p = _parser(
        sub,
        "summary",
        "Per-layer and total storage of a model: levels, bits, bytes, MACs, file size.",
        "  lowbit summary t3.lowbit\n  lowbit summary runs/t3 --json\n"
        "  lowbit summary runs/t3 --layout byte --input-shape 1,28,28",
    )
    p.add_argument("path", help="a .lowbit file, a run directory or a checkpoint")
    p.add_argument("--layout", choices=("dense", "byte"), default="dense", help="code layout")
    p.add_argument("--input-shape", help="C,H,W for the MAC count (default: the model's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_summary)


def _cmd_summary(args: argparse.Namespace) -> int:
    from lowbit.summary import summary

    shape = None
    if args.input_shape:
        try:
            shape = tuple(int(s) for s in args.input_shape.split(","))
        except ValueError as exc:
            raise ValueError(
                f"--input-shape must be C,H,W integers, got {args.input_shape!r}"
            ) from exc
    s = summary(args.path, input_shape=shape, layout=args.layout)
    if args.json:
        _print_json(s.to_dict())
    else:
        print(s)
    return 0


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = _parser(
        sub,
        "verify",
        "Check a .lowbit file: codes in their level sets, accuracy, same predictions as trained.",
        "  lowbit verify t3.lowbit --dataset fashion-mnist\n"
        "  lowbit verify t3.lowbit --against runs/t3 --json",
    )
    p.add_argument("path", help="the .lowbit file")
    p.add_argument("--against", metavar="RUN_DIR", help="the run (or checkpoint) it came from")
    p.add_argument("--dataset", help="dataset for the test set (default: the run's)")
    p.add_argument("--data-dir", help="a folder to search first for the dataset")
    p.add_argument("--batch-size", type=int, default=50, help="evaluation batch size")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_verify)


def _cmd_verify(args: argparse.Namespace) -> int:
    from lowbit.verify import verify

    r = verify(
        args.path,
        against=args.against,
        dataset=args.dataset,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
    )
    if args.json:
        _print_json(r)
    else:
        print(f"{r['packed_layers']} packed layers, codes {'ok' if r['codes_ok'] else 'BAD'}")
        for problem in r["problems"]:
            print(f"  {problem}")
        if "accuracy" in r:
            print(f"{r['dataset']} test accuracy {r['accuracy']:.4f} ({r['test_size']} images)")
        if "prediction_mismatches" in r:
            print(
                f"fake-quant accuracy {r['fake_quant_accuracy']:.4f}; predictions differ on "
                f"{r['prediction_mismatches']} images; max |delta logit| "
                f"{r['max_abs_logit_diff']:.3g}"
            )
        print("verify: OK" if r["ok"] else "verify: FAILED")
    return 0 if r["ok"] else 1


# --- predict, export -----------------------------------------------------------------------------


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = _parser(
        sub,
        "predict",
        "Predict classes of raw images with a .lowbit model (its saved preprocessing applied).",
        "  lowbit predict t3.lowbit $F/t10k-images-idx3-ubyte.gz --labels "
        "$F/t10k-labels-idx1-ubyte.gz\n"
        "      (F=/usr/share/datasets/fashion-mnist: raw pixels in, the run's accuracy out)\n"
        "  lowbit predict t3.lowbit images.npy --top 3 --json -o predictions.json\n"
        "  lowbit predict t3.lowbit shoe.png shirt.png\n"
        "INPUTS: one IDX file (.gz or not), one .npy array of raw images (no pickle), or PNGs.",
    )
    p.add_argument("path", help="the .lowbit file")
    p.add_argument("inputs", nargs="+", metavar="INPUTS", help="images: IDX, .npy or PNG files")
    p.add_argument("--top", type=int, default=1, metavar="K", help="print the K likeliest classes")
    p.add_argument("--labels", metavar="FILE", help="IDX1 or .npy labels: also print accuracy")
    p.add_argument(
        "--dataset",
        help="for a file without saved preprocessing: normalise as lowbit does for this dataset",
    )
    p.add_argument("--batch-size", type=int, default=500, help="images per forward pass")
    p.add_argument("-o", "--output", help="write the predictions to this file, not stdout")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    import lowbit
    from lowbit import predict
    from lowbit.files import atomic_write

    if args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    model = lowbit.load(args.path)
    meta = getattr(model, "lowbit_meta", None)
    channels = meta.input_shape[0] if meta is not None and meta.input_shape else None
    images = predict.read_images(args.inputs, channels)
    labels = predict.read_labels(args.labels) if args.labels else None
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{args.labels}: {len(labels)} labels for {len(images)} images")
    pred = predict.run(
        model,
        images,
        batch_size=args.batch_size,
        dataset=args.dataset,
        progress=predict.progress_printer(len(images), args.batch_size),
    )
    for note in pred.notes:
        print(f"lowbit predict: note: {note}", file=sys.stderr)
    rep = predict.report(pred, args.top, labels)
    body = json.dumps(rep, indent=2, sort_keys=True) + "\n" if args.json else predict.text(rep)
    if args.output:
        atomic_write(args.output, body)
        summary = f"wrote {rep['count']} predictions to {args.output}"
        if "accuracy" in rep:
            summary += f"; accuracy {rep['accuracy']:.4f}"
        print(summary, file=sys.stderr)
    else:
        sys.stdout.write(body)
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = _parser(
        sub,
        "export",
        "Export a .lowbit model to ONNX (runs in onnxruntime; needs lowbit[onnx]).",
        "  lowbit export t3.lowbit -o t3.onnx\n"
        "  lowbit export t3.lowbit -o t3-raw.onnx --embed-preprocessing --json",
    )
    p.add_argument("path", help="the .lowbit file")
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.add_argument(
        "--embed-preprocessing",
        action="store_true",
        help="the graph takes raw uint8 pixels (B, C, H, W) and normalises them as saved",
    )
    p.add_argument(
        "--compact",
        action="store_true",
        help="2-bit weights for 2/3-level linear layers (smaller; slower in onnxruntime)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    import lowbit
    from lowbit.export import export_onnx

    model = lowbit.load(args.path)
    size = export_onnx(
        model, args.output, embed_preprocessing=args.embed_preprocessing, compact=args.compact
    )
    result = {"output": args.output, "bytes": size, "source_bytes": os.path.getsize(args.path)}
    if args.json:
        _print_json(result)
    else:
        print(f"wrote {args.output}: {size:,} bytes (from {result['source_bytes']:,} in .lowbit)")
    return 0


# --- study, report -------------------------------------------------------------------------------


def _add_study(sub: argparse._SubParsersAction) -> None:
    p = _parser(
        sub,
        "study",
        "Run a sweep (a preset or a TOML spec) into DIR/results.sqlite; re-running resumes.",
        "  lowbit study sign-vs-linear --quick --out runs/svl\n"
        "  lowbit study low-resolution --quick --out runs/lr --workers 2\n"
        "  lowbit study my-grid.toml --out runs/mine --backend ray --export csv\n"
        "  lowbit study low-resolution --out runs/lr --device cuda --workers 4\n"
        "  RAY_ADDRESS=auto lowbit study low-resolution --out /shared/lr --backend ray "
        "--device cuda --gpus-per-cell 0.25\n"
        "presets: sign-vs-linear, low-resolution (spec format: lowbit/study/spec.py)",
    )
    p.add_argument("spec", metavar="PRESET_OR_SPEC", help="a preset name or a .toml spec file")
    p.add_argument("--out", required=True, metavar="DIR", help="study folder (database, runs)")
    p.add_argument("--quick", action="store_true", help="the spec's [quick] variant")
    p.add_argument("--workers", type=int, help="parallel cells (default: the core count)")
    p.add_argument("--backend", choices=("local", "ray"), default="local", help="executor")
    p.add_argument("--threads", type=int, help="torch threads per worker (default: cores/workers)")
    p.add_argument("--data-dir", help="a folder to search first for datasets")
    p.add_argument("--device", default="cpu", help=_HELP["device"])
    p.add_argument("--amp", action="store_true", help=_HELP["amp"])
    p.add_argument(
        "--gpus-per-cell",
        type=float,
        metavar="G",
        help="Ray backend: GPUs each cell asks for (default 1 with a cuda device; 0.25 puts four "
        "cells on one GPU); each cell also asks for --threads CPUs",
    )
    p.add_argument("--export", choices=("csv",), help="also write DIR/*.csv when done")
    p.add_argument(
        "--resume-from",
        metavar="EXPORT",
        action="append",
        help="take the finished cells of an earlier run of this study from its CSV export "
        "(lowbit report DIR --csv) instead of training them: continue on another machine "
        "(repeat it to gather cells from several exports)",
    )
    p.add_argument("--dry-run", action="store_true", help="validate and list cells; run nothing")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_study)


def _cmd_study(args: argparse.Namespace) -> int:
    from lowbit.study import spec as study_spec
    from lowbit.study.runner import dataset_checker, run

    spec = study_spec.load(args.spec, quick=args.quick)
    if args.dry_run:
        cells = spec.cells(dataset_checker(args.data_dir))
        if args.json:
            _print_json([{"id": c.id, **c.config} for c in cells])
        else:
            for c in cells:
                print(c.id, json.dumps(c.config, sort_keys=True))
            print(f"{len(cells)} cells")
        return 0
    result = run(
        spec,
        args.out,
        workers=args.workers,
        backend=args.backend,
        data_dir=args.data_dir,
        quick=args.quick,
        threads=args.threads,
        device=args.device,
        amp=args.amp,
        gpus_per_cell=args.gpus_per_cell,
        resume_from=args.resume_from,
    )
    if result.interrupted:
        print(
            f"lowbit study: interrupted; run the same command again to resume ({args.out})",
            file=sys.stderr,
        )
        return 130
    files = []
    if args.export == "csv":
        from lowbit.study.export import export_csv

        files = [str(f) for f in export_csv(args.out)]
    out = {
        "out": str(result.out_dir),
        "database": str(result.db_path),
        "cells": result.cells,
        "skipped": result.skipped,
        "statuses": result.statuses,
        "wall_s": round(result.wall_s, 1),
        "notes": result.notes,
        "csv": files,
    }
    if args.json:
        _print_json(out)
    else:  # the notes went to stderr as they happened
        counts = ", ".join(f"{n} {k}" for k, n in sorted(result.statuses.items()))
        print(
            f"{result.cells} cells ({result.skipped} already done): {counts} "
            f"in {result.wall_s:.0f} s; database {result.db_path}"
        )
        for f in files:
            print(f"wrote {f}")
    return 0 if result.statuses.get("failed", 0) == 0 else 1


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = _parser(
        sub,
        "report",
        "Write DIR/report/index.html and report.md with PNG figures from a study's database.",
        "  lowbit report runs/svl\n  lowbit report runs/lr --csv --json",
    )
    p.add_argument("dir", metavar="DIR", help="a study folder (holds results.sqlite)")
    p.add_argument("--csv", action="store_true", help="also write DIR/runs.csv, epochs.csv, ...")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from lowbit.study.report import write_report

    info = write_report(args.dir)
    if args.csv:
        from lowbit.study.export import export_csv

        info["csv"] = [str(f) for f in export_csv(args.dir)]
    if args.json:
        _print_json(info)
    else:
        print(f"report: {info['index']} ({len(info['figures'])} figures; also {info['markdown']})")
        for f in info.get("csv", []):
            print(f"wrote {f}")
    return 0


# --- bench ---------------------------------------------------------------------------------------


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = _parser(
        sub,
        "bench",
        "Benchmark lowbit's packed kernels against torch fp32 / bf16 (interleaved medians).",
        "  lowbit bench kernels --quick\n"
        "  lowbit bench kernels --json --shapes my-shapes.csv --out results.csv",
    )
    p.add_argument("what", choices=["kernels"], help="what to benchmark")
    p.add_argument(
        "--quick", action="store_true", help="levels 2/3/5, few rounds, a few of the default shapes"
    )
    p.add_argument(
        "--shapes", help="shape list CSV (default: lowbit/kernels/shapes.csv, shipped with lowbit)"
    )
    p.add_argument("--no-stream", action="store_true", help="skip the weights-streaming regime")
    p.add_argument("--out", help="also write the rows to this CSV file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from lowbit.kernels import bench

    if args.out and os.path.isdir(args.out):  # refused before minutes of measuring, not after
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), args.out)
    quiet = args.json or not sys.stderr.isatty()
    info, rows = bench.run(
        args.shapes,
        quick=args.quick,
        stream=not args.no_stream,
        progress=None if quiet else lambda s: print(f"  {s}", file=sys.stderr),
    )
    if args.out:
        bench.write_csv(args.out, info, rows)
    checks = [{"claim": c, "measured": m, "met": ok} for c, m, ok in bench.targets(rows)]
    if args.json:
        _print_json({"machine": info, "targets": checks, "rows": rows})
        return 0
    print(" ".join(f"{k}={v}" for k, v in info.items()))
    print(
        f"{'shape':20s} {'batch':>5s} {'regime':6s} {'variant':10s} {'us':>10s} "
        f"{'GMAC/s':>8s} {'xfp32':>7s} {'xbf16':>7s}"
    )
    for r in rows:
        print(
            f"{r['shape']:20s} {r['batch']:5d} {r['regime']:6s} {r['variant']:10s} "
            f"{r['median_us']:10.1f} {r['gmacs']:8.1f} {r['speedup_vs_fp32']!s:>7} "
            f"{r['speedup_vs_bf16']!s:>7}"  # rounded already; "" where no torch baseline ran
        )
    for c in checks:
        print(f"{c['claim']:45s} {c['measured']:>22s}  {'met' if c['met'] else 'NOT met'}")
    return 0


# --- registry of subcommands ---------------------------------------------------------------------

_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_data,
    _add_train,
    _add_pack,
    _add_summary,
    _add_verify,
    _add_predict,
    _add_export,
    _add_study,
    _add_report,
    _add_bench,
]


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgParser(
        prog="lowbit",
        description="Train, compare, pack, verify and run networks with few-valued weights.",
    )
    from lowbit import __version__

    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


_OS_HINTS = {
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.EROFS: "the file system is read-only; choose another path",
    errno.EEXIST: "it exists and is not a directory; choose another path",
    errno.ENOTDIR: "a part of it is a file, not a directory; choose another path",
    errno.EISDIR: "name a file, not a folder",
    errno.ENOSPC: "the disk is full; free space or choose another path",
}


def _one_line(exc: BaseException) -> str:
    """The error as one line; an OSError names the user's path and says what to do."""
    if isinstance(exc, OSError) and exc.filename is not None:
        msg = f"{exc.filename}: {exc.strerror or type(exc).__name__}"
        hint = _OS_HINTS.get(exc.errno or 0)
        return f"{msg}; {hint}" if hint else msg
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _quiet_stdout() -> None:
    """The reader of our stdout went away (``lowbit ... | head``): drop what is still buffered,
    as Unix tools do, instead of a BrokenPipeError at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = args.func(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return 128 + signal.SIGPIPE  # what a shell reports for a tool killed by SIGPIPE
    except (LowbitError, ValueError, OSError) as exc:
        print(f"lowbit {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lowbit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
