"""Bad input on the command line: exit 2, one line on stderr naming the user's path, no traceback
(or the correct behaviour where that is the answer). Python API misuse: a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lowbit
from lowbit import cli, data, train
from lowbit.errors import ConfigError, FormatError


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code: int, err: str, *needles: str) -> str:
    """Assert exit 2 and a single ``lowbit ...: error:`` line holding every needle."""
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("lowbit ")
    assert ": error: " in lines[0]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny finished training run (synthetic data, mlp 1x8, ternary, 1 epoch)."""
    out = tmp_path_factory.mktemp("run") / "t"
    code = cli.main(
        ["train", "--dataset", "synthetic", "--layer", "ternary", "--depth", "1", "--width", "8"]
        + ["--epochs", "1", "--out", str(out), "--json"]
    )
    assert code == 0
    return out


# --- OSError on a user path -------------------------------------------------------------------


def test_train_out_names_an_existing_file(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    code, _, err = _run(capsys, "train", "--dataset", "synthetic", "--out", f)
    _one_line_error(code, err, str(f), "not a folder")
    assert f.read_text() == "x"


def test_train_out_empty_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, "train", "--dataset", "synthetic", "--out", "")
    _one_line_error(code, err, "--out")
    assert list(tmp_path.iterdir()) == []  # nothing written into the current directory


def test_pack_output_is_an_existing_directory(run_dir, tmp_path, capsys):
    code, _, err = _run(capsys, "pack", run_dir, "-o", tmp_path)
    line = _one_line_error(code, err, str(tmp_path), "Is a directory")
    assert ".tmp" not in line
    assert list(tmp_path.iterdir()) == []


def test_report_on_a_file_that_is_not_sqlite(tmp_path, capsys):
    (tmp_path / "results.sqlite").write_bytes(b"this is not a database" * 100)
    code, _, err = _run(capsys, "report", tmp_path)
    _one_line_error(code, err, str(tmp_path / "results.sqlite"))


def test_report_on_an_empty_sqlite_database(tmp_path, capsys):
    import sqlite3

    sqlite3.connect(tmp_path / "results.sqlite").execute("CREATE TABLE t (a)").connection.close()
    code, _, err = _run(capsys, "report", tmp_path)
    _one_line_error(code, err, str(tmp_path / "results.sqlite"), "no study results")


def test_study_out_is_a_file(tmp_path, capsys):
    spec = tmp_path / "s.toml"
    spec.write_text('[grid]\nlayer = "ternary"\ndataset = "synthetic"\nepochs = 1\n')
    f = tmp_path / "f"
    f.write_text("x")
    code, _, err = _run(capsys, "study", spec, "--out", f, "--workers", "1")
    _one_line_error(code, err, str(f))


_AS_NOBODY = r"""
import contextlib, io, json, sys
from lowbit import cli
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except SystemExit as exc:
            code = exc.code
        except BaseException as exc:  # an escaped exception is a failure of this test
            code = f"raised {type(exc).__name__}: {exc}"
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def _without_root_file_powers() -> None:
    """In the child: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so
    root obeys file permissions after exec like any user."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # 24 = PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="permissions via Linux prctl")
def test_read_only_targets_for_train_pack_report_study(run_dir):
    """Targets the user cannot write: a read-only folder, a read-only database (as root, the
    child runs without the capabilities that let root ignore permissions)."""
    base = Path(tempfile.mkdtemp(prefix="lowbit-ro-"))
    try:
        study = base / "study"
        spec = base / "s.toml"
        spec.write_text('[grid]\nlayer = "ternary"\ndataset = "synthetic"\nepochs = 1\n')
        assert cli.main(["study", str(spec), "--out", str(study), "--workers", "1"]) == 0
        ro = base / "ro"
        ro.mkdir()
        ro_db = base / "rodb"
        ro_db.mkdir()
        (ro_db / "results.sqlite").write_bytes((study / "results.sqlite").read_bytes())
        cases = [
            ["train", "--dataset", "synthetic", "--epochs", "1", "--out", str(ro / "t")],
            ["pack", str(run_dir), "-o", str(ro / "m.lowbit")],
            ["study", str(spec), "--out", str(ro / "s"), "--workers", "1"],
            ["study", str(spec), "--out", str(ro_db), "--workers", "1"],
            ["report", str(study)],
        ]
        db = "results.sqlite"  # sqlite needs to write next to a WAL database, even to read it
        # the report fails on its database or, where sqlite could read it without writing, on
        # the report folder: either way a path in the read-only study folder
        paths = [ro / "t", ro / "m.lowbit", ro / "s", ro_db / db, study]
        for p in (base, study, spec, run_dir.parent, run_dir, *run_dir.iterdir()):
            p.chmod(0o755 if p.is_dir() else 0o644)
        for p in (ro, ro_db, ro_db / "results.sqlite", study):
            p.chmod(0o555 if p.is_dir() else 0o444)
        proc = subprocess.run(
            [sys.executable, "-c", _AS_NOBODY, json.dumps(cases)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "HOME": str(base)},
            cwd=base,
            preexec_fn=_without_root_file_powers if os.geteuid() == 0 else None,
        )
        assert proc.returncode == 0, proc.stderr
        for (code, err), path in zip(json.loads(proc.stdout), paths, strict=True):
            _one_line_error(code, err, str(path))
    finally:
        for p in base.rglob("*"):
            if p.is_dir():
                p.chmod(0o755)
        subprocess.run(["rm", "-rf", str(base)], check=False)


def test_bench_out_a_directory_is_refused_before_measuring(tmp_path, capsys):
    code, _, err = _run(capsys, "bench", "kernels", "--quick", "--out", tmp_path)
    _one_line_error(code, err, str(tmp_path), "Is a directory")
    assert list(tmp_path.iterdir()) == []


def test_broken_pipe_is_quiet(tmp_path):
    r, w = os.pipe()
    os.close(r)  # the reader is gone before lowbit writes (as `lowbit data | head -0`)
    proc = subprocess.run(
        [sys.executable, "-m", "lowbit", "data"], stdout=w, stderr=subprocess.PIPE, timeout=120
    )
    os.close(w)
    assert b"Traceback" not in proc.stderr and b"BrokenPipe" not in proc.stderr
    assert proc.stderr == b"" and proc.returncode == 141


# --- values that do not fit ---------------------------------------------------------------------


@pytest.mark.parametrize("shape, needle", [("3,32,32", "does not fit"), ("0,1,1", "C,H,W")])
def test_summary_input_shape_that_does_not_fit(run_dir, capsys, shape, needle):
    code, _, err = _run(capsys, "summary", run_dir, "--input-shape", shape)
    _one_line_error(code, err, needle)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("name,kind\nx,linear\n", "missing column"),
        (
            "name,kind,out_features,in_features,c_in,h,w,kernel,padding,batches,threads\n",
            "no shapes",
        ),
        (
            "name,kind,out_features,in_features,c_in,h,w,kernel,padding,batches,threads\n"
            "x,linear,many,16,,,,,,1,all\n",
            "row 1",
        ),
        (
            "name,kind,out_features,in_features,c_in,h,w,kernel,padding,batches,threads\n"
            "x,linear,16,16,,,,,,0,all\n",
            "batches",
        ),
    ],
)
def test_bench_shapes_malformed_csv(tmp_path, capsys, text, needle):
    f = tmp_path / "shapes.csv"
    f.write_text(text)
    code, out, err = _run(capsys, "bench", "kernels", "--shapes", f)
    _one_line_error(code, err, str(f), needle)
    assert out == ""


def _idx(path: Path, arr) -> None:
    import numpy as np

    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    path.write_bytes(header + arr.tobytes())


def test_train_and_test_images_of_different_sizes_fail_at_load(tmp_path, capsys):
    import numpy as np

    folder = tmp_path / "mnist"
    folder.mkdir()
    _idx(folder / "train-images-idx3-ubyte", np.zeros((8, 32, 32)))
    _idx(folder / "train-labels-idx1-ubyte", np.arange(8) % 10)
    _idx(folder / "t10k-images-idx3-ubyte", np.zeros((4, 28, 28)))
    _idx(folder / "t10k-labels-idx1-ubyte", np.arange(4))
    code, _, err = _run(
        capsys, "train", "--dataset", "mnist", "--data-dir", folder, "--out", tmp_path / "r"
    )
    _one_line_error(code, err, str(folder / "train-images-idx3-ubyte"), "do not belong together")
    assert not (tmp_path / "r").exists()  # refused before any training


def test_data_dir_that_does_not_exist(tmp_path, capsys):
    code, _, err = _run(
        capsys, "train", "--data-dir", tmp_path / "nope", "--out", tmp_path / "r", "--epochs", "1"
    )
    _one_line_error(code, err, str(tmp_path / "nope"), "does not exist")


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--layer", "linear"], "layer"),
        (["--layer", "nlevel", "--levels", "5"], "layer"),
        (["--width", "16"], "width"),
        (["--depth", "2"], "depth"),
    ],
)
def test_resume_with_another_model_is_refused(run_dir, tmp_path, capsys, flags, needle):
    import shutil

    rd = tmp_path / "copy"
    shutil.copytree(run_dir, rd)
    before = (rd / "config.json").read_text()
    base = {"--layer": "ternary", "--depth": "1", "--width": "8"}
    for k, v in zip(flags[::2], flags[1::2], strict=True):
        base[k] = v
    argv = ["train", "--dataset", "synthetic", "--epochs", "2", "--out", rd]
    argv += [x for kv in base.items() for x in kv] + flags[len(base) * 2 :]
    code, _, err = _run(capsys, *argv)
    _one_line_error(code, err, str(rd), needle, "another model")
    assert (rd / "config.json").read_text() == before  # not rewritten


def test_rerun_says_resuming_or_already_finished(run_dir, tmp_path, capsys):
    import shutil

    rd = tmp_path / "copy"
    shutil.copytree(run_dir, rd)
    argv = ["train", "--dataset", "synthetic", "--layer", "ternary", "--depth", "1", "--width"]
    argv += ["8", "--out", rd]
    code, _, err = _run(capsys, *argv, "--epochs", "1")
    assert code == 0 and "already finished" in err and "nothing trained" in err
    code, _, err = _run(capsys, *argv, "--epochs", "2")
    assert code == 0 and "resuming at epoch 2/2" in err and "epoch 2/2" in err


def test_study_ray_backend_without_ray_creates_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    spec = tmp_path / "s.toml"
    spec.write_text('[grid]\nlayer = "ternary"\ndataset = "synthetic"\nepochs = 1\n')
    code, _, err = _run(capsys, "study", spec, "--out", tmp_path / "o", "--backend", "ray")
    _one_line_error(code, err, "pip install 'lowbit[ray]'")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("key, value", [("width", 200_000), ("classes", 10**9), ("depth", 10**6)])
def test_pack_refuses_a_checkpoint_spec_out_of_bounds(run_dir, tmp_path, capsys, key, value):
    """``load_trained`` checks the recorded spec before allocating the model it describes."""
    spec = json.loads((run_dir / "config.json").read_text())["model"]
    spec["kwargs"][key] = value
    tensors = {"model.x": torch.zeros(1)}
    meta = {"format": "lowbit-checkpoint", "version": "1", "model_spec": json.dumps(spec)}
    ckpt = tmp_path / "checkpoint.safetensors"
    save_file(tensors, str(ckpt), metadata=meta)
    code, _, err = _run(capsys, "pack", ckpt, "-o", tmp_path / "m.lowbit")
    _one_line_error(code, err, str(ckpt))


def test_pack_refuses_a_spec_that_does_not_match_the_tensors(run_dir, tmp_path, capsys):
    spec = json.loads((run_dir / "config.json").read_text())["model"]
    spec["kwargs"]["width"] = 4096  # within bounds, but the file holds width 8
    meta = {"format": "lowbit-checkpoint", "version": "1", "model_spec": json.dumps(spec)}
    ckpt = tmp_path / "checkpoint.safetensors"
    save_file({"model.x": torch.zeros(1)}, str(ckpt), metadata=meta)
    with pytest.raises(FormatError, match="does not fit its model spec"):
        lowbit.checkpoint.load_trained(ckpt)


# --- Python API ----------------------------------------------------------------------------------


def test_quantize_needs_a_qatconfig():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="QATConfig"):
        lowbit.quantize_(model, "ternary")


def test_fit_refuses_data_that_does_not_fit_the_model(tmp_path):
    ds = data.synthetic(n_train=16, n_test=8)  # (1, 8, 8), 4 classes
    wrong_shape = lowbit.models.get("mlp", depth=1, width=8, input_shape=(1, 28, 28), classes=4)
    with pytest.raises(ConfigError, match="does not take synthetic's images"):
        train.fit(wrong_shape, ds, train.TrainConfig(epochs=1), progress=False)
    wrong_classes = lowbit.models.get("mlp", depth=1, width=8, input_shape=(1, 8, 8), classes=10)
    with pytest.raises(ConfigError, match="4 classes"):
        train.fit(wrong_classes, ds, train.TrainConfig(epochs=1), progress=False)


def test_fit_run_dir_that_is_a_file(tmp_path):
    ds = data.synthetic(n_train=16, n_test=8)
    model = lowbit.models.get("mlp", depth=1, width=8, input_shape=(1, 8, 8), classes=4)
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        train.fit(model, ds, train.TrainConfig(epochs=1), run_dir=f, progress=False)
    with pytest.raises(ConfigError, match="empty"):
        train.fit(model, ds, train.TrainConfig(epochs=1), run_dir="", progress=False)


def test_fit_prints_epoch_lines_by_default(capsys):
    ds = data.synthetic(n_train=16, n_test=8)
    model = lowbit.models.get("mlp", depth=1, width=8, input_shape=(1, 8, 8), classes=4)
    train.fit(model, ds, train.TrainConfig(epochs=2))
    err = capsys.readouterr().err
    assert "epoch 1/2" in err and "epoch 2/2" in err
    train.fit(model, ds, train.TrainConfig(epochs=1), progress=False)
    assert capsys.readouterr().err == ""


def test_run_config_records_the_data_folder_and_digest(tmp_path):
    import numpy as np

    folder = tmp_path / "mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    _idx(folder / "train-images-idx3-ubyte", rng.integers(0, 255, (16, 8, 8)))
    _idx(folder / "train-labels-idx1-ubyte", np.arange(16) % 10)
    _idx(folder / "t10k-images-idx3-ubyte", rng.integers(0, 255, (8, 8, 8)))
    _idx(folder / "t10k-labels-idx1-ubyte", np.arange(8))
    ds = data.load("mnist", data_dir=folder)
    model = lowbit.models.get("mlp", depth=1, width=8, input_shape=(1, 8, 8), classes=10)
    train.fit(model, ds, train.TrainConfig(epochs=1), run_dir=tmp_path / "r", progress=False)
    recorded = json.loads((tmp_path / "r" / "config.json").read_text())["data"]
    assert recorded["source"] == str(folder) and len(recorded["digest"]) == 64
    # other content under the same name and sizes: the resume is refused
    _idx(folder / "t10k-labels-idx1-ubyte", np.arange(8)[::-1])
    other = data.load("mnist", data_dir=folder)
    assert other.digest != ds.digest
    with pytest.raises(ConfigError, match="other data"):
        train.fit(model, other, train.TrainConfig(epochs=2), run_dir=tmp_path / "r")
