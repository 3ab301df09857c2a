"""The ``lowbit`` command: data, train, study, report, pack, summary, verify, bench.

Each subcommand is an ``_add_<name>(subparsers)`` that declares its flags and a ``_cmd_<name>(args)``
that runs it and returns the exit code. Bad input (a ``LowbitError`` or ``ValueError``) is printed
as one line, ``lowbit <cmd>: error: ...``, with exit code 2 and no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from lowbit.errors import LowbitError


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


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
            where = info["path"] or "not found"
            print(f"{name:14s} {where}")
    return 0


# --- train --------------------------------------------------------------------------------------


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
        "Run again with the same --out (and flags) to resume after an interruption; a larger\n"
        "--epochs continues a finished run.",
    )
    p.add_argument("--model", default="mlp", help="mlp, fcnn1, fcnn2, cvnn1, cvnn2, vit1, vit2")
    p.add_argument("--depth", type=int, help="hidden layers (mlp; default 3)")
    p.add_argument("--width", type=int, help="units per hidden layer (mlp; default 256)")
    p.add_argument(
        "--layer",
        default="linear",
        help="linear, bitlinear8, mybitlinear, misborn, sign, ternary, ternary-median, nlevel",
    )
    p.add_argument("--levels", type=int, help="number of weight values N (--layer nlevel)")
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
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--augment", action="store_true", help="shift/zoom/flip/rotate each batch")
    p.add_argument("--train-subset", type=int, metavar="N", help="train on N images only")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    config_kw = dict(
        optimizer=args.optimizer,
        lr=args.lr,
        batch_size=args.batch_size,
        epochs=args.epochs,
        seed=args.seed,
        augment=args.augment,
        train_subset=args.train_subset,
        threads=args.threads,
    )
    import torch

    from lowbit import data, models, train

    config = train.TrainConfig(**config_kw)  # validate flags before loading any data
    if args.model != "mlp" and (args.depth is not None or args.width is not None):
        raise ValueError(f"--depth/--width apply to --model mlp only, not {args.model}")
    dataset = data.load(args.dataset, args.data_dir)
    model_kw = {"input_shape": dataset.input_shape, "classes": dataset.classes}
    if args.model == "mlp":
        model_kw.update(depth=3 if args.depth is None else args.depth)
        model_kw.update(width=256 if args.width is None else args.width)
    torch.manual_seed(args.seed)  # the model's initialisation
    model = models.get(args.model, layer=args.layer, levels=args.levels, **model_kw)

    def report(m: dict[str, Any], _model: Any) -> None:
        print(
            f"epoch {m['epoch']}/{config.epochs}  train loss {m['train_loss']:.4g} "
            f"acc {m['train_acc']:.4f}  test loss {m['test_loss']:.4g} acc {m['test_acc']:.4f}  "
            f"({m['wall_s']:.1f} s)",
            flush=True,
        )

    result = train.fit(
        model, dataset, config, run_dir=args.out, on_epoch=None if args.json else report
    )
    if args.json:
        _print_json(result.to_dict())
    else:
        print(
            f"{result.status}: test acc {result.test_acc:.4f} after {result.epochs} epochs; "
            f"run dir {result.run_dir}"
        )
    return 130 if result.status == "interrupted" else 0


# --- registry of subcommands ---------------------------------------------------------------------

_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_data, _add_train]


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (LowbitError, ValueError, FileNotFoundError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"lowbit {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lowbit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
