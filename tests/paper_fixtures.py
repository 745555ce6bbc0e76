"""What the paper protocol's smoke run (.test/config/paper-smoke.yaml) reads, written offline:

- three Hugging Face ``save_to_disk`` folders under ``<data_root>/<id>`` in the formats and column
  names of the authors' copies that config/paper.yaml names (cifar10: ``img``/``label`` with a
  ClassLabel; fer2013: ``jpg``/``cls`` with a plain integer and the webdataset ``__key__``; eurosat:
  ``image``/``label``), holding encoded JPEG and PNG bytes of many sizes (smaller and larger than
  224 px, non-square) in RGB, L and RGBA modes. Each class is a colour (hue and brightness), drawn as
  the background of a noisy image with a distractor shape, so it survives timm's augmentation
  (crops to 8 % of the area, flips, colour jitter 0.4) and FT above chance is a real result;
- a ViT-Ti/16 checkpoint in the layout of timm's pretrained files (safetensors, timm parameter
  names, the 21,843-class ImageNet-21k head of ``vit_tiny_patch16_224.augreg_in21k``), which the run
  reads through ``backbone: {source: timm, tag: augreg_in21k, file: ...}``.

Write them by hand for the smoke config (paths relative to the folder snakemake runs in):

    python tests/paper_fixtures.py /tmp/qv-paper-smoke
    snakemake --snakefile Snakefile --directory /tmp/qv-paper-smoke --configfile .test/config/paper-smoke.yaml --cores 2
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Relative to the run folder, as .test/config/paper-smoke.yaml names it.
BACKBONE_FILE = "data/timm/vit_tiny_patch16_224.augreg_in21k.safetensors"
IN21K_CLASSES = 21_843

# name -> RGB colour of the class; hues far apart and luminances spread (L images keep only luminance).
PALETTE = {
    "red": (205, 35, 30), "green": (40, 185, 55), "blue": (35, 65, 215), "yellow": (235, 215, 40),
}


@dataclass(frozen=True)
class FixtureTask:
    """One task's on-disk copy: the hub id it stands in for, its splits, columns and classes."""

    id: str
    image: str
    label: str
    classes: tuple[str, ...]
    class_label: bool  # a datasets.ClassLabel column (names kept) or a plain int64 (fer2013's cls)
    sizes: tuple[tuple[int, int], ...]  # (width, height) drawn per image
    train: str = "train"
    test: str = "test"
    extra_columns: tuple[str, ...] = ()


TASKS: dict[str, FixtureTask] = {
    "cifar10": FixtureTask("uoft-cs/cifar10", "img", "label", ("red", "green", "blue"), True,
                           ((32, 32), (32, 32), (300, 200), (96, 160))),
    "fer2013": FixtureTask("clip-benchmark/wds_fer2013", "jpg", "cls", ("red", "yellow", "blue"), False,
                           ((48, 48), (48, 48), (256, 320), (120, 64)), extra_columns=("__key__",)),
    "eurosat": FixtureTask("tanganke/eurosat", "image", "label", ("red", "green", "blue", "yellow"), True,
                           ((64, 64), (240, 240), (400, 180), (72, 130))),
}
MODES = ("RGB", "RGB", "RGB", "RGBA", "L")  # cycled: mostly RGB (JPEG), RGBA and L as PNG


def draw(colour: tuple[int, int, int], size: tuple[int, int], mode: str, rng: np.random.Generator):
    """A PIL image of ``size`` whose background is ``colour`` (brightness varied, pixel noise) with a
    grey distractor rectangle or ellipse, in ``mode``."""
    from PIL import Image, ImageDraw

    w, h = size
    scale = rng.uniform(0.8, 1.15)
    base = np.clip(np.array(colour, dtype=np.float32) * scale, 0, 255)
    pixels = base + rng.normal(0, 12, (h, w, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    pen = ImageDraw.Draw(image)
    x0, y0 = int(rng.integers(0, max(1, w // 2))), int(rng.integers(0, max(1, h // 2)))
    box = (x0, y0, x0 + max(2, w // 3), y0 + max(2, h // 3))
    grey = int(rng.integers(90, 170))
    (pen.ellipse if rng.random() < 0.5 else pen.rectangle)(box, fill=(grey, grey, grey))
    if mode == "RGBA":
        alpha = Image.fromarray(rng.integers(200, 256, (h, w), dtype=np.uint8), "L")
        image.putalpha(alpha)
        return image
    return image.convert(mode)


def encode(image) -> bytes:
    """JPEG bytes for RGB and L images (as most hub copies store photos), PNG for RGBA."""
    buf = io.BytesIO()
    if image.mode == "RGBA":
        image.save(buf, format="PNG")
    else:
        image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_hf_task(root: Path, name: str, n_train: int, n_test: int, seed: int = 0) -> Path:
    """``name``'s fixture under ``root/<id>`` (save_to_disk); classes balanced, modes and sizes cycled."""
    import datasets

    task = TASKS[name]
    label_feature = datasets.ClassLabel(names=list(task.classes)) if task.class_label else datasets.Value("int64")
    columns = {task.image: datasets.Image(), task.label: label_feature, **{c: datasets.Value("string") for c in task.extra_columns}}
    features = datasets.Features(columns)
    rng = np.random.default_rng([seed, sum(map(ord, name))])
    splits = {}
    for split, n in ((task.train, n_train), (task.test, n_test)):
        rows = {c: [] for c in columns}
        for i in range(n):
            label = i % len(task.classes)
            mode = MODES[(i // len(task.classes)) % len(MODES)]
            size = task.sizes[int(rng.integers(len(task.sizes)))]
            image = draw(PALETTE[task.classes[label]], size, mode, rng)
            rows[task.image].append({"bytes": encode(image), "path": None})
            rows[task.label].append(label)
            for c in task.extra_columns:
                rows[c].append(f"{split}-{i:06d}")
        splits[split] = datasets.Dataset.from_dict(rows, features=features)
    out = root / task.id
    datasets.DatasetDict(splits).save_to_disk(str(out))
    return out


def write_timm_checkpoint(path: Path, seed: int = 0, timm_name: str = "vit_tiny_patch16_224", overrides: dict | None = None) -> Path:
    """``timm_name`` as timm's pretrained in21k file lays it out: every tensor under its timm name, fp32,
    with a 21,843-class head, in safetensors. The weights are timm's own initialisation (seeded): at
    that initialisation the class token's final features are small before the last LayerNorm, which
    scales them up, so an lr-sized step moves the logits far and a few steps of the paper's lr 1e-5
    learn colour classes (FT above chance). This tests the door, not pretrained features.
    ``overrides`` (timm model arguments, e.g. ``depth``) cut the arch down for quick tests."""
    import timm
    import torch
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(timm_name, pretrained=False, num_classes=IN21K_CLASSES, **(overrides or {}))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt"})
    return path


def write_all(run_dir: Path, n_train: int = 48, n_test: int = 16, seed: int = 0) -> dict[str, Path]:
    """Every fixture the smoke config reads, under ``run_dir`` (the folder snakemake runs in)."""
    run_dir = Path(run_dir)
    out = {name: write_hf_task(run_dir / "data", name, n_train, n_test, seed) for name in TASKS}
    out["backbone"] = write_timm_checkpoint(run_dir / BACKBONE_FILE, seed)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    for what, where in write_all(Path(sys.argv[1])).items():
        print(f"{what}: {where}")
