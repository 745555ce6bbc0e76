"""The run configuration (the same YAML file Snakemake reads) turned into qvlib objects.

The workflow validates the file against ``workflow/schemas/config.schema.yaml`` before any job
starts; here each section is checked again by the object it becomes, so ``qv`` run by hand gives
the same errors.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from .data.base import Preprocess
from .data.registry import LoadOptions
from .models import ArchSpec
from .quant import VIT_BLOCK_LINEARS, QuantPolicy, QuantSpec
from .train import TrainConfig
from .vocab import SweepMethod


@dataclass
class Config:
    """A run configuration at one replicate seed (``seed``; default: the first of ``seeds``)."""

    raw: dict
    path: Path
    replicate: int | None = None
    quant_tag: str | None = None  # the quantizer a job runs (None: the first of ``quants``)

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no config file at {path}")
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the config must be a mapping")
        for key in ("name", "archs", "tasks", "finetune"):
            if key not in raw:
                raise ValueError(f"{path}: missing required key {key!r}")
        if "seed" in raw:
            raise ValueError(f"{path}: 'seed' is now 'seeds', a list of replicate seeds: write seeds: [{raw['seed']}]")
        return cls(raw, path)

    def with_seed(self, seed: int | None) -> "Config":
        """This config at replicate ``seed`` (None: the first of ``seeds``), which must be one of ``seeds``."""
        if seed is not None and int(seed) not in self.seeds:
            raise ValueError(f"seed {seed} is not one of this config's seeds {self.seeds}")
        return Config(self.raw, self.path, None if seed is None else int(seed), self.quant_tag)

    def with_quant(self, tag: str | None) -> "Config":
        """This config for the quantizer of ``tag`` (None: the first of ``quants``)."""
        if tag is not None and tag not in self.quant_tags:
            raise ValueError(f"quantizer {tag!r} is not one of this config's quantizers {self.quant_tags}")
        return Config(self.raw, self.path, self.replicate, tag)

    @property
    def name(self) -> str:
        return self.raw["name"]

    @property
    def seeds(self) -> list[int]:
        """Replicate seeds: each runs the whole chain (backbone pretraining, heads, data order, controls)."""
        return [int(s) for s in self.raw.get("seeds", [0])]

    @property
    def seed(self) -> int:
        return self.seeds[0] if self.replicate is None else self.replicate

    @property
    def data_seed(self) -> int:
        """Seed of generated data and subsampling: the same for every replicate, so all see one dataset."""
        return int(self.raw.get("data_seed", 0))

    @property
    def random_controls(self) -> int:
        """Norm-matched random directions evaluated beside each donor (their gains are averaged)."""
        return int(self.raw.get("random_controls", 1))

    @property
    def merged_donors(self) -> list[str]:
        """Merge methods (qvlib.merging) whose leave-one-out merged donor joins every receiver's row."""
        return [str(m) for m in self.raw.get("merged_donors", [])]

    @property
    def datafree_criteria(self) -> list[str]:
        """Data-free lambda criteria (qvlib.datafree) recorded beside the sweep of every cell."""
        return [str(c) for c in self.raw.get("datafree", {}).get("criteria", [])]

    @property
    def datafree_images(self) -> int:
        """How many noise images the ``outputs`` criterion compares the models on."""
        return int(self.raw.get("datafree", {}).get("noise_images", 64))

    @property
    def data_root(self) -> Path:
        return Path(self.raw.get("data_root", "data")).expanduser()

    @property
    def reuse_backbones(self) -> Path | None:
        """The folder of backbones pretrained earlier (qvlib.backbones), or None: always pretrain."""
        folder = self.raw.get("reuse_backbones")
        return None if folder is None else Path(folder).expanduser()

    @property
    def quants(self) -> list[QuantSpec]:
        """Every quantizer of the run (``quant``: one mapping or a list of them); FT is shared, QAT,
        vectors, baselines and cells are per quantizer, named by its tag."""
        raw = self.raw.get("quant", {})
        specs = [QuantSpec.from_mapping(q) for q in (raw if isinstance(raw, list) else [raw])]
        if not specs:
            raise ValueError(f"{self.path}: quant is an empty list")
        tags = [s.tag for s in specs]
        if len(set(tags)) != len(tags):
            raise ValueError(f"{self.path}: quantizers must differ, got tags {tags}")
        return specs

    @property
    def quant_tags(self) -> list[str]:
        return [s.tag for s in self.quants]

    @property
    def quant(self) -> QuantSpec:
        """The quantizer of this job (``with_quant``), else the first."""
        specs = self.quants
        return specs[0] if self.quant_tag is None else next(s for s in specs if s.tag == self.quant_tag)

    @property
    def policy(self) -> QuantPolicy:
        """Which tensors are quantized (``policy: {pattern: regex}``), and which are trained and held by
        vectors (``policy: {scope: linear | all}``)."""
        section = self.raw.get("policy", {})
        return QuantPolicy(pattern=section.get("pattern", VIT_BLOCK_LINEARS), scope=section.get("scope", "linear"))

    @property
    def lambdas(self) -> list[float]:
        return [float(x) for x in self.raw.get("lambdas", [1.0])]

    @property
    def lambda_search(self) -> dict:
        """How each cell scores the sweep: ``method`` (dense | racing) and the race's ``keep``,
        ``margin``, ``tolerance`` and ``start`` (see qvlib.racing.race_lambda)."""
        raw = dict(self.raw.get("lambda_search") or {})
        method = SweepMethod(raw.pop("method", SweepMethod.DENSE))
        unknown = set(raw) - {"keep", "margin", "tolerance", "start"}
        if unknown:
            raise ValueError(f"unknown lambda_search keys: {', '.join(sorted(unknown))}")
        return {"method": method, **raw}

    @property
    def task_names(self) -> list[str]:
        return list(self.raw["tasks"])

    @property
    def arch_names(self) -> list[str]:
        return list(self.raw["archs"])

    def arch(self, name: str, backbone_path: str | Path | None = None) -> ArchSpec:
        """The arch; a backbone of source 'pretrain' (trained by ``qv pretrain``) is read from ``backbone_path``."""
        if name not in self.raw["archs"]:
            raise ValueError(f"unknown arch {name!r}; this config has: {', '.join(self.arch_names)}")
        cfg = dict(self.raw["archs"][name])
        backbone = dict(cfg.get("backbone", {"source": "random"}))
        if backbone.get("source") == "pretrain" and backbone_path is not None:
            backbone = {"source": "file", "path": str(backbone_path)}
        elif backbone.get("source") == "file" and backbone_path is not None:
            backbone["path"] = str(backbone_path)
        cfg["backbone"] = backbone
        return ArchSpec.from_config(name, cfg)

    def task(self, name: str) -> Mapping[str, Any]:
        if name not in self.raw["tasks"]:
            raise ValueError(f"unknown task {name!r}; this config has: {', '.join(self.task_names)}")
        return self.raw["tasks"][name] or {}

    def load_options(self, task: str, preprocess: Preprocess) -> LoadOptions:
        opts = {**self.raw.get("task_defaults", {}), **self.task(task)}
        opts.pop("train", None)
        known = set(LoadOptions.__dataclass_fields__) - {"preprocess", "root", "seed", "calib_position"}
        unknown = set(opts) - known
        if unknown:
            raise ValueError(f"task {task!r}: unknown option(s) {sorted(unknown)}; allowed: {sorted(known)} and train")
        return LoadOptions(preprocess=preprocess, root=self.data_root, seed=self.data_seed,
                           download=bool(self.raw.get("download", False)),
                           calib_position=self.raw.get("calib_position", "head"), **opts)

    def finetune_train(self, task: str) -> TrainConfig:
        base = dict(self.raw["finetune"])
        return TrainConfig.from_mapping({**base, **(self.task(task).get("train") or {}), "seed": self.seed})

    def pretrain_train(self) -> TrainConfig:
        if "pretrain" not in self.raw:
            raise ValueError(f"{self.path}: no 'pretrain' section, but an arch has backbone source 'pretrain'")
        return TrainConfig.from_mapping({**self.raw["pretrain"]["train"], "seed": self.seed})

    def pretrain_mixture(self) -> tuple[list[str], int]:
        section = self.raw["pretrain"]
        return list(section["tasks"]), int(section.get("n_per_task", 4000))

    def eval_batch_size(self) -> int:
        return int(self.raw.get("evaluate", {}).get("batch_size", 512))

    def eval_precision(self) -> str:
        """bf16 (autocast on a GPU) or fp32 for every evaluation forward."""
        return str(self.raw.get("evaluate", {}).get("precision", "bf16"))

    def digest(self, *sections: str) -> str:
        """Short hash of the named sections, for checkpoint metadata."""
        return digest_of({k: self.raw.get(k) for k in sections})


def digest_of(*parts: Any) -> str:
    """Short stable hash of JSON-able parts: checkpoint metadata, and the Snakemake params whose change
    reruns exactly the jobs that read them."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]
