"""Train-time augmentation as timm builds it for an arch (the authors' protocol): random resized crop
(scale 0.08-1, the arch's interpolation), horizontal flip and colour jitter 0.4, applied to the
*original* image, not to the eval crop. Only the training split is augmented; calib and test keep the
deterministic eval transform, and normalisation still happens on the device.

Each image's augmentation is drawn from (run seed, micro-step, index), so a resumed run sees exactly
the crops an uninterrupted one would, with any number of DataLoader workers.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import torch
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2

from .base import ArrayDataset, Preprocess, TransformedDataset, TransposedImages


def _to_rgb_pil(image: Any):
    """PIL (any mode) or a uint8 (C, H, W) tensor -> an RGB PIL image."""
    if isinstance(image, torch.Tensor):
        image = v2.functional.to_pil_image(image)
    return image.convert("RGB")


def train_transform(preprocess: Preprocess) -> Callable:
    """timm's training transform for ``preprocess``'s size and interpolation, without its to-float and
    normalisation stages: image -> uint8 tensor (3, img_size, img_size)."""
    import timm

    primary, secondary, _ = timm.data.create_transform(preprocess.img_size, is_training=True,
                                                       interpolation=preprocess.interpolation, separate=True)
    return v2.Compose([v2.Lambda(_to_rgb_pil), primary, secondary, v2.PILToTensor()])


def _identity(x):
    return x


def raw_view(ds: Dataset) -> Dataset:
    """The same samples as ``ds`` before its eval transform (the original images), labels unchanged.
    In-memory arrays are already images at the model's size and are returned as they are."""
    if isinstance(ds, Subset):
        return Subset(raw_view(ds.dataset), ds.indices)
    if isinstance(ds, TransformedDataset):
        return TransformedDataset(ds.base, _identity, ds.target_map)
    if isinstance(ds, ArrayDataset):
        return ds
    raise TypeError(f"cannot augment a {type(ds).__name__}: expected images from a task loader")


class AugmentedDataset(Dataset):
    """``raw`` with ``transform`` drawn per (seed, step, index): items are keyed ``(index, step)``."""

    def __init__(self, raw: Dataset, transform: Callable, seed: int):
        self.raw, self.transform, self.seed = raw, transform, seed

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, key: tuple[int, int]):
        index, step = key
        image, label = self.raw[index]
        draw = (self.seed * 1_000_003 + step) * 1_000_033 + index
        state = random.getstate()  # timm's crop draws from Python's random, torchvision's from torch
        try:
            random.seed(draw)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(draw % (2**63))
                out = self.transform(image)
        finally:
            random.setstate(state)
        return out, int(label)


def stored_view(ds: Dataset) -> tuple[Dataset, bool]:
    """``ds`` (a raw view) as its images are stored, and whether they are stored transposed: for a
    task loaded upright through :class:`TransposedImages`, its untransposed base."""
    if isinstance(ds, Subset):
        base, transposed = stored_view(ds.dataset)
        return Subset(base, ds.indices), transposed
    if isinstance(ds, TransformedDataset) and isinstance(ds.base, TransposedImages):
        return TransformedDataset(ds.base.base, ds.transform, ds.target_map), True
    return ds, False


def _transpose_tensor(image: torch.Tensor) -> torch.Tensor:
    return image.transpose(-1, -2).contiguous()


def augmented(ds: Dataset, preprocess: Preprocess, seed: int) -> AugmentedDataset:
    """``ds`` (a task's training split) with timm's training augmentation for ``preprocess``. Images
    stored transposed (EMNIST) are augmented as stored and transposed upright afterwards, the authors'
    order: their random flip is a vertical flip of the upright letter."""
    raw, transposed = stored_view(raw_view(ds))
    transform = train_transform(preprocess)
    if transposed:
        transform = v2.Compose([transform, v2.Lambda(_transpose_tensor)])
    return AugmentedDataset(raw, transform, seed)
