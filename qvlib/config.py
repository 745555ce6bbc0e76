"""The run configuration (the same YAML file Snakemake reads) turned into qvlib objects.

The workflow validates the file against ``workflow/schemas/config.schema.yaml`` before any job
starts; here each section is checked again by the object it becomes (qvlib.sections: one frozen
dataclass per section, torch-free), so ``qv`` run by hand gives the same errors. Every accessor
parses only the top-level keys it reads, when it is called: a store job's file (qvlib.store) holds
only the sections its job reads, behind a ReadGuard that refuses the others.

Nothing here imports torch or timm at import time: the workflow builds its DAG from this module.
What only a timm build knows (an arch's pixels and its weights' widths) is :func:`arch_facts`,
which builds the arch on the meta device once and can keep the answer in a cache folder.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import yaml

from .sections import (
    ArchSection,
    ControlsSection,
    DatafreeSection,
    DataSection,
    EvaluateSection,
    LambdaSection,
    LoadOptions,
    Preprocess,
    PretrainSection,
    QuantPolicy,
    QuantSection,
    QuantSpec,
    TaskSection,
    TrainConfig,
    TrainOverrides,
    TrainSettings,
    merge_train,  # noqa: F401  (re-exported: it has always been qvlib.config.merge_train)
)
from .store import DEFAULT_STORE, JOB, Plan, ReadGuard, digest_of, guarded
from .vocab import LambdaTies

# Where the workflow keeps what it learnt from timm about each arch (arch_facts), relative to the folder
# snakemake runs in: a dry run may write there (never under results/).
DAG_CACHE = Path(".snakemake") / "qvlib"
# Bumped when what arch_facts records, or how qvlib computes it, changes: every cached answer is redone.
ARCH_FACTS_VERSION = 1


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
            # A store job's file is JSON (qvlib.store), read as such: YAML 1.1 takes JSON's 1e-05 for a string.
            raw = (json.load(f) if path.suffix == ".json" else yaml.safe_load(f)) or {}
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

    @property
    def job_key(self) -> str | None:
        """The store key of the job whose file this is (qvlib.store), or None."""
        return self.raw.head.get("key") if isinstance(self.raw, ReadGuard) else None

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
        return self.arch_facts(arch).preprocess

    # -- the sections, each parsed (and checked) by its dataclass when asked for, from only its own keys
    def quant_section(self) -> QuantSection:
        return QuantSection.from_config(self.raw.get("quant"))

    def policy_section(self) -> QuantPolicy:
        return QuantPolicy.from_config(self.raw.get("policy"))

    def arch_section(self, name: str) -> ArchSection:
        if name not in self.raw["archs"]:
            raise ValueError(f"unknown arch {name!r}; this config has: {', '.join(self.arch_names)}")
        return ArchSection.from_config(name, self.raw["archs"][name])

    def task_section(self, name: str) -> TaskSection:
        """Task ``name``'s options over ``task_defaults`` (reads both), and its own train keys."""
        return TaskSection.from_config(name, self.task(name), self.data_section("task_defaults").task_defaults)

    def data_section(self, *keys: str) -> DataSection:
        """The data settings ``keys`` (default: all of them; the rest keep their defaults)."""
        return DataSection.from_config(self.raw, keys or None)

    def finetune_section(self) -> TrainSettings:
        return TrainSettings.from_config(self.raw["finetune"], "finetune")

    def pretrain_section(self) -> PretrainSection:
        if "pretrain" not in self.raw:
            raise ValueError(f"{self.path}: no 'pretrain' section, but an arch has backbone source 'pretrain'")
        return PretrainSection.from_config(self.raw["pretrain"])

    def evaluate_section(self) -> EvaluateSection:
        return EvaluateSection.from_config(self.raw.get("evaluate"))

    def lambda_section(self, *keys: str) -> LambdaSection:
        """The lambda settings ``keys`` (default: all of them; the rest keep their defaults)."""
        return LambdaSection.from_config(self.raw, keys or None)

    def datafree_section(self) -> DatafreeSection:
        return DatafreeSection.from_config(self.raw.get("datafree"))

    def controls_section(self, *keys: str) -> ControlsSection:
        """The control settings ``keys`` (default: all of them; the rest keep their defaults)."""
        return ControlsSection.from_config(self.raw, keys or None)

    # -- the settings, as the pipeline reads them
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
        return self.data_section("data_seed").data_seed

    @property
    def random_controls(self) -> int:
        """Norm-matched random directions evaluated beside each donor (their gains are averaged)."""
        return self.controls_section("random_controls").random_controls

    @property
    def merged_donors(self) -> list[str]:
        """Merge methods (qvlib.merging) whose leave-one-out merged donor joins every receiver's row."""
        return list(self.controls_section("merged_donors").merged_donors)

    @property
    def datafree_criteria(self) -> list[str]:
        """Data-free lambda criteria (qvlib.datafree) recorded beside the sweep of every cell."""
        return list(self.datafree_section().criteria)

    @property
    def datafree_images(self) -> int:
        """How many noise images the ``outputs`` criterion compares the models on."""
        return self.datafree_section().noise_images

    @property
    def datafree_proxy_images(self) -> int:
        """How many training images of other tasks the @donor and @others rules compare the models on."""
        return self.datafree_section().proxy_images

    @property
    def data_root(self) -> Path:
        return self.data_section("data_root").root

    @property
    def reuse_backbones(self) -> Path | None:
        """The folder of backbones pretrained earlier (qvlib.backbones), or None: always pretrain."""
        folder = self.raw.get("reuse_backbones")
        return None if folder is None else Path(folder).expanduser()

    @property
    def quants(self) -> list[QuantSpec]:
        """Every quantizer of the run (``quant``: one mapping or a list of them); FT is shared, QAT,
        vectors, baselines and cells are per quantizer, named by its tag."""
        return list(self.quant_section().specs)

    @property
    def quant_tags(self) -> list[str]:
        return self.quant_section().tags

    @property
    def quant(self) -> QuantSpec:
        """The quantizer of this job (``with_quant``), else the first."""
        return self.quant_section().spec(self.quant_tag)

    @property
    def policy(self) -> QuantPolicy:
        """Which tensors are quantized (``policy: {pattern: regex}``), and which are trained and held by
        vectors (``policy: {scope: linear | all}``)."""
        return self.policy_section()

    @property
    def lambdas(self) -> list[float]:
        return list(self.lambda_section("lambdas").lambdas)

    @property
    def lambda_ties(self) -> LambdaTies:
        """Which of several best lambdas a pick keeps (qvlib.tables.pairs): nearest 1, or the smallest."""
        return self.lambda_section("lambda_ties").lambda_ties

    @property
    def lambda_search(self) -> dict:
        """How each cell scores the sweep: ``method`` (dense | racing) and the race's ``keep``,
        ``margin``, ``tolerance`` and ``start`` the config sets (see qvlib.racing.race_lambda)."""
        return self.lambda_section("lambda_search").lambda_search.options()

    @property
    def oracle_search(self) -> bool:
        """Whether each cell also runs the adaptive (golden-section) lambda search on test (on when left out)."""
        return self.lambda_section("oracle_search").oracle_search

    @property
    def task_names(self) -> list[str]:
        return list(self.raw["tasks"])

    @property
    def arch_names(self) -> list[str]:
        return list(self.raw["archs"])

    def arch(self, name: str, backbone_path: str | Path | None = None):
        """The arch (qvlib.models.ArchSpec, which imports timm); a backbone of source 'pretrain' (trained
        by ``qv pretrain``) is read from ``backbone_path``."""
        return self.arch_section(name).spec(backbone_path)

    def arch_facts(self, name: str, cache: str | Path | None = None) -> "ArchFacts":
        """What a timm build of arch ``name`` says (its pixels and weight widths): see :func:`arch_facts`."""
        return arch_facts(self.arch_section(name), cache)

    def task(self, name: str) -> Mapping[str, Any]:
        """Task ``name``'s own mapping as written (null: {}), checked by its TaskSection."""
        if name not in self.raw["tasks"]:
            raise ValueError(f"unknown task {name!r}; this config has: {', '.join(self.task_names)}")
        own = self.raw["tasks"][name] or {}
        TaskSection.from_config(name, own)
        return own

    def load_options(self, task: str, preprocess: Preprocess) -> LoadOptions:
        data = self.data_section()
        section = TaskSection.from_config(task, self.task(task), data.task_defaults)
        return LoadOptions(preprocess=preprocess, root=data.root, seed=data.data_seed, download=data.download,
                           calib_position=data.calib_position, **section.options())

    def arch_train(self, arch: str) -> Mapping[str, Any]:
        """The arch's own ``train`` keys (over ``finetune``, under a task's), as written: no defaults."""
        return dict(self.arch_section(arch).train.values)

    def finetune_train(self, task: str, arch: str | None = None) -> TrainConfig:
        """FT and QAT settings of ``task`` on ``arch``: ``finetune`` < ``archs.<arch>.train`` <
        ``tasks.<task>.train``, each narrower section's keys winning (TrainConfig's defaults for what none
        sets). ``arch`` may be left out only while no arch has train settings of its own."""
        if arch is None:
            own = [name for name in self.arch_names if self.arch_section(name).train.values]
            if own:
                raise ValueError(f"arch {own[0]!r} has train settings of its own: say which arch the task "
                                 f"{task!r} trains on (Config.finetune_train(task, arch))")
            arch_keys: Mapping[str, Any] = {}
        else:
            arch_keys = self.arch_train(arch)
        task_keys = TrainOverrides.from_config(self.task(task).get("train"), f"tasks.{task}.train").values
        return self.finetune_section().train_config(self.seed, arch_keys, task_keys)

    def pretrain_train(self) -> TrainConfig:
        return self.pretrain_section().train.train_config(self.seed)

    def pretrain_mixture(self) -> tuple[list[str], int]:
        section = self.pretrain_section()
        return list(section.tasks), section.n_per_task

    def eval_batch_size(self) -> int:
        return self.evaluate_section().batch_size

    def eval_precision(self) -> str:
        """bf16 (autocast on a GPU) or fp32 for every evaluation forward."""
        return str(self.evaluate_section().precision)

    def store_plan(self, cache: str | Path | None = None) -> Plan:
        """Every store job of this (whole, validated) config (qvlib.store.Plan), as the workflow plans it:
        quantizers by tag in their canonical form, each arch's pixels from timm (cached under ``cache``)."""
        quants = {spec.tag: json.loads(spec.to_json()) for spec in self.quants}
        pixels = {}
        for arch in self.arch_names:
            pre = self.arch_facts(arch, cache=cache).preprocess
            pixels[arch] = (pre.pixels(), pre.pixel_settings())
        return Plan(self.raw, quants, pixels, root=str(self.raw.get("store") or DEFAULT_STORE).rstrip("/"))

    def check(self, cache: str | Path | None = None) -> None:
        """What a job would find wrong with this config, found before any job runs (the workflow calls
        this on a dry run): every section as its dataclass checks it (unknown tasks and pretraining
        generators, quantizers, the policy's regex, ...), each arch (a timm VisionTransformer, whose
        quantized widths every group size divides: :func:`arch_facts`, kept in ``cache`` if given) and
        each job's training settings. The first problem raises ValueError naming its key."""
        for name in self.task_names:
            self._checked(lambda: self.task_section(name).check_known())
        self._checked(self.data_section)
        archs = {name: self._checked(lambda: self.arch_section(name)) for name in self.arch_names}
        needs = [name for name, section in archs.items() if section.needs_pretrain]
        if needs and "pretrain" not in self.raw:
            raise ValueError(f"{self.path}: archs.{needs[0]}.backbone: source pretrain needs a pretrain section")
        if "pretrain" in self.raw:
            self._checked(self.pretrain_section)
        if needs:
            self._checked(self.pretrain_train, "pretrain.train")
        specs = self._checked(self.quant_section).specs
        policy = self._checked(self.policy_section)
        self._checked(self.finetune_section)
        for build in (self.evaluate_section, self.lambda_section, self.datafree_section, self.controls_section):
            self._checked(build)
        for name, section in archs.items():
            widths = self._quantized_widths(section, policy, cache)
            for spec in specs:
                if spec.granularity == "group":
                    bad = sorted(w for w in widths.values() if w % spec.group_size)
                    if bad:
                        raise ValueError(f"{self.path}: quant group_size {spec.group_size} does not divide the input width {bad[0]} "
                                         f"of arch {name!r}'s quantized weights: pick a divisor of {', '.join(map(str, sorted(set(widths.values()))))}")
            for task in self.task_names:
                self._checked(lambda: self.finetune_train(task, name), f"tasks.{task}.train (on arch {name})")

    def _checked(self, build, key: str | None = None):
        """``build()``, its ValueError (or TypeError) prefixed with this config's path (and ``key``)."""
        try:
            return build()
        except (ValueError, TypeError) as err:
            raise ValueError(f"{self.path}: {key + ': ' if key else ''}{err}") from None

    def _quantized_widths(self, section: ArchSection, policy: QuantPolicy, cache: str | Path | None) -> dict[str, int]:
        """Input width of each tensor of the arch that ``policy`` quantizes (:func:`arch_facts`); the
        pattern must match at least one."""
        facts = self._checked(lambda: arch_facts(section, cache))
        widths = {n: w for n, w in facts.widths.items() if policy.matches(n)}
        if not widths:
            raise ValueError(f"{self.path}: policy.pattern {policy.pattern!r} matches no 2-D weight of arch {section.name!r} "
                             "(timm names such as blocks.0.attn.qkv.weight)")
        return widths


@dataclass(frozen=True)
class ArchFacts:
    """What only a timm build of an arch knows, and the workflow's DAG needs: its preprocessing (timm's
    data config at the arch's own input size: the pixels key of its caches) and the input width of each
    2-D parameter (the group sizes must divide the quantized ones)."""

    preprocess: Preprocess
    widths: Mapping[str, int]

    def to_json(self) -> dict[str, Any]:
        return {"preprocess": asdict(self.preprocess), "widths": dict(self.widths)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ArchFacts":
        pre = {k: tuple(v) if isinstance(v, list) else v for k, v in data["preprocess"].items()}
        return cls(Preprocess(**pre), {str(k): int(v) for k, v in data["widths"].items()})


_FACTS: dict[str, ArchFacts] = {}  # this process's answers, by key


@functools.lru_cache(maxsize=None)
def _library_versions() -> dict[str, str]:
    """The versions of what decides a build's answer (timm's configs and model code, torch)."""
    out = {}
    for dist in ("timm", "torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "none"
    return out


def arch_facts_key(section: ArchSection) -> str:
    """What an arch's facts depend on: the timm name and overrides (not the backbone's weights, nor the
    arch's name), the timm and torch versions, and ARCH_FACTS_VERSION."""
    return digest_of(ARCH_FACTS_VERSION, section.build(), dict(_library_versions()))


def arch_facts(section: ArchSection, cache: str | Path | None = None) -> ArchFacts:
    """The arch's :class:`ArchFacts`, from a headless build on the meta device (no weights allocated).

    The build imports torch and timm (seconds); with ``cache`` (a folder; the workflow's is DAG_CACHE)
    the answer is kept in ``<cache>/archs/<key>.json``, keyed by :func:`arch_facts_key`, so a later
    run (every dry run, every cluster job's parse) reads it without importing either. Archs that build
    alike share one answer. A config error (no such timm model, not a VisionTransformer, overrides timm
    refuses) raises ValueError naming the arch's key, and is never cached."""
    key = arch_facts_key(section)
    path = Path(cache) / "archs" / f"{key}.json" if cache is not None else None
    facts = _FACTS.get(key)
    stored = False
    if path is not None and path.exists():
        try:
            facts = ArchFacts.from_json(json.loads(path.read_text()))
            stored = True
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable: rewritten below
    if facts is None:
        facts = _build_facts(section)
    if path is not None and not stored:
        _write_json(path, {**facts.to_json(), "arch": section.build(), "versions": dict(_library_versions()),
                           "version": ARCH_FACTS_VERSION})
    _FACTS[key] = facts
    return facts


def _build_facts(section: ArchSection) -> ArchFacts:
    import torch

    from .models import build_vit

    key = f"archs.{section.name}"
    try:
        spec = section.spec()
    except (ValueError, TypeError) as err:
        raise ValueError(f"{key}: {err}") from None
    try:
        with torch.device("meta"):
            model = build_vit(spec, num_classes=0)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{key}.timm_name {spec.timm_name!r}: {err}") from None
    widths = {name: int(p.shape[1]) for name, p in model.named_parameters() if p.dim() == 2}
    return ArchFacts(Preprocess.from_model(model), widths)


def _write_json(path: Path, data: Any) -> None:
    """Write ``data`` atomically (a reader never sees half a file; parallel writers each write whole
    files); a folder that cannot be written is no error, the answer is only not kept."""
    from .fileio import write_json

    try:
        write_json(path, data)
    except OSError:
        pass


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
