"""Atomic writes: leftovers of a killed writer are cleaned on the next write; errors name the
destination, never the temporary file."""

from __future__ import annotations

import os

import pytest

from lowbit.files import atomic_write


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path):
    dead = tmp_path / ".out.json.4194305.deadbeef.tmp"  # above Linux's largest pid: never alive
    live = tmp_path / f".out.json.{os.getppid()}.cafecafe.tmp"  # a writer that is still running
    other = tmp_path / ".other.json.4194305.deadbeef.tmp"  # another destination's: not ours
    for p in (dead, live, other):
        p.write_bytes(b"partial")
    atomic_write(tmp_path / "out.json", "{}")
    assert (tmp_path / "out.json").read_text() == "{}"
    assert not dead.exists() and live.exists() and other.exists()


def test_errors_name_the_destination(tmp_path):
    with pytest.raises(IsADirectoryError) as err:
        atomic_write(tmp_path, b"x")
    assert err.value.filename == str(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        atomic_write(tmp_path / "missing" / "f", b"x")
    assert err.value.filename == str(tmp_path / "missing" / "f")
    assert list(tmp_path.iterdir()) == []
