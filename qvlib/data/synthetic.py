"""Procedurally generated 32x32 RGB classification tasks, deterministic by seed.

Each generator maps ``(n, rng)`` to ``(uint8 images (n, 3, 32, 32), int labels (n,))``. They differ
in what decides the class (shape, orientation, spatial frequency, letter or digit identity, count, blur), so
the tasks pull a shared backbone in different directions, as real downstream tasks do.
"""

from __future__ import annotations

import glob
from functools import lru_cache
from typing import Callable

import numpy as np
import torch

SIZE = 32
Generator = Callable[[int, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def _grid() -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    return ys[None], xs[None]


def _colours(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random dark background and light foreground colours, shape (n, 3, 1, 1)."""
    bg = rng.uniform(0.0, 0.45, (n, 3))
    fg = rng.uniform(0.55, 1.0, (n, 3))
    return bg[..., None, None].astype(np.float32), fg[..., None, None].astype(np.float32)


def _compose(mask: np.ndarray, rng: np.random.Generator, noise: float = 0.08) -> np.ndarray:
    """Blend a (n, H, W) mask in [0, 1] between random colours, add pixel noise, return uint8 (n, 3, H, W)."""
    n = mask.shape[0]
    bg, fg = _colours(n, rng)
    img = bg + (fg - bg) * mask[:, None]
    img = img + rng.normal(0, noise, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def shapes(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """6 classes: circle, square, triangle, cross, ring, diamond; random position, size, colours."""
    labels = rng.integers(0, 6, n)
    ys, xs = _grid()
    cy, cx = (rng.uniform(10, 22, (2, n, 1, 1))).astype(np.float32)
    r = rng.uniform(5, 10, (n, 1, 1)).astype(np.float32)
    dy, dx = ys - cy, xs - cx
    dist = np.sqrt(dx**2 + dy**2)
    masks = np.stack([
        dist <= r,
        np.maximum(np.abs(dx), np.abs(dy)) <= 0.8 * r,
        (dy >= -r) & (dy <= 0.7 * r) & (np.abs(dx) <= (dy + r) * 0.6),
        ((np.abs(dx) <= 0.3 * r) & (np.abs(dy) <= r)) | ((np.abs(dy) <= 0.3 * r) & (np.abs(dx) <= r)),
        (dist <= r) & (dist >= 0.55 * r),
        np.abs(dx) + np.abs(dy) <= r,
    ])
    mask = masks[labels, np.arange(n)].astype(np.float32)
    return _compose(mask, rng), labels


def _grating(angle: np.ndarray, freq: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = angle.shape[0]
    ys, xs = _grid()
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    a, f = angle[:, None, None], freq[:, None, None]
    wave = np.sin(2 * np.pi * f * (xs * np.cos(a) + ys * np.sin(a)) + phase)
    contrast = rng.uniform(0.5, 1.0, (n, 1, 1))
    return (0.5 + 0.5 * contrast * wave).astype(np.float32)


def orientation(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """8 classes: grating orientation in steps of 22.5 degrees (jitter 4 degrees), random frequency."""
    labels = rng.integers(0, 8, n)
    angle = labels * np.pi / 8 + rng.uniform(-1, 1, n) * np.deg2rad(4)
    freq = rng.uniform(0.1, 0.3, n)
    return _compose(_grating(angle, freq, rng), rng, noise=0.1), labels


FREQUENCIES = np.array([0.05, 0.08, 0.12, 0.18, 0.27, 0.4])


def frequency(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """6 classes: spatial frequency of a grating (log-spaced, 5% jitter), random orientation."""
    labels = rng.integers(0, len(FREQUENCIES), n)
    freq = FREQUENCIES[labels] * rng.uniform(0.95, 1.05, n)
    angle = rng.uniform(0, np.pi, n)
    return _compose(_grating(angle, freq, rng), rng, noise=0.1), labels


LETTERS = "AEFHKMNRTX"
NUMERALS = "0123456789"


@lru_cache(maxsize=1)
def font_files() -> tuple[str, ...]:
    """The DejaVu Sans faces on this machine (sorted, so the choice is stable); empty if none."""
    return tuple(sorted(glob.glob("/usr/share/fonts/truetype/dejavu/DejaVuSans*.ttf")))


@lru_cache(maxsize=64)
def _font(path: str | None, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(path, size) if path else ImageFont.load_default(size=size)


def glyphs(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """10 classes: a letter rendered with a random DejaVu face, size, position and small rotation."""
    return _rendered(LETTERS, n, rng)


def numerals(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """10 classes: a digit 0-9 rendered with a random DejaVu face, size, position and small rotation."""
    return _rendered(NUMERALS, n, rng)


def _rendered(chars: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Label k: ``chars[k]`` drawn in a random DejaVu face (18-26 px), position and rotation (+-8 deg)."""
    from PIL import Image, ImageDraw

    labels = rng.integers(0, len(chars), n)
    fonts = font_files() or (None,)
    masks = np.empty((n, SIZE, SIZE), np.float32)
    for i, label in enumerate(labels):
        font = _font(fonts[rng.integers(len(fonts))], int(rng.integers(18, 27)))
        canvas = Image.new("L", (SIZE, SIZE), 0)
        draw = ImageDraw.Draw(canvas)
        left, top, right, bottom = draw.textbbox((0, 0), chars[label], font=font)
        x = rng.uniform(-left, max(-left, SIZE - right))
        y = rng.uniform(-top, max(-top, SIZE - bottom))
        draw.text((x, y), chars[label], fill=255, font=font)
        canvas = canvas.rotate(float(rng.uniform(-8, 8)), resample=Image.BILINEAR)
        masks[i] = np.asarray(canvas, np.float32) / 255
    return _compose(masks, rng), labels


def dots(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """6 classes: 1 to 6 non-overlapping dots of random size and place."""
    labels = rng.integers(0, 6, n)
    ys, xs = _grid()
    masks = np.zeros((n, SIZE, SIZE), np.float32)
    for i, label in enumerate(labels):
        centres: list[tuple[float, float]] = []
        while len(centres) < label + 1:
            c = rng.uniform(4, SIZE - 4, 2)
            if all((c[0] - a) ** 2 + (c[1] - b) ** 2 > 49 for a, b in centres):
                centres.append((float(c[0]), float(c[1])))
        for cy, cx in centres:
            r = rng.uniform(1.8, 3.0)
            masks[i] = np.maximum(masks[i], ((ys[0] - cy) ** 2 + (xs[0] - cx) ** 2 <= r * r).astype(np.float32))
    return _compose(masks, rng, noise=0.05), labels


BLUR_SIGMAS = (0.0, 0.7, 1.3, 2.0, 3.0)


def blur(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """5 classes: how much a random block texture is blurred (Gaussian sigma 0 to 3 pixels)."""
    from torchvision.transforms.v2.functional import gaussian_blur

    labels = rng.integers(0, len(BLUR_SIGMAS), n)
    cells = rng.integers(0, 2, (n, 1, 8, 8)).astype(np.float32)
    texture = torch.from_numpy(cells).repeat_interleave(4, 2).repeat_interleave(4, 3)
    for k, sigma in enumerate(BLUR_SIGMAS):
        idx = torch.from_numpy(np.flatnonzero(labels == k))
        if sigma > 0 and len(idx):
            texture[idx] = gaussian_blur(texture[idx], kernel_size=[13, 13], sigma=[sigma, sigma])
    return _compose(texture[:, 0].numpy(), rng, noise=0.02), labels


GENERATORS: dict[str, tuple[Generator, tuple[str, ...]]] = {
    "shapes": (shapes, ("circle", "square", "triangle", "cross", "ring", "diamond")),
    "orientation": (orientation, tuple(f"{22.5 * k:g}deg" for k in range(8))),
    "frequency": (frequency, tuple(f"{f:g}cyc/px" for f in FREQUENCIES)),
    "glyphs": (glyphs, tuple(LETTERS)),
    "numerals": (numerals, tuple(NUMERALS)),
    "dots": (dots, tuple(str(k) for k in range(1, 7))),
    "blur": (blur, tuple(f"sigma{s:g}" for s in BLUR_SIGMAS)),
}


RENDERED = ("glyphs", "numerals")  # the tasks drawn with the machine's fonts (recorded in provenance)


def generate(kind: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of generator ``kind`` drawn with ``seed``: uint8 (n, 3, 32, 32) and int64 labels."""
    if kind not in GENERATORS:
        raise ValueError(f"unknown generator {kind!r}; known: {', '.join(GENERATORS)}")
    images, labels = GENERATORS[kind][0](n, np.random.default_rng(seed))
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels).long()
