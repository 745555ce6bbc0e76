import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest
import torch

from qvlib.models import ArchSpec

# A CPU-sized ViT used throughout the tests: same timm class as vit_base_patch16_224.
TINY = dict(img_size=16, patch_size=8, embed_dim=24, depth=2, num_heads=2)


@pytest.fixture
def tiny_arch():
    return ArchSpec(name="tiny", timm_name="vit_tiny_patch16_224", overrides=TINY, backbone={"source": "random", "seed": 0})


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """The slow modules (whole workflow runs, the Slurm cluster) first. make test hands each module to one
    pytest-xdist worker in this order (--no-loadscope-reorder), so the long ones start at once instead
    of last, and the Slurm test's waits on its scheduler overlap the rest."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
