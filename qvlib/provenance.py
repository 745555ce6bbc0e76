"""Where a figure was measured: the machine line every summary carries."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` reports."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_label() -> str:
    """The CPU's model and the instruction set torch's CPU kernels dispatch to (e.g. AVX512, AVX2): two
    machines that differ in either can train the same config and seed to different weights."""
    return f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()})"


def machine_line() -> str:
    """One line naming the CPU, its cores, the GPU if any, and the torch version."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu_model()}, {os.cpu_count()} cores, {gpu}; {platform.system()} {platform.machine()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")
