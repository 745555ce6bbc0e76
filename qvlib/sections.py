"""The run config's sections as small frozen dataclasses, each parsed and validated in one place.

Every section of the YAML file becomes one object here (``quant`` a :class:`QuantSection` of
:class:`QuantSpec`, ``policy`` a :class:`QuantPolicy`, ``archs.<name>`` an :class:`ArchSection`,
``tasks.<name>`` a :class:`TaskSection`, ``finetune`` a :class:`TrainSettings`, ...). A section
checks itself when it is built (a ValueError whose message starts with the key it names) and has a
``fingerprint()``: a short stable hash of its canonical form, the defaults filled in, so two configs
that write the same setting differently (left out or the default spelled out) agree.

Sections that gather several top-level keys (:class:`DataSection`, :class:`LambdaSection`,
:class:`ControlsSection`) are built from only the keys asked for (``from_config(raw, keys)``): a
store job's file (qvlib.store.ReadGuard) refuses the keys its job does not read, and each of
:class:`qvlib.config.Config`'s accessors reads exactly the keys it needs.

Nothing here imports torch or timm: the workflow builds its DAG from this module. The torch modules
re-export what moved here (qvlib.quant: QuantSpec, QuantPolicy; qvlib.train: TrainConfig;
qvlib.data.base: Preprocess; qvlib.data.registry: LoadOptions).
"""

from __future__ import annotations

import math
import re
import json
import sys
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Literal, Mapping, Sequence

from .store import digest_of
from .vocab import LambdaTies, Precision, SweepMethod

if TYPE_CHECKING:  # annotations only
    import torch


# ------------------------------------------------------------------ shared helpers
def _plain(value: Any) -> Any:
    """``value`` as plain JSON data: sections by their canonical form, mappings with sorted string keys,
    tuples as lists, enums by value, paths as strings."""
    if isinstance(value, Section):
        return value.canonical()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


class Section:
    """What every config section has: a canonical form (JSON data, defaults filled in) and its hash.
    ``LABELS`` are fields that name the section (an arch's or a task's name) rather than set anything:
    they are left out of both. ``FLOATS`` are compared as floats (``lr: 1`` is ``lr: 1.0``)."""

    LABELS: ClassVar[tuple[str, ...]] = ()
    FLOATS: ClassVar[tuple[str, ...]] = ()

    def canonical(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):  # type: ignore[arg-type]
            if f.name in self.LABELS:
                continue
            value = getattr(self, f.name)
            if f.name in self.FLOATS and _number(value):
                value = float(value)
            out[f.name] = _plain(value)
        return out

    def fingerprint(self) -> str:
        """Short stable hash of the section's canonical form (its kind included): equal settings, equal hash."""
        return digest_of(type(self).__name__, self.canonical())


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _mapping(value: Any, key: str) -> Mapping[str, Any]:
    """A section's mapping (None or left out: empty), or a ValueError naming ``key``."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{key} must be a mapping, got {value!r}")
    return value


def _known(data: Mapping[str, Any], allowed: Iterable[str], key: str, what: str = "key(s)") -> None:
    allowed = list(allowed)
    unknown = sorted(set(data) - set(allowed), key=str)
    if unknown:
        raise ValueError(f"{key}: unknown {what} {unknown}; allowed: {', '.join(allowed)}")


def _int(value: Any, key: str, minimum: int | None = None, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        floor = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{key} must be an integer{floor}{' or null' if optional else ''}, got {value!r}")
    return value


def _real(value: Any, key: str, minimum: float | None = None, above: float | None = None,
          below: float | None = None) -> float:
    """A finite number (not a bool) within the bounds: ``minimum`` inclusive, ``above``/``below`` exclusive."""
    ok = _number(value) and math.isfinite(value)
    ok = ok and (minimum is None or value >= minimum) and (above is None or value > above) and (below is None or value < below)
    if not ok:
        bounds = [f">= {minimum}" if minimum is not None else "", f"> {above}" if above is not None else "",
                  f"< {below}" if below is not None else ""]
        text = " and ".join(b for b in bounds if b)
        raise ValueError(f"{key} must be a finite number{' ' + text if text else ''}, got {value!r}")
    return value


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def _choice(value: Any, choices: Sequence[str], key: str) -> str:
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _registered(builtin: Sequence[str], module: str, attr: str) -> list[str]:
    """The names a registry knows: the builtin ones (known without importing the torch module that holds
    the functions), then any that a plugin registered there, once that module is loaded."""
    loaded = getattr(sys.modules.get(module), attr, None) or {}
    return list(dict.fromkeys([*builtin, *loaded]))


def _pick_keys(raw: Mapping[str, Any], keys: Iterable[str] | None, all_keys: Sequence[str], section: str) -> dict[str, Any]:
    """The top-level keys ``keys`` (default: all of ``all_keys``) that ``raw`` sets (null: left out).
    Only those are read: a job file's ReadGuard refuses a key its job does not read."""
    keys = tuple(all_keys) if keys is None else tuple(keys)
    bad = [k for k in keys if k not in all_keys]
    if bad:
        raise ValueError(f"the {section} section has no key(s) {bad}; its keys: {', '.join(all_keys)}")
    return {k: raw[k] for k in keys if k in raw and raw[k] is not None}


# ------------------------------------------------------------------ names known without torch
# The builtin names of qvlib's registries, known here so that a config can be checked without loading
# the torch modules that hold the functions (tests/test_sections.py checks each against its registry).
BUILTIN_SCALES: tuple[str, ...] = ("absmax", "mse", "hqq")  # qvlib.quant.SCALES
GENERATORS: tuple[str, ...] = ("shapes", "orientation", "frequency", "glyphs", "numerals", "dots", "blur")  # qvlib.data.synthetic
BUILTIN_TASKS: tuple[str, ...] = (  # qvlib.data.registry.REGISTRY
    *GENERATORS, "digits", "mnist5k",
    "mnist", "fashion_mnist", "kmnist", "emnist", "cifar10", "cifar100", "svhn", "stl10", "gtsrb", "dtd",
    "stanford_cars", "sun397", "fer2013", "pcam", "flowers102", "oxford_pet", "rendered_sst2", "food101", "eurosat",
    "resisc45", "tiny_imagenet", "imagenet",
)
BUILTIN_MERGE_METHODS: tuple[str, ...] = ("sum", "mean", "ties")  # qvlib.merging.MERGE_METHODS
BUILTIN_CRITERIA: tuple[str, ...] = ("weights", "outputs", "agreement", "features")  # qvlib.datafree.LAMBDA_CRITERIA
INPUT_MEASURES: tuple[str, ...] = ("outputs", "agreement", "features")  # the criteria that read images
IMAGE_SOURCES: tuple[str, ...] = ("noise", "donor", "others", "synth")  # qvlib.datafree.IMAGE_SOURCES


def scale_names() -> list[str]:
    return _registered(BUILTIN_SCALES, "qvlib.quant", "SCALES")


def known_task_names() -> list[str]:
    return sorted(_registered(BUILTIN_TASKS, "qvlib.data.registry", "REGISTRY"))


def merge_method_names() -> list[str]:
    return _registered(BUILTIN_MERGE_METHODS, "qvlib.merging", "MERGE_METHODS")


def criterion_names() -> list[str]:
    return _registered(BUILTIN_CRITERIA, "qvlib.datafree", "LAMBDA_CRITERIA")


# ------------------------------------------------------------------ quant: the quantizers
Granularity = Literal["channel", "group", "tensor"]
GRANULARITIES: tuple[str, ...] = ("channel", "group", "tensor")


@dataclass(frozen=True)
class QuantSpec(Section):
    """How weights are quantized: bit-width and the blocks that share one scale."""

    bits: int = 3
    granularity: Granularity = "channel"
    group_size: int | None = None
    scale: str = "absmax"

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer in 2..8, got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}"
            )
        if self.granularity == "group":
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(
                    f"granularity 'group' needs a positive integer group_size, got {self.group_size!r}"
                )
        elif self.group_size is not None:
            raise ValueError(f"group_size is only valid with granularity 'group', not {self.granularity!r}")
        names = scale_names()
        if self.scale not in names:
            raise ValueError(f"scale must be one of {', '.join(names)}, got {self.scale!r}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def tag(self) -> str:
        """Short name used in file names and tables, e.g. ``w3-channel``, ``w4-group128``; a scale other
        than the paper's absmax is appended (``w2-channel-mse``)."""
        blocks = f"group{self.group_size}" if self.granularity == "group" else self.granularity
        return f"w{self.bits}-{blocks}" + ("" if self.scale == "absmax" else f"-{self.scale}")

    def to_json(self) -> str:
        """JSON of the spec; the default absmax scale is left out, so files written before scales
        existed compare equal."""
        data = asdict(self)
        if data["scale"] == "absmax":
            del data["scale"]
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_mapping(cls, data: Mapping) -> "QuantSpec":
        unknown = set(data) - {"bits", "granularity", "group_size", "scale"}
        if unknown:
            raise ValueError(f"unknown QuantSpec keys: {sorted(unknown)}")
        return cls(**dict(data))

    @classmethod
    def from_json(cls, text: str) -> "QuantSpec":
        return cls.from_mapping(json.loads(text))


@dataclass(frozen=True)
class QuantSection(Section):
    """``quant``: one quantizer (a mapping) or a list of them, told apart by their tags. FT is shared;
    QAT, vectors, baselines and cells are per quantizer."""

    specs: tuple[QuantSpec, ...] = (QuantSpec(),)

    def __post_init__(self) -> None:
        if not self.specs:
            raise ValueError("quant is an empty list")
        tags = [s.tag for s in self.specs]
        if len(set(tags)) != len(tags):
            raise ValueError(f"quant: quantizers must differ, got tags {tags}")

    @classmethod
    def from_config(cls, value: Any) -> "QuantSection":
        """From the config's ``quant`` value (left out: the default quantizer)."""
        if value is None:
            return cls()
        items = [(f"quant[{i}]", q) for i, q in enumerate(value)] if isinstance(value, list) else [("quant", value)]
        specs = []
        for key, item in items:
            data = _mapping(item, key)
            try:
                specs.append(QuantSpec.from_mapping(data))
            except (ValueError, TypeError) as err:
                raise ValueError(f"{key}: {err}") from None
        return cls(tuple(specs))

    @property
    def tags(self) -> list[str]:
        return [s.tag for s in self.specs]

    def spec(self, tag: str | None) -> QuantSpec:
        """The quantizer of ``tag`` (None: the first)."""
        if tag is None:
            return self.specs[0]
        for spec in self.specs:
            if spec.tag == tag:
                return spec
        raise ValueError(f"quantizer {tag!r} is not one of this config's quantizers {self.tags}")


# ------------------------------------------------------------------ policy: which tensors
# Linear weights inside the transformer blocks of a timm ViT: attn.qkv, attn.proj, mlp.fc1, mlp.fc2.
VIT_BLOCK_LINEARS = r"^blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))\.weight$"

# What fine-tuning trains and a quantization vector carries (config ``policy: {scope}``):
#   linear: only the quantized tensors (the paper's text: block linear weights, a fixed random head);
#   all:    every parameter, the head included (the authors' code); vectors carry every tensor but the head.
Scope = Literal["linear", "all"]
SCOPES: tuple[str, ...] = ("linear", "all")
HEAD_PREFIX = "head."


@dataclass(frozen=True)
class QuantPolicy(Section):
    """Which tensors are quantized (a regex over parameter names, 2-D tensors only), and with
    ``scope`` which are trained and carried by a quantization vector. Built once from the config
    (``Config.policy``) and passed down; ``DEFAULT_POLICY`` is the paper text's.

    scope ``linear``: trained = carried = quantized. scope ``all``: every parameter trains (the
    head too); a vector carries every floating tensor except the head's; only the pattern's tensors
    are fake-quantized, in QAT and after patching, and the rest of a vector is added unquantized.
    """

    pattern: str = VIT_BLOCK_LINEARS
    scope: Scope = "linear"

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"the quantization pattern must be a non-empty regular expression, got {self.pattern!r}")
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ValueError(f"the quantization pattern {self.pattern!r} is not a valid regular expression: {err}") from None

    @classmethod
    def from_config(cls, value: Any) -> "QuantPolicy":
        """From the config's ``policy`` mapping (left out: the paper's policy)."""
        data = _mapping(value, "policy")
        try:
            _known(data, ("pattern", "scope"), "policy")
            return cls(**dict(data))
        except ValueError as err:
            raise ValueError(str(err) if str(err).startswith("policy") else f"policy: {err}") from None

    def matches(self, name: str, tensor: "torch.Tensor | None" = None) -> bool:
        """Is this tensor quantized?"""
        if tensor is not None and tensor.dim() != 2:
            return False
        return re.search(self.pattern, name) is not None

    def carries(self, name: str, tensor: "torch.Tensor | None" = None) -> bool:
        """Is this tensor part of a quantization vector (and so patched)?"""
        if self.scope == "linear":
            return self.matches(name, tensor)
        return not name.startswith(HEAD_PREFIX) and (tensor is None or tensor.is_floating_point())

    def trains(self, name: str, tensor: "torch.Tensor | None" = None) -> bool:
        """Does fine-tuning (FT and QAT) update this parameter?"""
        return self.scope == "all" or self.matches(name, tensor)

    @staticmethod
    def _items(named):
        return named.items() if isinstance(named, Mapping) else named

    def select(self, named) -> list[str]:
        """Names of the quantized tensors, in order, from a state dict or ``model.named_parameters()``."""
        return [name for name, t in self._items(named) if self.matches(name, t)]

    def select_carried(self, named) -> list[str]:
        """Names of the tensors a vector holds, in order."""
        return [name for name, t in self._items(named) if self.carries(name, t)]

    def select_model(self, model: "torch.nn.Module") -> list[str]:
        """The model's quantized parameters; an error when there are none."""
        names = self.select(model.named_parameters())
        if not names:
            raise ValueError(f"no parameter of {type(model).__name__} matches the quantization pattern {self.pattern!r}")
        return names

    def trained_model(self, model: "torch.nn.Module") -> list[str]:
        """The model's parameters that fine-tuning updates (at least the quantized ones)."""
        self.select_model(model)
        return [name for name, p in model.named_parameters() if self.trains(name, p)]


# The paper's policy: every module that quantizes, trains or patches takes this as its default.
DEFAULT_POLICY = QuantPolicy()


# ------------------------------------------------------------------ training: finetune, pretrain.train, archs/tasks train
LAST_BATCH = ("drop", "keep")
LR_SCHEDULES = ("aligned", "lagged")
# Steps and epochs are two ways to say how long a run trains: a section that gives one replaces both.
RUN_LENGTH = ("steps", "epochs")


def check_precision(precision: str) -> str:
    """``precision`` if it names a :class:`Precision`, else a ValueError that lists the choices."""
    if precision not in tuple(Precision):
        raise ValueError(f"precision must be one of {', '.join(Precision)}, got {precision!r}")
    return precision


def micro_batches_per_epoch(n: int, batch_size: int, keep_last: bool = False) -> int:
    """Micro-batches in one pass over ``n`` examples: full ones only, or with a smaller last one."""
    size = min(batch_size, n)
    return max(1, math.ceil(n / size) if keep_last else n // size)


@dataclass(frozen=True)
class TrainConfig(Section):
    """Optimisation hyperparameters. Give ``steps`` or ``epochs`` (one of them)."""

    FLOATS: ClassVar[tuple[str, ...]] = ("epochs", "lr", "weight_decay", "grad_clip")

    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 50
    num_workers: int = 0
    precision: str = Precision.BF16
    augment: bool = False  # timm's training augmentation of the original images (qvlib.data.augment)
    # What happens to the images an epoch's last full micro-batch leaves over: "drop" them (qvlib's
    # default) or "keep" them as a smaller last micro-batch, as a DataLoader without drop_last does (the
    # authors' code: ceil(N / batch) micro-batches per epoch). Only matters with ``epochs``.
    last_batch: str = "drop"
    # When the learning-rate schedule advances: "aligned" (qvlib's default) runs optimizer step k at the
    # schedule's value for k; "lagged" advances it after each optimizer step, as the authors' code does,
    # so step 0 runs at the optimizer's peak lr and step k >= 1 at the schedule's value for k - 1.
    lr_schedule: str = "aligned"

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.last_batch not in LAST_BATCH:
            raise ValueError(f"last_batch must be one of {', '.join(LAST_BATCH)}, got {self.last_batch!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(f"give exactly one of steps or epochs (got steps={self.steps}, epochs={self.epochs})")
        for key in ("batch_size", "grad_accum", "checkpoint_every", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "TrainConfig":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown training keys: {sorted(unknown)}")
        return cls(**dict(data))

    def total_steps(self, n_examples: int) -> int:
        """Optimizer steps of the run: ``steps``, or ``epochs`` passes of micro-batches over
        ``n_examples`` (``last_batch`` says whether an epoch's partial micro-batch counts)."""
        if self.steps is not None:
            return self.steps
        if self.last_batch == "keep":  # the authors' count: epochs * ceil(N / batch) // accumulation
            micro = micro_batches_per_epoch(n_examples, self.batch_size, keep_last=True)
            return max(1, math.floor(self.epochs * micro) // self.grad_accum)
        per_epoch = max(1, n_examples // (self.batch_size * self.grad_accum))
        return max(1, math.ceil(self.epochs * per_epoch))


# The keys a train section may set (the seed is the config's replicate seed, never a train key).
TRAIN_KEYS: tuple[str, ...] = tuple(f.name for f in fields(TrainConfig) if f.name != "seed")
# TrainConfig's defaults of every key but the run's length: what the widest sections fill in.
TRAIN_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(TrainConfig)
                                  if f.name in TRAIN_KEYS and f.name not in RUN_LENGTH}


def merge_train(*sections: Mapping[str, Any]) -> dict[str, Any]:
    """Training settings from the widest section to the narrowest (finetune, arch, task): each one's keys
    win over the wider ones', and a section that sets ``steps`` or ``epochs`` replaces both."""
    merged: dict[str, Any] = {}
    for section in sections:
        if any(k in section for k in RUN_LENGTH):
            merged = {k: v for k, v in merged.items() if k not in RUN_LENGTH}
        merged.update(section)
    return merged


@dataclass(frozen=True)
class TrainOverrides(Section):
    """A narrower train section as written (``archs.<arch>.train``, ``tasks.<task>.train``): only the
    keys it sets, each checked as TrainConfig checks it; they win over the wider sections' keys."""

    values: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, value: Any, key: str):
        data = dict(_mapping(value, key))
        unknown = set(data) - set(TRAIN_KEYS)
        if unknown:
            raise ValueError(f"{key}: unknown training keys: {sorted(unknown)} (allowed: {', '.join(TRAIN_KEYS)})")
        if data.get("steps") is not None:
            _int(data["steps"], f"{key}.steps", 1)
        if data.get("epochs") is not None:
            _real(data["epochs"], f"{key}.epochs", above=0)
        try:  # every other key as TrainConfig checks it (with a stand-in run length)
            TrainConfig(**{k: v for k, v in data.items() if k not in RUN_LENGTH}, steps=1)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{key}: {err}") from None
        return cls(data)

    def canonical(self) -> dict[str, Any]:
        return _plain({k: float(v) if k in TrainConfig.FLOATS and _number(v) else v for k, v in self.values.items()})


@dataclass(frozen=True)
class TrainSettings(TrainOverrides):
    """A widest train section (``finetune``, ``pretrain.train``): the keys it sets over TrainConfig's
    defaults, which its canonical form fills in (the schema fills the same defaults)."""

    def canonical(self) -> dict[str, Any]:
        return TrainOverrides({**TRAIN_DEFAULTS, **self.values}).canonical()

    def train_config(self, seed: int, *narrower: Mapping[str, Any]) -> TrainConfig:
        """The run's TrainConfig: these settings with ``narrower`` sections' keys over them."""
        return TrainConfig.from_mapping({**merge_train(self.values, *narrower), "seed": seed})


# ------------------------------------------------------------------ archs
# Keys a user may override on top of a timm architecture name, with the smallest value each takes.
ARCH_OVERRIDES = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
_OVERRIDE_MINIMA = {"img_size": 8, "patch_size": 1, "embed_dim": 8, "depth": 1, "num_heads": 1}
BACKBONE_SOURCES = ("timm", "file", "pretrain", "random")
BACKBONE_KEYS = ("source", "tag", "file", "path", "seed")


@dataclass(frozen=True)
class ArchSection(Section):
    """``archs.<name>``: a timm model name, its overrides, where the backbone comes from, and the arch's
    own train keys. :meth:`spec` is the qvlib.models.ArchSpec (which asks timm whether the name exists);
    :meth:`build` is what a timm build depends on (the pixels and widths of :func:`qvlib.config.arch_facts`)."""

    LABELS: ClassVar[tuple[str, ...]] = ("name",)

    name: str
    timm_name: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    backbone: Mapping[str, Any] = field(default_factory=lambda: {"source": "random"})
    train: TrainOverrides = field(default_factory=TrainOverrides)

    def __post_init__(self) -> None:
        key = f"archs.{self.name}"
        if not isinstance(self.timm_name, str) or not self.timm_name:
            raise ValueError(f"{key}.timm_name must be a timm model name, got {self.timm_name!r}")
        _known(self.overrides, ARCH_OVERRIDES, f"{key}.overrides", "override(s)")
        for name, value in self.overrides.items():
            if name == "mlp_ratio":
                _real(value, f"{key}.overrides.mlp_ratio", above=0)
            else:
                _int(value, f"{key}.overrides.{name}", _OVERRIDE_MINIMA[name])
        _known(self.backbone, BACKBONE_KEYS, f"{key}.backbone")
        _choice(self.backbone.get("source"), BACKBONE_SOURCES, f"{key}.backbone.source")

    @classmethod
    def from_config(cls, name: str, value: Any) -> "ArchSection":
        key = f"archs.{name}"
        data = _mapping(value, key)
        _known(data, ("timm_name", "overrides", "backbone", "train"), key)
        if "timm_name" not in data:
            raise ValueError(f"{key}: missing timm_name (a timm VisionTransformer name, e.g. vit_base_patch16_224)")
        return cls(name, data["timm_name"], dict(_mapping(data.get("overrides"), f"{key}.overrides")),
                   dict(_mapping(data.get("backbone", {"source": "random"}), f"{key}.backbone")),
                   TrainOverrides.from_config(data.get("train"), f"{key}.train"))

    def canonical(self) -> dict[str, Any]:
        out = super().canonical()
        if _number(out["overrides"].get("mlp_ratio")):  # mlp_ratio: 4 is mlp_ratio: 4.0
            out["overrides"]["mlp_ratio"] = float(out["overrides"]["mlp_ratio"])
        return out

    @property
    def needs_pretrain(self) -> bool:
        return self.backbone.get("source") == "pretrain"

    def build(self) -> dict[str, Any]:
        """What a timm build of the arch depends on: its name and overrides (not its backbone's weights)."""
        return {"timm_name": self.timm_name, "overrides": _plain(self.overrides)}

    def spec(self, backbone_path: str | Path | None = None):
        """The qvlib.models.ArchSpec (imports timm); a backbone of source 'pretrain' (trained by ``qv
        pretrain``) or 'file' is read from ``backbone_path`` when given."""
        from .models import ArchSpec

        backbone = dict(self.backbone)
        if backbone.get("source") == "pretrain" and backbone_path is not None:
            backbone = {"source": "file", "path": str(backbone_path)}
        elif backbone.get("source") == "file" and backbone_path is not None:
            backbone["path"] = str(backbone_path)
        return ArchSpec(name=self.name, timm_name=self.timm_name, overrides=dict(self.overrides), backbone=backbone)


# ------------------------------------------------------------------ tasks and their data
CALIB_POSITIONS = ("head", "tail")
TASK_OPTIONS = ("n_train", "n_test", "max_train", "max_test", "source")
SOURCE_KINDS = ("hf", "idx_gz")
SOURCE_KEYS = ("kind", "id", "name", "train", "test", "image", "label", "path", "transpose")
N_TRAIN, N_TEST = 3000, 1000  # generated tasks' sizes when no option sets them


def _task_options(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    """Task options (a task's own or ``task_defaults``), each checked; ``key`` names them in errors."""
    out = dict(data)
    for name in ("n_train", "n_test"):
        if name in out:
            _int(out[name], f"{key}.{name}", 1)
    for name in ("max_train", "max_test"):
        if name in out:
            _int(out[name], f"{key}.{name}", 1, optional=True)
    if "source" in out:
        source = dict(_mapping(out["source"], f"{key}.source"))
        _known(source, SOURCE_KEYS, f"{key}.source")
        if "kind" in source:
            _choice(source["kind"], SOURCE_KINDS, f"{key}.source.kind")
        if "transpose" in source:
            _bool(source["transpose"], f"{key}.source.transpose")
        out["source"] = source
    return out


@dataclass(frozen=True)
class TaskSection(Section):
    """``tasks.<name>`` over ``task_defaults``: how the task's data is drawn (qvlib.data.registry's
    LoadOptions) and its own train keys. Whether the name is a known task is :meth:`check_known`'s
    question (a Hugging Face source may name any task)."""

    LABELS: ClassVar[tuple[str, ...]] = ("name",)

    name: str
    n_train: int = N_TRAIN
    n_test: int = N_TEST
    max_train: int | None = None
    max_test: int | None = None
    source: Mapping[str, Any] = field(default_factory=dict)
    train: TrainOverrides = field(default_factory=TrainOverrides)

    @classmethod
    def from_config(cls, name: str, value: Any, defaults: Mapping[str, Any] | None = None) -> "TaskSection":
        """The task's own mapping (null: its defaults) over ``defaults`` (the config's ``task_defaults``)."""
        key = f"tasks.{name}"
        own = dict(_mapping(value, key))
        train = own.pop("train", None)
        unknown = set(own) - set(TASK_OPTIONS)
        if unknown:
            raise ValueError(f"{key}: unknown option(s) {sorted(unknown)}; allowed: {', '.join(TASK_OPTIONS)} and train")
        options = {**_task_options(_mapping(defaults, "task_defaults"), "task_defaults"), **_task_options(own, key)}
        return cls(name, **options, train=TrainOverrides.from_config(train, f"{key}.train"))

    def options(self) -> dict[str, Any]:
        """The LoadOptions fields the task sets (every one, defaults filled in)."""
        return {k: getattr(self, k) for k in TASK_OPTIONS}

    def check_known(self) -> None:
        if self.source.get("kind") != "hf" and self.name not in known_task_names():
            raise ValueError(f"tasks.{self.name}: unknown task; known tasks: {', '.join(known_task_names())} "
                             "(any other name needs source: {kind: hf, id: ...})")


@dataclass(frozen=True)
class DataSection(Section):
    """Where and how every task's data is read: ``data_root``, ``data_seed`` (generated data and
    subsampling, shared by every replicate), ``calib_position``, ``download`` and ``task_defaults``."""

    KEYS: ClassVar[tuple[str, ...]] = ("data_root", "data_seed", "calib_position", "download", "task_defaults")

    data_root: str = "data"
    data_seed: int = 0
    calib_position: str = "head"
    download: bool = False
    task_defaults: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.data_root, (str, Path)) or not str(self.data_root):
            raise ValueError(f"data_root must be a folder name, got {self.data_root!r}")
        _int(self.data_seed, "data_seed")
        _choice(self.calib_position, CALIB_POSITIONS, "calib_position")
        _bool(self.download, "download")
        _known(self.task_defaults, TASK_OPTIONS, "task_defaults", "option(s)")
        _task_options(self.task_defaults, "task_defaults")

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], keys: Iterable[str] | None = None) -> "DataSection":
        values = _pick_keys(raw, keys, cls.KEYS, "data")
        if "data_root" in values and isinstance(values["data_root"], Path):
            values["data_root"] = str(values["data_root"])
        if "task_defaults" in values:
            values["task_defaults"] = dict(_mapping(values["task_defaults"], "task_defaults"))
        return cls(**values)

    @property
    def root(self) -> Path:
        return Path(self.data_root).expanduser()


# ------------------------------------------------------------------ pretrain
@dataclass(frozen=True)
class PretrainSection(Section):
    """``pretrain``: the generated mixture (``tasks``: generators, ``n_per_task`` images each) the demo
    backbone of archs with backbone source pretrain is trained on, and its training run."""

    tasks: tuple[str, ...]
    train: TrainSettings
    n_per_task: int = 4000

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("pretrain.tasks: name at least one generator")
        for kind in self.tasks:
            if kind not in GENERATORS:
                raise ValueError(f"pretrain.tasks: unknown generator {kind!r}; known: {', '.join(GENERATORS)}")
        _int(self.n_per_task, "pretrain.n_per_task", 1)

    @classmethod
    def from_config(cls, value: Any) -> "PretrainSection":
        data = _mapping(value, "pretrain")
        _known(data, ("tasks", "n_per_task", "train"), "pretrain")
        for key in ("tasks", "train"):
            if key not in data:
                raise ValueError(f"pretrain: missing {key}")
        if not isinstance(data["tasks"], (list, tuple)):
            raise ValueError(f"pretrain.tasks must be a list of generators, got {data['tasks']!r}")
        return cls(tuple(data["tasks"]), TrainSettings.from_config(data["train"], "pretrain.train"),
                   data.get("n_per_task", 4000))


# ------------------------------------------------------------------ evaluate
@dataclass(frozen=True)
class EvaluateSection(Section):
    """``evaluate``: images per forward pass and the arithmetic of every evaluation forward."""

    batch_size: int = 512
    precision: str = Precision.BF16

    def __post_init__(self) -> None:
        _int(self.batch_size, "evaluate.batch_size", 1)
        try:
            check_precision(self.precision)
        except ValueError as err:
            raise ValueError(f"evaluate.{err}") from None

    @classmethod
    def from_config(cls, value: Any) -> "EvaluateSection":
        data = _mapping(value, "evaluate")
        _known(data, ("batch_size", "precision"), "evaluate")
        return cls(**dict(data))


# ------------------------------------------------------------------ lambdas: sweep, search, oracle, ties
@dataclass(frozen=True)
class LambdaSearch(Section):
    """``lambda_search``: how each cell scores the sweep, ``dense`` or ``racing`` with the race's
    ``keep``, ``margin``, ``tolerance`` and ``start`` (None: qvlib.racing.race_lambda's default)."""

    FLOATS: ClassVar[tuple[str, ...]] = ("keep", "margin", "tolerance")
    OPTIONS: ClassVar[tuple[str, ...]] = ("keep", "margin", "tolerance", "start")

    method: SweepMethod = SweepMethod.DENSE
    keep: float | None = None
    margin: float | None = None
    tolerance: float | None = None
    start: int | None = None

    def __post_init__(self) -> None:
        if self.keep is not None:
            _real(self.keep, "lambda_search.keep", above=0, below=1)
        if self.margin is not None:
            _real(self.margin, "lambda_search.margin", minimum=0)
        if self.tolerance is not None:
            _real(self.tolerance, "lambda_search.tolerance", minimum=0)
        if self.start is not None:
            _int(self.start, "lambda_search.start", 1)

    @classmethod
    def from_config(cls, value: Any) -> "LambdaSearch":
        data = dict(_mapping(value, "lambda_search"))
        method = data.pop("method", SweepMethod.DENSE)
        if method not in tuple(SweepMethod):
            raise ValueError(f"lambda_search.method must be one of {', '.join(SweepMethod)}, got {method!r}")
        unknown = set(data) - set(cls.OPTIONS)
        if unknown:
            raise ValueError(f"unknown lambda_search keys: {', '.join(sorted(unknown))}")
        return cls(SweepMethod(method), **data)

    def options(self) -> dict[str, Any]:
        """``method`` and the race options the config sets, as written (what Config.lambda_search returns)."""
        return {"method": self.method, **{k: getattr(self, k) for k in self.OPTIONS if getattr(self, k) is not None}}


@dataclass(frozen=True)
class LambdaSection(Section):
    """How each cell picks lambda: the sweep (``lambdas``), how it is scored (``lambda_search``), whether
    the adaptive oracle search runs on test too (``oracle_search``), and which of several best lambdas
    the tables keep (``lambda_ties``)."""

    KEYS: ClassVar[tuple[str, ...]] = ("lambdas", "lambda_search", "oracle_search", "lambda_ties")

    lambdas: tuple[float, ...] = (1.0,)
    lambda_search: LambdaSearch = field(default_factory=LambdaSearch)
    oracle_search: bool = True
    lambda_ties: LambdaTies = LambdaTies.NEAREST_ONE

    def __post_init__(self) -> None:
        if not self.lambdas:
            raise ValueError("lambdas: give at least one lambda")
        for i, lam in enumerate(self.lambdas):
            _real(lam, f"lambdas[{i}]", minimum=0)
        _bool(self.oracle_search, "oracle_search")

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], keys: Iterable[str] | None = None) -> "LambdaSection":
        values = _pick_keys(raw, keys, cls.KEYS, "lambda")
        if "lambdas" in values:
            if not isinstance(values["lambdas"], (list, tuple)):
                raise ValueError(f"lambdas must be a list of numbers, got {values['lambdas']!r}")
            values["lambdas"] = tuple(float(_real(x, f"lambdas[{i}]", minimum=0)) for i, x in enumerate(values["lambdas"]))
        if "lambda_search" in values:
            values["lambda_search"] = LambdaSearch.from_config(values["lambda_search"])
        if "lambda_ties" in values:
            values["lambda_ties"] = LambdaTies(_choice(values["lambda_ties"], tuple(LambdaTies), "lambda_ties"))
        return cls(**values)


# ------------------------------------------------------------------ datafree
def source_parts(source: str) -> tuple[str, ...]:
    """The image sources a rule's ``@source`` joins with ``+`` (``others+donor``: both image sets
    together), in order; a single source is a one-tuple."""
    return tuple(str(source).split("+"))


def split_rule(text: str) -> tuple[str, str, float]:
    """A data-free rule ``criterion[@source][~tolerance]`` as (criterion, image source, tolerance), the
    source ``noise`` where none is given; checked without torch (qvlib.datafree.Rule is built from it)."""
    rest, _, tol = str(text).partition("~")
    criterion, at, source = rest.partition("@")
    names = criterion_names()
    if criterion not in names:
        raise ValueError(f"data-free rule {text!r}: unknown criterion {criterion!r}; known: {', '.join(names)}")
    if at and criterion not in INPUT_MEASURES:
        raise ValueError(f"data-free rule {text!r}: criterion {criterion!r} reads no images, so it takes no @source")
    if at:
        parts = source_parts(source)
        for part in parts:
            if part not in IMAGE_SOURCES:
                raise ValueError(f"data-free rule {text!r}: unknown image source {part!r}; known: {', '.join(IMAGE_SOURCES)} "
                                 "(or several joined by +)")
        if len(set(parts)) != len(parts):
            raise ValueError(f"data-free rule {text!r}: an image source is named twice in {source!r}")
    try:
        tolerance = float(tol) if tol else 0.0
    except ValueError:
        raise ValueError(f"data-free rule {text!r}: the tolerance after ~ must be a number, got {tol!r}") from None
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"data-free rule {text!r}: the tolerance must be a finite number >= 0")
    return criterion, source if at else "noise", tolerance


def check_rule(text: str) -> str:
    """A data-free rule checked without torch (:func:`split_rule`); the text itself."""
    split_rule(text)
    return str(text)


@dataclass(frozen=True)
class DatafreeSection(Section):
    """``datafree``: the data-free lambda rules recorded beside every cell's sweep (``criteria``), the
    noise images the @noise rules compare on, and the other tasks' training images the @donor and
    @others rules compare on."""

    criteria: tuple[str, ...] = ()
    noise_images: int = 64
    proxy_images: int = 256

    def __post_init__(self) -> None:
        for i, text in enumerate(self.criteria):
            try:
                check_rule(text)
            except ValueError as err:
                raise ValueError(f"datafree.criteria[{i}]: {err}") from None
        _int(self.noise_images, "datafree.noise_images", 1)
        _int(self.proxy_images, "datafree.proxy_images", 1)

    @classmethod
    def from_config(cls, value: Any) -> "DatafreeSection":
        data = dict(_mapping(value, "datafree"))
        _known(data, ("criteria", "noise_images", "proxy_images"), "datafree")
        if "criteria" in data:
            if not isinstance(data["criteria"], (list, tuple)):
                raise ValueError(f"datafree.criteria must be a list of rules, got {data['criteria']!r}")
            data["criteria"] = tuple(str(c) for c in data["criteria"])
        return cls(**data)


# ------------------------------------------------------------------ controls
@dataclass(frozen=True)
class ControlsSection(Section):
    """What is evaluated beside each donor: ``random_controls`` norm-matched random directions, and the
    leave-one-out merged donors of ``merged_donors`` (merge methods of qvlib.merging)."""

    KEYS: ClassVar[tuple[str, ...]] = ("random_controls", "merged_donors")

    random_controls: int = 1
    merged_donors: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _int(self.random_controls, "random_controls", 1)
        names = merge_method_names()
        for method in self.merged_donors:
            if method not in names:
                raise ValueError(f"merged_donors: unknown merge method {method!r}; known: {', '.join(names)}")
        if len(set(self.merged_donors)) != len(self.merged_donors):
            raise ValueError(f"merged_donors: a method is named twice in {list(self.merged_donors)}")

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], keys: Iterable[str] | None = None) -> "ControlsSection":
        values = _pick_keys(raw, keys, cls.KEYS, "controls")
        if "merged_donors" in values:
            if not isinstance(values["merged_donors"], (list, tuple)):
                raise ValueError(f"merged_donors must be a list of merge methods, got {values['merged_donors']!r}")
            values["merged_donors"] = tuple(str(m) for m in values["merged_donors"])
        return cls(**values)


# ------------------------------------------------------------------ what an arch's build decides
@dataclass(frozen=True)
class Preprocess:
    """Model-side preprocessing: resize + centre crop to ``img_size`` (uint8), then normalise on the device.

    Built from timm's data config of the architecture (:meth:`from_model`), so it follows the model.
    Its torch methods import torch when called: the workflow's DAG reads ``pixels()`` without it.
    """

    img_size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    crop_pct: float = 1.0

    @classmethod
    def from_model(cls, model: "torch.nn.Module") -> "Preprocess":
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
        from torchvision.transforms import v2

        interp = v2.InterpolationMode(self.interpolation)
        return v2.Compose([
            v2.Lambda(lambda im: im.convert("RGB")),
            v2.Resize(self.resize_size(), interpolation=interp),
            v2.CenterCrop(self.img_size),
            v2.PILToTensor(),
        ])

    def resize_batch(self, images: "torch.Tensor") -> "torch.Tensor":
        """uint8 (N, C, H, W) -> uint8 (N, 3, img_size, img_size); synthetic arrays are not cropped."""
        import torch
        from torchvision.transforms import v2

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

    def normalize(self, images: "torch.Tensor") -> "torch.Tensor":
        """uint8 batch on any device -> float batch ready for the model."""
        import torch

        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1) * 255
        return (images.float() - mean) / std


@dataclass(frozen=True)
class LoadOptions:
    """Everything a loader needs besides the task name.

    ``source`` overrides the task's default source, e.g. ``{"kind": "hf", "id": "tanganke/eurosat"}``
    or ``{"kind": "idx_gz", "path": "/usr/share/datasets/fashion-mnist"}``; ``max_train`` and
    ``max_test`` subsample (seeded) for quick runs; ``n_train``/``n_test`` size generated tasks.
    """

    preprocess: Preprocess
    root: Path = Path("data")
    download: bool = False
    seed: int = 0
    n_train: int = N_TRAIN
    n_test: int = N_TEST
    max_train: int | None = None
    max_test: int | None = None
    source: Mapping[str, Any] = field(default_factory=dict)
    calib_position: str = "head"  # where calib is cut from the seeded permutation of train (qvlib.data.base.calib_indices)


# ------------------------------------------------------------------ store keys
# How often a run saves a resumable checkpoint and logs: never its weights (a resumed run reaches the same
# ones), so never a store key (qvlib.backbones' shipped-backbone digest leaves them out too).
BOOKKEEPING: tuple[str, ...] = ("checkpoint_every", "log_every")
# Tasks generated or shipped as arrays in a package: they read no file under data_root.
EMBEDDED_TASK_NAMES: tuple[str, ...] = (*GENERATORS, "digits", "mnist5k")  # qvlib.data.registry.EMBEDDED_TASKS


def _run_settings(canonical: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in canonical.items() if k not in BOOKKEEPING}


def reads_image_files(name: str, options: Mapping[str, Any] | None = None) -> bool:
    """Does the task decode image files (a real dataset read through PIL, under data_root or from a hub),
    as opposed to the embedded tasks generated or shipped as arrays? Their pixels depend on the PIL
    resize (Preprocess.pil_transform), and only they read data_root."""
    return bool((options or {}).get("source")) or name not in EMBEDDED_TASK_NAMES


def key_settings(sections: Mapping[str, Any], reads: Iterable[str]) -> dict[str, Any]:
    """What a store job's key hashes of the config sections it reads (``reads``): each section's
    canonical form, so a setting written out at its default, or spelled another way (1 for 1.0), keys
    as the default does, and a default that lives in qvlib's code is in the key. Left out: how often a
    run checkpoints and logs, ``download`` (it lets torchvision fetch files, never changes them), and
    ``data_root`` where none of the job's tasks reads a file there."""
    reads = set(reads)
    out: dict[str, Any] = {}
    if "archs" in reads and "archs" in sections:
        out["archs"] = {}
        for name, value in sections["archs"].items():
            arch = ArchSection.from_config(name, value)
            out["archs"][name] = {**arch.canonical(), "train": _run_settings(arch.train.canonical())}
    if "tasks" in reads and "tasks" in sections:
        out["tasks"] = {}
        defaults = sections.get("task_defaults") if "task_defaults" in reads else None
        for name, value in sections["tasks"].items():  # each task's options over task_defaults
            task = TaskSection.from_config(name, value, defaults).canonical()
            out["tasks"][name] = {**task, "train": _run_settings(task.get("train", {}))}
    data_keys = [k for k in DataSection.KEYS if k in reads]
    if data_keys:
        data = DataSection.from_config(sections, data_keys).canonical()
        data.pop("download", None)
        data.pop("task_defaults", None)  # read only through each task's options, keyed above
        tasks = sections.get("tasks") or {} if "tasks" in reads else {}
        if not any(reads_image_files(name, value) for name, value in tasks.items()):
            data.pop("data_root", None)
        out["data"] = {k: v for k, v in data.items() if k in data_keys}
    if "pretrain" in reads and sections.get("pretrain") is not None:
        pretrain = PretrainSection.from_config(sections["pretrain"]).canonical()
        out["pretrain"] = {**pretrain, "train": _run_settings(pretrain["train"])}
    if "finetune" in reads and "finetune" in sections:
        out["finetune"] = _run_settings(TrainSettings.from_config(sections["finetune"], "finetune").canonical())
    if "policy" in reads:
        out["policy"] = QuantPolicy.from_config(sections.get("policy")).canonical()
    if "quant" in reads and "quant" in sections:
        out["quant"] = QuantSection.from_config(sections["quant"]).canonical()
    if "evaluate" in reads:
        out["evaluate"] = EvaluateSection.from_config(sections.get("evaluate")).canonical()
    lambda_keys = [k for k in ("lambdas", "lambda_search", "oracle_search") if k in reads]
    if lambda_keys:
        lam = LambdaSection.from_config(sections, lambda_keys).canonical()
        out["lambda"] = {k: v for k, v in lam.items() if k in lambda_keys}
    if "random_controls" in reads:
        out["controls"] = ControlsSection.from_config(sections, ["random_controls"]).canonical()["random_controls"]
    if "datafree" in reads:
        out["datafree"] = DatafreeSection.from_config(sections.get("datafree")).canonical()
    for key in ("seeds", "preprocess"):
        if key in reads and key in sections:
            out[key] = _plain(sections[key])
    if "reuse_backbones" in reads:
        out["reuse_backbones"] = sections.get("reuse_backbones")
    return out
