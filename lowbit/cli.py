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


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _parser(sub: argparse._SubParsersAction, name: str, help: str, examples: str):
    p = sub.add_parser(
        name, help=help, description=help, epilog=f"examples:\n{examples}", formatter_class=_Formatter
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
        "--dataset fashion-mnist --epochs 5 --out runs/t3",
    )
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    raise LowbitError("train is not available yet")


# --- registry of subcommands ---------------------------------------------------------------------

_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_data, _add_train]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
