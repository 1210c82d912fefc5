"""Standard errors of the token-detector counts (``--detector-intervals``,
neuronspec/analyses/ngram.py): a resample equals the pass over its windows, shards and the
cache keep the per-group tables exactly, and on planted detectors whose status is
borderline the SE matches the count's spread over independent corpora."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuronspec.analyses.ngram import ngram_layer_from_stats, token_detector_counts_resampled
from neuronspec.capture.config import StatsConfig
from neuronspec.capture.stats import NeuronStats
from neuronspec.capture.window_groups import window_groups
from neuronspec.errors import NeuronSpecError
from neuronspec.uncertainty import t_quantile

CONFIG = StatsConfig(detector_intervals=True)
TOKENS, WINDOW, WIDTH, GROUPS = 12, 16, 24, 20


def _planted(n_windows: int, seed: int, batch: int = 16):
    """Batches ``(ids (B, T), pre (B, T, W))``: neuron n's own token is 1 + n mod 12 of 12
    equally likely tokens. Neurons 0-11 fire on their token with probability 0.93..0.97 and
    never elsewhere (covered or not: borderline); neurons 12-23 always fire on it and
    elsewhere with probability 0.002..0.008 (their token's share of their firings is
    borderline around 95%)."""
    generator = torch.Generator().manual_seed(seed)
    on_token = torch.cat([torch.linspace(0.93, 0.97, 12), torch.ones(12)])
    elsewhere = torch.cat([torch.zeros(12), torch.linspace(0.002, 0.008, 12)])
    own = 1 + torch.arange(WIDTH) % TOKENS
    batches = []
    for _ in range(n_windows // batch):
        ids = torch.randint(1, 1 + TOKENS, (batch, WINDOW), generator=generator)
        probability = torch.where(ids[..., None] == own, on_token, elsewhere)  # (B, T, W)
        fires = torch.rand(batch, WINDOW, WIDTH, generator=generator) < probability
        size = torch.rand(batch, WINDOW, WIDTH, generator=generator)
        batches.append((ids, torch.where(fires, size + 0.01, -1.0)))
    return batches


def _stream(batches, backend="torch", config=CONFIG) -> NeuronStats:
    stats = NeuronStats.empty([WIDTH], WINDOW, 1000, config, backend=backend)
    for ids, pre in (batch for batch in batches if len(batch[0])):
        counted = stats.add_tokens(ids, bos_id=None)
        stats.add_layer(0, pre, pre.clamp_min(0), ids, counted)
    return stats


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_a_resample_of_the_detector_count_equals_the_pass_over_its_windows(backend):
    """Weight 0 for one group and 1 for the others: the detector count of the pass over the
    other groups' windows, for four left-out groups; weight 2 for a group: its windows twice."""
    batches = _planted(160, seed=4)
    whole = _stream(batches, backend)
    present = torch.nonzero(whole.group_windows, as_tuple=True)[0][:4].tolist()
    weights = torch.ones(len(present) + 1, GROUPS, dtype=torch.float64)
    for row, group in enumerate(present):
        weights[row, group] = 0.0
    weights[-1, present[0]] = 2.0
    resampled = token_detector_counts_resampled(whole, 0, weights)
    expected = []
    for group in present:
        kept = [(ids[window_groups(ids, GROUPS) != group], pre[window_groups(ids, GROUPS) != group])
                for ids, pre in batches]  # fmt: skip
        expected.append(ngram_layer_from_stats(_stream(kept), 0, model="p").n_token_detectors)
    twice = [(ids[window_groups(ids, GROUPS) == present[0]], pre[window_groups(ids, GROUPS) == present[0]])
             for ids, pre in batches]  # fmt: skip
    expected.append(
        ngram_layer_from_stats(_stream(batches + twice), 0, model="p").n_token_detectors
    )
    assert resampled.tolist() == expected
    assert len(set(expected)) > 1  # the planted detectors are borderline: leave-outs differ


def test_the_group_tables_merge_and_reload_exactly():
    batches = _planted(96, seed=5)
    whole = _stream(batches)
    merged = _stream(batches[:3]).merge(_stream(batches[3:]))
    reloaded = NeuronStats.from_tensors(whole.to_tensors(), whole.meta())
    for stats in (merged, reloaded):
        mine_tables, their_tables = stats.unigram_group_table(0), whole.unigram_group_table(0)
        for mine, theirs in zip(mine_tables, their_tables, strict=True):
            assert np.array_equal(mine, theirs)
        assert torch.equal(stats.token_count_groups, whole.token_count_groups)
    neuron, token, group, count = whole.unigram_group_table(0)
    table = whole.unigram_table(0)
    summed = {}
    for n, t, c in zip(neuron.tolist(), token.tolist(), count.tolist(), strict=True):
        summed[(n, t)] = summed.get((n, t), 0) + c
    pairs = zip(table[0].tolist(), table[1].tolist(), strict=True)
    assert summed == dict(zip(pairs, table[2].tolist(), strict=True))
    assert torch.equal(whole.token_count_groups.sum(0), whole.token_count)


def test_detector_count_se_matches_its_spread_over_corpora():
    """40 independent corpora of 128 windows: the mean bootstrap SE of the detector count
    is within a factor 1.5 of the count's standard deviation over the corpora, and the 95%
    intervals hold the mean count in at least 85% of them (measured over 100 corpora:
    SD 1.67, mean SE 1.76, coverage 97%)."""
    counts, ses = [], []
    for seed in range(40):
        finding = ngram_layer_from_stats(_stream(_planted(128, seed)), 0, model="planted")
        counts.append(finding.n_token_detectors)
        ses.append(finding.n_token_detectors_se)
    counts, ses = np.array(counts), np.array(ses)
    spread = counts.std(ddof=1)
    assert spread > 0.5  # the planted detectors are borderline
    assert 1 / 1.5 <= ses.mean() / spread <= 1.5
    k = t_quantile(0.975, finding.se_df)
    assert np.mean(np.abs(counts - counts.mean()) <= k * ses) >= 0.85
    interval = finding.estimate().interval(0.95)
    assert interval.low < finding.n_token_detectors < interval.high


def test_detector_intervals_are_opt_in_and_say_so():
    stats = _stream(_planted(32, seed=0), config=StatsConfig())
    finding = ngram_layer_from_stats(stats, 0, model="p")
    assert finding.n_token_detectors_se is None
    with pytest.raises(NeuronSpecError, match="--detector-intervals"):
        finding.estimate()
    with pytest.raises(NeuronSpecError, match="--detector-intervals"):
        stats.unigram_group_table(0)
    with pytest.raises(NeuronSpecError, match="window groups"):
        StatsConfig(detector_intervals=True, window_groups=0)


@pytest.mark.parametrize("embedded", ["tiny-gpt2", "tiny-mamba"])
def test_the_embedded_models_detector_counts_get_an_se_and_nothing_else_moves(embedded, tmp_path):
    """The pass with --detector-intervals gives every layer an SE of its detector count, the
    same findings otherwise (unigram tables, detectors), the snapshot view gains the SE, and
    Fig. 3a draws it."""
    from neuronspec.analyses.ngram import NgramFindings
    from neuronspec.capture.runner import collect_stats
    from neuronspec.data.corpus import CorpusConfig
    from neuronspec.data.windows import build_windows
    from neuronspec.models.registry import load_model
    from neuronspec.plots.voita import plot_token_detectors

    loaded = load_model(embedded)
    windows = build_windows(loaded.tokenizer, CorpusConfig(max_tokens=8192))
    plain, with_se = (
        collect_stats(loaded, windows.analysis, bos_id=windows.bos_id, config=config)
        for config in (StatsConfig(), CONFIG)
    )
    found = {}
    for name, stats in (("plain", plain), ("with_se", with_se)):
        found[name] = NgramFindings(
            [
                ngram_layer_from_stats(stats, layer, model=embedded)
                for layer in range(stats.n_layers)
            ]
        )
    for a, b in zip(found["plain"], found["with_se"], strict=True):
        assert a.detector_tokens == b.detector_tokens
        assert a.covering_histogram == b.covering_histogram
        assert a.n_token_detectors_se is None and b.n_token_detectors_se is not None
        assert b.se_df == 19
    view_plain, view_se = found["plain"].snapshot_view(), found["with_se"].snapshot_view()
    assert "n_token_detectors_se" not in view_plain["layers"][0]
    assert "n_detectors_se" not in view_plain["summary"]
    assert view_se["summary"]["n_detectors_se"] == [
        f.n_token_detectors_se for f in found["with_se"]
    ]
    assert plot_token_detectors(found["with_se"].summary, tmp_path / "fig3a.png").exists()
