"""The racing lambda search against the dense grid on score surfaces whose answer is known."""

import pytest
import torch

from qvlib.racing import race_lambda, stratified_order

GRID = [0.15, 0.30, 0.45, 0.60, 0.75, 0.90, 1.00, 1.05, 1.20, 1.35, 1.50]


def test_stratified_order_is_a_permutation_whose_prefixes_keep_class_shares():
    labels = torch.tensor([0] * 300 + [1] * 100 + [2] * 600)
    order = stratified_order(labels, seed=3)
    assert sorted(order.tolist()) == list(range(1000))
    for prefix in (20, 100, 500):
        counts = torch.bincount(labels[order[:prefix]], minlength=3).tolist()
        expected = [0.3 * prefix, 0.1 * prefix, 0.6 * prefix]
        assert all(abs(c - e) <= 1 for c, e in zip(counts, expected)), (prefix, counts)
    assert not torch.equal(order, stratified_order(labels, seed=4))


def scorer(correct: torch.Tensor, calls: list):
    def score(lam, idx):
        calls.append((lam, idx.tolist()))
        return correct[GRID.index(lam), idx]
    return score


def test_two_peaks_the_far_one_higher_is_found_and_survivors_pay_only_for_new_images():
    n = 800
    p = torch.tensor([0.50, 0.70, 0.55, 0.40, 0.35, 0.30, 0.45, 0.50, 0.60, 0.85, 0.60])  # peaks at 0.30 and 1.35
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    correct = u[None] < p[:, None]  # per image: right under every lambda whose accuracy exceeds its difficulty
    calls = []
    result = race_lambda(scorer(correct, calls), GRID, torch.randint(0, 5, (n,)))
    assert result.best_lambda == 1.35 and result.best_correct == int(correct[GRID.index(1.35)].sum())
    for lam in GRID:  # nested subsamples: no image is scored twice for one lambda
        seen = [i for called, idx in calls if called == lam for i in idx]
        assert len(seen) == len(set(seen)) == result.seen[lam]
    assert result.seen[1.35] == result.seen[1.0] == n  # lambda = 1 always reaches the end
    assert result.forwards == sum(result.seen.values()) < 0.35 * result.dense_forwards()


def surface(gen: torch.Generator) -> torch.Tensor:
    """Accuracy against lambda with three random bumps: often several peaks."""
    lam = torch.tensor(GRID)
    p = torch.full((len(GRID),), 0.4)
    for _ in range(3):
        centre, height, width = 1.5 * torch.rand(1, generator=gen), 0.3 * torch.rand(1, generator=gen), 0.05 + 0.3 * torch.rand(1, generator=gen)
        p += height * torch.exp(-((lam - centre) / width) ** 2)
    return p.clamp(0.02, 0.98)


def test_racing_meets_its_goal_on_random_multi_peak_surfaces():
    """Within 0.5 points of the dense grid's best in >= 95% of cells, with <= 35% of its forwards."""
    n, trials, hits, spent = 1000, 120, 0, 0.0
    for seed in range(trials):
        gen = torch.Generator().manual_seed(seed)
        p = surface(gen)
        difficulty = torch.rand(n, generator=gen)
        correct = difficulty[None] + 0.15 * torch.randn(len(GRID), n, generator=gen) < p[:, None]
        full = correct.sum(dim=1)
        result = race_lambda(scorer(correct, []), GRID, torch.randint(0, 10, (n,), generator=gen))
        hits += (full.max() - full[GRID.index(result.best_lambda)]).item() / n * 100 <= 0.5
        spent += result.forwards / result.dense_forwards()
    assert hits / trials >= 0.95 and spent / trials <= 0.35, (hits / trials, spent / trials)


def test_small_splits_grids_and_errors():
    correct = torch.ones(len(GRID), 10, dtype=torch.bool)
    result = race_lambda(scorer(correct, []), GRID, torch.zeros(10))
    assert result.best_lambda == 1.0 and result.best_correct == 10  # all tie: the lambda nearest 1
    one = race_lambda(lambda lam, idx: torch.ones(len(idx)), [0.5], torch.zeros(50), start=8)
    assert (one.best_lambda, one.best_correct, one.forwards) == (0.5, 50, 50)
    with pytest.raises(ValueError, match="grid is empty"):
        race_lambda(lambda lam, idx: 0, [], torch.zeros(5))
    with pytest.raises(ValueError, match="keep must be in"):
        race_lambda(lambda lam, idx: 0, GRID, torch.zeros(5), keep=1.0)
    with pytest.raises(ValueError, match="split is empty"):
        race_lambda(lambda lam, idx: 0, GRID, torch.zeros(0))


def test_the_margin_reads_the_paired_difference_not_each_accuracy():
    """A lambda 6 points behind the others that disagrees with them only where it is wrong: two
    binomial errors of each accuracy (~9 points on the first 125 images) would keep it, the paired
    difference (~7 discordant images, all lost) drops it after the first round."""
    n = 2000
    base = torch.rand(n, generator=torch.Generator().manual_seed(1)) < 0.6
    correct = base.repeat(len(GRID), 1)
    loser = GRID.index(0.15)
    flipped = base.nonzero().flatten()[::10]  # wrong on a tenth of the images the others get right
    correct[loser, flipped] = False
    paired = race_lambda(scorer(correct, []), GRID, torch.zeros(n), keep=0.1, margin=2.0)
    assert paired.seen[0.15] == n // 16  # out after the first round
    assert paired.best_lambda == 1.0  # every other lambda ties: the one nearest 1


def test_score_must_answer_every_image():
    with pytest.raises(ValueError, match="answers for"):
        race_lambda(lambda lam, idx: torch.ones(len(idx) - 1), GRID, torch.zeros(100))


def test_result_records_correct_answers_on_the_images_each_lambda_saw():
    n = 640
    correct = torch.rand(len(GRID), n, generator=torch.Generator().manual_seed(2)) < torch.linspace(0.3, 0.8, len(GRID))[:, None]
    result = race_lambda(scorer(correct, []), GRID, torch.zeros(n), seed=5)
    order = stratified_order(torch.zeros(n), 5)
    for lam in GRID:
        k = result.seen[lam]
        assert result.correct[lam] == int(correct[GRID.index(lam), order[:k]].sum())


def test_complete_scores_a_lambda_on_the_rest_of_the_split_once():
    n = 512
    correct = torch.rand(len(GRID), n, generator=torch.Generator().manual_seed(3)) < 0.5
    calls = []
    result = race_lambda(scorer(correct, calls), GRID, torch.zeros(n))
    lam = min(GRID, key=lambda g: result.seen[g])  # a lambda dropped early
    before, seen = result.forwards, result.seen[lam]
    assert seen < n
    assert result.complete(lam) == int(correct[GRID.index(lam)].sum())
    assert result.seen[lam] == n and result.forwards == before + n - seen
    assert result.complete(lam) == int(correct[GRID.index(lam)].sum()) and result.forwards == before + n - seen
    with pytest.raises(ValueError, match="not in the race's grid"):
        result.complete(0.2)


def test_race_splits_keeps_lambda_one_on_test_only_and_finishes_calibs_pick_on_test():
    from qvlib.racing import race_splits

    n = 1024
    gen = torch.Generator().manual_seed(4)
    p = torch.tensor([0.80, 0.75, 0.70, 0.60, 0.55, 0.50, 0.30, 0.30, 0.25, 0.20, 0.20])  # lambda = 1 far behind
    correct = {s: torch.rand(len(GRID), n, generator=gen) < p[:, None] for s in ("test", "calib")}
    races = race_splits(lambda s, lam, idx: correct[s][GRID.index(lam), idx], GRID,
                        {"test": torch.zeros(n), "calib": torch.zeros(n)}, finish_on_test=[0.6], keep=0.2, margin=0.0)
    assert races["test"].seen[1.0] == n and races["calib"].seen[1.0] < n
    assert races["calib"].best_lambda == 0.15 and races["test"].best_lambda == 0.15
    assert races["test"].seen[0.6] == n  # a data-free pick, finished on test
    assert races["test"].forwards + races["calib"].forwards < 0.35 * 2 * len(GRID) * n


def test_every_race_setting_passes_the_config_and_its_schema_and_reaches_the_race(tmp_path):
    from pathlib import Path

    import yaml
    from jsonschema import validate

    from qvlib.config import Config

    settings = {"method": "racing", "keep": 0.25, "margin": 1.5, "tolerance": 0.5, "start": 64}
    schema = yaml.safe_load((Path(__file__).parents[1] / "workflow" / "schemas" / "config.schema.yaml").read_text())
    validate(settings, schema["properties"]["lambda_search"])
    options = Config({"lambda_search": settings}, tmp_path).lambda_search
    assert options == settings
    correct = torch.ones(len(GRID), 256, dtype=torch.bool)
    result = race_lambda(scorer(correct, []), GRID, torch.zeros(256), **{k: v for k, v in options.items() if k != "method"})
    assert result.seen[GRID[0]] == 64  # start reached the race
    with pytest.raises(ValueError, match="unknown lambda_search keys: speed"):
        Config({"lambda_search": {"method": "racing", "speed": 2}}, tmp_path).lambda_search
