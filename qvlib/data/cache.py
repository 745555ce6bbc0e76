"""Preprocessed evaluation splits, stored once and loaded whole onto the device.

The grid evaluates each receiver's test and calib splits dozens of times; decoding and resizing
images on every pass would dominate. A cache file holds uint8 images and int64 labels with the
fingerprint of the preprocessing, so a stale cache is detected instead of silently reused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..vectors import WeightVector
from .base import Preprocess, TaskData, materialize


def write_split_cache(task: TaskData, split: str, preprocess: Preprocess, path: str | Path, num_workers: int = 0) -> Path:
    images, labels = materialize(task.split(split), num_workers=num_workers, progress=f"caching {task.name}/{split}")
    meta = {"task": task.name, "split": split, "n": len(labels), "num_classes": task.num_classes,
            "fingerprint": task.fingerprint(split, preprocess), "preprocess": preprocess.key()}
    return WeightVector({"images": images.contiguous(), "labels": labels.contiguous()}).save(path, meta)


def read_split_cache(path: str | Path, device: str | torch.device = "cpu", fingerprint: str | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(uint8 images, int64 labels, metadata); ``fingerprint`` (if given) must match the file's."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no cached split at {path}; build it with `qv cache-splits`")
    cached = WeightVector.load(path, device=device)
    meta = cached.metadata
    if "images" not in cached or "labels" not in cached:
        raise ValueError(f"{path} is not a cached split (it holds no images and labels); build it with `qv cache-splits`")
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise ValueError(f"cached split {path} was made with other preprocessing or data "
                         f"(fingerprint {meta.get('fingerprint')}, expected {fingerprint}); delete it to rebuild")
    return cached["images"], cached["labels"], meta
