"""timm ViT factory: architecture from a name plus overrides, backbone weights, freezing, fixed heads."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from .quant import DEFAULT_POLICY, HEAD_PREFIX, QuantPolicy
from .sections import ARCH_OVERRIDES  # noqa: F401  (keys a user may override on top of a timm name)
from .vectors import WeightVector


@dataclass(frozen=True)
class ArchSpec:
    """One architecture of the grid: a timm model name, overrides, and where its backbone comes from.

    ``backbone`` is one of ``{"source": "timm", "tag": "orig_in21k", "file": optional local weights}``,
    ``{"source": "file", "path": "backbone.safetensors"}`` (a file written by ``qv pretrain`` or any
    state dict with timm names), or ``{"source": "random"}`` (tests).
    """

    name: str
    timm_name: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    backbone: Mapping[str, Any] = field(default_factory=lambda: {"source": "random"})

    def __post_init__(self) -> None:
        bad = set(self.overrides) - set(ARCH_OVERRIDES)
        if bad:
            raise ValueError(f"arch {self.name!r}: unknown override(s) {sorted(bad)}; allowed: {', '.join(ARCH_OVERRIDES)}")
        if not timm.is_model(self.timm_name):
            raise ValueError(f"arch {self.name!r}: {self.timm_name!r} is not a timm model name (see timm.list_models('vit_*'))")

    @classmethod
    def from_config(cls, name: str, cfg: Mapping[str, Any]) -> "ArchSpec":
        return cls(name=name, timm_name=cfg["timm_name"], overrides=dict(cfg.get("overrides", {})),
                   backbone=dict(cfg.get("backbone", {"source": "random"})))


def build_vit(arch: ArchSpec, num_classes: int = 0, seed: int = 0) -> VisionTransformer:
    """A randomly initialised (seeded) timm ViT of ``arch`` with a ``num_classes`` head (0: no head)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(arch.timm_name, pretrained=False, num_classes=num_classes, **arch.overrides)
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"arch {arch.name!r}: {arch.timm_name!r} is a {type(model).__name__}, not a timm VisionTransformer")
    return model


def backbone_state(arch: ArchSpec, root: str | Path = ".") -> dict[str, torch.Tensor]:
    """The shared pretrained weights of ``arch`` without a head, from the source its config names.

    A file (``source: file``, or ``source: timm`` with ``file``) must hold exactly the arch's tensors
    besides the head: a missing or extra tensor is an error that names it."""
    source = arch.backbone.get("source", "random")
    if source == "random":
        return {k: v for k, v in build_vit(arch, 0, seed=int(arch.backbone.get("seed", 0))).state_dict().items()}
    if source == "file":
        path = Path(root) / arch.backbone["path"]
        state = dict(WeightVector.load(path))  # checked tensor by tensor when loaded (load_backbone)
    elif source == "timm":
        state = timm_pretrained_state(arch, root)
    elif source == "pretrain":
        raise ValueError(f"arch {arch.name!r} is pretrained by `qv pretrain`; pass its output with --backbone")
    else:
        raise ValueError(f"arch {arch.name!r}: unknown backbone source {source!r}; expected timm, file, pretrain or random")
    return {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}


# Weight files that timm's pretrained loading reads: its hub format, torch state dicts (read with
# weights_only) and the original JAX/Flax checkpoints (augreg's .npz, timm's custom loader).
TIMM_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")


def timm_pretrained_state(arch: ArchSpec, root: str | Path = ".") -> dict[str, torch.Tensor]:
    """The headless state of ``arch`` as timm's pretrained loading gives it: from the hub for
    ``{source: timm, tag}``, or from a local copy of the same weights (``file``) through the same
    door (``pretrained_cfg_overlay``), after checking tensor by tensor that the file fits the arch
    (timm itself loads non-strictly once the head is dropped, so a missing tensor would keep its
    random initialisation without a word)."""
    tag = arch.backbone.get("tag")
    name = f"{arch.timm_name}.{tag}" if tag else arch.timm_name
    if tag and name not in timm.list_pretrained(arch.timm_name + ".*"):
        raise ValueError(f"arch {arch.name!r}: timm has no pretrained weights {name!r} "
                         f"(see timm.list_pretrained('{arch.timm_name}*'))")
    file = arch.backbone.get("file")
    if not file:
        return timm.create_model(name, pretrained=True, num_classes=0, **arch.overrides).state_dict()
    path = Path(root) / file
    if not path.is_file():
        raise FileNotFoundError(f"arch {arch.name!r}: backbone file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in TIMM_FILE_SUFFIXES:
        raise ValueError(f"arch {arch.name!r}: backbone file {path} is not a format timm's pretrained loading reads; "
                         f"expected one of {', '.join(TIMM_FILE_SUFFIXES)} (.npz: the original JAX checkpoints)")
    if suffix == ".npz":
        return _timm_npz_state(arch, name, path)
    _check_timm_file(arch, path)
    overlay = {"file": str(path), "custom_load": False}
    model = timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay, **arch.overrides)
    return model.state_dict()


def _check_timm_file(arch: ArchSpec, path: Path) -> None:
    """Raise a one-line ``ValueError`` unless ``path``, read and converted as timm's pretrained loading
    does (its checkpoint reader, then the ViT checkpoint filter), holds every tensor of the headless
    arch with its shape and nothing else but a head."""
    from timm.models import load_state_dict
    from timm.models.vision_transformer import checkpoint_filter_fn

    model = build_vit(arch, 0)
    try:
        state = load_state_dict(str(path), weights_only=True)
    except Exception as err:  # safetensors and torch raise many kinds for a damaged or foreign file
        raise ValueError(f"backbone file {path} is unreadable as a weight file ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None
    state = checkpoint_filter_fn(state, model)
    check_fits(state, model.state_dict(), f"backbone file {path}", arch.name, ignore_prefix=HEAD_PREFIX)


def _timm_npz_state(arch: ArchSpec, name: str, path: Path) -> dict[str, torch.Tensor]:
    """An original JAX/Flax ``.npz`` checkpoint read by timm's own loader (the ``custom_load`` path of
    its pretrained loading). The loader raises for most missing arrays (reported in one line) but
    skips some it treats as optional, so every tensor starts as NaN and one still NaN afterwards is
    reported missing; arrays the loader does not read (a head, pre-logits) are ignored."""
    model = timm.create_model(name, pretrained=False, num_classes=0, **arch.overrides)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.fill_(float("nan"))
        try:
            model.load_pretrained(str(path))
        except (KeyError, ValueError, RuntimeError, OSError) as err:
            text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
            first = text.splitlines()[0] if text else ""
            raise ValueError(f"backbone file {path} does not fit arch {arch.name!r} as timm's JAX checkpoint "
                             f"loader reads it ({type(err).__name__}: {first})") from None
    state = model.state_dict()
    for key, t in state.items():
        if t.is_floating_point() and torch.isnan(t).any():
            raise ValueError(f"backbone file {path} does not fit arch {arch.name!r}: it is missing tensor {key!r} "
                             f"(shape {tuple(t.shape)}); timm's JAX checkpoint loader found nothing for it")
    return state


def check_fits(state: Mapping[str, torch.Tensor], needed: Mapping[str, torch.Tensor], what: str, arch: str,
               ignore_prefix: str | None = None) -> None:
    """Raise ``ValueError`` unless ``state`` holds every tensor of ``needed`` with its shape and no
    other (names starting with ``ignore_prefix`` are not compared). ``what`` names the file in errors."""
    own = {k: v for k, v in needed.items() if not (ignore_prefix and k.startswith(ignore_prefix))}
    for name, t in own.items():
        if name not in state:
            raise ValueError(f"{what} does not fit arch {arch!r}: it is missing tensor {name!r} (shape {tuple(t.shape)})")
        if tuple(state[name].shape) != tuple(t.shape):
            raise ValueError(f"{what} does not fit arch {arch!r}: tensor {name!r} is {tuple(state[name].shape)}, "
                             f"expected {tuple(t.shape)}")
    extra = [k for k in state if k not in own and not (ignore_prefix and k.startswith(ignore_prefix))]
    if extra:
        raise ValueError(f"{what} does not fit arch {arch!r}: it has tensor {extra[0]!r} that the arch does not have")


def load_backbone(model: torch.nn.Module, state: Mapping[str, torch.Tensor], arch: str = "?") -> None:
    """Copy ``state`` into every non-head tensor of ``model``; a missing or misshaped tensor is an error."""
    check_fits(state, model.state_dict(), "the backbone", arch, ignore_prefix=HEAD_PREFIX)
    model.load_state_dict({**model.state_dict(), **{k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}})


def head_seed(task: str, seed: int) -> int:
    """A stable per-(task, seed) seed for the fixed random head (crc32 does not vary between runs)."""
    return (zlib.crc32(task.encode()) + 1_000_003 * seed) % (2**31)


def set_fixed_head(model: VisionTransformer, task: str, seed: int) -> None:
    """Overwrite the head with a random projection drawn from (task, seed) and zero bias, and freeze it."""
    head = model.head
    if not isinstance(head, torch.nn.Linear):
        raise ValueError("the model has no classification head; build it with num_classes > 0")
    gen = torch.Generator().manual_seed(head_seed(task, seed))
    weight = torch.randn(head.weight.shape, generator=gen) / head.in_features**0.5
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight.dtype))
        head.bias.zero_()
    head.requires_grad_(False)


def freeze_except(model: torch.nn.Module, policy: QuantPolicy = DEFAULT_POLICY) -> list[str]:
    """Train only the parameters that ``policy`` trains (scope linear: the quantized ones; scope all:
    every one); returns their names."""
    names = set(policy.trained_model(model))
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    return [n for n, _ in model.named_parameters() if n in names]


def task_model(arch: ArchSpec, backbone: Mapping[str, torch.Tensor], task: str, num_classes: int, seed: int,
               policy: QuantPolicy = DEFAULT_POLICY) -> VisionTransformer:
    """The starting point of every fine-tuning run: the shared backbone and a head for the task.
    Scope linear (the paper's text): the task's fixed random head, everything frozen but the
    quantized linear weights. Scope all (the authors' code): timm's own freshly initialised head
    (seeded; FT and QAT of a task start from the same one), and every parameter trains."""
    model = build_vit(arch, num_classes, seed=seed)
    load_backbone(model, backbone, arch.name)
    if policy.scope == "linear":
        set_fixed_head(model, task, seed)
    freeze_except(model, policy)
    return model


def data_config(model: torch.nn.Module) -> dict[str, Any]:
    """timm's preprocessing for the model: input_size, mean, std, interpolation, crop_pct."""
    return timm.data.resolve_data_config({}, model=model)
