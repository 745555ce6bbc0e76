"""A racing lambda search: successive halving over nested, class-stratified subsamples of a split.

Every lambda of the grid is scored on a small subsample; the best fraction (and lambda = 1, the
paper's default, while it is in the grid) goes on to a subsample twice as large, which contains the
previous one, so each survivor only pays for the new images; the last survivors see the whole split
and the best of them is chosen (ties: the lambda nearest 1, then the smaller). Accuracy against
lambda need not be unimodal: every lambda gets the same first look, unlike a golden-section search.

A lambda is also kept, whatever its rank, while its accuracy is within ``margin`` standard errors
of the round's best (a binomial standard error on the images seen so far), so a near-tie is not
decided on a few dozen images. ``forwards`` counts the image forwards spent, for comparison with
the dense grid's ``len(grid) * n``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch


@dataclass
class RaceResult:
    best_lambda: float
    best_correct: int  # on the whole split
    n: int  # images in the split
    forwards: int  # image forwards spent by the race
    seen: dict[float, int] = field(default_factory=dict)  # lambda -> images it was scored on

    def dense_forwards(self) -> int:
        return len(self.seen) * self.n


def stratified_order(labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A permutation of ``range(len(labels))`` whose every prefix holds the classes in about their
    proportions: each class is shuffled, then classes are interleaved by each image's rank within
    its class divided by the class size."""
    gen = torch.Generator().manual_seed(seed)
    labels = labels.long().cpu()
    position = torch.empty(len(labels), dtype=torch.float64)
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        perm = idx[torch.randperm(len(idx), generator=gen)]
        position[perm] = (torch.arange(len(idx), dtype=torch.float64) + 0.5) / len(idx)
    jitter = torch.rand(len(labels), generator=gen, dtype=torch.float64) * 1e-9  # breaks ties between classes
    return torch.argsort(position + jitter, stable=True)


def race_lambda(score: Callable[[float, torch.Tensor], int], grid: Sequence[float], labels: torch.Tensor,
                start: int | None = None, keep: float = 1 / 3, margin: float = 1.0, seed: int = 0) -> RaceResult:
    """Successive halving over ``grid``. ``score(lam, indices)`` returns how many of the images at
    ``indices`` the model patched with ``lam`` classifies correctly. The first round sees ``start``
    images (default: a sixteenth of the split, at least 32)."""
    grid = sorted({float(g) for g in grid})
    if not grid:
        raise ValueError("the lambda grid is empty")
    if not 0 < keep < 1:
        raise ValueError(f"keep must be in (0, 1), got {keep}")
    n = len(labels)
    if n == 0:
        raise ValueError("the split is empty")
    order = stratified_order(labels, seed)
    correct = {lam: 0 for lam in grid}
    seen = {lam: 0 for lam in grid}
    alive = list(grid)
    size = min(max(1, start if start is not None else max(32, n // 16)), n)
    forwards = 0
    while True:
        for lam in alive:
            new = order[seen[lam]:size]
            if len(new):
                correct[lam] += int(score(lam, new))
                forwards += len(new)
                seen[lam] = size
        if size >= n or len(alive) == 1:
            break
        acc = {lam: correct[lam] / size for lam in alive}
        best = max(acc.values())
        stderr = math.sqrt(max(best * (1 - best), 1.0 / size) / size)
        ranked = sorted(alive, key=lambda lam: (-acc[lam], abs(lam - 1.0), lam))
        survivors = set(ranked[:max(1, math.ceil(keep * len(alive)))])
        survivors |= {lam for lam in alive if acc[lam] >= best - margin * stderr}
        if 1.0 in alive:
            survivors.add(1.0)
        alive = [lam for lam in alive if lam in survivors]
        size = min(2 * size, n)
    finalists = [lam for lam in alive if seen[lam] == n] or alive
    best_lambda = max(finalists, key=lambda lam: (correct[lam], -abs(lam - 1.0), -lam))
    if seen[best_lambda] < n:  # only one lambda was left before the whole split: finish it
        rest = order[seen[best_lambda]:]
        correct[best_lambda] += int(score(best_lambda, rest))
        forwards += len(rest)
        seen[best_lambda] = n
    return RaceResult(best_lambda, correct[best_lambda], n, forwards, seen)
