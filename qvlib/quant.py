"""Symmetric weight fake quantization (the paper's Eq. 1-3) and which parameters it applies to.

For a bit-width ``b`` the integer grid is ``[-2^(b-1), 2^(b-1) - 1]`` and the scale of a
block (an output channel, a group of input columns, or the whole tensor) is
``max|W_block| / (2^(b-1) - 1)``. At 3 bits that is ``absmax / 3`` with integers in
``[-4, 3]``: the paper's operator, not torchao's ``absmax / 3.5``.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping, Sequence

import torch

from .registry import Registry

# The torch-free pieces live in qvlib.sections (the workflow's DAG reads them without torch); they are
# re-exported here, where every module has always imported them from.
from .sections import (  # noqa: F401
    DEFAULT_POLICY,
    GRANULARITIES,
    HEAD_PREFIX,
    SCOPES,
    VIT_BLOCK_LINEARS,
    Granularity,
    QuantPolicy,
    QuantSpec,
    Scope,
)

# How a block's scale is chosen: name -> fn(blocks (B, E) float32, spec) -> scales (B, 1). A new
# data-free quantizer is one function here (with @register_scale) and its test; QuantSpec(scale=name)
# and the config's `quant: {scale: name}` then reach it everywhere (training STE, PTQ, patching).
# QuantSpec knows the builtin names without this module (qvlib.sections.BUILTIN_SCALES) and any other
# registered here once it is loaded.
ScaleFn = Callable[[torch.Tensor, "QuantSpec"], torch.Tensor]
SCALES: Registry[ScaleFn] = Registry("scale")
register_scale = SCALES.register


@register_scale("absmax")
def absmax_scale(blocks: torch.Tensor, spec: "QuantSpec") -> torch.Tensor:
    """The paper's scale (Eq. 2): the block's largest magnitude maps to the largest positive integer."""
    return blocks.abs().amax(dim=1, keepdim=True) / spec.qmax


# Clipping ratios the ``mse`` scale tries: 0.20, 0.22, ..., 1.00 of the block's absmax (1.0 is absmax itself).
MSE_RATIOS: tuple[float, ...] = tuple(round(0.2 + 0.02 * i, 2) for i in range(41))


def clipped_scale(blocks: torch.Tensor, spec: "QuantSpec", ratios: Sequence[float]) -> torch.Tensor:
    """Per block, ``ratio * absmax / qmax`` for the ratio of ``ratios`` whose round-to-nearest
    quantization has the least squared reconstruction error (ties: the larger ratio, nearer absmax).
    With 1.0 among the ratios the error is never above absmax's."""
    if not ratios:
        raise ValueError("the clipping grid is empty")
    base = absmax_scale(blocks, spec)
    safe = torch.where(base > 0, base, torch.ones_like(base))
    best_err = best = None
    for ratio in sorted(ratios, reverse=True):  # strict < below keeps the larger ratio on ties
        scale = safe * ratio
        err = (torch.clamp(torch.round(blocks / scale), spec.qmin, spec.qmax) * scale - blocks).pow(2).sum(dim=1, keepdim=True)
        if best is None:
            best_err, best = err, scale
        else:
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, scale, best)
    return torch.where(base > 0, best, base)


@register_scale("mse")
def mse_scale(blocks: torch.Tensor, spec: "QuantSpec") -> torch.Tensor:
    """Data-free clipping: the absmax scale shrunk by the ratio of :data:`MSE_RATIOS` that minimises
    the block's squared weight reconstruction error. At 2 bits absmax rounds every weight below
    absmax/2 to zero; clipping the few largest weights keeps more of the rest."""
    return clipped_scale(blocks, spec, MSE_RATIOS)


@register_scale("hqq")
def hqq_scale(blocks: torch.Tensor, spec: "QuantSpec") -> torch.Tensor:
    """HQQ's calibration-free scale fit (half-quadratic quantization, scale only, symmetric), as
    torchao implements it: per block, the scale is refined by alternating a sparsity-promoting
    estimate of the quantization error (an lp norm, p < 1, so a few large weights may be clipped)
    with a closed-form scale update. The codes are then the round-to-nearest ones of that scale, on
    the paper's symmetric integer grid, like every other scale here."""
    # torchao keeps this fit private (no public wrapper takes qmin/qmax); the version is pinned in pyproject.toml
    from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_scale_only_hqq as fit

    _, scale = fit(blocks.float(), [1, blocks.shape[1]], spec.qmin, spec.qmax)
    return scale.float().reshape(-1, 1)


def _blocks(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View ``w`` as (blocks, elements per block); every block gets one scale."""
    if spec.granularity == "tensor":
        return w.reshape(1, -1)
    if w.dim() < 2:
        raise ValueError(f"granularity {spec.granularity!r} needs a weight of 2+ dims, got shape {tuple(w.shape)}")
    rows = w.reshape(w.shape[0], -1)
    if spec.granularity == "channel":
        return rows
    if rows.shape[1] % spec.group_size:
        raise ValueError(
            f"group_size {spec.group_size} does not divide the {rows.shape[1]} input columns of a weight of shape {tuple(w.shape)}"
        )
    return rows.reshape(-1, spec.group_size)


def _codes(blocks: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Float integer codes and scales of a (blocks, elements) float32 view.

    All-zero blocks get scale 1 so that their codes are 0 and they dequantize to exactly 0.
    """
    scale = SCALES[spec.scale](blocks, spec)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(torch.round(blocks / scale), spec.qmin, spec.qmax), scale


def quantize(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (int8, shape of ``w``) and per-block scales (float32, shape (blocks, 1))."""
    codes, scale = _codes(_blocks(w.detach(), spec).float(), spec)
    return codes.to(torch.int8).reshape(w.shape), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, spec: QuantSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (_blocks(codes, spec).float() * scale).reshape(codes.shape).to(dtype)


def fake_quant(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``dequantize(quantize(w))`` in one pass: same shape and dtype as ``w``, no gradient."""
    with torch.no_grad():
        codes, scale = _codes(_blocks(w, spec).float(), spec)
        return (codes * scale).reshape(w.shape).to(w.dtype)


def fake_quant_ste(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake quantization whose gradient is the identity (straight-through estimator)."""
    return w + (fake_quant(w, spec) - w).detach()


def layer_type(name: str) -> str:
    """The layer kind of a block linear parameter name (``qkv``, ``proj``, ``fc1``, ``fc2``), else ``other``."""
    match = re.search(r"\.(qkv|proj|fc1|fc2)\.weight$", name)
    return match.group(1) if match else "other"


def quantized_patch(base: Mapping[str, torch.Tensor], names: Iterable[str], spec: QuantSpec | None,
                    vector: Mapping[str, torch.Tensor] | None = None, lam: float = 0.0) -> dict[str, torch.Tensor]:
    """``Q(theta + lam * rho)`` for the quantized ``names``, and ``theta + lam * rho`` unquantized for
    every other tensor the vector carries (scope ``all``: biases, norms, embeddings). ``spec`` None
    leaves everything unquantized."""
    names = list(names)
    quantized = set(names)
    patched = names + [n for n in (vector or {}) if n not in quantized]
    out = {}
    for n in patched:
        if n not in base:
            raise KeyError(f"the vector holds {n!r}, which the receiver does not have")
        w = base[n]
        if vector is not None and lam != 0.0 and n in vector:
            w = w + lam * vector[n]
        out[n] = fake_quant(w, spec) if spec is not None and n in quantized else w
    return out


def fake_quant_state(
    state: Mapping[str, torch.Tensor], spec: QuantSpec, policy: QuantPolicy = DEFAULT_POLICY
) -> dict[str, torch.Tensor]:
    """A copy of ``state`` with every policy-selected tensor fake-quantized, the rest unchanged."""
    return {name: fake_quant(t, spec) if policy.matches(name, t) else t for name, t in state.items()}
