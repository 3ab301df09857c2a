"""The machine, versions, date and load of a benchmark run, for the header of a results file."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch


# (vendor, family, model) -> core; only the kinds these machines have shown. A virtual machine may
# report its model name as just "AMD EPYC", which does not tell a Zen 2 from a Zen 4.
_CORES = {
    ("AuthenticAMD", 23, 49): "Zen 2",
    ("AuthenticAMD", 25, 1): "Zen 3",
    ("AuthenticAMD", 25, 17): "Zen 4",
    ("GenuineIntel", 6, 143): "Sapphire Rapids",
    ("GenuineIntel", 6, 207): "Emerald Rapids",
}
# cpuinfo flag -> what a results file says of it (the kernels' dispatch depends on these)
_ISA = (
    ("avx2", "AVX2"),
    ("avx512f", "AVX-512"),
    ("avx512_vnni", "VNNI"),
    ("avx512_vpopcntdq", "VPOPCNTDQ"),
    ("amx_tile", "AMX"),
)


def _cpu() -> str:
    """'model name (core, family F model M; ISA extensions)' from /proc/cpuinfo."""
    try:
        fields: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first CPU is enough
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        return platform.processor() or platform.machine()
    name = fields.get("model name", platform.machine())
    family, model = fields.get("cpu family", "?"), fields.get("model", "?")
    key = (
        fields.get("vendor_id", ""),
        int(family) if family.isdigit() else -1,
        int(model) if model.isdigit() else -1,
    )
    flags = set(fields.get("flags", "").split())
    isa = ", ".join(label for flag, label in _ISA if flag in flags) or "no AVX2"
    core = f"{_CORES[key]}, " if key in _CORES else ""
    return f"{name} ({core}family {family} model {model}; {isa})"


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
        "machine": f"{_cpu()}, {os.cpu_count()} logical CPUs, {platform.system()}",
        "python": sys.version.split()[0],
        "torch": f"{torch.__version__} ({torch.get_num_threads()} threads in this process)",
        "lowbit commit": _commit(),
        "load average at start": load(),
    }


def markdown(info: dict[str, str]) -> str:
    return "\n".join(f"- {k}: {v}" for k, v in info.items()) + "\n"
