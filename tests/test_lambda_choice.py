"""qvlib.lambda_choice (qv choose-lambda's donor and lambda choice and its two reports) and the images
an input criterion compares on (qvlib.pipeline.proxy_images)."""

import math
from types import SimpleNamespace

import pytest
import torch

from qvlib.datafree import choose_lambda, score_lambdas
from qvlib.lambda_choice import choice_json, choice_lines, choose_donor, rank_lambdas
from qvlib.quant import QuantSpec
from qvlib.vectors import WeightVector, random_direction

W = "blocks.0.attn.qkv.weight"
SPEC = QuantSpec(bits=2)


def tensors(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return WeightVector({W: torch.randn(8, 16, generator=g) * scale})


def test_rank_lambdas_scores_the_candidates_once_each_and_ptq_beside_them():
    receiver, rho = tensors(0), tensors(1, 0.05)
    scores, best, share = rank_lambdas("weights", receiver, rho, SPEC, [1.0, 0.5, 1.0, 2.0])
    expected = score_lambdas("weights", receiver, rho, SPEC, [1.0, 0.5, 2.0, 0.0])
    assert list(scores) == [1.0, 0.5, 2.0] and scores == {lam: expected[lam] for lam in (1.0, 0.5, 2.0)}
    assert best == choose_lambda(scores) and share == expected[best] / expected[0.0]
    scores, _, _ = rank_lambdas("weights", receiver, rho, SPEC, [0.0, 1.0])  # 0 a candidate: scored once, kept
    assert list(scores) == [0.0, 1.0]


def test_choose_donor_takes_the_smallest_share_and_ranks_random_directions_beside_each():
    receiver = tensors(0)
    good, other = tensors(1, 0.05), tensors(2, 0.05)
    donors, chosen = choose_donor("weights", receiver, [("a", good), ("b", other)], SPEC, [0.5, 1.0], controls=2)
    assert [d["vector"] for d in donors] == ["a", "b"] and list(donors[0]) == [
        "vector", "scores", "lambda", "share_of_ptq", "random_share_of_ptq"]
    for d, vec in zip(donors, (good, other)):
        scores, best, share = rank_lambdas("weights", receiver, vec, SPEC, [0.5, 1.0])
        randoms = [rank_lambdas("weights", receiver, random_direction(vec, s), SPEC, [0.5, 1.0])[2] for s in (0, 1)]
        assert (d["scores"], d["lambda"], d["share_of_ptq"]) == (scores, best, share)
        assert d["random_share_of_ptq"] == sum(randoms) / 2
    assert chosen is min(donors, key=lambda d: d["share_of_ptq"])
    donors, chosen = choose_donor("weights", receiver, [("a", good)], SPEC, [1.0], controls=0)
    assert donors[0]["random_share_of_ptq"] is None and chosen is donors[0]


def donor(name, scores, lam, share, random):
    return {"vector": name, "scores": scores, "lambda": lam, "share_of_ptq": share, "random_share_of_ptq": random}


def test_the_reports_mark_the_picks_flag_a_donor_no_better_than_random_and_null_what_failed():
    a = donor("v/a.safetensors", {0.5: 2.0, 1.0: 1.0}, 1.0, 0.25, 0.5)
    b = donor("v/b.safetensors", {0.5: float("nan"), 1.0: 3.0}, 1.0, float("nan"), None)
    assert choice_lines("weights", None, [a, b], a, 1, name=lambda v: v.split("/")[-1]) == [
        "criterion weights: lower is better",
        "a.safetensors  <- chosen donor",
        "lambda  0.500  score 2",
        "lambda  1.000  score 1  <- chosen",
        "b.safetensors",
        "lambda  0.500  score nan",
        "lambda  1.000  score 3  <- chosen",
        "chosen: a.safetensors at 1, which leaves 25% of PTQ's score; 1 random direction(s) of the same norms leave 50%"]
    worse = donor("a", {1.0: 1.0}, 1.0, 0.5, 0.4)
    assert choice_lines("outputs", "16 noise images", [worse], worse, 3) == [
        "criterion outputs on 16 noise images: lower is better",
        "lambda  1.000  score 1  <- chosen",
        "chosen: a at 1, which leaves 50% of PTQ's score; 3 random direction(s) of the same norms leave 40% "
        "(no better than random: do not trust this donor)"]
    assert choice_lines("weights", None, [b], b, 0)[-1] == "chosen: v/b.safetensors at 1, which leaves nan% of PTQ's score"
    assert choice_json("weights", None, [a, b], a) == {
        "criterion": "weights", "lower_is_better": True, "images": None, "scores": {0.5: 2.0, 1.0: 1.0}, "lambda": 1.0,
        "vector": "v/a.safetensors",
        "donors": [a, {**b, "scores": {0.5: None, 1.0: 3.0}, "share_of_ptq": None}]}
    assert math.isnan(b["share_of_ptq"])  # the donors themselves are left as they are


def test_proxy_images_are_noise_a_folder_or_other_tasks_never_the_receivers(tiny_arch):
    from qvlib.models import build_vit
    from qvlib.pipeline import proxy_images

    pre = SimpleNamespace(img_size=16, normalize=lambda p: (p / 255 - 0.5) / 0.5)
    model = build_vit(tiny_arch, 3, seed=0).eval()
    x, what = proxy_images(None, pre, "shapes", synth_from=model, n_images=6)
    assert x.shape == (6, 3, 16, 16) and what == "6 images synthesized from the receiver"
    with pytest.raises(ValueError) as err:
        proxy_images(None, pre, "shapes", tasks=["dots"], synth_from=model)
    assert str(err.value) == "give one of --images, --task and --synth"
    pre = SimpleNamespace(img_size=8)
    x, what = proxy_images(None, pre, "shapes")
    assert x.shape == (256, 3, 8, 8) and what == "256 noise images"
    x, what = proxy_images(None, pre, "shapes", images=3)
    assert x.shape == (3, 3, 8, 8) and what == "3 noise images"
    with pytest.raises(ValueError) as err:
        proxy_images(None, pre, "shapes", images=3, tasks=["dots"])
    assert str(err.value) == "give one of --images, --task and --synth"
    with pytest.raises(ValueError) as err:
        proxy_images(None, pre, "shapes", tasks=["dots", "shapes"])
    assert str(err.value) == ("--task shapes is the receiver's own task (its checkpoint's metadata): "
                              "a data-free criterion never sees the receiver's images")
