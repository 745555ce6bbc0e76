"""The arithmetic of training and evaluation forwards: one rule for both (the CPU always runs fp32)."""

from __future__ import annotations

import contextlib

import torch

from .vocab import Precision


def check_precision(precision: str) -> str:
    """``precision`` if it names a :class:`Precision`, else a ValueError that lists the choices."""
    if precision not in tuple(Precision):
        raise ValueError(f"precision must be one of {', '.join(Precision)}, got {precision!r}")
    return precision


def autocast_for(device: torch.device, precision: str):
    """bfloat16 autocast on a CUDA device when ``precision`` is bf16; otherwise plain fp32."""
    if device.type == "cuda" and precision == Precision.BF16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
