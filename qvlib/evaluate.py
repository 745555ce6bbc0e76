"""Top-1 accuracy of quantized, patched models: the engine behind baselines and the transfer grid.

The receiver's split lives on the device as uint8 for the whole job; each (donor, lambda) cell
computes ``Q(theta_R + lambda * rho_D)`` on the device in one pass over the quantized tensors
and runs the frozen model with those weights swapped in (``torch.func.functional_call``), so no
model is rebuilt and no file is read per cell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch

from .data.base import Preprocess
from .precision import autocast_for, check_precision
from .quant import QuantSpec, quantized_patch
from .vocab import Precision


@dataclass
class Split:
    """A preprocessed split resident on the device."""

    images: torch.Tensor  # uint8 (N, 3, H, W)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> "Split":
        """The images at ``indices`` (a copy on the same device)."""
        indices = indices.to(self.labels.device)
        return Split(self.images[indices], self.labels[indices])


class Engine:
    """Evaluates weight overrides of one model on resident splits."""

    def __init__(self, model: torch.nn.Module, preprocess: Preprocess, device: torch.device, batch_size: int = 512,
                 precision: str = Precision.BF16):
        self.precision = check_precision(precision)
        self.model = model.to(device).eval()
        self.preprocess = preprocess
        self.device = device
        self.batch_size = batch_size
        self.base = {n: p.detach() for n, p in self.model.named_parameters()}
        self.passes = 0

    def autocast(self):
        """bfloat16 autocast on CUDA unless the engine was made with precision fp32 (the CPU runs fp32)."""
        return autocast_for(self.device, self.precision)

    @torch.inference_mode()
    def correct_mask(self, overrides: Mapping[str, torch.Tensor], split: Split) -> torch.Tensor:
        """Per image of ``split`` (bool, on the device): does the model (with ``overrides``) get its label."""
        self.passes += 1
        right = []
        with self.autocast():
            for i in range(0, len(split), self.batch_size):
                x = self.preprocess.normalize(split.images[i:i + self.batch_size])
                logits = torch.func.functional_call(self.model, dict(overrides), (x,), strict=False)
                right.append(logits.argmax(dim=1) == split.labels[i:i + self.batch_size])
        return torch.cat(right) if right else torch.zeros(0, dtype=torch.bool, device=self.device)

    def correct(self, overrides: Mapping[str, torch.Tensor], split: Split) -> int:
        """Number of images of ``split`` whose argmax over the model (with ``overrides``) equals the label."""
        return int(self.correct_mask(overrides, split).sum())

    @torch.inference_mode()
    def quantized(self, names: Iterable[str], spec: QuantSpec | None, vector: Mapping[str, torch.Tensor] | None = None,
                  lam: float = 0.0) -> dict[str, torch.Tensor]:
        """Overrides ``Q(theta + lam * vector)`` for the quantized ``names`` (``spec`` None: no
        quantization), plus ``theta + lam * vector`` for the vector's other tensors (scope all)."""
        return quantized_patch(self.base, names, spec, vector, lam)


def load_split(images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> Split:
    return Split(images.to(device, non_blocking=True), labels.to(device, non_blocking=True).long())


@dataclass
class SearchResult:
    best_lambda: float
    best_correct: int
    evaluated: dict[float, int]


def dense_grid(lo: float = 0.0, hi: float = 2.0, points: int = 21) -> list[float]:
    return [round(lo + (hi - lo) * i / (points - 1), 10) for i in range(points)]


def search_lambda(score: Callable[[float], int], grid: list[float] | None = None) -> SearchResult:
    """The best lambda of a sorted ``grid`` (default: 21 points over [0, 2]) with few evaluations.

    Golden-section search over grid positions: accuracy against lambda rises to one peak and falls
    (a unimodal curve is what the paper's sweeps show), so each step drops the part of the bracket
    beyond the worse of two inner points and reuses the other. The last few points are all tried.
    Ties prefer the lambda nearest 1. ``score`` is called at most once per lambda.
    """
    grid = sorted(grid or dense_grid())
    cache: dict[int, int] = {}

    def f(i: int) -> int:
        if i not in cache:
            cache[i] = score(grid[i])
        return cache[i]

    ratio = (math.sqrt(5) - 1) / 2
    a, b = 0, len(grid) - 1
    while b - a > 2:
        c = b - round((b - a) * ratio)
        d = a + round((b - a) * ratio)
        if c >= d:
            c, d = d - 1, d
        if f(c) >= f(d):
            b = d
        else:
            a = c
    for i in range(a, b + 1):
        f(i)
    best = max(cache, key=lambda i: (cache[i], -abs(grid[i] - 1.0)))
    return SearchResult(grid[best], cache[best], {grid[i]: cache[i] for i in sorted(cache)})


def accuracy(correct: int, n: int) -> float:
    return 100.0 * correct / n if n else math.nan
