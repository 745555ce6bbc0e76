"""The machine labels that tables and the demo study attach to measured figures."""

import os
import subprocess
import sys

import torch

from qvlib import provenance


def test_cpu_model_reads_the_model_name_line(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineTest\nmodel name\t: Test CPU 9000 @ 1.00GHz\nflags\t: avx2\n")
    monkeypatch.setattr(provenance, "Path", lambda _: info)
    assert provenance.cpu_model() == "Test CPU 9000 @ 1.00GHz"


def test_cpu_label_names_the_kernel_path(monkeypatch):
    monkeypatch.setattr(provenance, "cpu_model", lambda: "Test CPU")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert provenance.cpu_label() == "Test CPU (AVX2)"


def test_cpu_label_follows_the_kernel_cap_of_the_environment():
    """ATEN_CPU_CAPABILITY=default makes torch run its generic kernels; the label must say so."""
    code = "from qvlib.provenance import cpu_label; print(cpu_label())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ATEN_CPU_CAPABILITY": "default"},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == f"{provenance.cpu_model()} (DEFAULT)"


def test_machine_line_names_cpu_cores_and_torch(monkeypatch):
    monkeypatch.setattr(provenance, "cpu_model", lambda: "Test CPU")
    line = provenance.machine_line()
    assert line.startswith(f"Test CPU, {os.cpu_count()} cores, ")
    assert f"torch {torch.__version__}" in line
