"""What every task yields: uint8 images at the model's resolution, labels, and deterministic splits."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset

# The torch-free pieces live in qvlib.sections (the workflow's DAG reads them without torch).
from ..sections import CALIB_POSITIONS, Preprocess  # noqa: F401

CALIB_FRACTION = 0.1
CALIB_MAX = 5000
CALIB_SEED = 0


class ArrayDataset(Dataset):
    """Preprocessed uint8 images and int64 labels held in memory."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


class TransformedDataset(Dataset):
    """A dataset of (image, label) with a transform applied to the image; labels become ints."""

    def __init__(self, base: Dataset, transform: Callable, target_map: Callable[[Any], int] = int):
        self.base, self.transform, self.target_map = base, transform, target_map

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        image, label = self.base[i]
        return self.transform(image), self.target_map(label)


class TransposedImages(Dataset):
    """``base`` with every (PIL) image transposed: what a task stored transposed (EMNIST) looks like
    upright. Train-time augmentation runs on ``base`` and transposes after it, as the authors do."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        from PIL import Image

        image, label = self.base[i]
        return image.transpose(Image.Transpose.TRANSPOSE), label


@dataclass
class TaskData:
    """One task's splits. ``train`` excludes ``calib``; ``calib`` is for choosing lambda, never for training."""

    name: str
    classes: list[str]
    train: Dataset
    calib: Dataset
    test: Dataset
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> Dataset:
        if name not in ("train", "calib", "test"):
            raise ValueError(f"unknown split {name!r}; expected train, calib or test")
        return getattr(self, name)

    def fingerprint(self, split: str, preprocess: Preprocess) -> str:
        """Hash of everything that decides the cached tensors of ``split``."""
        blob = json.dumps({"task": self.name, "split": split, "n": len(self.split(split)),
                           "preprocess": preprocess.key(), "provenance": self.provenance}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def calib_indices(n_train: int, seed: int = CALIB_SEED, fraction: float = CALIB_FRACTION,
                  max_size: int = CALIB_MAX, position: str = "head") -> tuple[list[int], list[int]]:
    """(train, calib) index lists: calib is ``fraction`` of the training set, at most ``max_size``, from
    a permutation drawn with ``seed``: its first images (``head``) or its last (``tail``: what
    ``torch.utils.data.random_split(train, [n - n_calib, n_calib])`` with a generator seeded ``seed``
    holds out, the authors' validation split); both lists sorted and disjoint."""
    if position not in CALIB_POSITIONS:
        raise ValueError(f"calib position must be one of {', '.join(CALIB_POSITIONS)}, got {position!r}")
    n_calib = min(int(n_train * fraction), max_size)
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed)).tolist()
    calib = perm[:n_calib] if position == "head" else perm[n_train - n_calib:]
    train = perm[n_calib:] if position == "head" else perm[:n_train - n_calib]
    return sorted(train), sorted(calib)


def with_calib(name: str, classes: Sequence[str], train_full: Dataset, test: Dataset,
               provenance: dict[str, Any], position: str = "head") -> TaskData:
    train_idx, calib_idx = calib_indices(len(train_full), position=position)
    if position != "head":  # recorded (and fingerprinted) only where it differs from the default
        provenance = {**provenance, "calib_position": position}
    return TaskData(name, list(classes), _subset(train_full, train_idx), _subset(train_full, calib_idx), test, provenance)


def _subset(ds: Dataset, idx: list[int]) -> Dataset:
    if isinstance(ds, ArrayDataset):
        index = torch.tensor(idx, dtype=torch.long)
        return ArrayDataset(ds.images[index], ds.labels[index])
    return Subset(ds, idx)


def materialize(ds: Dataset, batch_size: int = 256, num_workers: int = 0, progress: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All images (uint8) and labels (int64) of a dataset as two tensors."""
    if isinstance(ds, ArrayDataset):
        return ds.images, ds.labels
    from tqdm.auto import tqdm

    images, labels = [], []
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
    for x, y in tqdm(loader, desc=progress or "decoding", disable=progress is None):
        images.append(x)
        labels.append(torch.as_tensor(y))
    if not images:
        return torch.empty(0, 3, 1, 1, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
    return torch.cat(images), torch.cat(labels).long()


def data_root(path: str | Path | None) -> Path:
    return Path(path if path is not None else "data").expanduser()
