"""Choosing lambda with no data of the receiver: criteria computed from its weights alone, or from
inputs anyone can make (noise). Each criterion scores every candidate lambda, lower is better; the
chosen lambda is the lowest score's (ties: the lambda nearest 1, then the smaller).

These are what a user who holds only a fine-tuned model and a donor's vector can run; how close
each comes to the oracle (best lambda on test) is an empirical question the grid can answer.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from .quant import DEFAULT_POLICY, QuantPolicy, QuantSpec, fake_quant, quantized_patch
from .registry import Registry

LAMBDA_CRITERIA: Registry = Registry("data-free lambda criterion")


@LAMBDA_CRITERIA.register("weights")
def weight_error(receiver: Mapping[str, torch.Tensor], vector: Mapping[str, torch.Tensor], spec: QuantSpec,
                 lambdas: Sequence[float], policy: QuantPolicy = DEFAULT_POLICY, **_) -> dict[float, float]:
    """Mean over the quantized layers of ``||Q(theta + lam * rho) - theta||^2 / ||theta||^2``: how far
    the patched, quantized weights land from the receiver's own full-precision weights. It rewards a
    vector that moves the weights onto the quantization grid without moving them elsewhere."""
    names = policy.select(vector)
    if not names:
        raise ValueError(f"the vector holds no tensor that the policy quantizes (pattern {policy.pattern!r})")
    scores = {}
    for lam in lambdas:
        errors = []
        for n in names:
            w = receiver[n].double()
            q = fake_quant((w + lam * vector[n].double()).float(), spec).double()
            errors.append(float((q - w).pow(2).sum() / w.pow(2).sum().clamp(min=1e-30)))
        scores[float(lam)] = sum(errors) / len(errors)
    return scores


def noise_images(n: int, img_size: int, seed: int = 0) -> torch.Tensor:
    """Standard-normal images in the model's normalised input space: inputs with no data behind them."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of noise images must be a positive integer, got {n!r}")
    return torch.randn(n, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))


@LAMBDA_CRITERIA.register("outputs")
@torch.inference_mode()
def output_divergence(receiver: Mapping[str, torch.Tensor], vector: Mapping[str, torch.Tensor], spec: QuantSpec,
                      lambdas: Sequence[float], policy: QuantPolicy = DEFAULT_POLICY, *,
                      model: torch.nn.Module, inputs: torch.Tensor, **_) -> dict[float, float]:
    """Mean KL divergence from the full-precision receiver's class probabilities to the patched,
    quantized receiver's, on synthetic ``inputs`` (no labels, no task data): the lambda whose
    quantized model behaves most like the model the user fine-tuned. Tensors the vector carries but
    the policy does not quantize (scope all) are patched unquantized."""
    names = policy.select(vector)
    device = next(model.parameters()).device
    x = inputs.to(device)
    base = {n: receiver[n].to(device) for n in vector}
    rho = {n: t.to(device) for n, t in vector.items()}
    reference = torch.func.functional_call(model, base, (x,), strict=False).float().log_softmax(dim=1)
    scores = {}
    for lam in lambdas:
        patched = quantized_patch(base, names, spec, rho, lam)
        logp = torch.func.functional_call(model, patched, (x,), strict=False).float().log_softmax(dim=1)
        scores[float(lam)] = float(torch.nn.functional.kl_div(logp, reference, log_target=True, reduction="batchmean"))
    return scores


def choose_lambda(scores: Mapping[float, float]) -> float:
    """The lambda of the lowest score; ties go to the lambda nearest 1, then to the smaller. A
    non-finite score (a criterion that failed at that lambda) never wins; all of them non-finite is
    an error, as is a non-finite lambda."""
    if not scores:
        raise ValueError("no lambda was scored")
    bad = [lam for lam in scores if not math.isfinite(lam)]
    if bad:
        raise ValueError(f"lambda {bad[0]!r} is not a finite number")
    finite = [lam for lam, score in scores.items() if math.isfinite(score)]
    if not finite:
        raise ValueError(f"every lambda scored a non-finite value ({', '.join(f'{lam:g}' for lam in scores)}): nothing to choose")
    return min(finite, key=lambda lam: (scores[lam], abs(lam - 1.0), lam))


def check_fits(receiver: Mapping[str, torch.Tensor], vector: Mapping[str, torch.Tensor]) -> None:
    """Every tensor of the vector must be in the receiver with the same shape (a ValueError naming it)."""
    for name, t in vector.items():
        if name not in receiver:
            raise ValueError(f"the vector holds tensor {name!r}, which the receiver does not have: "
                             "the vector was made for another model")
        if tuple(receiver[name].shape) != tuple(t.shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)} in the vector but {tuple(receiver[name].shape)} "
                             "in the receiver: the vector was made for another model")


def score_lambdas(criterion: str, receiver: Mapping[str, torch.Tensor], vector: Mapping[str, torch.Tensor],
                  spec: QuantSpec, lambdas: Sequence[float], policy: QuantPolicy = DEFAULT_POLICY, **inputs) -> dict[float, float]:
    """Scores of ``lambdas`` (finite numbers) under the named criterion (``outputs`` also needs
    ``model`` and ``inputs``, at least one image); the vector must fit the receiver."""
    fn = LAMBDA_CRITERIA.lookup(criterion)
    if criterion == "outputs" and not {"model", "inputs"} <= set(inputs):
        raise ValueError("the outputs criterion needs the receiver's model and synthetic inputs")
    if criterion == "outputs" and len(inputs["inputs"]) == 0:
        raise ValueError("the outputs criterion needs at least one input image")
    lambdas = [float(lam) for lam in lambdas]
    if not lambdas:
        raise ValueError("no lambda to score")
    bad = [lam for lam in lambdas if not math.isfinite(lam)]
    if bad:
        raise ValueError(f"lambda {bad[0]!r} is not a finite number")
    check_fits(receiver, vector)
    return fn(receiver, vector, spec, lambdas, policy, **inputs)
