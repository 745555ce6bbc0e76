"""Merging several vectors into one: a small registry of named methods.

Each method is a per-tensor function ``fn(stack, **params) -> tensor`` over the vectors' copies of
one tensor stacked on dim 0; ``merge(vectors, method, **params)`` checks that the vectors agree in
names and shapes and applies the method tensor by tensor. A new method is one decorated function
here and its test. Patching with a merged vector is the paper's patch: ``theta_R + lambda * merged``.

``qv merge`` labels each vector it reads (:func:`label_vectors`: its metadata task, else its file
name) and builds the merged file with :func:`merged_vector`, which leaves out excluded labels and a
leave-one-out donor's receiver and records what it merged (:func:`merged_tasks` reads it back).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch

from .registry import Registry
from .vectors import WeightVector

MergeFn = Callable[..., torch.Tensor]
MERGE_METHODS: Registry[MergeFn] = Registry("merge method")
merge_method = MERGE_METHODS.register  # decorator: @merge_method("name") registers a per-tensor function


@merge_method("sum")
def merge_sum(stack: torch.Tensor) -> torch.Tensor:
    """Task arithmetic: the plain sum (the paper's patch with several vectors at one lambda)."""
    return stack.sum(dim=0)


@merge_method("mean")
def merge_mean(stack: torch.Tensor) -> torch.Tensor:
    """The average: keeps what the vectors share, shrinks what each has alone by 1/n."""
    return stack.mean(dim=0)


@merge_method("ties")
def merge_ties(stack: torch.Tensor, density: float = 0.2) -> torch.Tensor:
    """TIES-merging: keep each vector's ``density`` share of largest-magnitude entries, elect each
    entry's sign as the sign of the kept values' sum (a zero sum elects nothing: the entry is 0), and
    average the kept values that agree with it."""
    if not 0 < density <= 1:
        raise ValueError(f"ties: density must be in (0, 1], got {density}")
    flat = stack.reshape(stack.shape[0], -1)
    keep = max(1, round(density * flat.shape[1]))
    threshold = flat.abs().topk(keep, dim=1).values[:, -1:]
    trimmed = torch.where(flat.abs() >= threshold, flat, torch.zeros_like(flat))
    sign = torch.sign(trimmed.sum(dim=0, keepdim=True))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    count = agree.sum(dim=0)
    total = torch.where(agree, trimmed, torch.zeros_like(trimmed)).sum(dim=0)
    merged = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    return merged.reshape(stack.shape[1:])


def merge(vectors: Sequence[Mapping[str, torch.Tensor]], method: str = "mean", **params) -> WeightVector:
    """One vector from several with the named method; ``params`` go to it (e.g. ``density`` of ties)."""
    fn = MERGE_METHODS.lookup(method)
    allowed = set(inspect.signature(fn).parameters) - {"stack"}
    unknown = set(params) - allowed
    if unknown:
        raise ValueError(f"merge method {method!r} takes {sorted(allowed) or 'no parameters'}, not {sorted(unknown)}")
    vecs = [v if isinstance(v, WeightVector) else WeightVector(v) for v in vectors]
    if not vecs:
        raise ValueError("nothing to merge: give at least one vector")
    for v in vecs[1:]:
        vecs[0].check_compatible(v)
    return WeightVector({name: fn(torch.stack([v[name] for v in vecs]), **params) for name in vecs[0]})


def vector_label(vector: WeightVector, path: str | Path) -> str:
    """What a vector is called among the vectors to merge: its metadata task, else its file's stem."""
    return vector.metadata.get("task") or Path(path).stem


def label_vectors(vectors: Iterable[tuple[str | Path, WeightVector]]) -> dict[str, WeightVector]:
    """(path, vector) pairs -> label -> vector (:func:`vector_label`), in order; two vectors with one
    label are an error, raised before any later pair is read (``vectors`` may load them lazily)."""
    out: dict[str, WeightVector] = {}
    for path, vector in vectors:
        label = vector_label(vector, path)
        if label in out:
            raise ValueError(f"two vectors are labelled {label!r} (by their metadata task or file name): merge each once")
        out[label] = vector
    return out


def merged_vector(vectors: Mapping[str, WeightVector], method: str = "mean", exclude: Iterable[str] = (),
                  receiver: str | None = None, **params) -> WeightVector:
    """One vector from several (``vectors``: label -> vector) with one of :data:`MERGE_METHODS`,
    leaving out the labels in ``exclude``, each of which must be among the labels (a typo is an error,
    not a no-op). ``receiver``: the task a leave-one-out donor is built for; its vector is left out if
    it is among ``vectors`` and it is recorded as left out either way (a workflow passes only the
    other tasks' vectors). The result records the method, the labels it merged and the ones it left
    out; arch, quant and seed are kept where the vectors that record them agree, and vectors made for
    different quantizers or archs are refused."""
    unknown = sorted(set(exclude) - set(vectors))
    if unknown:
        raise ValueError(f"cannot exclude {unknown[0]!r}: no vector to merge is labelled so (labels: "
                         f"{', '.join(sorted(vectors))}); a vector's label is its metadata task, else its file name")
    excluded = set(exclude) | ({receiver} if receiver is not None else set())
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


def merged_tasks(merged: WeightVector) -> list[str]:
    """The labels a vector written by :func:`merged_vector` merged, from its metadata."""
    return json.loads(merged.metadata["merged"])["tasks"]
