"""Pretrained demo backbones kept in a folder and reused instead of pretrained again.

The demo's backbone plays the part of the paper's downloaded ImageNet-21k checkpoint: the method
starts from it and never changes it. Pretraining it is most of a one-seed demo's time on two CPU
cores, so a config may name a folder (``reuse_backbones``) of backbones that ``qv pretrain`` wrote
earlier. A file there is found by the arch, the replicate seed and a digest of every setting that
pretraining reads (the arch, the mixture, the training settings with their defaults filled in, and
``data_seed``), so a changed setting finds no file and pretrains as before.

A reused backbone is the bytes the earlier run wrote, on the CPU that ran it; pretraining the same
settings on another CPU rounds differently, so ``qv pretrain --no-reuse`` can give other weights.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import Config, digest_of
from .fileio import atomic_write, write_json
from .sections import BOOKKEEPING
from .train import metrics_path
from .vectors import WeightVector


# Not in the digest: the seed (named apart) and when a run logs or saves its resumable state (the store
# keys leave the same out: qvlib.sections.BOOKKEEPING).
LEFT_OUT = ("seed", *BOOKKEEPING)
# Training settings added after the shipped backbones were written: left out of the key while at their
# default (which is what those backbones were trained with), so the shipped files keep their names.
ADDED_LATER = {"last_batch": "drop", "lr_schedule": "aligned"}


def pretrain_key(cfg: Config, arch_name: str) -> str:
    """Digest of the settings that decide a pretrained backbone (the seed is named apart), taken from
    the parsed settings so that a config with its defaults filled in gives the same digest."""
    arch = {k: v for k, v in asdict(cfg.arch(arch_name)).items() if k != "name"}
    train = {k: v for k, v in asdict(cfg.pretrain_train()).items()
             if k not in LEFT_OUT and not (k in ADDED_LATER and v == ADDED_LATER[k])}
    return digest_of(arch, cfg.pretrain_mixture(), train, cfg.data_seed)


def shipped_name(cfg: Config, arch_name: str) -> str:
    """The file name a reusable backbone of this arch and replicate seed has in the folder."""
    return f"{arch_name}-seed{cfg.seed}-{pretrain_key(cfg, arch_name)}.safetensors"


def shipped_backbone(cfg: Config, arch_name: str) -> Path | None:
    """Where this config's reuse folder would hold the backbone (None: the config names no folder)."""
    folder = cfg.reuse_backbones
    return None if folder is None else folder / shipped_name(cfg, arch_name)


@dataclass(frozen=True)
class BackboneChoice:
    """What ``qv pretrain`` does for one arch and replicate seed: copy ``reuse`` (a file the config's
    reuse folder holds) or pretrain (``reuse`` None). ``looked_at``: where the folder would hold the
    backbone (None: the config names no folder, or reuse was turned off)."""

    reuse: Path | None
    looked_at: Path | None

    @property
    def note(self) -> str | None:
        """The log line that says which it is (None: there was nowhere to look)."""
        if self.reuse is not None:
            return f"reused {self.reuse}, pretrained earlier with these settings (--no-reuse pretrains it here)"
        if self.looked_at is not None:
            return f"no backbone with these settings at {self.looked_at}: pretraining (copy the result there to reuse it)"
        return None


def choose_backbone(cfg: Config, arch_name: str, reuse: bool = True) -> BackboneChoice:
    """Reuse the backbone the config's reuse folder holds for these settings, or pretrain: pretrain when
    ``reuse`` is False, when the config names no folder, or when the folder has no such file."""
    found = shipped_backbone(cfg, arch_name) if reuse else None
    return BackboneChoice(reuse=found if found is not None and found.exists() else None, looked_at=found)


def reuse_backbone(found: Path, output: Path, cfg: Config, arch_name: str) -> None:
    """Copy ``found`` (and its metrics, marked ``reused_from``) to ``output`` after checking that its
    metadata names the same arch, seed and mode: a file renamed by hand is refused, not trusted."""
    meta = WeightVector.load(found).metadata  # a truncated or foreign file: the loader's own error
    expected = {"mode": "pretrain", "arch": arch_name, "seed": str(cfg.seed)}
    wrong = {k: meta.get(k) for k, v in expected.items() if meta.get(k) != v}
    if wrong:
        raise ValueError(f"{found} is not a pretrained backbone of arch {arch_name!r} at seed {cfg.seed}: "
                         f"its metadata has {wrong}, expected {expected}")
    atomic_write(output, lambda tmp: shutil.copyfile(found, tmp))
    shipped_metrics = metrics_path(found)
    metrics = json.loads(shipped_metrics.read_text()) if shipped_metrics.exists() else {"mode": "pretrain"}
    write_json(metrics_path(output), {**metrics, "reused_from": str(found)})
