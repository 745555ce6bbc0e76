"""The ``qv`` command: every workflow rule calls one of its subcommands, and users can run them on
their own safetensors checkpoints.

This module only parses arguments and calls qvlib: each command imports what it uses when it runs, and
``main`` builds only the named command's options, so ``qv --help`` or a report command (tables, figures, paper-tables,
readme) does not import torch to parse its arguments."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from .fileio import check_output, check_outputs
from .vocab import FINETUNE_MODES, LambdaTies, Split

if TYPE_CHECKING:
    from .quant import QuantPolicy, QuantSpec
    from .vectors import WeightVector

log = logging.getLogger("qvlib.cli")

# name -> (help, add_arguments(parser), run(args) -> exit code)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def register(name: str, help: str, add_args, run) -> None:
    COMMANDS[name] = (help, add_args, run)


# ---------------------------------------------------------------- argument types
# Each refuses a bad value while the command line is parsed, as argparse's one-line error (exit 2).
def finite_float(text: str) -> float:
    """A finite number (NaN and infinities are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max, without importing torch to parse


def lambda_value(text: str) -> float:
    """A finite lambda that float32 can hold: a vector is scaled in float32, where 1e39 is inf."""
    value = finite_float(text)
    if abs(value) > FLOAT32_MAX:
        raise argparse.ArgumentTypeError(f"must be within float32's range (|lambda| <= {FLOAT32_MAX:.8g}), got {text!r}")
    return value


def int_in(low: int, high: int | None = None, what: str = ""):
    """An integer type for argparse: ``low`` <= value (<= ``high``); ``what`` starts its message."""
    expected = f"an integer in {low}..{high}" if high is not None else ("a positive integer" if low == 1 else f"an integer >= {low}")
    what = f"{what} " if what else ""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{what}must be {expected}, got {text!r}")
        return value

    return parse


def fraction(text: str) -> float:
    """A share in (0, 1]."""
    value = finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return value


def load_as(path: Path, role: str, used=None) -> WeightVector:
    """A safetensors file that must be ``role`` (see checkpoints.require); ``used`` None: all its tensors."""
    from . import checkpoints
    from .vectors import WeightVector

    ckpt = WeightVector.load(path)
    checkpoints.require(ckpt, role, str(path), ckpt if used is None else used)
    return ckpt


def add_quant_args(p: argparse.ArgumentParser) -> None:
    from .quant import GRANULARITIES, SCALES

    p.add_argument("--bits", type=int_in(2, 8, "bits"), default=None,
                   help="bit-width, 2..8 (default: what the input's metadata records, else 3, as in the paper)")
    p.add_argument("--granularity", default=None, choices=GRANULARITIES,
                   help="the blocks that share one scale: a row (channel), --group-size columns of a row (group), or "
                        "the whole tensor (default: the input's metadata, else channel)")
    p.add_argument("--group-size", type=int_in(1), default=None,
                   help="columns per scale with --granularity group (default: the input's metadata, else none)")
    p.add_argument("--scale", default=None, choices=list(SCALES),
                   help="how a block's scale is chosen: absmax (the paper's), mse (clipping that minimises the squared "
                        "error), hqq (HQQ's half-quadratic fit); all data-free (default: the input's metadata, else absmax)")
    add_force_arg(p)


def add_force_arg(p: argparse.ArgumentParser) -> None:
    if not any("--force" in a.option_strings for a in p._actions):
        p.add_argument("--force", action="store_true",
                       help="use the quantizer and policy options given even where the input's metadata records others "
                            "(without it such a contradiction is an error)")


def quant_spec(args: argparse.Namespace) -> QuantSpec:
    from .quant import QuantSpec

    return QuantSpec(bits=args.bits, granularity=args.granularity, group_size=args.group_size, scale=args.scale)


# ---------------------------------------------------------------- options the input's metadata settles
# Checkpoints written by the workflow record ``quant`` (the quantizer, JSON; empty for FT), ``policy`` (the
# quantized pattern) and ``scope``; vectors record ``quant`` and ``scope``; ``qv patch`` passes its vectors'
# ``quant`` on to the patched checkpoint. An option left out takes the recorded value, else its fallback.
FALLBACK_OPTIONS = ("bits", "granularity", "group_size", "scale", "pattern", "scope")


def fallbacks() -> dict[str, object]:
    """Each of :data:`FALLBACK_OPTIONS`' value when neither the command line nor the metadata gives one."""
    from .quant import DEFAULT_POLICY

    return {"bits": 3, "granularity": "channel", "group_size": None, "scale": "absmax",
            "pattern": DEFAULT_POLICY.pattern, "scope": DEFAULT_POLICY.scope}


# command -> (the attributes naming its input files, in order of precedence; whether a given option that
# contradicts their metadata is an error without --force). info only reports, so its options simply win.
METADATA_INPUTS: dict[str, tuple[tuple[str, ...], bool]] = {
    "info": (("checkpoint",), False),
    "extract": (("qat", "ft"), True),
    "choose-lambda": (("vector", "receiver"), True),
    "quantize": (("checkpoint",), True),
}


def read_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata without its tensors; {} when it cannot be read (the command's own
    load then names what is wrong with the file)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - any unreadable file: the command reports it when it loads it
        return {}


def recorded_options(meta: dict[str, str]) -> dict[str, object]:
    """The quantizer and policy options one file's metadata records (option dest -> value)."""
    from .quant import SCOPES, QuantSpec

    out: dict[str, object] = {}
    if meta.get("quant"):
        try:
            spec = QuantSpec.from_json(meta["quant"])
        except (ValueError, TypeError):
            spec = None  # not a spec (e.g. a hand-made file): the metadata says nothing usable
        if spec is not None:
            out.update(bits=spec.bits, granularity=spec.granularity, group_size=spec.group_size, scale=spec.scale)
    if meta.get("scope") in SCOPES:
        out["scope"] = meta["scope"]
    if meta.get("policy"):
        out["pattern"] = meta["policy"]
    return out


def _option(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def settle_from_metadata(args: argparse.Namespace) -> None:
    """Fill the quantizer and policy options a command was not given from its inputs' metadata (else
    :func:`fallbacks`); an option given that contradicts the metadata is a ValueError unless --force."""
    attrs, strict = METADATA_INPUTS.get(args.command, ((), False))
    dests = [d for d in FALLBACK_OPTIONS if hasattr(args, d)]
    if not dests:
        return
    defaults = fallbacks()
    paths = []
    for attr in attrs:
        value = getattr(args, attr, None)
        paths += [Path(v) for v in (value if isinstance(value, list) else [value]) if v is not None]
    recorded: dict[str, list[tuple[object, Path]]] = {}
    for path in paths:
        for dest, value in recorded_options(read_metadata(path)).items():
            recorded.setdefault(dest, []).append((value, path))
    given = {d: getattr(args, d) for d in dests if getattr(args, d) is not None}
    for dest in dests:
        found = recorded.get(dest, [])
        if dest in given:
            wrong = [(v, p) for v, p in found if v != given[dest]]
            if wrong and strict and not getattr(args, "force", False):
                value, path = wrong[0]
                raise ValueError(f"{_option(dest)} {given[dest]} contradicts {path}: its metadata records {value!r}; "
                                 f"leave {_option(dest)} out to use it, or pass --force to override it")
            continue
        values = {v for v, _ in found}
        if len(values) > 1:
            listed = ", ".join(f"{p} records {v!r}" for v, p in found)
            raise ValueError(f"the inputs disagree on {_option(dest)} ({listed}): give {_option(dest)} (and --force)")
        value = values.pop() if values else defaults[dest]
        if dest == "group_size" and "granularity" in given and given["granularity"] != "group":
            value = None  # a group size recorded for group granularity does not apply to another one
        setattr(args, dest, value)


# ---------------------------------------------------------------- checkpoint commands
def add_pattern_arg(p: argparse.ArgumentParser, scope: bool = True) -> None:
    from .quant import SCOPES

    p.add_argument("--pattern", default=None,
                   help="regex of the tensors that are quantized (default: the input's metadata 'policy', else the "
                        "block linear weights)")
    if scope:
        p.add_argument("--scope", default=None, choices=list(SCOPES),
                       help="what a vector holds: linear = only the quantized tensors (the paper's text); all = every "
                            "tensor but the head (the authors' code, for models fine-tuned with all parameters) "
                            "(default: the input's metadata, else linear)")
    add_force_arg(p)


def policy_of(args: argparse.Namespace) -> QuantPolicy:
    from .quant import DEFAULT_POLICY, QuantPolicy

    return QuantPolicy(pattern=args.pattern, scope=getattr(args, "scope", None) or DEFAULT_POLICY.scope)


FLOAT32_ONLY = ("Inputs must be float32 safetensors: bf16, fp16 or integer copies are refused, not converted; "
                "a file whose metadata records what it is (mode) must be what it is given as.")


def _info_args(p):
    p.add_argument("checkpoint", type=Path, help="a safetensors checkpoint or vector")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_pattern_arg(p)


def _info(args) -> int:
    from . import checkpoints
    from .vectors import WeightVector

    ckpt = WeightVector.load(args.checkpoint)
    info = {"path": str(args.checkpoint), "file_bytes": args.checkpoint.stat().st_size,
            **checkpoints.summary(ckpt, str(args.checkpoint), policy_of(args))}
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        for key, value in info.items():
            if key != "metadata":
                print(f"{key:>18}: {value}")
        for key, value in sorted(info["metadata"].items()):
            print(f"{'meta.' + key:>18}: {value}")
    return 0


register("info", "summarise a checkpoint or vector: sizes, quantized tensors, metadata", _info_args, _info)


def _extract_args(p):
    p.description += (". The two checkpoints must hold the same tensors with the same shapes. " + FLOAT32_ONLY)
    p.add_argument("--qat", type=Path, required=True, help="checkpoint fine-tuned with QAT")
    p.add_argument("--ft", type=Path, required=True, help="checkpoint fine-tuned plainly, same task and start")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="the vector to write (safetensors, float32): QAT minus FT over the tensors --scope carries, metadata mode qv with the quantizer, scope and both sources")
    add_pattern_arg(p)


def _extract(args) -> int:
    from . import checkpoints
    from .vectors import WeightVector

    check_output(args.output, args.qat, args.ft)
    policy = policy_of(args)
    rho = checkpoints.extract_vector(WeightVector.load(args.qat), WeightVector.load(args.ft), policy,
                                     qat_name=str(args.qat), ft_name=str(args.ft))
    rho.save(args.output)
    print(f"wrote {args.output}: {len(rho)} tensors, norm {rho.norm():.6g}")
    return 0


register("extract", "quantization vector = QAT checkpoint - FT checkpoint (block linear weights)", _extract_args, _extract)


def _patch_args(p):
    p.description += ". " + FLOAT32_ONLY
    p.add_argument("--receiver", type=Path, required=True, help="the FT checkpoint to patch")
    p.add_argument("--vector", type=Path, action="append", required=True, help="a vector; repeat to add several")
    p.add_argument("--lambda", dest="lambdas", type=lambda_value, action="append",
                   help="scale per vector, a finite number within float32's range (one value applies to all; default 1.0)")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="the patched checkpoint to write (safetensors, float32): the receiver with lambda times each vector added, its metadata plus patched_with and the vectors' quant (qv quantize's default)")


def _patch(args) -> int:
    from . import checkpoints
    from .vectors import WeightVector

    check_output(args.output, args.receiver, *args.vector)
    lambdas = checkpoints.broadcast_lambdas(args.lambdas, len(args.vector))
    receiver = WeightVector.load(args.receiver)
    vectors = [WeightVector.load(v) for v in args.vector]
    out = checkpoints.patched(receiver, zip(lambdas, vectors), map(str, args.vector), str(args.receiver))
    checkpoints.with_vectors_quant(out, vectors).save(args.output)
    print(f"wrote {args.output}")
    return 0


register("patch", "receiver + lambda * vector(s): zero-shot patching, no data needed", _patch_args, _patch)


def _random_args(p):
    p.add_argument("vector", type=Path, help="a quantization vector")
    p.add_argument("--seed", type=int_in(0), default=0, help="seed of the random direction (an integer >= 0)")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="the random vector to write (safetensors, float32): per tensor the norm of the given vector, metadata control random and the seed")


def _random(args) -> int:
    from . import checkpoints
    from .vectors import WeightVector

    check_output(args.output, args.vector)
    out = checkpoints.random_control(WeightVector.load(args.vector), args.seed, str(args.vector))
    out.save(args.output)
    print(f"wrote {args.output}: random direction, per-tensor norms of {args.vector} (norm {out.norm():.6g})")
    return 0


register("random-direction", "control: a random vector with the same per-tensor norms as a given vector",
         _random_args, _random)


def _merge_args(p):
    from .merging import MERGE_METHODS

    p.add_argument("vectors", type=Path, nargs="+", help="quantization vectors to merge")
    p.add_argument("--method", default="mean", choices=list(MERGE_METHODS), help="merge method (default mean)")
    p.add_argument("--density", type=fraction, default=None, help="ties: share of largest entries each vector keeps, in (0, 1] (default: the method's own, 0.2 for ties)")
    p.add_argument("--exclude", action="append", default=[], metavar="TASK",
                   help="leave out the vector of this task (its metadata's task, else its file name), which must be "
                        "among the inputs; repeatable")
    p.add_argument("--receiver", default=None, metavar="TASK",
                   help="the receiver this leave-one-out donor is for: its vector is left out if it is among the "
                        "inputs, and it is recorded as left out either way (qv diagnostics reads it; default: none)")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="the merged vector to write (safetensors, float32), usable by qv patch; its metadata records the method and the tasks merged and left out")


def _merge(args) -> int:
    from .merging import label_vectors, merged_tasks, merged_vector

    check_output(args.output, *args.vectors)
    params = {} if args.density is None else {"density": args.density}
    vectors = label_vectors((path, load_as(path, "vector")) for path in args.vectors)
    merged = merged_vector(vectors, args.method, exclude=args.exclude, receiver=args.receiver, **params)
    merged.save(args.output)
    kept = merged_tasks(merged)
    print(f"wrote {args.output}: {args.method} of {len(kept)} vectors ({', '.join(kept)}), norm {merged.norm():.6g}")
    return 0


register("merge", "one vector from several (mean, sum = task arithmetic, ties); usable by qv patch", _merge_args, _merge)


def _images_arg(text: str):
    """--images: a positive integer (that many noise images) or a folder of proxy images."""
    if text.strip().lstrip("+-").replace(".", "", 1).isdigit():
        return int_in(1)(text)
    return Path(text)


def _tolerance_arg(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def _choose_args(p):
    from .datafree import INPUT_MEASURES, LAMBDA_CRITERIA

    p.add_argument("--criterion", default="weights", choices=list(LAMBDA_CRITERIA),
                   help="weights: from the weights alone; " + ", ".join(INPUT_MEASURES) + ": how far the patched, "
                        "quantized receiver lands from the full-precision one on proxy images (KL, top-1 disagreement, "
                        "pre-logit feature error); lower is better (docs/zero-shot-lambda.md compares them)")
    p.add_argument("--receiver", type=Path, required=True, help="the FT checkpoint to patch")
    p.add_argument("--vector", type=Path, nargs="+", required=True,
                   help="the (donor or merged) quantization vector; several: each is scored and the donor whose best "
                        "score is the smallest share of PTQ's is chosen")
    p.add_argument("--lambdas", type=lambda_value, nargs="+", default=[0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0],
                   help="candidate lambdas, finite numbers within float32's range")
    add_quant_args(p)
    add_pattern_arg(p)
    p.add_argument("--config", type=Path, default=None, help="input criteria: the run config that names the arch")
    p.add_argument("--arch", default=None, help="input criteria: an arch name from --config")
    p.add_argument("--images", type=_images_arg, default=None,
                   help="input criteria: a folder of proxy images (any images but the receiver's task's, e.g. the "
                        "donor's training images), or a positive integer: that many noise images (default 256 noise)")
    p.add_argument("--task", nargs="+", default=None,
                   help="input criteria: registered tasks whose training images are the proxies (e.g. the donor's "
                        "task); the receiver's own task (its checkpoint's metadata) is refused")
    p.add_argument("--synth", action="store_true",
                   help="input criteria: images synthesized from the receiver alone (class-conditional inversion of "
                        "its model): no image of any task is read")
    p.add_argument("--n-images", type=int_in(1), default=256, help="proxy images drawn from --images DIR or --task, or synthesized")
    p.add_argument("--tolerance", type=_tolerance_arg, default=0.0,
                   help="the lambda nearest 1 among those scoring within (1 + tolerance) x the lowest (the demo's "
                        "data-free rules use 0.05: docs/zero-shot-lambda.md)")
    p.add_argument("--controls", type=int_in(0, what="controls"), default=1,
                   help="norm-matched random directions scored beside each vector (how sure: a donor should leave a "
                        "smaller share of PTQ's score than its random directions); 0: none")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _choose(args) -> int:
    from .datafree import INPUT_MEASURES
    from .lambda_choice import choice_json, choice_lines, choose_donor

    extra, images = {}, None
    spec, policy = quant_spec(args), policy_of(args)
    vectors = [load_as(v, "vector") for v in args.vector]
    if args.criterion in INPUT_MEASURES:
        if args.config is None or args.arch is None:
            raise ValueError(f"--criterion {args.criterion} needs --config and --arch to build the receiver's model")
        from .pipeline import criterion_inputs

        receiver, extra, images = criterion_inputs(load_config(args), args.arch, args.receiver, images=args.images,
                                                   tasks=args.task, n_images=args.n_images, synth=args.synth)
    else:
        if args.images is not None or args.task or args.synth:
            raise ValueError(f"--criterion {args.criterion} reads no images: --images, --task and --synth need an input criterion")
        receiver = load_as(args.receiver, "checkpoint", sorted({n for v in vectors for n in v}))
    donors, chosen = choose_donor(args.criterion, receiver, [(str(p), v) for p, v in zip(args.vector, vectors)], spec,
                                  args.lambdas, policy, args.tolerance, args.controls, **extra)
    if args.json:
        print(json.dumps(choice_json(args.criterion, images, donors, chosen), indent=2, allow_nan=False))
        return 0
    from .merging import vector_label

    labels = {str(p): vector_label(v, p) for p, v in zip(args.vector, vectors)}
    if len(set(labels.values())) < len(labels):  # two donors of one task (e.g. two seeds): their paths tell them apart
        labels = {p: p for p in labels}
    print("\n".join(choice_lines(args.criterion, images, donors, chosen, args.controls, name=labels.__getitem__)))
    return 0


register("choose-lambda", "pick lambda (and a donor) with no receiver data: from the weights alone or from proxy images",
         _choose_args, _choose)


def _quantize_args(p):
    p.description += ". " + FLOAT32_ONLY
    p.add_argument("checkpoint", type=Path, help="a float32 model checkpoint (FT, QAT or patched)")
    add_quant_args(p)
    add_pattern_arg(p, scope=False)  # quantizing reads the pattern only; a vector's scope does not apply
    p.add_argument("--packed", action="store_true",
                   help="write integer codes bit-packed (bits per weight) with float32 scales, not fake-quantized float32")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="the quantized checkpoint to write (safetensors): the pattern's tensors fake-quantized in float32, "
                        "or with --packed their integer codes and scales (qv unpack reads it); the rest unchanged")


def _quantize(args) -> int:
    from . import checkpoints
    from .packing import pack_checkpoint, packed_sizes
    from .vectors import WeightVector

    check_output(args.output, args.checkpoint)
    spec, policy = quant_spec(args), policy_of(args)
    ckpt = WeightVector.load(args.checkpoint)
    if args.packed:
        checkpoints.require(ckpt, "checkpoint", str(args.checkpoint), policy.select(ckpt))
        packed = pack_checkpoint(ckpt, spec, policy)
        packed.save(args.output)
        sizes = packed_sizes(packed, str(args.output))
        print(f"wrote {args.output} ({spec.tag}, packed): quantized tensors {sizes['quantized_bytes']:,} bytes, "
              f"{sizes['packed_ratio']:.4f} of float32 (bits/32 = {spec.bits / 32:.4f})")
        return 0
    checkpoints.quantized(ckpt, spec, policy, str(args.checkpoint)).save(args.output)
    print(f"wrote {args.output} ({spec.tag})")
    return 0


register("quantize", "write the quantized checkpoint: fake-quantized float32, or packed integers (--packed)",
         _quantize_args, _quantize)


def _unpack_args(p):
    p.add_argument("packed", type=Path, help="a checkpoint written by qv quantize --packed")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="the float32 checkpoint to write (safetensors): fake-quantized weights, bit-exact with qv quantize without --packed")


def _unpack(args) -> int:
    from .packing import unpack_checkpoint
    from .vectors import WeightVector

    check_output(args.output, args.packed)
    unpack_checkpoint(WeightVector.load(args.packed), str(args.packed)).save(args.output)
    print(f"wrote {args.output} (fake-quantized float32, bit-exact with qv quantize)")
    return 0


register("unpack", "a packed checkpoint back to its fake-quantized float32 weights", _unpack_args, _unpack)


# ---------------------------------------------------------------- workflow steps
def add_job_args(p, task: bool = False, arch: bool = True) -> None:
    p.add_argument("--config", type=Path, default=Path("config/config.yaml"), help="run configuration (YAML)")
    p.add_argument("--arch", required=arch, default=None,
                   help="an arch name from the config" + ("" if arch else " (not needed with a store job's file, which states the preprocessing)"))
    if task:
        p.add_argument("--task", required=True, help="a task name from the config")
    p.add_argument("--seed", type=int, default=None, help="replicate seed, one of the config's seeds (default: the first)")
    p.add_argument("--quant", default=None, help="quantizer tag, one of the config's quantizers, e.g. w3-channel (default: the first)")
    p.add_argument("--threads", type=int_in(1), default=None,
                   help="CPU threads for torch (Snakemake passes {threads}; default: torch's own choice)")
    p.add_argument("--device", default=None, help="cuda, cpu, cuda:1 ... (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")


def load_config(args: argparse.Namespace):
    """The run config at the replicate seed and quantizer a job names (``--seed``, ``--quant``)."""
    import yaml

    from .config import Config

    try:
        cfg = Config.load(args.config)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or " ".join(str(err).split())
        raise ValueError(f"{args.config} is not valid YAML: {problem}{where}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{args.config} is not valid JSON: {err}") from None
    return cfg.with_seed(getattr(args, "seed", None)).with_quant(getattr(args, "quant", None))


def _pretrain_args(p):
    add_job_args(p)
    p.add_argument("-o", "--output", type=Path, required=True, help="backbone safetensors to write")
    p.add_argument("--no-reuse", action="store_true",
                   help="pretrain even when the config's reuse_backbones folder holds this backbone")


def _pretrain(args) -> int:
    from .backbones import choose_backbone, reuse_backbone

    check_output(args.output)
    cfg = load_config(args)
    choice = choose_backbone(cfg, args.arch, reuse=not args.no_reuse)
    if choice.reuse is not None:
        reuse_backbone(choice.reuse, args.output, cfg, args.arch)
        log.info("%s", choice.note)
        return 0
    if choice.note:
        log.info("%s", choice.note)
    from .pipeline import pretrain, set_threads

    set_threads(args.threads)
    pretrain(cfg, args.arch, args.output, device=args.device, progress=not args.no_progress)
    return 0


register("pretrain", "train the demo backbone on the generated pretraining mixture", _pretrain_args, _pretrain)


def _finetune_args(p):
    add_job_args(p, task=True)
    p.add_argument("--mode", required=True, choices=[str(m) for m in FINETUNE_MODES], help="plain fine-tuning or quantization-aware")
    p.add_argument("--backbone", type=Path, default=None, help="backbone file (for archs pretrained by `qv pretrain`; default: the arch's timm weights)")
    p.add_argument("-o", "--output", type=Path, required=True, help="checkpoint safetensors to write")


def _finetune(args) -> int:
    from .pipeline import finetune, set_threads

    check_output(args.output, args.backbone)
    set_threads(args.threads)
    finetune(load_config(args), args.arch, args.task, args.mode, args.output, backbone=args.backbone,
             device=args.device, progress=not args.no_progress)
    return 0


register("finetune", "fine-tune the block linear weights on one task, plainly (ft) or with QAT", _finetune_args, _finetune)


def _cache_args(p):
    add_job_args(p, task=True, arch=False)
    p.add_argument("--test", type=Path, required=True, help="cache file to write for the test split")
    p.add_argument("--calib", type=Path, required=True, help="cache file to write for the calib split")


def _cache(args) -> int:
    from .pipeline import cache_splits, set_threads

    check_outputs([args.test, args.calib])
    set_threads(args.threads)
    cache_splits(load_config(args), args.arch, args.task, {Split.TEST: args.test, Split.CALIB: args.calib})
    return 0


register("cache-splits", "store a task's preprocessed test and calib splits for fast evaluation", _cache_args, _cache)


def add_cache_inputs(p) -> None:
    p.add_argument("--test-cache", type=Path, required=True, help="cached test split (qv cache-splits)")
    p.add_argument("--calib-cache", type=Path, default=None, help="cached calib split (default: none, no calib rows)")


def cache_inputs(args) -> dict:
    caches = {Split.TEST: args.test_cache}
    if args.calib_cache:
        caches[Split.CALIB] = args.calib_cache
    return caches


def _baselines_args(p):
    add_job_args(p, task=True)
    p.add_argument("--ft", type=Path, required=True, help="the task's FT checkpoint")
    p.add_argument("--qat", type=Path, required=True, help="the task's QAT checkpoint")
    add_cache_inputs(p)
    p.add_argument("-o", "--output", type=Path, required=True, help="parquet file to write")


def _baselines(args) -> int:
    from .pipeline import evaluate_baselines, set_threads

    check_output(args.output, args.ft, args.qat, args.test_cache, args.calib_cache)
    set_threads(args.threads)
    evaluate_baselines(load_config(args), args.arch, args.task, args.ft, args.qat, cache_inputs(args),
                       args.output, device=args.device)
    return 0


register("evaluate-baselines", "Top-1 of FT, PTQ(FT), QAT quantized and QAT on one task", _baselines_args, _baselines)


def _transfer_args(p):
    add_job_args(p)
    p.add_argument("--receiver", required=True, help="receiver task name")
    p.add_argument("--ft", type=Path, required=True, help="the receiver's FT checkpoint")
    p.add_argument("--donor", action="append", required=True, metavar="NAME=VECTOR",
                   help="a donor task and its quantization vector; repeat for several donors")
    add_cache_inputs(p)
    p.add_argument("-o", "--output", required=True, action="append",
                   help="parquet file to write: once per --donor, in the same order, or once with {donor} in it "
                        "(replaced by each donor's name)")
    p.add_argument("--no-controls", action="store_true", help="skip the norm-matched random-direction control")


def _transfer(args) -> int:
    from .donors import transfer_cells
    from .pipeline import evaluate_cells, set_threads

    cells = transfer_cells(args.donor, args.output)
    check_outputs([out for _, _, out in cells], args.ft, *(vector for _, vector, _ in cells), args.test_cache,
                  args.calib_cache)
    set_threads(args.threads)
    evaluate_cells(load_config(args), args.arch, args.receiver, args.ft, cells, cache_inputs(args),
                   device=args.device, controls=not args.no_controls)
    return 0


register("evaluate-transfer", "Top-1 of Q(receiver + lambda * donor vector) over the lambda sweep, with controls",
         _transfer_args, _transfer)


# ---------------------------------------------------------------- report
def add_ties_arg(p) -> None:
    p.add_argument("--lambda-ties", choices=[str(t) for t in LambdaTies], default=str(LambdaTies.NEAREST_ONE),
                   help="which of several lambdas with the best accuracy the oracle and calib picks keep: nearest_one "
                        "(the lambda nearest 1, then the smaller; default) or smallest (the authors' rule)")


TABLE_HELP = {"baselines": "Top-1 of every task's models (baselines.parquet)",
              "transfer": "transfer grid with gains over PTQ (transfer.parquet)",
              "donor": "per-donor summary", "receiver": "per-receiver summary",
              "specific": "specific gains over the random controls, per pair and rule",
              "summary-specific": "specific gains pooled with bootstrap intervals and verdicts",
              "norms": "norms of the FT updates and vectors (all seeds)", "cosine": "cosine of the vectors (all seeds)"}


def _tables_args(p):
    p.add_argument("--baselines", type=Path, nargs="+", required=True, help="per-task baseline parquet files")
    p.add_argument("--cells", type=Path, nargs="+", required=True, help="per-cell transfer parquet files")
    p.add_argument("--norms", type=Path, nargs="+", required=True, help="per-seed diagnostics parquet files")
    p.add_argument("--cosine", type=Path, nargs="+", required=True, help="per-seed cosine parquet files")
    for name in ("baselines", "transfer", "donor", "receiver", "specific", "summary-specific", "norms", "cosine"):
        p.add_argument(f"--out-{name}", type=Path, required=True, help=f"the {TABLE_HELP[name]} to write (Parquet)")
    p.add_argument("--out-quantizers", type=Path, default=None,
                   help="the quantizer comparison to write (Parquet; default: not written)")
    p.add_argument("--out-quantizers-md", type=Path, default=None,
                   help="the quantizer comparison to write (markdown; default: not written)")
    add_ties_arg(p)


def _tables(args) -> int:
    from .report import assemble_tables

    outputs = {name: getattr(args, f"out_{name}") for name in
               ("baselines", "transfer", "donor", "receiver", "specific", "summary_specific", "norms", "cosine",
                "quantizers", "quantizers_md") if getattr(args, f"out_{name}") is not None}
    check_outputs(outputs.values(), *args.baselines, *args.cells, *args.norms, *args.cosine)
    assemble_tables(args.baselines, args.cells, args.norms, args.cosine, outputs, ties=args.lambda_ties)
    return 0


register("tables", "assemble baselines, the transfer grid with gains, specific gains over random controls, and summaries",
         _tables_args, _tables)


def _diagnostics_args(p):
    p.add_argument("--config", type=Path, default=Path("config/config.yaml"), help="run configuration (YAML)")
    p.add_argument("--arch", required=True, help="an arch name from the config")
    p.add_argument("--seed", type=int, default=None, help="replicate seed, one of the config's seeds (default: the first)")
    p.add_argument("--quant", default=None, help="quantizer tag, one of the config's quantizers (default: the first)")
    p.add_argument("--backbone", type=Path, default=None, help="backbone file (archs pretrained by `qv pretrain`; default: the arch's timm weights)")
    p.add_argument("--ft", type=Path, nargs="+", required=True, help="FT checkpoints (task taken from metadata)")
    p.add_argument("--vectors", type=Path, nargs="+", required=True, help="quantization vectors (task from metadata)")
    p.add_argument("--merged", type=Path, nargs="*", default=[], help="leave-one-out merged donors (`qv merge --receiver`)")
    p.add_argument("--out-norms", type=Path, required=True,
                   help="Parquet to write: relative norms of each FT update and vector, total and per layer type")
    p.add_argument("--out-cosine", type=Path, required=True,
                   help="Parquet to write: cosine of every pair of vectors, and of each merged donor with its receiver's")


def _diagnostics(args) -> int:
    from .pipeline import diagnostics

    check_outputs([args.out_norms, args.out_cosine], args.backbone, *args.ft, *args.vectors, *args.merged)
    diagnostics(load_config(args), args.arch, args.backbone, args.ft, args.vectors, args.out_norms, args.out_cosine,
                merged=args.merged)
    return 0


register("diagnostics", "relative norms of FT updates and vectors, and the cosine matrix of vectors", _diagnostics_args, _diagnostics)


def _figures_args(p):
    p.add_argument("--arch", required=True, help="the arch name (the title of the figures and the summary)")
    p.add_argument("--quant", default=None, help="the quantizer tag whose grid to draw (default: the tables hold one)")
    for name, what in (("baselines", "baselines"), ("transfer", "transfer"), ("summary-specific", "summary_specific"),
                       ("norms", "diagnostics"), ("cosine", "cosine")):
        p.add_argument(f"--{name}", type=Path, required=True, help=f"the run's {what}.parquet (qv tables)")
    p.add_argument("--out-gain", type=Path, required=True,
                   help="PNG to write: gain over PTQ at lambda = 1 and at the oracle lambda, receivers x donors, controls beside")
    p.add_argument("--out-cosine", type=Path, required=True, help="PNG to write: cosine of the tasks' vectors")
    p.add_argument("--out-summary", type=Path, required=True,
                   help="markdown to write (also printed): verdicts, per-seed table, per-task tables")
    add_ties_arg(p)


def _figures(args) -> int:
    from .report import figures

    check_outputs([args.out_gain, args.out_cosine, args.out_summary], args.baselines, args.transfer,
                  args.summary_specific, args.norms, args.cosine)
    print(figures(args.arch, args.baselines, args.transfer, args.summary_specific, args.norms, args.cosine,
                  args.out_gain, args.out_cosine, args.out_summary, quant=args.quant, ties=args.lambda_ties))
    return 0


register("figures", "gain and cosine heatmaps and the markdown summary", _figures_args, _figures)


def _paper_tables_args(p):
    p.add_argument("--name", required=True, help="the title of the tables, e.g. the arch and quantizer")
    p.add_argument("--quant", default=None, help="the quantizer tag whose grid to tabulate (default: the tables hold one)")
    p.add_argument("--baselines", type=Path, required=True, help="the run's baselines.parquet (qv tables)")
    p.add_argument("--transfer", type=Path, required=True, help="the run's transfer.parquet (qv tables)")
    p.add_argument("--out-md", type=Path, required=True, help="markdown of Tables 1-3")
    p.add_argument("--out-table1", type=Path, required=True, help="Parquet of Table 1 (one row per arch, quantizer, task)")
    p.add_argument("--out-transfer", type=Path, required=True,
                   help="Parquet of Tables 2 and 3 (one row per arch, quantizer, task and lambda rule)")
    add_ties_arg(p)


def _paper_tables(args) -> int:
    from .report import paper_tables

    check_outputs([args.out_md, args.out_table1, args.out_transfer], args.baselines, args.transfer)
    print(paper_tables(args.name, args.baselines, args.transfer, args.out_md, args.out_table1, args.out_transfer,
                       quant=args.quant, ties=args.lambda_ties))
    return 0


register("paper-tables", "the paper's Tables 1-3 in its layout: baselines, transfer at lambda = 1, transfer at the "
         "tuned lambda", _paper_tables_args, _paper_tables)


def _readme_args(p):
    p.add_argument("--summary", type=Path, default=None,
                   help="a run's summary.md (qv figures): its headline block (readme markers) and its short verdict block "
                        "(verdict markers), each copied where the target file has its markers (default: those blocks are "
                        "left as they are)")
    p.add_argument("--quantizers", type=Path, default=None, help="a run's quantizers.md (qv tables): its comparison block (default: that block is left as it is)")
    p.add_argument("--readme", type=Path, default=Path("README.md"), help="the file whose blocks are replaced")


def _readme(args) -> int:
    from .report import update_readme

    check_output(args.readme, args.summary, args.quantizers)  # the README itself is rewritten in place
    if not (args.summary or args.quantizers):
        raise SystemExit("qv readme: give --summary and/or --quantizers")
    for path, name in update_readme(args.readme, summary=args.summary, quantizers=args.quantizers):
        print(f"{args.readme}: {name} block replaced from {path}")
    return 0


register("readme", "copy a summary's headline block (verdicts, per-seed table, machine) or a quantizer comparison into the README",
         _readme_args, _readme)


class Parser(argparse.ArgumentParser):
    """argparse with its errors in one line, ``qv <command>: error: ...`` and exit status 2, like the
    errors of a running command (the usage is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.HelpFormatter):
    """Shows each optional option's default, ``(default: X)``, unless its help already says what the
    default is; required options, flags (off unless given) and options without a default show none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        empty = isinstance(action.default, (list, tuple)) and not action.default  # e.g. a repeatable option: none
        unset = any(action.default is v for v in (None, False, argparse.SUPPRESS))  # identity: 0 is a default to show
        if action.option_strings and not action.required and not unset and not empty and "default" not in text:
            default = action.default
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
            text += f" (default: {shown})"
        return text


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``qv`` parser. ``commands``: the commands whose options are added (None: all); the others
    keep their name and help, so that parsing one command imports only what its options need."""
    wanted = None if commands is None else set(commands)
    parser = Parser(prog="qv", description="Quantization vectors for Vision Transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_args, _) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if wanted is None or name in wanted:
            add_args(command)
    return parser


def one_line(err: BaseException) -> str:
    """An error as one line: an OSError as ``file: reason``, any message's lines joined."""
    if isinstance(err, OSError) and err.strerror:
        files = [str(f) for f in (err.filename, err.filename2) if f is not None]
        text = f"{' -> '.join(files)}: {err.strerror}" if files else err.strerror
    else:
        text = str(err) or type(err).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


# What a command reports as one line and exit status 2: bad values or files (ValueError, which
# json and the safetensors loader raise too), the file system (OSError: missing, unwritable, a
# directory), non-finite arithmetic and a missing optional package. Anything else is a bug: traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError, ImportError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The only options before the command are --help and mistakes, so the first command name is the one
    # parsed: only its options are built (none for `qv --help`, which lists the commands).
    named = next((a for a in argv if isinstance(a, str) and a in COMMANDS), None)
    try:
        args = build_parser([named] if named else []).parse_args(argv)
    except SystemExit as stop:  # --help (0) or a bad argument (2, its one line already printed)
        return stop.code if isinstance(stop.code, int) else 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    _, _, run = COMMANDS[args.command]
    try:
        settle_from_metadata(args)
        return run(args)
    except USER_ERRORS as err:
        print(f"qv {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
