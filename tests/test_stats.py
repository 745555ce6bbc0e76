"""Bootstrap intervals and verdicts on fixed inputs whose answer is known exactly."""

import pytest

from qvlib.stats import Interval, bootstrap_mean, verdict
from qvlib.vocab import Verdict


def test_constant_values_have_a_zero_width_interval():
    assert bootstrap_mean([2.5] * 7) == Interval(2.5, 2.5, 2.5)


def test_two_values_interval_is_their_range():
    # means of 2 draws from {0, 10} are 0, 5, 10 with probability 1/4, 1/2, 1/4: the 2.5% and 97.5%
    # quantiles are the extremes
    ci = bootstrap_mean([0.0, 10.0], n_boot=4000)
    assert ci == Interval(5.0, 0.0, 10.0)


def test_grouped_resampling_keeps_the_spread_between_seeds():
    values, seeds = [1.0] * 5 + [3.0] * 5, [0] * 5 + [1] * 5
    # seeds resampled first: each resample holds seed 0 twice (mean 1), once (2) or never (3)
    assert bootstrap_mean(values, seeds, n_boot=4000) == Interval(2.0, 1.0, 3.0)
    flat = bootstrap_mean(values, n_boot=4000)  # pairs alone: the pooled 10 values, much narrower
    assert 1.0 < flat.low < 2.0 < flat.high < 3.0


def test_same_input_same_interval_and_level_narrows():
    values = [0.3, -1.2, 4.0, 2.2, 0.9, 1.7, -0.4, 3.1]
    assert bootstrap_mean(values) == bootstrap_mean(values)
    wide, narrow = bootstrap_mean(values, level=0.95), bootstrap_mean(values, level=0.5)
    assert wide.low < narrow.low < wide.mean < narrow.high < wide.high
    assert wide.mean == pytest.approx(sum(values) / len(values))


def test_empty_is_nan_and_bad_input_is_an_error():
    ci = bootstrap_mean([])
    assert ci.mean != ci.mean and ci.low != ci.low
    with pytest.raises(ValueError, match="finite"):
        bootstrap_mean([1.0, float("nan")])
    with pytest.raises(ValueError, match="level"):
        bootstrap_mean([1.0, 2.0], level=1.5)
    with pytest.raises(ValueError, match="group labels"):
        bootstrap_mean([1.0, 2.0], groups=[0])


@pytest.mark.parametrize("low,high,expected", [
    (0.1, 3.0, Verdict.YES), (-3.0, -0.1, Verdict.NO), (-1.0, 1.0, Verdict.INCONCLUSIVE), (0.0, 2.0, Verdict.INCONCLUSIVE),
])
def test_verdict(low, high, expected):
    assert verdict(Interval((low + high) / 2, low, high)) == expected
