"""The README's examples run as written (on the synthetic dataset, for speed)."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from lowbit.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = "\n".join(_blocks("python"))
    code = code.replace('"fashion-mnist"', '"synthetic"').replace("epochs=5", "epochs=1")
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    lowbit = scope["lowbit"]
    # The claim the example makes in its comments: the file is the size the summary predicts.
    assert os.path.getsize("t3.lowbit") == lowbit.summary(scope["model"]).total_bytes


def _cli_lines() -> list[list[str]]:
    text = "\n".join(_blocks("sh")).replace("\\\n", " ")
    lines = []
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        for part in line.split("&&"):
            if part.strip().startswith("lowbit "):
                lines.append(shlex.split(part)[1:])
    return lines


@pytest.mark.parametrize("argv", _cli_lines(), ids=lambda a: " ".join(a[:2]))
def test_cli_examples_parse(argv):
    args = build_parser().parse_args(argv)
    assert args.func is not None
