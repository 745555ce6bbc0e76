"""Merging several vectors into one: a small registry of named methods.

Each method is a per-tensor function ``fn(stack, **params) -> tensor`` over the vectors' copies of
one tensor stacked on dim 0; ``merge(vectors, method, **params)`` checks that the vectors agree in
names and shapes and applies the method tensor by tensor. A new method is one decorated function
here and its test. Patching with a merged vector is the paper's patch: ``theta_R + lambda * merged``.
"""

from __future__ import annotations

import inspect
from typing import Callable, Mapping, Sequence

import torch

from .registry import Registry
from .vectors import WeightVector

MergeFn = Callable[..., torch.Tensor]
MERGE_METHODS: Registry[MergeFn] = Registry("merge method")
merge_method = MERGE_METHODS.register  # decorator: @merge_method("name") registers a per-tensor function


@merge_method("sum")
def merge_sum(stack: torch.Tensor) -> torch.Tensor:
    """Task arithmetic: the plain sum (the paper's patch with several vectors at one lambda)."""
    return stack.sum(dim=0)


@merge_method("mean")
def merge_mean(stack: torch.Tensor) -> torch.Tensor:
    """The average: keeps what the vectors share, shrinks what each has alone by 1/n."""
    return stack.mean(dim=0)


@merge_method("ties")
def merge_ties(stack: torch.Tensor, density: float = 0.2) -> torch.Tensor:
    """TIES-merging: keep each vector's ``density`` share of largest-magnitude entries, elect each
    entry's sign as the sign of the kept values' sum (a zero sum elects nothing: the entry is 0), and
    average the kept values that agree with it."""
    if not 0 < density <= 1:
        raise ValueError(f"ties: density must be in (0, 1], got {density}")
    flat = stack.reshape(stack.shape[0], -1)
    keep = max(1, round(density * flat.shape[1]))
    threshold = flat.abs().topk(keep, dim=1).values[:, -1:]
    trimmed = torch.where(flat.abs() >= threshold, flat, torch.zeros_like(flat))
    sign = torch.sign(trimmed.sum(dim=0, keepdim=True))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    count = agree.sum(dim=0)
    total = torch.where(agree, trimmed, torch.zeros_like(trimmed)).sum(dim=0)
    merged = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    return merged.reshape(stack.shape[1:])


def merge(vectors: Sequence[Mapping[str, torch.Tensor]], method: str = "mean", **params) -> WeightVector:
    """One vector from several with the named method; ``params`` go to it (e.g. ``density`` of ties)."""
    fn = MERGE_METHODS.lookup(method)
    allowed = set(inspect.signature(fn).parameters) - {"stack"}
    unknown = set(params) - allowed
    if unknown:
        raise ValueError(f"merge method {method!r} takes {sorted(allowed) or 'no parameters'}, not {sorted(unknown)}")
    vecs = [v if isinstance(v, WeightVector) else WeightVector(v) for v in vectors]
    if not vecs:
        raise ValueError("nothing to merge: give at least one vector")
    for v in vecs[1:]:
        vecs[0].check_compatible(v)
    return WeightVector({name: fn(torch.stack([v[name] for v in vecs]), **params) for name in vecs[0]})
