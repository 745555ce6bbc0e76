"""The method on checkpoints a user already has: describe, extract a vector, patch, quantize, and
make the random-direction control (merging several vectors is qvlib.merging's). Every ``qv`` checkpoint command is a thin wrapper over one of
these; each takes and returns :class:`WeightVector` objects (metadata included), so nothing here
touches the file system.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch

from .merging import merged_vector  # noqa: F401 - it lives in qvlib.merging; kept importable from here
from .packing import PACKED_FORMAT, is_packed, packed_sizes
from .quant import DEFAULT_POLICY, QuantPolicy, QuantSpec, fake_quant_state
from .vectors import WeightVector, patch, quantization_vector, random_direction
from .vocab import Control, Mode

# The metadata ``mode`` of a quantization vector (extract, merge, random-direction); model checkpoints
# record a training Mode (ft, qat, pretrain).
VECTOR_MODE = "qv"
# What a command may be handed: "vector", "checkpoint" (any model checkpoint), or one training Mode.
ROLES = ("vector", "checkpoint", *(str(m) for m in Mode))


def require(ckpt: WeightVector, role: str, name: str, used: Iterable[str] = ()) -> None:
    """Refuse a file that its metadata says is something else, or that is not float32.

    ``role``: one of :data:`ROLES`. A file whose metadata records no ``mode`` (a user's own export) is
    taken for what it is given as. Every floating tensor must be float32, and so must the ``used``
    tensors (the ones the command computes with) whatever their dtype: bf16, fp16 or int8 copies are
    refused rather than converted, because a vector of rounded weights is rounding noise."""
    require_role(ckpt, role, name)
    used = set(used)
    for key, t in ckpt.items():
        if t.dtype != torch.float32 and (t.is_floating_point() or key in used):
            raise ValueError(f"{name}: tensor {key!r} is {str(t.dtype).removeprefix('torch.')}, not float32; qv reads "
                             "float32 files only: convert the file to float32 yourself (qv does not guess how it was rounded)")


def require_role(ckpt: WeightVector, role: str, name: str) -> None:
    """The role half of :func:`require`: refuse a packed file, and a file whose metadata ``mode`` says
    it is something other than ``role``. Run before anything that compares the file with another, so
    that a swapped input is named as such rather than as a missing tensor."""
    role = str(role)
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    if ckpt.metadata.get("format") == PACKED_FORMAT:
        raise ValueError(f"{name} is a packed checkpoint (qv quantize --packed): unpack it to float32 first (qv unpack)")
    mode = ckpt.metadata.get("mode")
    if mode is not None:
        if role == "vector" and mode != VECTOR_MODE:
            raise ValueError(f"{name} is not a quantization vector: its metadata records mode {mode!r}; "
                             "give a vector written by qv extract or qv merge")
        if role != "vector" and mode == VECTOR_MODE:
            raise ValueError(f"{name} is a quantization vector (metadata mode {VECTOR_MODE!r}), not a model checkpoint; "
                             "give a fine-tuned checkpoint")
        if role in Mode.__members__.values() and mode != role:
            raise ValueError(f"{name} is a {mode!r} checkpoint (its metadata's mode), expected a {role!r} one: "
                             "are two inputs swapped?")


def _require_quantized(ckpt: Mapping, what: str, policy: QuantPolicy) -> list[str]:
    names = policy.select(ckpt)
    if not names:
        raise ValueError(f"{what} holds no tensor that the policy quantizes (pattern {policy.pattern!r}, "
                         "e.g. blocks.0.attn.qkv.weight)")
    return names


def describe(ckpt: WeightVector, policy: QuantPolicy = DEFAULT_POLICY) -> dict:
    """Sizes of a checkpoint or vector, how much of it the policy quantizes, and its metadata."""
    quantized = policy.select(ckpt)
    return {
        "tensors": len(ckpt),
        "values": ckpt.numel(),
        "quantized_tensors": len(quantized),
        "quantized_values": sum(ckpt[n].numel() for n in quantized),
        "norm_quantized": ckpt.subset(quantized).norm() if quantized else 0.0,
        "metadata": dict(ckpt.metadata),
    }


def summary(ckpt: WeightVector, name: str, policy: QuantPolicy = DEFAULT_POLICY) -> dict:
    """What ``qv info`` reports of a loaded file (``name``: how errors name it): a packed checkpoint's
    sizes (the ratio to 4 places) and metadata, else :func:`describe` under ``policy``."""
    if is_packed(ckpt):
        sizes = packed_sizes(ckpt, name)
        return {**sizes, "packed_ratio": round(sizes["packed_ratio"], 4), "metadata": dict(ckpt.metadata)}
    return describe(ckpt, policy)


def extract_vector(qat: WeightVector, ft: WeightVector, policy: QuantPolicy = DEFAULT_POLICY,
                   qat_name: str = "the QAT checkpoint", ft_name: str = "the FT checkpoint") -> WeightVector:
    """``rho = theta_QAT - theta_FT`` over the tensors the policy's vectors carry (scope linear: the
    quantized ones; scope all: every tensor but the head), with provenance metadata. The two
    checkpoints must come from the same arch and task (when their metadata says). Checked in this
    order: what each file is (its metadata mode, packed or not), arch and task, the tensor names and
    shapes, then the dtypes."""
    require_role(qat, Mode.QAT, qat_name)
    require_role(ft, Mode.FT, ft_name)
    for key in ("arch", "task"):
        a, b = qat.metadata.get(key), ft.metadata.get(key)
        if a is not None and b is not None and a != b:
            raise ValueError(f"{qat_name} has {key}={a!r} but {ft_name} has {key}={b!r}")
    for this, other, this_name, other_name in ((qat, ft, qat_name, ft_name), (ft, qat, ft_name, qat_name)):
        only = [n for n in this if n not in other]
        if only:
            more = f" (and {len(only) - 1} more)" if len(only) > 1 else ""
            raise ValueError(f"tensor {only[0]!r} is in {this_name} but not in {other_name}{more}: "
                             "give two checkpoints of the same model")
    for n, t in ft.items():
        if tuple(t.shape) != tuple(qat[n].shape):
            raise ValueError(f"tensor {n!r} has shape {tuple(qat[n].shape)} in {qat_name} but {tuple(t.shape)} in {ft_name}")
    _require_quantized(ft, ft_name, policy)
    carried = policy.select_carried(ft)
    require(qat, Mode.QAT, qat_name, carried)
    require(ft, Mode.FT, ft_name, carried)
    rho = quantization_vector(qat, ft, carried)
    meta = {k: v for k, v in ft.metadata.items() if k in ("arch", "task", "seed", "config_hash")}
    meta.update(mode="qv", quant=qat.metadata.get("quant", ""), scope=policy.scope, source={"qat": qat_name, "ft": ft_name})
    return rho.with_metadata(meta)


def patched(receiver: WeightVector, vectors: Iterable[tuple[float, WeightVector]], names: Iterable[str] = (),
            receiver_name: str = "the receiver") -> WeightVector:
    """``theta_R + sum(lambda_i * rho_i)``, the receiver's metadata kept; ``names`` label the vectors in it.
    The receiver must be a float32 model checkpoint, each vector a float32 vector, each lambda finite."""
    vectors = list(vectors)
    labels = list(names) or [f"vector {i}" for i in range(len(vectors))]
    for label, (lam, vec) in zip(labels, vectors):
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
            raise ValueError(f"lambda {lam!r} for {label} is not a finite number")
        require(vec, "vector", label, vec)
    require(receiver, "checkpoint", receiver_name, {n for _, vec in vectors for n in vec})
    out = dict(receiver)
    for label, (lam, vec) in zip(labels, vectors):  # one vector at a time, so an overflow names its lambda and vector
        out = patch(out, [(lam, vec)])
        for name in vec:
            if out[name].is_floating_point() and not bool(torch.isfinite(out[name]).all()):
                raise ValueError(f"lambda {lam!r} times {label} gives non-finite values in tensor {name!r} of "
                                 f"{receiver_name} (beyond float32's range): use a smaller lambda")
    out = WeightVector(out, receiver.metadata)
    return out.with_metadata({"patched_with": [{"vector": n, "lambda": lam} for n, (lam, _) in zip(labels, vectors)]})


def with_vectors_quant(ckpt: WeightVector, vectors: Iterable[WeightVector]) -> WeightVector:
    """A patched checkpoint recording the quantizer its vectors were made for (the one ``quant`` they
    record), where it records none itself: what ``qv quantize`` then uses by default."""
    quants = {v.metadata.get("quant") for v in vectors} - {None, ""}
    if not ckpt.metadata.get("quant") and len(quants) == 1:
        return ckpt.with_metadata({"quant": quants.pop()})
    return ckpt


def broadcast_lambdas(lambdas: list[float] | None, n_vectors: int) -> list[float]:
    """One lambda per vector: none given means 1.0 for all, one value applies to all."""
    lambdas = list(lambdas or [1.0])
    if len(lambdas) == 1:
        lambdas = lambdas * n_vectors
    if len(lambdas) != n_vectors:
        raise ValueError(f"got {n_vectors} vectors but {len(lambdas)} lambda values")
    return lambdas


def quantized(ckpt: WeightVector, spec: QuantSpec, policy: QuantPolicy = DEFAULT_POLICY, name: str = "the checkpoint") -> WeightVector:
    """The checkpoint with every policy tensor fake-quantized (the rest unchanged); a float32 model
    checkpoint, not a vector."""
    require(ckpt, "checkpoint", name, _require_quantized(ckpt, name, policy))
    return WeightVector(fake_quant_state(ckpt, spec, policy), ckpt.metadata).with_metadata({"fake_quantized": spec.to_json()})


def random_control(rho: WeightVector, seed: int, name: str = "the vector") -> WeightVector:
    """A random direction with ``rho``'s per-tensor norms: what any perturbation of that size does."""
    require(rho, "vector", name, rho)
    out = random_direction(rho, seed)
    return WeightVector(out, rho.metadata).with_metadata({"control": str(Control.RANDOM), "random_seed": seed, "norms_of": name})
