"""Hostile inputs: bad files, flags, paths and interruptions, through the CLI and the Python API.

Claim: every bad input a user or an attacker can hand lowbit ends in a clear one-line error (CLI:
exit 2, one line on stderr that says what is wrong, naming the user's path, no traceback) or in
the correct behaviour; 0 tracebacks and 0 silent wrong results.

Each case builds its input in a fresh folder (tiny generated data, one shared 1-epoch run), runs
it, and is classified:

    clear error    exit 2 (API: a LowbitError/ValueError/TypeError) whose one line holds every
                   expected word (the path, the option)
    cryptic error  the same but a word is missing (the user is not told what or where)
    correct        an input that is not an error behaved as it should (a check passes)
    traceback      an exception escaped, or "Traceback" reached stderr, or a raw torch/numpy error
    silent wrong   exit 0 / no error where one was due, or the correctness check failed

CLI cases run in-process through ``lowbit.cli.main`` (stdout/stderr captured), except those that
need a process (closed pipes, signals, permissions: a child without root's file powers).

    python benchmarks/hostile_inputs.py            # writes docs/results/hostile-inputs.md
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import pickle
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import environment  # noqa: E402

import lowbit  # noqa: E402
from lowbit import cli, data, models, train  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.files import atomic_write  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "hostile-inputs.md"
IDX = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
DEBIAN = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("clear error", "cryptic error", "correct", "traceback", "silent wrong")


@dataclass
class Result:
    group: str
    name: str
    outcome: str
    detail: str


# --- running one input ----------------------------------------------------------------------------


def run_cli(argv: list[Any]) -> tuple[Any, str, str]:
    """(exit code or the escaped exception, stdout, stderr) of ``lowbit argv`` in-process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code: Any = cli.main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code
        except BaseException as exc:  # noqa: BLE001 - an escaped exception is the finding
            code = exc
            err.write(traceback.format_exc())
    return code, out.getvalue(), err.getvalue()


def judge_error(code: Any, err: str, needles: tuple[str, ...]) -> tuple[str, str]:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if isinstance(code, BaseException) or "Traceback" in err:
        return "traceback", (lines[-1] if lines else repr(code))[:160]
    if code == 0:
        return "silent wrong", "exit 0: " + (lines[-1] if lines else "(nothing on stderr)")[:150]
    if code != 2 or len(lines) != 1:
        return "cryptic error", f"exit {code}, {len(lines)} lines: " + " | ".join(lines)[:140]
    missing = [n for n in needles if n not in lines[0]]
    if missing:
        return "cryptic error", f"missing {missing}: {lines[0][:140]}"
    return "clear error", lines[0][:160]


def cli_error(argv: list[Any], *needles: Any) -> tuple[str, str]:
    code, _, err = run_cli(argv)
    return judge_error(code, err, tuple(str(n) for n in needles))


def cli_ok(argv: list[Any], check: Callable[[Any, str, str], bool], what: str) -> tuple[str, str]:
    code, out, err = run_cli(argv)
    if isinstance(code, BaseException) or "Traceback" in err:
        return "traceback", err.strip().splitlines()[-1][:160]
    return ("correct", what) if check(code, out, err) else ("silent wrong", f"exit {code}: {err}")


def api_error(fn: Callable[[], Any], kinds: tuple[type, ...], *needles: str) -> tuple[str, str]:
    try:
        fn()
    except kinds as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        missing = [n for n in needles if n not in msg]
        if missing or "\n" in str(exc).strip():
            return "cryptic error", f"{type(exc).__name__}: missing {missing}: {msg[:120]}"
        return "clear error", f"{type(exc).__name__}: {msg[:150]}"
    except Exception as exc:  # noqa: BLE001 - a raw error from below is the finding
        return "traceback", f"{type(exc).__name__}: {str(exc)[:150]}"
    return "silent wrong", "no error"


USER_ERRORS = (LowbitError, ValueError, TypeError)


# --- building inputs ------------------------------------------------------------------------------


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def make_idx(folder: Path, n_train: int = 32, n_test: int = 16, hw: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, hw, hw)),
        "train_y": rng.integers(0, 10, n_train),
        "test_x": rng.integers(0, 256, (n_test, hw, hw)),
        "test_y": rng.integers(0, 10, n_test),
    }
    for key, arr in arrays.items():
        (folder / IDX[key]).write_bytes(idx_bytes(arr))
    return folder


def make_cifar_py(folder: Path, batch: Any) -> Path:
    """cifar-10-batches-py with tiny good batches; data_batch_1 is ``batch`` (bytes or object)."""
    folder.mkdir(parents=True, exist_ok=True)
    good = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps(good, protocol=2))
    raw = batch if isinstance(batch, bytes) else pickle.dumps(batch, protocol=2)
    (folder / "data_batch_1").write_bytes(raw)
    return folder / "data_batch_1"


def make_cifar_bin(folder: Path, first: bytes | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rec = bytes(1 + 3072) * 2
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        (folder / name).write_bytes(rec)
    if first is not None:
        (folder / "data_batch_1.bin").write_bytes(first)
    return folder / "data_batch_1.bin"


def g(module: str, name: str) -> bytes:
    """The pickle GLOBAL opcode for ``module.name``."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


class _Reduce:
    def __init__(self, fn: Any, args: tuple) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple:
        return (self.fn, self.args)


TRAIN = ["train", "--dataset", "synthetic", "--depth", "1", "--width", "8", "--epochs", "1"]
SPEC = '[grid]\nlayer = "ternary"\ndataset = "synthetic"\nepochs = 1\ndepth = 1\nwidth = 8\n'


class Bench:
    """The cases; ``self.tmp()`` gives each a fresh folder; ``self.run`` is a finished run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.n = 0
        self.results: list[Result] = []
        self.run = root / "shared-run"
        code, _, err = run_cli([*TRAIN, "--layer", "ternary", "--out", self.run, "--json"])
        assert code == 0, err
        self.lowbit_file = root / "shared.lowbit"
        assert run_cli(["pack", self.run, "-o", self.lowbit_file])[0] == 0

    def tmp(self) -> Path:
        self.n += 1
        d = self.root / f"case{self.n:03d}"
        d.mkdir()
        return d

    def case(self, group: str, name: str, fn: Callable[[], tuple[str, str]]) -> None:
        t0 = time.time()
        try:
            outcome, detail = fn()
        except Exception as exc:  # noqa: BLE001 - the case's own set-up failed: report it
            outcome, detail = "traceback", f"harness: {type(exc).__name__}: {exc}"
        self.results.append(Result(group, name, outcome, detail.replace("|", "/")))
        print(f"{outcome:13s} {time.time() - t0:5.1f}s  {group}: {name}", file=sys.stderr)

    # --- the groups ---------------------------------------------------------------------------

    def train_flags(self) -> None:
        G = "train flags"
        flags = [
            (["--epochs", "0"], "epochs"),
            (["--epochs", "-3"], "epochs"),
            (["--epochs", "many"], "--epochs"),
            (["--batch-size", "0"], "batch_size"),
            (["--lr", "-1"], "lr"),
            (["--lr", "0"], "lr"),
            (["--lr", "nan"], "lr"),
            (["--optimizer", "lbfgs"], "--optimizer"),
            (["--layer", "fivebit"], "fivebit"),
            (["--layer", "nlevel"], "levels"),
            (["--layer", "nlevel", "--levels", "1"], "levels"),
            (["--layer", "nlevel", "--levels", "300"], "levels"),
            (["--width", "0"], "width"),
            (["--width", "-5"], "width"),
            (["--seed", "-1"], "seed"),
            (["--train-subset", "0"], "train_subset"),
            (["--threads", "0"], "threads"),
            (["--no-such-flag"], "no-such-flag"),
        ]
        for extra, needle in flags:
            self.case(
                G,
                " ".join(extra),
                lambda e=extra, n=needle: cli_error([*TRAIN, "--out", self.tmp() / "r", *e], n),
            )
        self.case(
            G,
            "--model cvnn1 --depth 3",
            lambda: cli_error(
                [
                    "train",
                    "--dataset",
                    "synthetic",
                    "--model",
                    "cvnn1",
                    "--depth",
                    "3",
                    "--out",
                    self.tmp() / "r",
                ],
                "--depth",
            ),
        )
        self.case(
            G,
            "--dataset imagenet",
            lambda: cli_error(
                ["train", "--dataset", "imagenet", "--out", self.tmp() / "r"], "imagenet"
            ),
        )
        self.case(G, "no --out", lambda: cli_error(["train", "--dataset", "synthetic"], "--out"))
        self.case(
            G,
            "--model resnet50",
            lambda: cli_error(
                [
                    "train",
                    "--dataset",
                    "synthetic",
                    "--model",
                    "resnet50",
                    "--out",
                    self.tmp() / "r",
                ],
                "resnet50",
            ),
        )

        def no_hidden_layer() -> tuple[str, str]:
            out = self.tmp() / "r"
            code, _, err = run_cli([*TRAIN, "--depth", "0", "--out", out, "--json"])
            spec = json.loads((out / "config.json").read_text())["model"] if code == 0 else {}
            ok = code == 0 and spec.get("kwargs", {}).get("depth") == 0
            what = "a model without hidden layers (a linear classifier), recorded as depth 0"
            return ("correct", what) if ok else ("silent wrong", err.strip()[-150:])

        self.case(G, "--depth 0", no_hidden_layer)

    def out_paths(self) -> None:
        G = "output paths"

        def existing_file() -> tuple[str, str]:
            f = self.tmp() / "f"
            f.write_text("keep")
            r = cli_error([*TRAIN, "--out", f], f)
            return r if f.read_text() == "keep" else ("silent wrong", "the file was changed")

        def empty_out() -> tuple[str, str]:
            d = self.tmp()
            cwd = os.getcwd()
            os.chdir(d)
            try:
                r = cli_error([*TRAIN, "--out", ""], "--out")
            finally:
                os.chdir(cwd)
            return r if not list(d.iterdir()) else ("silent wrong", "wrote into the cwd")

        def under_a_file() -> tuple[str, str]:
            f = self.tmp() / "f"
            f.write_text("x")
            return cli_error([*TRAIN, "--out", f / "sub"], f)

        self.case(G, "train --out names an existing file", existing_file)
        self.case(G, 'train --out ""', empty_out)
        self.case(G, "train --out under a file", under_a_file)
        self.case(
            G,
            "pack -o an existing directory",
            lambda: cli_error(["pack", self.run, "-o", (d := self.tmp())], d, "directory"),
        )
        self.case(
            G,
            "pack -o in a missing folder",
            lambda: cli_error(["pack", self.run, "-o", (d := self.tmp() / "no" / "m.lowbit")], d),
        )
        self.case(
            G,
            "pack -o under a file",
            lambda: cli_error(["pack", self.run, "-o", (f := self._file()) / "m.lowbit"], f),
        )
        self.case(
            G,
            "study --out names a file",
            lambda: cli_error(
                ["study", self._spec(), "--out", (f := self._file()), "--workers", "1"], f
            ),
        )
        self.case(
            G,
            'study --out ""',
            lambda: cli_error(["study", self._spec(), "--out", "", "--workers", "1"], "--out"),
        )
        self.case(
            G,
            "bench --out a directory",
            lambda: cli_error(
                [
                    "bench",
                    "kernels",
                    "--shapes",
                    self._shapes(_ONE_SHAPE),
                    "--out",
                    (d := self.tmp()),
                    "--quick",
                    "--no-stream",
                ],
                d,
            ),
        )

    def _file(self, text: str = "x") -> Path:
        f = self.tmp() / "f"
        f.write_text(text)
        return f

    def _spec(self, text: str = SPEC) -> Path:
        f = self.tmp() / "spec.toml"
        f.write_text(text)
        return f

    def _shapes(self, text: str) -> Path:
        f = self.tmp() / "shapes.csv"
        f.write_text(text)
        return f

    def data_dirs(self) -> None:
        G = "--data-dir"
        mnist = ["train", "--dataset", "mnist", "--epochs", "1", "--depth", "1", "--width", "8"]
        self.case(
            G,
            "does not exist",
            lambda: cli_error(
                [*mnist, "--data-dir", (d := self.tmp() / "nope"), "--out", self.tmp() / "r"],
                d,
                "does not exist",
            ),
        )
        self.case(
            G,
            "is a file",
            lambda: cli_error(
                [*mnist, "--data-dir", (f := self._file()), "--out", self.tmp() / "r"], f
            ),
        )
        self.case(
            G,
            "empty folder (no fallback to other copies)",
            lambda: cli_error(
                [*mnist, "--data-dir", (d := self.tmp()), "--out", self.tmp() / "r"], d, "not found"
            ),
        )

        def missing_one() -> tuple[str, str]:
            d = make_idx(self.tmp())
            (d / IDX["test_y"]).unlink()
            return cli_error([*mnist, "--data-dir", d, "--out", self.tmp() / "r"], d, IDX["test_y"])

        self.case(G, "folder missing one file", missing_one)

        def fashion_as_mnist(gz: bool) -> tuple[str, str]:
            if not DEBIAN.is_dir():
                return "correct", "skipped: no Debian Fashion-MNIST here"
            d = self.tmp()
            for name in IDX.values():
                src = DEBIAN / f"{name}.gz"
                if gz:
                    shutil.copy(src, d / src.name)
                else:
                    (d / name).write_bytes(gzip.decompress(src.read_bytes()))
            return cli_error([*mnist, "--data-dir", d, "--out", self.tmp() / "r"], "fashion-mnist")

        self.case(G, "--dataset mnist on Fashion-MNIST .gz files", lambda: fashion_as_mnist(True))
        self.case(G, "--dataset mnist on Fashion-MNIST raw files", lambda: fashion_as_mnist(False))

        def records_folder() -> tuple[str, str]:
            d = make_idx(self.tmp())
            out = self.tmp() / "r"
            code, _, err = run_cli([*mnist, "--data-dir", d, "--out", out, "--json"])
            if code != 0:
                return "silent wrong", err.strip()[:150]
            rec = json.loads((out / "config.json").read_text())["data"]
            ok = rec["source"] == str(d) and len(rec.get("digest") or "") == 64
            return (
                ("correct", "config.json records the folder and a SHA-256")
                if ok
                else ("silent wrong", json.dumps(rec)[:150])
            )

        self.case(G, "a run records the folder read and its digest", records_folder)
        self.case(
            G,
            "lowbit data --data-dir missing",
            lambda: cli_error(["data", "--data-dir", (d := self.tmp() / "nope")], d),
        )

    def idx_files(self) -> None:
        G = "IDX files"
        mnist = ["train", "--dataset", "mnist", "--epochs", "1", "--depth", "1", "--width", "8"]

        def corrupt(mutate: Callable[[Path], Path], *needles: str) -> tuple[str, str]:
            d = make_idx(self.tmp())
            bad = mutate(d)
            return cli_error([*mnist, "--data-dir", d, "--out", self.tmp() / "r"], bad, *needles)

        def write(d: Path, key: str, raw: bytes, gz: bool = False) -> Path:
            (d / IDX[key]).unlink()
            p = d / (IDX[key] + (".gz" if gz else ""))
            p.write_bytes(gzip.compress(raw) if gz else raw)
            return p

        imgs = np.zeros((32, 8, 8))
        cases = {
            "bad magic": lambda d: write(d, "train_x", b"\x00\x00\x09\x03" + idx_bytes(imgs)[4:]),
            "truncated images": lambda d: write(d, "train_x", idx_bytes(imgs)[:-7]),
            "trailing bytes": lambda d: write(d, "train_x", idx_bytes(imgs) + b"x"),
            "wrong number of dimensions": lambda d: write(
                d, "train_x", idx_bytes(imgs.reshape(32, 64))
            ),
            "fewer labels than images": lambda d: write(d, "train_y", idx_bytes(np.zeros(31))),
            "label 10 in a 10-class set": lambda d: write(d, "train_y", idx_bytes(np.full(32, 10))),
            "float labels (type 0x0D)": lambda d: write(
                d, "train_y", idx_bytes(np.zeros(32), code=0x0D)
            ),
            "int32 labels (type 0x0C)": lambda d: write(
                d, "train_y", idx_bytes(np.zeros(32), code=0x0C)
            ),
            "empty file": lambda d: write(d, "train_x", b""),
            "header only": lambda d: write(d, "train_x", idx_bytes(imgs)[:16]),
            "truncated header": lambda d: write(d, "train_x", idx_bytes(imgs)[:9]),
            "N x 0 x 0 images": lambda d: write(d, "train_x", idx_bytes(np.zeros((32, 0, 0)))),
            "empty training set": lambda d: (
                write(d, "train_x", idx_bytes(np.zeros((0, 8, 8)))),
                write(d, "train_y", idx_bytes(np.zeros(0))),
            )[0],
            "empty test set": lambda d: (
                write(d, "test_x", idx_bytes(np.zeros((0, 8, 8)))),
                write(d, "test_y", idx_bytes(np.zeros(0))),
            )[0],
            "train 32x32, test 8x8": lambda d: write(
                d, "train_x", idx_bytes(np.zeros((32, 32, 32)))
            ),
            "header declares 6e9 images": lambda d: write(
                d, "train_x", b"\x00\x00\x08\x03" + struct.pack(">3I", 4_000_000_000, 40, 40)
            ),
            "truncated .gz": lambda d: (
                p := write(d, "train_x", idx_bytes(imgs), gz=True),
                p.write_bytes(p.read_bytes()[:40]),
            )[0],
            "garbled .gz": lambda d: (
                p := write(d, "train_x", idx_bytes(imgs), gz=True),
                p.write_bytes(p.read_bytes()[:20] + b"\xff" * 30),
            )[0],
            ".gz that is not gzip": lambda d: (
                p := d / (IDX["train_x"] + ".gz"),
                (d / IDX["train_x"]).unlink(),
                p.write_bytes(idx_bytes(imgs)),
            )[0],
            ".gz bomb (0.3 MB -> 235 MB)": lambda d: write(
                d, "train_x", idx_bytes(np.zeros((300_000, 28, 28))), gz=True
            ),
            ".gz with 50 MB past the header's size": lambda d: write(
                d, "train_x", idx_bytes(imgs) + bytes(50 << 20), gz=True
            ),
            "images file is a directory": lambda d: (
                (d / IDX["train_x"]).unlink(),
                (d / IDX["train_x"]).mkdir(),
                d,
            )[2],
        }
        for name, mutate in cases.items():
            self.case(G, name, lambda m=mutate: corrupt(m))

    def cifar_files(self) -> None:
        G = "CIFAR files"
        c10 = ["train", "--dataset", "cifar10", "--epochs", "1", "--model", "cvnn1"]

        def py(batch: Any, *needles: str) -> tuple[str, str]:
            root = self.tmp()
            bad = make_cifar_py(root / "cifar-10-batches-py", batch)
            return cli_error([*c10, "--data-dir", root, "--out", self.tmp() / "r"], bad, *needles)

        x = np.zeros((2, 3072), np.uint8)
        shape_big = b"J\x40\x42\x0f\x00J\x00\x0c\x00\x00\x86"
        real = pickle.dumps(np.zeros((2, 3072), np.uint8), protocol=2)
        forged = real.replace(b"K\x02M\x00\x0c\x86", b"J\x80\x84\x1e\x00M\x00\x0c\x86", 1)
        pickles = {
            "labels 2-D": {b"data": x, b"labels": np.zeros((2, 1), np.int64)},
            "labels beyond int64": {b"data": x, b"labels": [0, 2**70]},
            "float labels": {b"data": x, b"labels": [0.0, 1.0]},
            "bool labels": {b"data": x, b"labels": [True, False]},
            "string labels": {b"data": x, b"labels": [b"cat", b"dog"]},
            "negative label": {b"data": x, b"labels": [0, -1]},
            "label 10 in cifar10": {b"data": x, b"labels": [0, 10]},
            "data of shape (2, 100)": {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]},
            "float data": {b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]},
            "no 'data' key": {b"labels": [0, 1]},
            "labels missing": {b"data": x},
            "a list, not a dict": [1, 2, 3],
            "object-dtype array": {b"data": np.array([None], dtype=object), b"labels": [0]},
            "os.system via __reduce__": {b"data": _Reduce(os.system, ("true",)), b"labels": [0]},
            "eval via __reduce__": _Reduce(eval, ("1+1",)),
            "numpy.ndarray((2**40,)) call (134-byte pickle)": b"\x80\x02}q\x00(C\x04dataq\x01"
            + g("numpy", "ndarray")
            + b"\x8a\x06\x00\x00\x00\x00\x00\x01\x85C\x02u1\x86R"
            + b"C\x06labelsq\x02]q\x03u.",
            "_reconstruct without state (uninitialised 3 GB)": b"\x80\x02}(C\x04data"
            + g("numpy.core.multiarray", "_reconstruct")
            + g("numpy", "ndarray")
            + shape_big
            + b"C\x01B\x87RC\x06labels]u.",
            "array shape larger than its bytes": b"\x80\x02}(C\x04data"
            + forged[2:-1]
            + b"C\x06labels]u.",
            "_codecs.encode with a codec to import": b"\x80\x02"
            + g("_codecs", "encode")
            + b"X\x01\x00\x00\x00aX\x09\x00\x00\x00mac_farsi\x86R.",
            "structured dtype": {
                b"data": x,
                b"labels": [0, 1],
                b"x": np.zeros(2, dtype=[("a", "u1")]),
            },
            "truncated pickle": pickle.dumps({b"data": x, b"labels": [0, 1]}, protocol=2)[:-30],
            "empty file": b"",
        }
        for name, batch in pickles.items():
            self.case(G, f"python: {name}", lambda b=batch: py(b))

        def binary(raw: bytes) -> tuple[str, str]:
            root = self.tmp()
            bad = make_cifar_bin(root / "cifar-10-batches-bin", raw)
            return cli_error([*c10, "--data-dir", root, "--out", self.tmp() / "r"], bad)

        self.case(G, "binary: truncated record", lambda: binary(bytes(3073 * 2 - 1)))
        self.case(G, "binary: empty file", lambda: binary(b""))
        self.case(G, "binary: label 200", lambda: binary(b"\xc8" + bytes(3072)))

    def run_dirs(self) -> None:
        G = "resume"
        base = [*TRAIN, "--layer", "ternary"]

        def resume(change: list[str], *needles: str) -> tuple[str, str]:
            rd = self.tmp() / "r"
            shutil.copytree(self.run, rd)
            before = (rd / "config.json").read_text()
            argv = list(base)
            for flag, value in zip(change[::2], change[1::2], strict=True):
                if flag in argv:
                    argv[argv.index(flag) + 1] = value
                else:
                    argv += [flag, value]
            r = cli_error([*argv, "--out", rd], rd, *needles)
            if (rd / "config.json").read_text() != before:
                return "silent wrong", "config.json rewritten"
            return r

        for change, needle in [
            (["--layer", "linear"], "layer"),
            (["--layer", "nlevel", "--levels", "5"], "layer"),
            (["--width", "16"], "width"),
            (["--depth", "2"], "depth"),
            (["--seed", "3"], "seed"),
            (["--optimizer", "sgd"], "optimizer"),
            (["--batch-size", "16"], "batch_size"),
        ]:
            self.case(G, "resume with " + " ".join(change), lambda c=change, n=needle: resume(c, n))

        def fewer_epochs() -> tuple[str, str]:
            rd = self.tmp() / "r"
            shutil.copytree(self.run, rd)
            return cli_ok(
                [*base, "--out", rd],
                lambda c, o, e: c == 0 and "nothing trained" in e,
                "finished run: 'already finished, nothing trained'",
            )

        def more_epochs() -> tuple[str, str]:
            rd = self.tmp() / "r"
            shutil.copytree(self.run, rd)
            argv = [*base, "--out", rd]
            argv[argv.index("--epochs") + 1] = "2"
            return cli_ok(
                argv,
                lambda c, o, e: c == 0 and "resuming at epoch 2/2" in e,
                "'resuming at epoch 2/2', then trains epoch 2",
            )

        def garbage(name: str) -> tuple[str, str]:
            rd = self.tmp() / "r"
            shutil.copytree(self.run, rd)
            (rd / name).write_bytes(b"\x00garbage{")
            return cli_error([*base, "--out", rd], rd / name)

        self.case(G, "re-run of a finished run", fewer_epochs)
        self.case(G, "re-run with more epochs", more_epochs)
        self.case(G, "garbage checkpoint.safetensors", lambda: garbage("checkpoint.safetensors"))
        self.case(G, "garbage config.json", lambda: garbage("config.json"))

    def pack_summary_verify(self) -> None:
        G = "pack / summary / verify"
        ckpt = self.run / "checkpoint.safetensors"
        spec = json.loads((self.run / "config.json").read_text())["model"]

        def forged(key: str, value: Any) -> Path:
            from lowbit import pack

            s = json.loads(json.dumps(spec))
            s["kwargs"][key] = value
            strings, entries = pack.read_container(ckpt)
            out = self.tmp() / "checkpoint.safetensors"
            pack.write_container(
                out, list(entries.values()), {**strings, "model_spec": json.dumps(s)}
            )
            return out

        for key, value in [
            ("width", 200_000),
            ("classes", 10**9),
            ("depth", 10**6),
            ("width", 4096),
            ("layer", "nonsense"),
        ]:
            self.case(
                G,
                f"pack a checkpoint whose spec says {key}={value}",
                lambda k=key, v=value: cli_error(
                    ["pack", (p := forged(k, v)), "-o", self.tmp() / "m.lowbit"], p
                ),
            )
        self.case(
            G,
            "pack a missing path",
            lambda: cli_error(
                ["pack", (p := self.tmp() / "nope"), "-o", self.tmp() / "m.lowbit"], p
            ),
        )
        self.case(
            G,
            "pack an empty folder",
            lambda: cli_error(["pack", (d := self.tmp()), "-o", self.tmp() / "m.lowbit"], d),
        )
        self.case(
            G,
            "pack a .npy file",
            lambda: cli_error(["pack", (p := self._npy()), "-o", self.tmp() / "m.lowbit"], p),
        )
        self.case(
            G, "summary of a .npy file", lambda: cli_error(["summary", (p := self._npy())], p)
        )
        self.case(
            G,
            "summary --input-shape 3,32,32 (model takes 1,8,8)",
            lambda: cli_error(["summary", self.run, "--input-shape", "3,32,32"], "3, 32, 32"),
        )
        self.case(
            G,
            "summary --input-shape a,b",
            lambda: cli_error(["summary", self.run, "--input-shape", "a,b"], "--input-shape"),
        )
        self.case(
            G,
            "summary --input-shape 0,1,1",
            lambda: cli_error(["summary", self.run, "--input-shape", "0,1,1"], "C,H,W"),
        )
        self.case(
            G,
            "summary --input-shape 1,100000,100000",
            lambda: cli_error(["summary", self.run, "--input-shape", "1,100000,100000"], "C,H,W"),
        )
        self.case(
            G,
            "summary --layout foo",
            lambda: cli_error(["summary", self.run, "--layout", "foo"], "--layout"),
        )

        def cut(keep: float) -> Path:
            p = self.tmp() / "m.lowbit"
            raw = self.lowbit_file.read_bytes()
            p.write_bytes(raw[: int(len(raw) * keep)])
            return p

        def flipped() -> Path:
            p = self.tmp() / "m.lowbit"
            raw = bytearray(self.lowbit_file.read_bytes())
            raw[-5] ^= 0xFF
            p.write_bytes(bytes(raw))
            return p

        self.case(
            G, "verify a truncated .lowbit", lambda: cli_error(["verify", (p := cut(0.7))], p)
        )
        self.case(
            G,
            "verify a .lowbit with a flipped byte",
            lambda: cli_error(["verify", (p := flipped())], p),
        )
        self.case(
            G,
            "summary of a .lowbit cut in its header",
            lambda: cli_error(["summary", (p := cut(0.01))], p),
        )
        self.case(
            G,
            "verify --against a missing run",
            lambda: cli_error(
                ["verify", self.lowbit_file, "--against", (p := self.tmp() / "nope")], p
            ),
        )
        self.case(G, "verify a text file", lambda: cli_error(["verify", (f := self._file())], f))

    def _npy(self) -> Path:
        p = self.tmp() / "x.npy"
        np.save(p, np.zeros((4, 4)))
        return p

    def studies(self) -> None:
        G = "study"
        self.case(
            G,
            "spec file missing",
            lambda: cli_error(
                ["study", (p := self.tmp() / "nope.toml"), "--out", self.tmp() / "o"], p
            ),
        )
        self.case(
            G,
            "unknown preset",
            lambda: cli_error(
                ["study", "no-such-preset", "--out", self.tmp() / "o"], "no-such-preset"
            ),
        )
        bad = {
            "TOML syntax error": ("[grid\nlayer = ", "TOML"),
            "unknown key": ('[grid]\nlayer = "ternary"\nwidht = 3\n', "widht"),
            "epochs = 0": ('[grid]\nlayer = "ternary"\nepochs = 0\n', "epochs"),
            "unknown layer": ('[grid]\nlayer = "fivebit"\n', "fivebit"),
            "levels = 1": ('[grid]\nlayer = "nlevel"\nlevels = 1\n', "levels"),
            "binary garbage": ("\x00\x01\x02garbage\xff", ""),
        }

        def bad_spec(text: str, needle: str) -> tuple[str, str]:
            o = self.tmp() / "o"
            r = cli_error(["study", self._spec(text), "--out", o], needle)
            return r if not o.exists() else ("silent wrong", "created the study folder")

        for name, (text, needle) in bad.items():
            self.case(G, f"spec: {name}", lambda t=text, n=needle: bad_spec(t, n))
        self.case(
            G,
            "spec is a directory",
            lambda: cli_error(["study", (d := self.tmp()), "--out", self.tmp() / "o"], d),
        )
        self.case(
            G,
            "--workers 0",
            lambda: cli_error(
                ["study", self._spec(), "--out", self.tmp() / "o", "--workers", "0"], "--workers"
            ),
        )
        self.case(
            G,
            "--threads 0",
            lambda: cli_error(
                ["study", self._spec(), "--out", self.tmp() / "o", "--threads", "0"], "--threads"
            ),
        )
        self.case(
            G,
            "--backend dask",
            lambda: cli_error(
                ["study", self._spec(), "--out", self.tmp() / "o", "--backend", "dask"], "--backend"
            ),
        )

        def ray_missing() -> tuple[str, str]:
            saved = sys.modules.get("ray")
            sys.modules["ray"] = None  # type: ignore[assignment]  # import ray -> ImportError
            try:
                o = self.tmp() / "o"
                r = cli_error(["study", self._spec(), "--out", o, "--backend", "ray"], "ray")
            finally:
                if saved is None:
                    sys.modules.pop("ray", None)
                else:
                    sys.modules["ray"] = saved
            return r if not o.exists() else ("silent wrong", "the store was created first")

        self.case(G, "--backend ray without Ray", ray_missing)

        def rerun() -> tuple[str, str]:
            spec, o = self._spec(), self.tmp() / "o"
            argv = ["study", spec, "--out", o, "--workers", "1"]
            assert run_cli(argv)[0] == 0
            return cli_ok(
                argv,
                lambda c, out, e: c == 0 and "(1 already done)" in out,
                "a finished study is skipped, not retrained",
            )

        self.case(G, "re-run of a finished study", rerun)

    def reports(self) -> None:
        G = "report"
        self.case(G, "missing folder", lambda: cli_error(["report", (d := self.tmp() / "n")], d))
        self.case(
            G, "folder without a database", lambda: cli_error(["report", (d := self.tmp())], d)
        )

        def db(content: Callable[[Path], None]) -> tuple[str, str]:
            d = self.tmp()
            content(d / "results.sqlite")
            return cli_error(["report", d], d / "results.sqlite")

        self.case(
            G,
            "results.sqlite is not SQLite",
            lambda: db(lambda p: p.write_bytes(b"not a database" * 100)),
        )
        self.case(
            G,
            "results.sqlite is an empty SQLite file",
            lambda: db(
                lambda p: sqlite3.connect(p).execute("CREATE TABLE t (a)").connection.close()
            ),
        )
        self.case(G, "results.sqlite is a directory", lambda: db(lambda p: p.mkdir()))
        self.case(G, "results.sqlite is empty (0 bytes)", lambda: db(lambda p: p.write_bytes(b"")))

    def bench_shapes(self) -> None:
        G = "bench --shapes"
        head = "name,kind,out_features,in_features,c_in,h,w,kernel,padding,batches,threads\n"
        bad = {
            "missing file": None,
            "missing columns": "name,kind\nx,linear\n",
            "no rows": head,
            "non-numeric size": head + "x,linear,many,16,,,,,,1,all\n",
            "batch 0": head + "x,linear,16,16,,,,,,0,all\n",
            "kind conv3d": head + "x,conv3d,16,16,,,,,,1,all\n",
            "binary garbage": "\x00\xff\xfe" * 10,
        }
        for name, text in bad.items():
            self.case(
                G,
                name,
                lambda t=text: cli_error(
                    [
                        "bench",
                        "kernels",
                        "--quick",
                        "--shapes",
                        (p := self._shapes(t) if t is not None else self.tmp() / "nope.csv"),
                    ],
                    p,
                ),
            )

    def api(self) -> None:
        G = "Python API"
        ds = data.synthetic(n_train=16, n_test=8)

        def mlp(**kw: Any) -> torch.nn.Module:
            kw = {"depth": 1, "width": 8, "input_shape": (1, 8, 8), "classes": 4, **kw}
            return models.get("mlp", **kw)

        cfg = train.TrainConfig(epochs=1)
        cases: list[tuple[str, Callable[[], Any], tuple, tuple[str, ...]]] = [
            (
                "quantize_(model, 'ternary')",
                lambda: lowbit.quantize_(torch.nn.Sequential(torch.nn.Linear(2, 2)), "ternary"),
                (TypeError,),
                ("QATConfig",),
            ),
            (
                "quantize_(model, None)",
                lambda: lowbit.quantize_(torch.nn.Sequential(torch.nn.Linear(2, 2)), None),
                (TypeError,),
                ("QATConfig",),
            ),
            (
                "fit: model for 1x28x28 on 1x8x8 data",
                lambda: train.fit(mlp(input_shape=(1, 28, 28)), ds, cfg, progress=False),
                USER_ERRORS,
                ("input_shape",),
            ),
            (
                "fit: 10-class model on 4-class data",
                lambda: train.fit(mlp(classes=10), ds, cfg, progress=False),
                USER_ERRORS,
                ("classes",),
            ),
            (
                "fit(run_dir=<a file>)",
                lambda: train.fit(mlp(), ds, cfg, run_dir=self._file(), progress=False),
                USER_ERRORS,
                ("folder",),
            ),
            (
                "fit(run_dir='')",
                lambda: train.fit(mlp(), ds, cfg, run_dir="", progress=False),
                USER_ERRORS,
                ("run_dir",),
            ),
            (
                "data.load('mnist', data_dir=3)",
                lambda: data.load("mnist", data_dir=3),
                USER_ERRORS,
                ("data_dir",),
            ),
            (
                "data.load('mnist', data_dir='')",
                lambda: data.load("mnist", data_dir=""),
                USER_ERRORS,
                ("data_dir",),
            ),
            ("data.load('imagenet')", lambda: data.load("imagenet"), USER_ERRORS, ("imagenet",)),
            (
                "data.load('synthetic', bogus=1)",
                lambda: data.load("synthetic", bogus=1),
                USER_ERRORS,
                ("bogus",),
            ),
            ("models.get('mlp', width=-1)", lambda: mlp(width=-1), USER_ERRORS, ("width",)),
            (
                "models.get('mlp', layer='nlevel', levels=1)",
                lambda: mlp(layer="nlevel", levels=1),
                USER_ERRORS,
                ("levels",),
            ),
            ("models.get('nope')", lambda: models.get("nope"), USER_ERRORS, ("nope",)),
            (
                "TrainConfig(epochs=0)",
                lambda: train.TrainConfig(epochs=0),
                USER_ERRORS,
                ("epochs",),
            ),
            ("TrainConfig(lr='fast')", lambda: train.TrainConfig(lr="fast"), USER_ERRORS, ("lr",)),
            (
                "quantizers.get('nope')",
                lambda: lowbit.quantizers.get("nope"),
                USER_ERRORS,
                ("nope",),
            ),
            (
                "quantizers.get('nlevel', levels=1)",
                lambda: lowbit.quantizers.get("nlevel", levels=1),
                USER_ERRORS,
                ("levels",),
            ),
            (
                "lowbit.load(<missing file>)",
                lambda: lowbit.load(self.tmp() / "nope.lowbit"),
                USER_ERRORS + (OSError,),
                ("nope.lowbit",),
            ),
            (
                "lowbit.save(model, <a directory>)",
                lambda: lowbit.save(mlp(), self.tmp()),
                USER_ERRORS + (OSError,),
                ("directory",),
            ),
            (
                "Dataset with 3 images and 2 labels",
                lambda: data.Dataset(
                    "x",
                    torch.zeros(3, 1, 2, 2),
                    torch.zeros(2, dtype=torch.int64),
                    torch.zeros(1, 1, 2, 2),
                    torch.zeros(1, dtype=torch.int64),
                    2,
                ),
                USER_ERRORS,
                ("3", "2"),
            ),
            (
                "Dataset with label 7 of 2 classes",
                lambda: data.Dataset(
                    "x",
                    torch.zeros(2, 1, 2, 2),
                    torch.tensor([0, 7]),
                    torch.zeros(1, 1, 2, 2),
                    torch.zeros(1, dtype=torch.int64),
                    2,
                ),
                USER_ERRORS,
                ("0..1",),
            ),
            (
                "Dataset with float labels",
                lambda: data.Dataset(
                    "x",
                    torch.zeros(2, 1, 2, 2),
                    torch.zeros(2),
                    torch.zeros(1, 1, 2, 2),
                    torch.zeros(1, dtype=torch.int64),
                    2,
                ),
                USER_ERRORS,
                ("int64",),
            ),
        ]
        for name, fn, kinds, needles in cases:
            self.case(G, name, lambda f=fn, k=kinds, n=needles: api_error(f, k, *n))

    def processes(self) -> None:
        """Inputs that need a process of their own: closed pipes, Ctrl-C, unwritable paths."""
        G = "processes"
        py = [sys.executable, "-m", "lowbit"]

        def closed_pipe(argv: list[str]) -> tuple[str, str]:
            r, w = os.pipe()
            os.close(r)
            proc = subprocess.run(py + argv, stdout=w, stderr=subprocess.PIPE, timeout=300)
            os.close(w)
            if b"Traceback" in proc.stderr:
                return "traceback", proc.stderr.decode().strip().splitlines()[-1][:150]
            ok = proc.returncode == 141 and not proc.stderr
            return (
                ("correct", "quiet exit 141 (SIGPIPE), as Unix tools")
                if ok
                else ("cryptic error", f"exit {proc.returncode}: {proc.stderr[:120]!r}")
            )

        self.case(G, "lowbit data | (reader gone)", lambda: closed_pipe(["data"]))
        self.case(
            G,
            "lowbit study --dry-run --json | (reader gone)",
            lambda: closed_pipe(
                ["study", str(self._spec()), "--out", str(self.tmp() / "o"), "--dry-run", "--json"]
            ),
        )

        def ctrl_c_train() -> tuple[str, str]:
            out = self.tmp() / "r"
            argv = [*TRAIN, "--epochs", "400", "--width", "64", "--out", str(out)]  # last wins
            proc = subprocess.Popen(
                py + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
            )
            deadline = time.time() + 120
            while not (out / "checkpoint.safetensors").exists():
                if proc.poll() is not None or time.time() > deadline:
                    return "silent wrong", "training ended before the interrupt"
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGINT)
            code = proc.wait(60)
            err = proc.stderr.read().decode()
            if "Traceback" in err:
                return "traceback", err.strip().splitlines()[-1][:150]
            res = json.loads((out / "result.json").read_text())
            ok = code == 130 and res["status"] == "interrupted"
            return (
                ("correct", "exit 130, status interrupted, checkpoint kept")
                if ok
                else ("silent wrong", f"exit {code}, status {res['status']}")
            )

        self.case(G, "Ctrl-C during lowbit train", ctrl_c_train)

        if sys.platform.startswith("linux"):
            self._unwritable()

    def _unwritable(self) -> None:
        """Read-only folders and files, run in one child without root's file powers."""
        G = "unwritable paths"
        base = Path(tempfile.mkdtemp(prefix="lowbit-hostile-ro-"))
        try:
            spec = base / "s.toml"
            spec.write_text(SPEC)
            study = base / "study"
            assert run_cli(["study", spec, "--out", study, "--workers", "1"])[0] == 0
            run, locked = base / "run", base / "locked-run"
            shutil.copytree(self.run, run)
            shutil.copytree(self.run, locked)
            ro = base / "ro"
            ro.mkdir()
            unreadable = make_idx(base / "idx")
            cases = [
                ("train --out in a read-only folder", [*TRAIN, "--out", ro / "t"], ro / "t"),
                (
                    "pack -o in a read-only folder",
                    ["pack", run, "-o", ro / "m.lowbit"],
                    ro / "m.lowbit",
                ),
                ("study --out in a read-only folder", ["study", spec, "--out", ro / "s"], ro / "s"),
                ("report on a read-only study folder", ["report", study], study / "results.sqlite"),
                (
                    "train on an unreadable IDX file",
                    [
                        "train",
                        "--dataset",
                        "mnist",
                        "--data-dir",
                        unreadable,
                        "--epochs",
                        "1",
                        "--out",
                        base / "t2",
                    ],
                    unreadable / IDX["train_x"],
                ),
                (
                    "pack a run whose checkpoint is unreadable",
                    ["pack", locked, "-o", base / "m.lowbit"],
                    locked / "checkpoint.safetensors",
                ),
            ]
            for p in base.rglob("*"):
                p.chmod(0o777 if p.is_dir() else 0o666)
            base.chmod(0o777)
            for p in (ro, study):
                p.chmod(0o555)
            (study / "results.sqlite").chmod(0o444)
            (unreadable / IDX["train_x"]).chmod(0o000)
            (locked / "checkpoint.safetensors").chmod(0o000)
            script = (
                "import contextlib, io, json, sys\nfrom lowbit import cli\nres = []\n"
                "for argv in json.loads(sys.argv[1]):\n"
                "    err, out = io.StringIO(), io.StringIO()\n"
                "    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):\n"
                "        try:\n            code = cli.main(argv)\n"
                "        except SystemExit as e:\n            code = e.code\n"
                "        except BaseException as e:\n"
                "            import traceback\n            traceback.print_exc(file=err)\n"
                "            code = None\n"
                "    res.append([code, err.getvalue()])\nprint(json.dumps(res))\n"
            )
            proc = subprocess.run(
                [sys.executable, "-c", script, json.dumps([[str(a) for a in c[1]] for c in cases])],
                capture_output=True,
                text=True,
                timeout=600,
                cwd=base,
                env={**os.environ, "HOME": str(base)},
                preexec_fn=_drop_root_file_powers if os.geteuid() == 0 else None,
            )
            got = json.loads(proc.stdout)
            for (name, _, path), (code, err) in zip(cases, got, strict=True):
                self.case(
                    G,
                    name,
                    lambda c=code, e=err, p=path: judge_error(
                        c if c is not None else RuntimeError("escaped"), e, (str(p),)
                    ),
                )
        finally:
            for p in [base, *base.rglob("*")]:
                with contextlib.suppress(OSError):
                    p.chmod(0o777 if p.is_dir() else 0o666)
            shutil.rmtree(base, ignore_errors=True)


_ONE_SHAPE = (
    "name,kind,out_features,in_features,c_in,h,w,kernel,padding,batches,threads\n"
    "tiny,linear,64,64,,,,,,1,1\n"
)


def _drop_root_file_powers() -> None:
    """Drop CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH (root would ignore the permissions)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


# --- report ---------------------------------------------------------------------------------------


def write_report(results: list[Result], info: dict[str, str], wall_s: float) -> str:
    tally = {c: sum(r.outcome == c for r in results) for c in CLASSES}
    groups = sorted({r.group for r in results}, key=[r.group for r in results].index)
    lines = [
        "# Hostile inputs: bad files, flags, paths and interruptions",
        "",
        "Written by `python benchmarks/hostile_inputs.py` (the classes are defined in its",
        "docstring). Each input runs through the CLI in-process (`lowbit.cli.main`) or through",
        "the Python API; closed pipes, Ctrl-C and unwritable paths run in child processes (the",
        "latter without root's file powers). Interruptions of studies with workers (SIGINT,",
        "SIGKILL of the parent, two sweeps on one folder) are tested in",
        "`tests/test_study_signals.py`, which this table does not repeat.",
        "",
        environment.markdown(info).rstrip(),
        f"- numpy: {np.__version__}; lowbit: {lowbit.__version__}; wall time: {wall_s:.0f} s",
        "",
        f"**{len(results)} distinct inputs: "
        + ", ".join(f"{n} {c}" for c, n in tally.items())
        + ".**",
        "",
        "| group | inputs | " + " | ".join(CLASSES) + " |",
        "|---|---:|" + "---:|" * len(CLASSES),
    ]
    for gname in groups:
        rs = [r for r in results if r.group == gname]
        counts = " | ".join(str(sum(r.outcome == c for r in rs)) for c in CLASSES)
        lines.append(f"| {gname} | {len(rs)} | {counts} |")
    lines += [
        "",
        "## Every input",
        "",
        "| # | group | input | outcome | what lowbit said |",
        "|---:|---|---|---|---|",
    ]
    for i, r in enumerate(results, 1):
        detail = r.detail.replace("\n", " ")
        lines.append(f"| {i} | {r.group} | {r.name} | {r.outcome} | `{detail}` |")
    return "\n".join(lines) + "\n"


def main() -> int:
    torch.set_num_threads(1)
    t0 = time.time()
    info = environment.describe()
    with tempfile.TemporaryDirectory(prefix="lowbit-hostile-") as tmp:
        root = Path(tmp)
        os.environ["HOME"] = str(root / "home")
        os.environ.pop("LOWBIT_DATA", None)
        os.environ["CI"] = "1"  # no progress bars in captured output
        bench = Bench(root)
        for group in (
            bench.train_flags,
            bench.out_paths,
            bench.data_dirs,
            bench.idx_files,
            bench.cifar_files,
            bench.run_dirs,
            bench.pack_summary_verify,
            bench.studies,
            bench.reports,
            bench.bench_shapes,
            bench.api,
            bench.processes,
        ):
            group()
    text = write_report(bench.results, info, time.time() - t0)
    atomic_write(OUT, text)
    bad = [r for r in bench.results if r.outcome in ("traceback", "silent wrong")]
    print(f"{len(bench.results)} inputs; wrote {OUT}", file=sys.stderr)
    for r in bad:
        print(f"  {r.outcome}: {r.group}: {r.name}: {r.detail}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
