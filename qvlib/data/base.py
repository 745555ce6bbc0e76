"""What every task yields: uint8 images at the model's resolution, labels, and deterministic splits."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

CALIB_FRACTION = 0.1
CALIB_MAX = 5000
CALIB_SEED = 0


@dataclass(frozen=True)
class Preprocess:
    """Model-side preprocessing: resize + centre crop to ``img_size`` (uint8), then normalise on the device.

    Built from timm's data config of the architecture (:meth:`from_model`), so it follows the model.
    """

    img_size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    crop_pct: float = 1.0

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "Preprocess":
        import timm

        cfg = timm.data.resolve_data_config({}, model=model)
        img_size = model.patch_embed.img_size[0]  # the model's own size, not its pretrained config's
        return cls(img_size=int(img_size), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                   interpolation=cfg.get("interpolation", "bicubic"), crop_pct=float(cfg.get("crop_pct", 1.0)))

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def pixels(self) -> str:
        """What decides the cached uint8 images (size, interpolation, crop), not the normalisation done
        on the device: archs with the same ``pixels()`` share one cache per task, e.g. ``224px-bicubic-crop0.9``."""
        return f"{self.img_size}px-{self.interpolation}-crop{self.crop_pct:g}"

    def pixel_settings(self) -> dict:
        """The fields that ``pixels()`` names: a cache job's ``preprocess`` section (qvlib.store)."""
        return {"img_size": self.img_size, "interpolation": self.interpolation, "crop_pct": self.crop_pct}

    def resize_size(self) -> int:
        """The shorter side before the centre crop, as timm computes it: floor(img_size / crop_pct)
        (224 at crop 0.9 -> 248)."""
        return math.floor(self.img_size / self.crop_pct)

    def pil_transform(self) -> Callable:
        """PIL image -> uint8 tensor (3, img_size, img_size): grey becomes 3 channels. The image is
        resized by PIL and cropped before it becomes a tensor, as timm's eval transform does on the
        authors' PIL images (torchvision's tensor resize differs from PIL's in 0.2-0.6% of the pixels
        by 1-2 grey levels: bench/resample_paths.py)."""
        interp = v2.InterpolationMode(self.interpolation)
        return v2.Compose([
            v2.Lambda(lambda im: im.convert("RGB")),
            v2.Resize(self.resize_size(), interpolation=interp),
            v2.CenterCrop(self.img_size),
            v2.PILToTensor(),
        ])

    def resize_batch(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> uint8 (N, 3, img_size, img_size); synthetic arrays are not cropped."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected uint8 images of shape (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if images.shape[1] != 3:
            raise ValueError(f"expected 1 or 3 channels, got {images.shape[1]}")
        if images.shape[-2:] != (self.img_size, self.img_size):
            images = v2.functional.resize(images, [self.img_size, self.img_size],
                                          interpolation=v2.InterpolationMode(self.interpolation), antialias=True)
        return images.contiguous()

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 batch on any device -> float batch ready for the model."""
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1) * 255
        return (images.float() - mean) / std


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


CALIB_POSITIONS = ("head", "tail")


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
