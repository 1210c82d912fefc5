"""Bootstrap intervals on corpus statistics from the pass's window groups
(:mod:`neuronspec.capture.window_groups`): exact identities (a resample equals the pass
over its windows; shards merge exactly), the t quantile against scipy, and
coverage on planted neurons whose true firing is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuronspec.analyses.dead import dead_neurons, firing_frequency_se
from neuronspec.analyses.positional import positional_layer_from_stats
from neuronspec.analyses.sparsity import sparsity_layer
from neuronspec.capture.config import StatsConfig
from neuronspec.capture.stats import NeuronStats
from neuronspec.capture.window_groups import GroupBootstrap, window_groups
from neuronspec.uncertainty import t_quantile

CONFIG = StatsConfig(unigrams=False)


def _stream(batches, width, window, config=CONFIG):
    """NeuronStats of ``(ids (B, T), pre (B, T, W))`` batches, one layer, mlp = relu(pre)."""
    stats = NeuronStats.empty(
        [width], window, 1000, config, backend="torch", window_mean_sites=("mlp",)
    )
    for ids, pre in batches:
        counted = stats.add_tokens(ids, bos_id=None)
        stats.add_layer(0, pre, pre.clamp_min(0), ids, counted)
    return stats


def _planted(probabilities, n_windows, seed, batch=16):
    """Batches of neurons firing with probability ``probabilities`` ((W,) or by position
    (T, W)), independent of the token and of each other; firing neurons get activation
    values of a random size, so the sparsity and window-mean statistics vary too."""
    generator = torch.Generator().manual_seed(seed)
    window = probabilities.shape[0] if probabilities.ndim == 2 else 16
    width = probabilities.shape[-1]
    batches = []
    for _ in range(n_windows // batch):
        ids = torch.randint(1, 1000, (batch, window), generator=generator)
        fires = torch.rand(batch, window, width, generator=generator) < probabilities
        size = torch.rand(batch, window, width, generator=generator, dtype=torch.float64)
        batches.append((ids, torch.where(fires, size.float() + 0.01, -1.0)))
    return batches, width, window


def test_t_quantile_agrees_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 5, 8, 19, 60, 500):
        for p in (0.0005, 0.01, 0.025, 0.3, 0.5, 0.9, 0.975, 0.995):
            exact = stats.t.ppf(p, df)
            tolerance = 1e-3 if df >= 8 else 6e-3
            assert t_quantile(p, df) == pytest.approx(exact, rel=tolerance, abs=1e-9), (df, p)
    assert t_quantile(0.975, None) == pytest.approx(1.959964, rel=1e-6)


def test_the_group_bootstrap_se_of_a_mean_is_the_classic_se():
    """For the mean of G equal groups, the corrected bootstrap SE estimates
    sd(group means) / √G (within the Monte Carlo error of 200 resamples, about 5%)."""
    groups = torch.full((20,), 5)
    bootstrap = GroupBootstrap.of(groups)
    group_means = torch.from_numpy(np.random.default_rng(0).normal(size=20))
    resampled = bootstrap.resample(group_means) / 20  # (R,)
    classic = float(group_means.std()) / np.sqrt(20)
    assert bootstrap.se(resampled.numpy()) == pytest.approx(classic, rel=0.12)
    assert bootstrap.df == 19 and GroupBootstrap.of(torch.tensor([0, 7, 0])) is None


def test_a_window_keeps_its_group_whatever_the_batch():
    ids = torch.randint(0, 50_000, (32, 64), generator=torch.Generator().manual_seed(1))
    whole = window_groups(ids, 20)
    assert torch.equal(torch.cat([window_groups(ids[:5], 20), window_groups(ids[5:], 20)]), whole)
    assert whole.min() >= 0 and whole.max() < 20 and len(set(whole.tolist())) > 10


def test_a_resample_equals_the_pass_over_its_windows():
    """A resample's statistics are those of the corpus with each window taken as often as
    its group's weight, streamed again: with weight 0 for one group and 1 for the others,
    the pass without that group's windows. Checked for firing by position, the sparsity
    sketch and per-token sums and the window-mean variance (what every SE reads)."""
    probabilities = (
        torch.linspace(0.02, 0.5, 24).repeat(8, 1) * torch.linspace(0.5, 1.5, 8)[:, None]
    )
    batches, width, window = _planted(probabilities, 96, seed=3)
    whole = _stream(batches, width, window)
    present = torch.nonzero(whole.group_windows, as_tuple=True)[0][:4]
    weights = torch.ones(len(present), 20, dtype=torch.float64)
    weights[torch.arange(len(present)), present] = 0.0
    leave_out = GroupBootstrap(weights, 20)
    fire, tokens = whole.fire_by_pos_resampled(0, leave_out, slice(None))
    variance = whole.window_mean_variance_resampled("mlp", 0, leave_out)
    layer = whole.layer(0)
    sketch = leave_out.resample(layer.abs_sketch_groups)
    sums = leave_out.resample(layer.token_sparsity_groups)
    for row, group in enumerate(present.tolist()):
        kept = [(ids[window_groups(ids, 20) != group], pre[window_groups(ids, 20) != group])
                for ids, pre in batches]  # fmt: skip
        without = _stream(kept, width, window)
        assert torch.equal(fire[row], without.layer(0).fire_by_pos.long())
        assert torch.equal(tokens[row], without.tokens_by_pos)
        assert torch.equal(sketch[row].long(), without.layer(0).abs_sketch)
        torch.testing.assert_close(
            sums[row], without.layer(0).token_sparsity, rtol=1e-12, atol=1e-9
        )
        torch.testing.assert_close(
            variance[row], without.window_mean_variance("mlp", 0), rtol=1e-9, atol=1e-12
        )


def test_window_groups_merge_exactly_across_shards():
    batches, width, window = _planted(torch.linspace(0.05, 0.5, 8), 64, seed=7)
    whole = _stream(batches, width, window)
    merged = _stream(batches[:1], width, window).merge(_stream(batches[1:], width, window))
    assert torch.equal(merged.group_windows, whole.group_windows)
    for name in ("fire_by_pos_groups", "abs_sketch_groups"):
        assert torch.equal(getattr(merged.layer(0), name), getattr(whole.layer(0), name))
    torch.testing.assert_close(
        merged.layer(0).token_sparsity_groups, whole.layer(0).token_sparsity_groups
    )
    assert firing_frequency_se(merged, 0) == pytest.approx(firing_frequency_se(whole, 0))


def test_no_window_groups_means_no_standard_errors_and_a_clear_error():
    batches, width, window = _planted(torch.linspace(0.05, 0.5, 8), 32, seed=0)
    stats = _stream(batches, width, window, StatsConfig(unigrams=False, window_groups=0))
    finding = dead_neurons(stats, 0)
    assert finding.dead_fraction_se is None and finding.se_df is None
    with pytest.raises(Exception, match="fewer than 2 non-empty window groups"):
        finding.estimate("dead_fraction")


def _covered(value, se, df, truth, level=0.95):
    half = t_quantile(0.5 + level / 2, df) * np.asarray(se)
    value, truth = np.asarray(value), np.asarray(truth)
    return (value - half <= truth) & (truth <= value + half)


def test_firing_frequency_intervals_cover_the_planted_probability():
    """Over 100 independent corpora, the 95% intervals of 64 neurons' firing frequencies
    (probabilities 0.01..0.6) contain the true probability in 93-97% of cases."""
    probabilities = torch.linspace(0.01, 0.6, 64)
    covered = []
    for seed in range(100):
        stats = _stream(*_planted(probabilities, 64, seed))
        frequency = stats.layer(0).fire_count.double() / stats.n_tokens
        df = stats.group_bootstrap().df
        covered.append(_covered(frequency, firing_frequency_se(stats, 0), df, probabilities))
    assert 0.93 <= np.mean(covered) <= 0.97, np.mean(covered)


@pytest.mark.slow
def test_dead_count_intervals_cover_the_expected_count():
    """Over 100 independent corpora of 640 windows, the 95% intervals of the dead count hold
    the expected dead count Σ_n (1 − p_n)^tokens in 93-97% of cases. The planted layer has
    16 truly dead neurons, 32 that fire 0.2..4 times per corpus on average (dead in some
    corpora, not in others: the count varies) and 16 that fire often."""
    tokens = 640 * 16
    probabilities = torch.cat([torch.zeros(16), torch.linspace(0.2, 4, 32) / tokens,
                               torch.linspace(0.1, 0.5, 16)])  # fmt: skip
    truth = float(((1 - probabilities.double()) ** tokens).sum())
    covered = []
    for seed in range(100):
        finding = dead_neurons(_stream(*_planted(probabilities, 640, seed)), 0)
        se = finding.dead_fraction_se * finding.n_neurons
        covered.append(_covered(finding.n_dead, se, finding.se_df, truth))
    assert 0.93 <= np.mean(covered) <= 0.97, np.mean(covered)


@pytest.mark.slow
def test_positional_count_intervals_cover_the_expected_count():
    """Over 100 independent corpora of 640 windows of 16 tokens, the 95% intervals of the
    number of positional neurons (I > 0.05 nats) hold its expected value in 93-97% of
    cases. Neurons fire with probability 0.3·(1 + a_n·cos(2πt/16)) at position t, a_n from
    0 to 0.9, so their I spans the threshold. The expected count is the mean over 4,000
    corpora drawn directly as binomial counts by position (not through the pass)."""
    from neuronspec.analyses.positional import positional_mutual_information

    window, n_windows = 16, 640
    position = torch.arange(window)[:, None]
    probabilities = 0.3 * (
        1 + torch.linspace(0, 0.9, 64) * torch.cos(2 * np.pi * position / window)
    )
    rng = np.random.default_rng(12345)
    tokens = np.full(window, n_windows)
    truth = np.mean([
        (positional_mutual_information(rng.binomial(n_windows, probabilities.numpy()), tokens) > 0.05).sum()
        for _ in range(4000)
    ])  # fmt: skip
    covered = []
    for seed in range(100):
        finding = positional_layer_from_stats(
            _stream(*_planted(probabilities, n_windows, seed)), 0, model="planted"
        )
        covered.append(
            _covered(finding.n_positional, finding.n_positional_se, finding.se_df, truth)
        )
    assert 0.93 <= np.mean(covered) <= 0.97, np.mean(covered)


def test_sparsity_and_delta_variance_carry_standard_errors():
    """Every sparsity measure and the window-mean variance get an SE that shrinks as the
    corpus grows (about 1/√n: 4× the windows, half the SE, within the resampling noise)."""
    probabilities = torch.linspace(0.05, 0.6, 32)
    findings = []
    for n_windows in (128, 512):
        stats = _stream(*_planted(probabilities, n_windows, seed=1))
        variance = stats.window_mean_variance_resampled("mlp", 0, stats.group_bootstrap())
        findings.append(
            (sparsity_layer(stats, 0, tau=0.5), stats.group_bootstrap().se(variance.numpy()))
        )
    (small, small_var), (large, large_var) = findings
    for name in ("threshold_sparsity", "entropy", "gini", "hoyer"):
        ratio = getattr(large, f"{name}_se") / getattr(small, f"{name}_se")
        assert 0.3 < ratio < 0.75, (name, ratio)
        assert large.estimate(name).interval(0.95).low < getattr(large, name)
    assert 0.3 < np.median(large_var / small_var) < 0.75


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_group_counts_stay_exact_past_255_windows_of_a_group(backend):
    """The pass counts each group in uint8 and folds it into int32 before it could pass 255
    windows (GroupFires): over 1,100 windows in 2 groups, in batches of 50 and one batch of
    600 (over 255 windows of one group at once), the counts equal the firings of each
    group's windows counted directly, and their sum is fire_by_pos."""
    config = StatsConfig(unigrams=False, window_groups=2)
    batches, width, window = _planted(torch.full((4, 8), 0.9), 1100, seed=3, batch=50)
    big_ids = torch.cat([ids for ids, _ in batches[:12]])
    big_pre = torch.cat([pre for _, pre in batches[:12]])
    batches = [(big_ids, big_pre)] + batches[12:]
    stats = NeuronStats.empty([width], window, 1000, config, backend=backend)
    expected = torch.zeros(2, window, width, dtype=torch.long)
    for ids, pre in batches:
        counted = stats.add_tokens(ids, bos_id=None)
        stats.add_layer(0, pre, pre.clamp_min(0), ids, counted)
        expected.index_add_(0, window_groups(ids, 2), (pre > 0).long())
    assert int(stats.group_windows.min()) > 255 * 2  # both groups folded more than once
    counts = stats.layer(0).fire_by_pos_groups
    assert counts.dtype == torch.int32 and torch.equal(counts.long(), expected)
    assert torch.equal(counts.sum(0), stats.layer(0).fire_by_pos)
    stored = NeuronStats.from_tensors(stats.to_tensors(), stats.meta())
    assert torch.equal(stored.layer(0).fire_by_pos_groups.long(), expected)


def test_group_counts_are_stored_in_uint8_while_every_group_fits():
    """The stored dtype is uint8 while every group holds at most 255 windows, else int32,
    the same for one pass and for merged shards (merges sum in int32)."""
    batches, width, window = _planted(torch.linspace(0.05, 0.5, 8), 64, seed=7)
    whole = _stream(batches, width, window)
    counts = whole.layer(0).fire_by_pos_groups
    assert counts.dtype == torch.uint8
    stored = NeuronStats.from_tensors(whole.to_tensors(), whole.meta())
    twice = stored.merge(stored)
    assert twice.layer(0).fire_by_pos_groups.dtype == torch.uint8
    assert torch.equal(twice.layer(0).fire_by_pos_groups.int(), 2 * counts.int())
    many = twice
    for _ in range(5):  # 64 windows in 20 groups (at most 7 in one): 64 times that passes 255
        many = many.merge(many)
    assert int(many.group_windows.max()) > 255
    assert many.layer(0).fire_by_pos_groups.dtype == torch.int32
    assert torch.equal(many.layer(0).fire_by_pos_groups, 64 * counts.int())
