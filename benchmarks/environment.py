"""The machine, versions, date and load of a benchmark run, for the header of a results file."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys

import torch

from lowbit.kernels import bench


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load() -> str:
    """The 1/5/15-minute load averages (the machine is shared: this shows the contention)."""
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def describe() -> dict[str, str]:
    return {
        "date (UTC)": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
        "machine": f"{bench.cpu()}, {os.cpu_count()} logical CPUs, {platform.system()}",
        "python": sys.version.split()[0],
        "torch": f"{torch.__version__} ({torch.get_num_threads()} threads in this process)",
        "lowbit commit": _commit(),
        "load average at start": load(),
    }


def markdown(info: dict[str, str]) -> str:
    return "\n".join(f"- {k}: {v}" for k, v in info.items()) + "\n"
