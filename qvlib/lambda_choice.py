"""``qv choose-lambda``'s decision, with no receiver data: score each donor vector's candidate lambdas
with a data-free criterion (qvlib.datafree), pick each donor's lambda, and choose the donor whose pick
leaves the smallest share of PTQ's score (lambda 0), with norm-matched random directions scored beside
it to say how sure the choice is. Also the two ways the command reports the choice (JSON, text).

A donor's result is a dict: ``vector`` (its name), ``scores`` (lambda -> score), ``lambda`` (the
pick), ``share_of_ptq`` (the pick's score over lambda 0's; NaN when that is not a positive finite
number) and ``random_share_of_ptq`` (the mean over the random directions; None without any).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch

from .datafree import choose_lambda, score_lambdas
from .quant import DEFAULT_POLICY, QuantPolicy, QuantSpec
from .vectors import random_direction


def rank_lambdas(criterion: str, receiver: Mapping[str, torch.Tensor], vector: Mapping[str, torch.Tensor],
                 spec: QuantSpec, lambdas: Sequence[float], policy: QuantPolicy = DEFAULT_POLICY,
                 tolerance: float = 0.0, **inputs) -> tuple[dict[float, float], float, float]:
    """The scores of ``lambdas`` (repeats dropped, in order), the pick (:func:`choose_lambda` with
    ``tolerance``) and its score as a share of PTQ's; lambda 0 is scored for that even when not a
    candidate. ``inputs``: what an input criterion needs (``model``, ``inputs``)."""
    lambdas = list(dict.fromkeys(lambdas))
    scored = lambdas + ([0.0] if 0.0 not in lambdas else [])
    all_scores = score_lambdas(criterion, receiver, vector, spec, scored, policy, **inputs)
    scores = {lam: all_scores[lam] for lam in lambdas}
    best = choose_lambda(scores, tolerance)
    at0 = all_scores[0.0]
    share = scores[best] / at0 if math.isfinite(at0) and at0 > 0 else float("nan")
    return scores, best, share


def choose_donor(criterion: str, receiver: Mapping[str, torch.Tensor],
                 vectors: Iterable[tuple[str, Mapping[str, torch.Tensor]]], spec: QuantSpec, lambdas: Sequence[float],
                 policy: QuantPolicy = DEFAULT_POLICY, tolerance: float = 0.0, controls: int = 1,
                 **inputs) -> tuple[list[dict], dict]:
    """Every donor's result (``vectors``: (name, vector) pairs, in order) and the chosen one: the
    smallest finite share of PTQ's score (the first of equals; a NaN share only when all are).
    ``controls`` random directions (seeds 0..controls-1) are ranked beside each vector; a vector that
    no random direction can match (non-finite norms) gets none."""
    donors = []
    for name, vec in vectors:
        scores, best, share = rank_lambdas(criterion, receiver, vec, spec, lambdas, policy, tolerance, **inputs)
        try:
            randoms = [rank_lambdas(criterion, receiver, random_direction(vec, seed), spec, lambdas, policy, tolerance,
                                    **inputs)[2] for seed in range(controls)]
        except ValueError:
            randoms = []
        donors.append({"vector": name, "scores": scores, "lambda": best, "share_of_ptq": share,
                       "random_share_of_ptq": sum(randoms) / len(randoms) if randoms else None})
    if not donors:
        raise ValueError("no vector to choose from")
    chosen = min(donors, key=lambda d: (d["share_of_ptq"] if math.isfinite(d["share_of_ptq"]) else math.inf))
    return donors, chosen


def _finite(x):
    return x if x is None or math.isfinite(x) else None


def choice_json(criterion: str, images: str | None, donors: list[dict], chosen: dict) -> dict:
    """The choice as JSON-ready data; a non-finite score or share (the criterion failed there) is None,
    so the output stays valid JSON."""
    return {"criterion": criterion, "lower_is_better": True, "images": images,
            "scores": {lam: _finite(v) for lam, v in chosen["scores"].items()}, "lambda": chosen["lambda"],
            "vector": chosen["vector"],
            "donors": [{**d, "scores": {lam: _finite(v) for lam, v in d["scores"].items()},
                        "share_of_ptq": _finite(d["share_of_ptq"]), "random_share_of_ptq": _finite(d["random_share_of_ptq"])}
                       for d in donors]}


def choice_lines(criterion: str, images: str | None, donors: list[dict], chosen: dict, controls: int,
                 name=lambda vector: vector) -> list[str]:
    """The choice as text: every donor's scores (the pick marked), then the chosen donor and lambda with
    the share of PTQ's score its random directions leave (a donor no better than them is flagged).
    ``name``: how a donor's ``vector`` is shown."""
    lines = [f"criterion {criterion}{' on ' + images if images else ''}: lower is better"]
    for d in donors:
        if len(donors) > 1:
            lines.append(f"{name(d['vector'])}{'  <- chosen donor' if d is chosen else ''}")
        for lam, score in d["scores"].items():
            lines.append(f"lambda {lam:>6.3f}  score {score:.6g}{'  <- chosen' if lam == d['lambda'] else ''}")
    sure = ""
    if chosen["random_share_of_ptq"] is not None:
        r = chosen["random_share_of_ptq"]
        sure = (f"; {controls} random direction(s) of the same norms leave {r:.0%}"
                + (" (no better than random: do not trust this donor)" if not chosen["share_of_ptq"] < r else ""))
    lines.append(f"chosen: {name(chosen['vector'])} at {chosen['lambda']:g}, which leaves {chosen['share_of_ptq']:.0%} "
                 f"of PTQ's score{sure}")
    return lines
