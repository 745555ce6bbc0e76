"""The run configuration (the same YAML file Snakemake reads) turned into qvlib objects.

The workflow validates the file against ``workflow/schemas/config.schema.yaml`` before any job
starts; here each section is checked again by the object it becomes, so ``qv`` run by hand gives
the same errors.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from .data.base import Preprocess
from .data.registry import REGISTRY, LoadOptions, known_tasks
from .data.synthetic import GENERATORS
from .models import ArchSpec
from .quant import VIT_BLOCK_LINEARS, QuantPolicy, QuantSpec
from .store import JOB, ReadGuard, digest_of, guarded
from .train import TrainConfig
from .vocab import LambdaTies, SweepMethod


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
        if JOB in raw:  # a store job's file (qvlib.store): only the sections that job reads
            check_finite(raw, str(path))
            return cls(guarded(raw), path)
        for key in ("name", "archs", "tasks", "finetune"):
            if key not in raw:
                raise ValueError(f"{path}: missing required key {key!r}")
        if "seed" in raw:
            raise ValueError(f"{path}: 'seed' is now 'seeds', a list of replicate seeds: write seeds: [{raw['seed']}]")
        check_finite(raw, str(path))
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
    def job_kind(self) -> str | None:
        """The kind of store job whose file this is (qvlib.store), or None for a whole config."""
        return self.raw.kind if isinstance(self.raw, ReadGuard) else None

    def fingerprint(self) -> str:
        """Hash of every setting this config holds: for a store job's file, exactly what the job reads."""
        return digest_of(dict(self.raw))

    def preprocess(self, arch: str | None) -> Preprocess:
        """The input preprocessing of ``arch``; a cache job's file states it (its ``preprocess`` section:
        the pixels it stores, shared by every arch that reads them) and names no arch."""
        if self.job_kind == "cache":
            return Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.raw["preprocess"].items()})
        if arch is None:
            raise ValueError("name the arch whose preprocessing to use (--arch)")
        from .pipeline import arch_preprocess

        return arch_preprocess(self.arch(arch))

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
    def lambda_ties(self) -> LambdaTies:
        """Which of several best lambdas a pick keeps (qvlib.tables.pairs): nearest 1, or the smallest."""
        return LambdaTies(self.raw.get("lambda_ties", LambdaTies.NEAREST_ONE))

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

    def arch_train(self, arch: str) -> Mapping[str, Any]:
        """The arch's own ``train`` keys (over ``finetune``, under a task's), as written: no defaults."""
        if arch not in self.raw["archs"]:
            raise ValueError(f"unknown arch {arch!r}; this config has: {', '.join(self.arch_names)}")
        return self.raw["archs"][arch].get("train") or {}

    def finetune_train(self, task: str, arch: str | None = None) -> TrainConfig:
        """FT and QAT settings of ``task`` on ``arch``: ``finetune`` < ``archs.<arch>.train`` <
        ``tasks.<task>.train``, each narrower section's keys winning (TrainConfig's defaults for what none
        sets). ``arch`` may be left out only while no arch has train settings of its own."""
        if arch is None:
            own = [name for name in self.arch_names if self.raw["archs"][name].get("train")]
            if own:
                raise ValueError(f"arch {own[0]!r} has train settings of its own: say which arch the task "
                                 f"{task!r} trains on (Config.finetune_train(task, arch))")
            arch_keys: Mapping[str, Any] = {}
        else:
            arch_keys = self.arch_train(arch)
        merged = merge_train(self.raw["finetune"], arch_keys, self.task(task).get("train") or {})
        return TrainConfig.from_mapping({**merged, "seed": self.seed})

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

    def check(self) -> None:
        """What a job would find wrong with this config, found before any job runs (the workflow calls
        this on a dry run): unknown tasks and pretraining generators, quantizers, the policy's regex,
        each arch (a timm VisionTransformer, whose quantized widths every group size divides) and each
        job's training settings. The first problem raises ValueError naming its key."""
        self._check_tasks()
        self._check_pretrain()
        specs = self._checked("quant", lambda: self.quants)
        policy = self._checked("policy", lambda: self.policy)
        try:
            re.compile(policy.pattern)
        except re.error as err:
            raise ValueError(f"{self.path}: policy.pattern {policy.pattern!r} is not a valid regular expression ({err})") from None
        for name in self.arch_names:
            widths = self._quantized_widths(name, policy)
            for spec in specs:
                if spec.granularity == "group":
                    bad = sorted(w for w in widths.values() if w % spec.group_size)
                    if bad:
                        raise ValueError(f"{self.path}: quant group_size {spec.group_size} does not divide the input width {bad[0]} "
                                         f"of arch {name!r}'s quantized weights: pick a divisor of {', '.join(map(str, sorted(set(widths.values()))))}")
            for task in self.task_names:
                self._checked(f"tasks.{task}.train (on arch {name})", lambda: self.finetune_train(task, name))

    def _checked(self, key: str, build):
        try:
            return build()
        except (ValueError, TypeError) as err:
            raise ValueError(f"{self.path}: {key}: {err}") from None

    def _check_tasks(self) -> None:
        for name in self.task_names:
            source = (self.task(name).get("source") or {})
            if source.get("kind") != "hf" and name not in REGISTRY:
                raise ValueError(f"{self.path}: tasks.{name}: unknown task; known tasks: {', '.join(known_tasks())} "
                                 "(any other name needs source: {kind: hf, id: ...})")

    def _check_pretrain(self) -> None:
        needs = [a for a in self.arch_names if (self.raw["archs"][a].get("backbone") or {}).get("source") == "pretrain"]
        if needs and "pretrain" not in self.raw:
            raise ValueError(f"{self.path}: archs.{needs[0]}.backbone: source pretrain needs a pretrain section")
        for kind in (self.raw.get("pretrain") or {}).get("tasks", []):
            if kind not in GENERATORS:
                raise ValueError(f"{self.path}: pretrain.tasks: unknown generator {kind!r}; known: {', '.join(GENERATORS)}")
        if needs:
            self._checked("pretrain.train", self.pretrain_train)

    def _quantized_widths(self, name: str, policy: QuantPolicy) -> dict[str, int]:
        """Input width of each tensor of arch ``name`` that ``policy`` quantizes, from a build on the meta
        device (no weights allocated); the arch must be a timm VisionTransformer the pattern matches."""
        import torch

        from .models import build_vit

        key = f"archs.{name}"
        spec = self._checked(key, lambda: self.arch(name))
        with torch.device("meta"):
            model = self._checked(f"{key}.timm_name {spec.timm_name!r}", lambda: build_vit(spec, num_classes=0))
        widths = {n: int(p.shape[1]) for n, p in model.named_parameters() if policy.matches(n, p)}
        if not widths:
            raise ValueError(f"{self.path}: policy.pattern {policy.pattern!r} matches no 2-D weight of arch {name!r} "
                             "(timm names such as blocks.0.attn.qkv.weight)")
        return widths


# Steps and epochs are two ways to say how long a run trains: a section that gives one replaces both.
RUN_LENGTH = ("steps", "epochs")


def merge_train(*sections: Mapping[str, Any]) -> dict[str, Any]:
    """Training settings from the widest section to the narrowest (finetune, arch, task): each one's keys
    win over the wider ones', and a section that sets ``steps`` or ``epochs`` replaces both."""
    merged: dict[str, Any] = {}
    for section in sections:
        if any(k in section for k in RUN_LENGTH):
            merged = {k: v for k, v in merged.items() if k not in RUN_LENGTH}
        merged.update(section)
    return merged


def non_finite(node: Any, path: str = "") -> str | None:
    """The key path of the first NaN or infinite number in a parsed config (None: all finite)."""
    if isinstance(node, float) and not math.isfinite(node):
        return path or "(top level)"
    if isinstance(node, Mapping):
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in node.items())
    elif isinstance(node, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(node))
    else:
        return None
    return next((found for key, v in items if (found := non_finite(v, key)) is not None), None)


def check_finite(raw: Mapping[str, Any], source: str) -> None:
    """Refuse a config holding NaN or infinity anywhere (YAML's .nan, .inf), naming the key."""
    where = non_finite(raw)
    if where is not None:
        raise ValueError(f"{source}: {where} is not a finite number: every number in the config must be finite")
