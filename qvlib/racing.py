"""A racing lambda search: successive halving over nested, class-stratified subsamples of a split.

Every lambda of the grid is scored on a small subsample; the best fraction (and lambda = 1, the
paper's default, on the split whose lambda = 1 accuracy a table reads) goes on to a subsample twice as large, which contains the
previous one, so each survivor only pays for the new images; the last survivors see the whole split
and the best of them is chosen (ties: the lambda nearest 1, then the smaller). Accuracy against
lambda need not be unimodal: every lambda gets the same first look, unlike a golden-section search.

A lambda outside the best fraction is still kept while the round's best does not beat it by more
than ``margin`` standard errors of their *paired* difference (less an indifference ``tolerance``): both are scored on the same images,
so the difference's error comes only from the images on which the two disagree, far fewer than a
binomial error of each accuracy would suggest. Two lambdas that agree on every image so far are
not a near-tie worth paying for: either is as good, and rank decides. ``forwards`` counts the image
forwards spent, for comparison with the dense grid's ``len(grid) * n``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from .data.registry import stable_seed
from .vocab import Split


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


def _rank_key(lam: float, right: int) -> tuple:
    return (-right, abs(lam - 1.0), lam)


class Race:
    """The state of one race: which images each lambda has been scored on, and its answers.

    ``score(lam, indices)`` returns, per image at ``indices`` (a bool tensor of the same length),
    whether the model patched with ``lam`` classifies it correctly."""

    def __init__(self, score: Callable[[float, torch.Tensor], torch.Tensor], grid: Sequence[float], labels: torch.Tensor,
                 seed: int = 0):
        self.grid = sorted({float(g) for g in grid})
        if not self.grid:
            raise ValueError("the lambda grid is empty")
        self.n = len(labels)
        if self.n == 0:
            raise ValueError("the split is empty")
        self.score = score
        self.order = stratified_order(labels, seed)
        self.right = {lam: torch.zeros(0, dtype=torch.bool) for lam in self.grid}  # answers in race order
        self.forwards = 0

    def seen(self, lam: float) -> int:
        return len(self.right[lam])

    def extend(self, lam: float, size: int) -> None:
        """Score ``lam`` on the first ``size`` images of the race order (only those it has not seen)."""
        new = self.order[self.seen(lam):size]
        if len(new):
            answers = torch.as_tensor(self.score(lam, new)).bool().cpu().flatten()
            if len(answers) != len(new):
                raise ValueError(f"score returned {len(answers)} answers for {len(new)} images")
            self.right[lam] = torch.cat([self.right[lam], answers])
            self.forwards += len(new)

    def correct(self, lam: float) -> int:
        return int(self.right[lam].sum())


@dataclass
class RaceResult:
    """The chosen lambda, and the race behind it: ``seen`` and ``correct`` per lambda, ``forwards`` in all."""

    best_lambda: float
    race: Race

    @property
    def n(self) -> int:
        return self.race.n

    @property
    def best_correct(self) -> int:  # on the whole split
        return self.race.correct(self.best_lambda)

    @property
    def forwards(self) -> int:
        return self.race.forwards

    @property
    def seen(self) -> dict[float, int]:
        return {lam: self.race.seen(lam) for lam in self.race.grid}

    @property
    def correct(self) -> dict[float, int]:
        return {lam: self.race.correct(lam) for lam in self.race.grid}

    def dense_forwards(self) -> int:
        return len(self.race.grid) * self.n

    def complete(self, lam: float) -> int:
        """Score ``lam`` on the rest of the split (a lambda another rule picked); its correct answers."""
        if lam not in self.race.right:
            raise ValueError(f"lambda {lam} is not in the race's grid {self.race.grid}")
        self.race.extend(lam, self.n)
        return self.race.correct(lam)


def race_lambda(score: Callable[[float, torch.Tensor], torch.Tensor], grid: Sequence[float], labels: torch.Tensor,
                start: int | None = None, keep: float = 1 / 3, margin: float = 2.0, tolerance: float = 0.0, seed: int = 0,
                keep_lambda: float | None = 1.0) -> RaceResult:
    """Successive halving over ``grid`` (see the module docstring); the first round sees ``start``
    images (default: a sixteenth of the split, at least 32). ``keep_lambda`` (default 1, the paper's
    lambda) stays in the race to the whole split whatever its rank; None keeps none. ``tolerance``
    (accuracy points) is an indifference zone: a lambda is kept by the margin test only while it
    could beat the round's best by more than that, so near-ties are not paid for."""
    if not 0 < keep < 1:
        raise ValueError(f"keep must be in (0, 1), got {keep}")
    race = Race(score, grid, labels, seed)
    n, alive = race.n, list(race.grid)
    size = min(max(1, start if start is not None else max(32, n // 16)), n)
    while True:
        for lam in alive:
            race.extend(lam, size)
        if size >= n or len(alive) == 1:
            break
        ranked = sorted(alive, key=lambda lam: _rank_key(lam, race.correct(lam)))
        leader = race.right[ranked[0]].float()
        survivors = set(ranked[:max(1, math.ceil(keep * len(alive)))])
        for lam in ranked:
            diff = leader - race.right[lam].float()
            if diff.abs().sum() and diff.mean() + tolerance / 100 <= margin * diff.std() / math.sqrt(size):
                survivors.add(lam)
        if keep_lambda in alive:
            survivors.add(keep_lambda)
        alive = [lam for lam in alive if lam in survivors]
        size = min(2 * size, n)
    finalists = [lam for lam in alive if race.seen(lam) == n] or alive
    result = RaceResult(min(finalists, key=lambda lam: _rank_key(lam, race.correct(lam))), race)
    result.complete(result.best_lambda)  # only one lambda was left before the whole split: finish it
    return result


def race_splits(score: Callable[[str, float, torch.Tensor], torch.Tensor], grid: Sequence[float],
                labels: Mapping[str, torch.Tensor], finish_on_test: Sequence[float] = (), seed: int = 0,
                **options) -> dict[str, RaceResult]:
    """One race per split of a cell's vector, as the tables read them: on ``test`` lambda = 1 reaches
    the whole split (the lambda = 1 rule) and the race's pick is the oracle; on ``calib`` nothing is
    kept by force, its pick is scored on the whole test split, like each of ``finish_on_test`` (the
    data-free criteria's picks). ``score(split, lam, indices)`` answers per image."""
    races = {}
    for split, split_labels in labels.items():
        on_test = split == Split.TEST
        races[split] = race_lambda(lambda lam, idx, split=split: score(split, lam, idx), grid, split_labels,
                                   seed=stable_seed("race", split, seed), keep_lambda=1.0 if on_test else None, **options)
    if Split.TEST in races:
        for lam in [*([races[Split.CALIB].best_lambda] if Split.CALIB in races else []), *finish_on_test]:
            races[Split.TEST].complete(lam)
    return races
