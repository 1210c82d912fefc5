"""Empirical p-values and the paired bootstrap of :mod:`neuronspec.uncertainty`: exact
values, the level check, agreement with the delta method, and coverage on synthetic
windows whose true effect is known."""

from __future__ import annotations

import numpy as np
import pytest

from neuronspec.errors import NeuronSpecError
from neuronspec.uncertainty import (
    change_interval,
    check_level,
    control_mean_replicates,
    empirical_p_value,
    paired_log_ratios,
    rank_correlation,
    rank_correlation_se,
    rank_sum_p_value,
    sign_flip_p_value,
)


def test_empirical_p_value_counts_controls_at_least_as_extreme():
    control = [0.1, 0.2, 0.3, 0.4]
    assert empirical_p_value(0.5, control, alternative="greater") == 1 / 5
    assert empirical_p_value(0.3, control, alternative="greater") == 3 / 5  # ties count
    assert empirical_p_value(0.05, control, alternative="less") == 1 / 5
    assert empirical_p_value(0.05, control, alternative="greater") == 1.0


def test_a_level_the_seeds_cannot_reach_raises():
    check_level(0.05, 19)
    check_level(0.01, 99)
    with pytest.raises(NeuronSpecError, match="needs at least 99 random-control seeds"):
        check_level(0.01, 98)
    with pytest.raises(NeuronSpecError, match="alpha must lie in"):
        check_level(0.0, 99)


def _windows(rng, n_windows, targets, effect):
    """Σ NLL per window for a baseline and a condition whose mean NLL per target is higher
    by ``effect`` nats; windows differ in difficulty, shared by both (paired)."""
    difficulty = rng.gamma(4.0, 0.5, size=n_windows)  # mean NLL per target of each window
    noise = rng.normal(0.0, 0.02, size=(2, n_windows))
    per_target = np.stack([difficulty, difficulty + effect]) + noise
    return per_target * targets  # (2, N)


def test_bootstrap_se_agrees_with_the_delta_method():
    rng = np.random.default_rng(1)
    window_nll = _windows(rng, 64, 63, 0.01)
    replicates = paired_log_ratios(window_nll, 63)
    d = (window_nll[1] - window_nll[0]) / 63  # per-window mean NLL difference
    delta_se = d.std(ddof=1) / np.sqrt(d.size)  # the SE of a mean
    assert replicates[1].std(ddof=1) == pytest.approx(delta_se, rel=0.1)
    assert np.all(replicates[0] == 0.0)  # the baseline against itself


def test_intervals_cover_the_true_change_at_their_level():
    rng = np.random.default_rng(2)
    effect = 0.3  # a large effect: the interval is built on the log ratio, so it stays valid
    truth = np.expm1(effect)
    covered = 0
    runs = 200
    for _ in range(runs):
        window_nll = _windows(rng, 64, 63, effect)
        change = float(np.expm1((window_nll[1].sum() - window_nll[0].sum()) / (64 * 63)))
        se = float(paired_log_ratios(window_nll, 63)[1].std(ddof=1))
        covered += truth in change_interval(change, se, 0.95, "bootstrap")
    assert 0.90 <= covered / runs <= 0.99, covered


def test_control_mean_replicates_spread_like_the_seed_mean():
    rng = np.random.default_rng(3)
    seeds = rng.normal(0.0, 1.0, size=(40, 1)).repeat(2000, axis=1)  # no window noise
    replicates = control_mean_replicates(seeds)
    assert replicates.std(ddof=1) == pytest.approx(seeds[:, 0].std(ddof=0) / np.sqrt(40), rel=0.1)


@pytest.mark.parametrize("seed", range(4))
def test_rank_sum_p_value_equals_scipy(seed):
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(seed)
    values = rng.exponential(1.5, size=10).round(1)  # rounded: ties across both sides
    control = rng.exponential(1.0, size=99).round(1)
    expected = stats.mannwhitneyu(values, control, alternative="greater", method="asymptotic")
    assert rank_sum_p_value(list(values), list(control)) == pytest.approx(expected.pvalue, rel=1e-9)


def test_sign_flip_p_value_exact_and_monte_carlo():
    # 3 positive differences: only the all-positive pattern is as extreme, p = 1/8
    assert sign_flip_p_value([1.0, 2.0, 3.0], alternative="greater") == 1 / 8
    assert sign_flip_p_value([1.0, 2.0, 3.0], alternative="less") == 1.0
    rng = np.random.default_rng(4)
    null = list(rng.normal(0.0, 1.0, size=30))  # Monte Carlo branch, no effect
    assert 0.05 < sign_flip_p_value(null, alternative="greater") < 0.95
    shifted = [v + 1.0 for v in null]
    assert sign_flip_p_value(shifted, alternative="greater") < 0.001


def test_difference_of_estimates_combines_their_errors():
    from neuronspec.uncertainty import Estimate

    difference = Estimate(0.3, 0.03, "bootstrap").minus(Estimate(0.1, 0.04, "bootstrap"))
    assert difference.value == pytest.approx(0.2) and difference.se == pytest.approx(0.05)
    assert difference.interval(0.95).low == pytest.approx(0.2 - 1.959964 * 0.05)
    assert difference.above(0.0, alpha=0.01) and not difference.above(0.1, alpha=0.01)


def test_sequential_p_value_stops_at_the_hth_exceedance():
    from neuronspec.uncertainty import sequential_draws, sequential_p_value

    controls = [0.5, 2.0, 0.1, 3.0, 4.0, 0.2]  # exceedances of 1.0 at draws 2, 4, 5
    assert sequential_draws(1.0, controls, alternative="greater", n_max=9, stop_at=3) == 5
    assert sequential_p_value(1.0, controls, alternative="greater", n_max=9, stop_at=3) == 3 / 5
    assert sequential_draws(1.0, controls[:4], alternative="greater", n_max=9, stop_at=3) is None
    with pytest.raises(NeuronSpecError, match="do not decide"):
        sequential_p_value(1.0, controls[:4], alternative="greater", n_max=9, stop_at=3)
    # all n_max draws without the h-th exceedance: the empirical p-value over them
    assert sequential_p_value(1.0, controls, alternative="greater", n_max=6, stop_at=4) == 4 / 7
    assert sequential_p_value(0.3, controls, alternative="less", n_max=6, stop_at=2) == 2 / 6


def test_sequential_p_value_is_valid_under_the_null():
    """Observed and controls from one distribution: P(p ≤ α) ≤ α (up to 3 binomial SEs
    over 4,000 trials) at α = 0.01, 0.05, 0.2; the draws average far fewer than n_max."""
    from neuronspec.uncertainty import sequential_draws, sequential_p_value

    rng = np.random.default_rng(0)
    trials, p_values, used = 4000, [], []
    for _ in range(trials):
        values = rng.normal(size=100)
        observed, controls = float(values[0]), values[1:].tolist()
        p_values.append(sequential_p_value(observed, controls, alternative="greater", n_max=99))
        used.append(sequential_draws(observed, controls, alternative="greater", n_max=99))
    p_values = np.array(p_values)
    for alpha in (0.01, 0.05, 0.2):
        assert np.mean(p_values <= alpha) <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / trials)
    assert np.mean(used) < 40


def test_rank_correlation_se_matches_the_spread_over_samples():
    """Fieller-Hartley-Pearson SE of Spearman's ρ against 2,000 bivariate-normal samples of
    109 pairs (the causal sweep's 10 candidates + 99 controls) at ρ_Pearson = 0.67."""
    rng = np.random.default_rng(0)
    n, r = 109, 0.67
    cov = [[1.0, r], [r, 1.0]]
    rhos = np.array(
        [rank_correlation(*rng.multivariate_normal([0, 0], cov, n).T) for _ in range(2000)]
    )
    se = rank_correlation_se(float(rhos.mean()), n)
    assert abs(rhos.std(ddof=1) / se - 1.0) < 0.1
    with pytest.raises(NeuronSpecError, match="at least 4 pairs"):
        rank_correlation_se(0.5, 3)
