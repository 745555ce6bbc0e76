"""How far fine-tuning and QAT move the quantized weights, and how aligned the vectors of tasks are."""

from __future__ import annotations

import json
import math
from typing import Iterable, Mapping

import polars as pl
import torch

from .quant import DEFAULT_POLICY, QuantPolicy, layer_type
from .vectors import WeightVector
from .vocab import merged_donor

LAYER_TYPES = ("all", "qkv", "proj", "fc1", "fc2")


def _sq(tensors: Mapping[str, torch.Tensor], names: list[str]) -> float:
    return sum(float(tensors[n].double().pow(2).sum()) for n in names)


def relative_norms(backbone: Mapping[str, torch.Tensor], ft: Mapping[str, torch.Tensor], rho: Mapping[str, torch.Tensor],
                   policy: QuantPolicy = DEFAULT_POLICY) -> list[dict]:
    """Per layer type (and all together): ||theta_FT - theta_0|| / ||theta_0|| and ||rho|| / ||theta_FT||."""
    names = policy.select(rho)
    update = {n: ft[n] - backbone[n] for n in names}
    rows = []
    for kind in LAYER_TYPES:
        sel = [n for n in names if kind == "all" or layer_type(n) == kind]
        if not sel:
            continue
        rows.append({
            "layer_type": kind,
            "ft_update_rel": math.sqrt(_sq(update, sel) / _sq(backbone, sel)),
            "qv_rel": math.sqrt(_sq(rho, sel) / _sq(ft, sel)),
            "qv_norm": math.sqrt(_sq(rho, sel)),
        })
    return rows


def norms_table(arch: str, seed: int, backbone: Mapping[str, torch.Tensor], fts: Mapping[str, Mapping],
                vectors: Mapping[str, Mapping], policy: QuantPolicy = DEFAULT_POLICY) -> pl.DataFrame:
    rows = []
    for task, rho in vectors.items():
        for row in relative_norms(backbone, fts[task], rho, policy):
            rows.append({"arch": arch, "seed": seed, "task": task, **row})
    return pl.DataFrame(rows)


def cosine_table(arch: str, seed: int, vectors: Mapping[str, Mapping]) -> pl.DataFrame:
    """Cosine similarity of every ordered pair of vectors (the diagonal is 1)."""
    vecs = {t: v if isinstance(v, WeightVector) else WeightVector(v) for t, v in vectors.items()}
    rows = []
    for a, va in vecs.items():
        for b, vb in vecs.items():
            rows.append({"arch": arch, "seed": seed, "task_a": a, "task_b": b, "cosine": va.cosine(vb)})
    return pl.DataFrame(rows)


def merged_cosine_table(arch: str, seed: int, vectors: Mapping[str, WeightVector], merged: Iterable[WeightVector]) -> pl.DataFrame:
    """Cosine of each leave-one-out merged donor with the vector of the receiver it was built for
    (``task_a`` the receiver, ``task_b`` the donor label ``merged:<method>``): how much of the
    receiver's own quantization vector the others' merge points along."""
    rows = []
    for vec in merged:
        info = json.loads(vec.metadata.get("merged", "{}"))
        left_out = json.loads(vec.metadata.get("left_out", "[]"))
        if not info or len(left_out) != 1:
            raise ValueError("a leave-one-out merged vector records its method and the one task it leaves out")
        receiver = left_out[0]
        if receiver not in vectors:
            raise ValueError(f"no vector of receiver {receiver!r} to compare its merged donor with")
        rows.append({"arch": arch, "seed": seed, "task_a": receiver, "task_b": merged_donor(info["method"]),
                     "cosine": vectors[receiver].cosine(vec)})
    return pl.DataFrame(rows, schema={"arch": pl.Utf8, "seed": pl.Int64, "task_a": pl.Utf8, "task_b": pl.Utf8, "cosine": pl.Float64})
