"""The ``qv`` command: every workflow rule calls one of its subcommands, and users can run them on
their own safetensors checkpoints."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from .quant import QuantPolicy, QuantSpec, fake_quant_state

# name -> (help, add_arguments(parser), run(args) -> exit code)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def register(name: str, help: str, add_args, run) -> None:
    COMMANDS[name] = (help, add_args, run)


def add_quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", type=int, default=3, help="bit-width, 2..8 (default 3, as in the paper)")
    p.add_argument("--granularity", default="channel", choices=["channel", "group", "tensor"])
    p.add_argument("--group-size", type=int, default=None, help="columns per scale with --granularity group")


def quant_spec(args: argparse.Namespace) -> QuantSpec:
    return QuantSpec(bits=args.bits, granularity=args.granularity, group_size=args.group_size)


# ---------------------------------------------------------------- info
def _info_args(p):
    p.add_argument("checkpoint", type=Path, help="a safetensors checkpoint or vector")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _info(args) -> int:
    from .vectors import WeightVector

    vec = WeightVector.load(args.checkpoint)
    quantized = QuantPolicy().select(vec)
    info = {
        "path": str(args.checkpoint),
        "tensors": len(vec),
        "values": vec.numel(),
        "quantized_tensors": len(quantized),
        "quantized_values": sum(vec[n].numel() for n in quantized),
        "norm_quantized": vec.subset(quantized).norm() if quantized else 0.0,
        "metadata": vec.metadata,
    }
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


# ---------------------------------------------------------------- extract
def _extract_args(p):
    p.add_argument("--qat", type=Path, required=True, help="checkpoint fine-tuned with QAT")
    p.add_argument("--ft", type=Path, required=True, help="checkpoint fine-tuned plainly, same task and start")
    p.add_argument("-o", "--output", type=Path, required=True)


def _extract(args) -> int:
    from .vectors import WeightVector, quantization_vector

    qat, ft = WeightVector.load(args.qat), WeightVector.load(args.ft)
    for key in ("arch", "task"):
        a, b = qat.metadata.get(key), ft.metadata.get(key)
        if a is not None and b is not None and a != b:
            raise ValueError(f"the QAT checkpoint has {key}={a!r} but the FT checkpoint has {key}={b!r}")
    names = QuantPolicy().select(ft)
    if not names:
        raise ValueError(f"{args.ft} holds no quantized linear weights (names like blocks.0.attn.qkv.weight)")
    rho = quantization_vector(qat, ft, names)
    meta = {k: v for k, v in ft.metadata.items() if k in ("arch", "task", "seed", "config_hash")}
    meta.update(mode="qv", quant=qat.metadata.get("quant", ""), source={"qat": str(args.qat), "ft": str(args.ft)})
    rho.save(args.output, meta)
    print(f"wrote {args.output}: {len(rho)} tensors, norm {rho.norm():.6g}")
    return 0


register("extract", "quantization vector = QAT checkpoint - FT checkpoint (block linear weights)", _extract_args, _extract)


# ---------------------------------------------------------------- patch
def _patch_args(p):
    p.add_argument("--receiver", type=Path, required=True, help="the FT checkpoint to patch")
    p.add_argument("--vector", type=Path, action="append", required=True, help="a vector; repeat to add several")
    p.add_argument("--lambda", dest="lambdas", type=float, action="append",
                   help="scale per vector (one value applies to all; default 1.0)")
    p.add_argument("-o", "--output", type=Path, required=True)


def _patch(args) -> int:
    from .vectors import WeightVector, patch

    lambdas = args.lambdas or [1.0]
    if len(lambdas) == 1:
        lambdas = lambdas * len(args.vector)
    if len(lambdas) != len(args.vector):
        raise ValueError(f"got {len(args.vector)} --vector but {len(lambdas)} --lambda values")
    receiver = WeightVector.load(args.receiver)
    vectors = [WeightVector.load(v) for v in args.vector]
    out = WeightVector(patch(receiver, zip(lambdas, vectors)), receiver.metadata)
    out.save(args.output, {"patched_with": [{"vector": str(v), "lambda": lam} for v, lam in zip(args.vector, lambdas)]})
    print(f"wrote {args.output}")
    return 0


register("patch", "receiver + lambda * vector(s): zero-shot patching, no data needed", _patch_args, _patch)


# ---------------------------------------------------------------- quantize
def _quantize_args(p):
    p.add_argument("checkpoint", type=Path)
    add_quant_args(p)
    p.add_argument("-o", "--output", type=Path, required=True)


def _quantize(args) -> int:
    from .vectors import WeightVector

    spec = quant_spec(args)
    ckpt = WeightVector.load(args.checkpoint)
    if not QuantPolicy().select(ckpt):
        raise ValueError(f"{args.checkpoint} holds no quantized linear weights (names like blocks.0.attn.qkv.weight)")
    out = WeightVector(fake_quant_state(ckpt, spec), ckpt.metadata)
    out.save(args.output, {"fake_quantized": spec.to_json()})
    print(f"wrote {args.output} ({spec.tag})")
    return 0


register("quantize", "write the fake-quantized checkpoint (block linear weights only)", _quantize_args, _quantize)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qv", description="Quantization vectors for Vision Transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _, _, run = COMMANDS[args.command]
    try:
        return run(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"qv {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
