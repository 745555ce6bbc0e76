"""The method on checkpoints a user already has: describe, extract a vector, patch, quantize, and
make the random-direction control. Every ``qv`` checkpoint command is a thin wrapper over one of
these; each takes and returns :class:`WeightVector` objects (metadata included), so nothing here
touches the file system.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from .merging import merge
from .quant import DEFAULT_POLICY, QuantPolicy, QuantSpec, fake_quant_state
from .vectors import WeightVector, patch, quantization_vector, random_direction
from .vocab import Control


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


def extract_vector(qat: WeightVector, ft: WeightVector, policy: QuantPolicy = DEFAULT_POLICY,
                   qat_name: str = "the QAT checkpoint", ft_name: str = "the FT checkpoint") -> WeightVector:
    """``rho = theta_QAT - theta_FT`` over the tensors the policy's vectors carry (scope linear: the
    quantized ones; scope all: every tensor but the head), with provenance metadata. The two
    checkpoints must come from the same arch and task (when their metadata says)."""
    for key in ("arch", "task"):
        a, b = qat.metadata.get(key), ft.metadata.get(key)
        if a is not None and b is not None and a != b:
            raise ValueError(f"{qat_name} has {key}={a!r} but {ft_name} has {key}={b!r}")
    _require_quantized(ft, ft_name, policy)
    rho = quantization_vector(qat, ft, policy.select_carried(ft))
    meta = {k: v for k, v in ft.metadata.items() if k in ("arch", "task", "seed", "config_hash")}
    meta.update(mode="qv", quant=qat.metadata.get("quant", ""), scope=policy.scope, source={"qat": qat_name, "ft": ft_name})
    return rho.with_metadata(meta)


def merged_vector(vectors: Mapping[str, WeightVector], method: str = "mean", exclude: Iterable[str] = (),
                  **params) -> WeightVector:
    """One vector from several (``vectors``: label -> vector) with a merge method of qvlib.merging,
    leaving out the labels in ``exclude`` (a receiver's own task, for a leave-one-out donor). The
    result records the method and the labels it merged; arch, quant and seed are kept where the vectors
    that record them agree, and vectors made for different quantizers or archs are refused."""
    excluded = set(exclude)
    kept = {label: v for label, v in vectors.items() if label not in excluded}
    if not kept:
        raise ValueError(f"nothing left to merge once {sorted(excluded)} are left out")
    meta: dict[str, object] = {"mode": "qv", "merged": {"method": method, **params, "tasks": sorted(kept)}}
    if excluded:
        meta["left_out"] = sorted(excluded)
    for key in ("arch", "quant", "seed"):
        values = {v.metadata[key] for v in kept.values() if v.metadata.get(key) is not None}
        if len(values) == 1:
            meta[key] = values.pop()
        elif len(values) > 1 and key != "seed":
            raise ValueError(f"the vectors to merge disagree on {key}: {sorted(str(v) for v in values)}")
    return merge(list(kept.values()), method, **params).with_metadata(meta)


def patched(receiver: WeightVector, vectors: Iterable[tuple[float, WeightVector]], names: Iterable[str] = ()) -> WeightVector:
    """``theta_R + sum(lambda_i * rho_i)``, the receiver's metadata kept; ``names`` label the vectors in it."""
    vectors = list(vectors)
    labels = list(names) or [f"vector {i}" for i in range(len(vectors))]
    out = WeightVector(patch(receiver, vectors), receiver.metadata)
    return out.with_metadata({"patched_with": [{"vector": n, "lambda": lam} for n, (lam, _) in zip(labels, vectors)]})


def broadcast_lambdas(lambdas: list[float] | None, n_vectors: int) -> list[float]:
    """One lambda per vector: none given means 1.0 for all, one value applies to all."""
    lambdas = list(lambdas or [1.0])
    if len(lambdas) == 1:
        lambdas = lambdas * n_vectors
    if len(lambdas) != n_vectors:
        raise ValueError(f"got {n_vectors} vectors but {len(lambdas)} lambda values")
    return lambdas


def quantized(ckpt: WeightVector, spec: QuantSpec, policy: QuantPolicy = DEFAULT_POLICY, name: str = "the checkpoint") -> WeightVector:
    """The checkpoint with every policy tensor fake-quantized (the rest unchanged)."""
    _require_quantized(ckpt, name, policy)
    return WeightVector(fake_quant_state(ckpt, spec, policy), ckpt.metadata).with_metadata({"fake_quantized": spec.to_json()})


def random_control(rho: WeightVector, seed: int, name: str = "the vector") -> WeightVector:
    """A random direction with ``rho``'s per-tensor norms: what any perturbation of that size does."""
    out = random_direction(rho, seed)
    return WeightVector(out, rho.metadata).with_metadata({"control": str(Control.RANDOM), "random_seed": seed, "norms_of": name})
