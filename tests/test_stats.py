"""featkd.stats: Welch's t-test against scipy, interval coverage, the studentized bootstrap, Holm."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from featkd import stats

A = [86.17, 85.02, 85.27]
B = [84.31, 84.90, 84.77, 84.20, 85.01]


def test_welch_matches_scipy():
    got = stats.welch(A, B)
    ref = scipy_stats.ttest_ind(A, B, equal_var=False)
    assert got.diff == pytest.approx(np.mean(A) - np.mean(B))
    assert got.p == pytest.approx(ref.pvalue, rel=1e-9)
    assert got.df == pytest.approx(ref.df, rel=1e-9)
    assert got.ci == pytest.approx(tuple(ref.confidence_interval(0.95)), rel=1e-9)
    assert (got.n_a, got.n_b, got.test, got.note) == (3, 5, "welch", "")
    swapped = stats.welch(B, A)
    assert swapped.diff == pytest.approx(-got.diff) and swapped.p == pytest.approx(got.p)


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")  # scipy's, on the constant sample
def test_welch_with_one_constant_sample_is_an_ordinary_test():
    got = stats.welch([85.0, 85.0, 85.0], B)
    ref = scipy_stats.ttest_ind([85.0, 85.0, 85.0], B, equal_var=False)
    assert got.p == pytest.approx(ref.pvalue) and got.df == pytest.approx(len(B) - 1)


@pytest.mark.parametrize("test", ["welch", "bootstrap"])
def test_no_test_without_a_variance_estimate(test):
    one_seed = stats.TESTS[test]([85.0], B)
    assert one_seed.p is None and one_seed.ci is None and one_seed.verdict == "n/a"
    assert "one seed" in one_seed.note and one_seed.diff == pytest.approx(85.0 - np.mean(B))
    for a, b in (([85.0, 85.0], [84.0, 84.0, 84.0]), ([85.0, 85.0], [85.0, 85.0])):
        constant = stats.TESTS[test](a, b)
        assert constant.p is None and constant.verdict == "n/a" and "constant" in constant.note
    with pytest.raises(ValueError, match="sample b"):
        stats.TESTS[test](A, [])
    with pytest.raises(ValueError, match="finite"):
        stats.TESTS[test]([1.0, float("nan")], A)


def test_verdict_words_follow_p_and_the_interval():
    better = stats.welch([88.0, 88.1, 87.9], [85.0, 85.2, 84.8])
    assert better.verdict == "better" and better.p < 0.05 and better.ci[0] > 0
    worse = stats.welch([85.0, 85.2, 84.8], [88.0, 88.1, 87.9])
    assert worse.verdict == "worse" and worse.ci[1] < 0
    close = stats.welch([85.0, 86.0, 84.0], [85.5, 86.4, 84.6])
    assert close.verdict == "no significant difference" and close.ci[0] < 0 < close.ci[1]
    rng = np.random.default_rng(1)
    for _ in range(200):  # p < 0.05 exactly when the 95 % interval excludes 0
        c = stats.welch(rng.normal(0.5, 1, 3), rng.normal(0, 1, 4))
        assert c.significant == (c.ci[0] > 0 or c.ci[1] < 0)


def test_a_close_verdict_wants_five_seeds_on_each_side():
    near = stats.welch([85.0, 86.0, 87.0], [83.0, 84.0, 85.0])  # p 0.070
    assert stats.CLOSE_P[0] <= near.p <= stats.CLOSE_P[1] and near.wants_seeds
    five = stats.welch([85.0, 86.0, 87.0, 85.5, 86.5], [83.5, 84.5, 85.5, 84.0, 85.0])  # p 0.017, 5 vs 5
    assert stats.CLOSE_P[0] <= five.p <= stats.CLOSE_P[1] and not five.wants_seeds
    assert stats.welch([85.0, 86.0, 87.0, 85.5, 86.5], [83.0, 84.0, 85.0]).wants_seeds  # 5 vs 3
    assert not stats.welch([88.0, 88.1, 87.9], [85.0, 85.2, 84.8]).wants_seeds  # p < 0.01: settled
    assert not stats.welch([85.0, 86.0, 84.0], [85.5, 86.4, 84.6]).wants_seeds  # p > 0.10
    assert not stats.welch([85.0], [84.0, 84.6]).wants_seeds  # no test


@pytest.mark.parametrize("n_a, n_b, sd_a, sd_b", [(3, 3, 0.5, 0.5), (3, 5, 0.2, 1.0), (5, 5, 1.0, 0.3)])
def test_welch_interval_covers_the_true_difference_about_95_percent(n_a, n_b, sd_a, sd_b):
    rng = np.random.default_rng(0)
    trials, true_diff = 2000, 0.7
    covered = 0
    for _ in range(trials):
        ci = stats.welch(rng.normal(85.7, sd_a, n_a), rng.normal(85.0, sd_b, n_b)).ci
        covered += ci[0] <= true_diff <= ci[1]
    assert 0.93 <= covered / trials <= 0.975  # Welch is near-exact; slightly conservative at tiny n


def test_bootstrap_is_seeded_and_covers_the_true_difference():
    assert stats.bootstrap(A, B, seed=3) == stats.bootstrap(A, B, seed=3)
    assert stats.bootstrap(A, B, seed=3).ci != stats.bootstrap(A, B, seed=4).ci
    rng = np.random.default_rng(0)
    trials, covered = 300, 0
    for _ in range(trials):
        c = stats.bootstrap(rng.normal(1.0, 1.0, 15), rng.normal(0.0, 2.0, 15), resamples=1999, seed=0)
        covered += c.ci[0] <= 1.0 <= c.ci[1]
        assert c.significant == (c.ci[0] > 0 or c.ci[1] < 0)
    assert 0.92 <= covered / trials <= 0.99
    clear = stats.bootstrap([88.0, 88.1, 87.9, 88.2], [85.0, 85.2, 84.8, 85.1])
    assert clear.verdict == "better" and 0 < clear.p < 0.01 and clear.df is None


@pytest.mark.parametrize("n_a, n_b", [(3, 3), (5, 3), (5, 5)])
@pytest.mark.parametrize("decimals", [None, 1])  # accuracies as measured, or rounded so that seeds tie
def test_bootstrap_keeps_its_level_at_the_benchmarks_seed_counts(n_a, n_b, decimals):
    """Under no true difference it calls at most about 5 % significant (a percentile bootstrap called
    11-18 % at these sizes), and p < 0.05 exactly when the interval excludes 0."""
    rng = np.random.default_rng(2)
    trials, significant = 400, 0
    for trial in range(trials):
        a, b = rng.normal(85.0, 0.3, n_a), rng.normal(85.0, 0.3, n_b)
        if decimals is not None:
            a, b = a.round(decimals), b.round(decimals)
        c = stats.bootstrap(a, b, resamples=999, seed=trial)
        if c.p is None:  # both rounded samples constant
            continue
        significant += c.significant
        assert c.significant == (c.ci[0] > 0 or c.ci[1] < 0)
    assert significant / trials <= 0.07


def test_bootstrap_counts_ties_and_needs_three_seeds_a_side():
    # |t| is 1 here, and so are a third of the resampled |t|: rounding must not make them smaller
    tied = stats.bootstrap([84.9] * 3, [84.9, 84.9, 85.3])
    assert tied.p > 0.3 and not tied.significant and tied.ci[0] < 0 <= tied.ci[1]
    # the constant sample's variance comes out as 1e-28 in floats: its resamples with a constant
    # partner are still dropped, not counted as extreme
    assert stats.bootstrap([91.16] * 3, [91.0, 91.3, 91.2]).p > 0.5
    two = stats.bootstrap([1.0, 1.0, 1.0], [1.0, 2.0])  # resamples of 2 seeds: itself or constants
    assert two.p is None and two.verdict == "n/a" and "fewer than 3 seeds" in two.note


def test_holm_adjusts_step_down_and_keeps_missing_values():
    adjusted = stats.holm([0.01, 0.04, None, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, None, 0.06, 0.02])
    assert stats.holm([0.2, 0.9]) == pytest.approx([0.4, 0.9])
    assert stats.holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # capped at 1, and monotone
    assert stats.holm([]) == []
