"""Data-free lambda criteria on toy cases whose right lambda is known."""

import pytest
import torch

from qvlib.datafree import choose_lambda, noise_images, output_divergence, score_lambdas, weight_error
from qvlib.models import build_vit
from qvlib.quant import QuantPolicy, QuantSpec, fake_quant

POLICY = QuantPolicy(pattern=r"^w$")


def test_weight_error_by_hand():
    # 2 bits (qmax 1): theta = [3, 1.4] quantizes to [3, 0] (error 1.96 / 10.96); with rho = [-1.6, 0]
    # lambda 0.5 gives [2.2, 1.4] -> scale 2.2 -> [2.2, 2.2] (error 1.28 / 10.96); lambda 1 gives
    # [1.4, 1.4] -> [1.4, 1.4] (error 2.56 / 10.96)
    theta, rho = {"w": torch.tensor([[3.0, 1.4]])}, {"w": torch.tensor([[-1.6, 0.0]])}
    scores = weight_error(theta, rho, QuantSpec(bits=2), [0.0, 0.5, 1.0], POLICY)
    assert scores == pytest.approx({0.0: 1.96 / 10.96, 0.5: 1.28 / 10.96, 1.0: 2.56 / 10.96})
    assert choose_lambda(scores) == 0.5


def test_choose_lambda_ties_prefer_one_then_smaller():
    assert choose_lambda({0.5: 1.0, 1.0: 1.0, 1.5: 1.0}) == 1.0
    assert choose_lambda({0.5: 2.0, 1.5: 2.0}) == 0.5
    with pytest.raises(ValueError, match="no lambda"):
        choose_lambda({})


def test_outputs_criterion_prefers_the_lambda_that_restores_the_receiver(tiny_arch):
    model = build_vit(tiny_arch, 5, seed=0).eval()
    spec = QuantSpec(bits=2)
    policy = QuantPolicy()
    names = policy.select_model(model)
    # a receiver whose quantized weights are its own weights (already on the grid), and a vector that
    # pushes them off it: lambda = 0 reproduces the receiver exactly, any other lambda does not
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in names:
                p.copy_(fake_quant(p, spec))
    receiver = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    rho = {n: 0.5 * torch.randn(receiver[n].shape, generator=g) * receiver[n].abs().max() for n in names}
    inputs = noise_images(16, 16, seed=0)
    scores = output_divergence(receiver, rho, spec, [0.0, 0.5, 1.0], policy, model=model, inputs=inputs)
    assert scores[0.0] == pytest.approx(0.0, abs=1e-6) and min(scores[0.5], scores[1.0]) > 1e-4
    assert choose_lambda(scores) == 0.0
    assert score_lambdas("weights", receiver, rho, spec, [0.0, 1.0], policy)[0.0] == pytest.approx(0.0, abs=1e-12)


def test_errors():
    theta = {"w": torch.ones(2, 2)}
    with pytest.raises(ValueError, match="unknown data-free lambda criterion 'psychic'; known: weights, outputs"):
        score_lambdas("psychic", theta, theta, QuantSpec(bits=2), [1.0], POLICY)
    with pytest.raises(ValueError, match="needs the receiver's model"):
        score_lambdas("outputs", theta, theta, QuantSpec(bits=2), [1.0], POLICY)
    with pytest.raises(ValueError, match="no tensor that the policy quantizes"):
        weight_error(theta, {"b": torch.ones(2)}, QuantSpec(bits=2), [1.0], POLICY)
