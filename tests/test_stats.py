"""Streaming statistics: exact against a dense recomputation, mergeable, planted dead neurons."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from builders import VOCAB, make_gpt2, make_mamba, wrap

from neuronspec.analyses.dead import dead_neurons
from neuronspec.capture.config import StatsConfig
from neuronspec.capture.moments import PEARSON_CONSTANT_VARIANCE
from neuronspec.capture.runner import collect_stats
from neuronspec.capture.stats import NeuronStats
from neuronspec.errors import LayerOutOfRangeError, TooFewTokensError

BOS = 0
CONFIG = StatsConfig(trigrams=True)


def _windows(n=12, length=16, seed=3):
    ids = torch.randint(1, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))
    ids[::3, 5] = BOS  # some document starts inside windows
    return ids


def _stats(loaded, windows, batch_size=4, config=CONFIG, backend="auto", window_offset=0):
    return collect_stats(
        loaded,
        windows,
        bos_id=BOS,
        config=config,
        batch_size=batch_size,
        backend=backend,
        window_offset=window_offset,
    )


def _dense(loaded, windows, layer):
    sites = loaded.adapter.capture(windows, [("mlp_pre", layer), ("mlp", layer)])
    return sites[("mlp_pre", layer)], sites[("mlp", layer)]


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_stats_equal_dense_recomputation(random_model, backend):
    windows = _windows()
    stats = _stats(random_model, windows, backend=backend)
    counted = torch.ones_like(windows, dtype=torch.bool)
    counted[:, 0] = False
    counted &= windows != BOS
    assert stats.n_tokens == windows.numel()
    np.testing.assert_array_equal(
        stats.token_count.numpy(), np.bincount(windows[counted].numpy(), minlength=VOCAB)
    )
    for layer in range(random_model.n_layers):
        pre, act = _dense(random_model, windows, layer)
        fires = pre > 0  # (n, T, W)
        layer_stats = stats.layers[layer]
        assert torch.equal(layer_stats.fire_by_pos, fires.sum(0))
        # per-window sums are float32 (the activations' own precision), totals float64
        dense_sum, dense_sumsq = act.double().sum((0, 1)), act.double().square().sum((0, 1))
        torch.testing.assert_close(layer_stats.act_sum, dense_sum, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer_stats.act_sumsq, dense_sumsq, rtol=1e-5, atol=1e-6)
        edges = np.concatenate([[0], stats.config.sketch_edges(), [np.inf]])
        expected_sketch = np.histogram(act.abs().numpy(), edges)[0]
        # edge rounding: the native bin index is float32 (about 1e-4 of a bin)
        assert (
            np.abs(layer_stats.abs_sketch.numpy() - expected_sketch).sum()
            <= 2 + act.numel() // 1000
        )
        assert int(layer_stats.abs_sketch.sum()) == act.numel()
        # sparse unigram table equals a dense (neuron, token) count on counted positions
        neuron, token, count = stats.unigram_table(layer)
        dense = np.zeros((act.shape[-1], VOCAB), dtype=np.int64)
        b, t, n = torch.nonzero(fires & counted[:, :, None], as_tuple=True)
        np.add.at(dense, (n.numpy(), windows[b, t].numpy()), 1)
        rebuilt = np.zeros_like(dense)
        rebuilt[neuron, token] = count
        np.testing.assert_array_equal(rebuilt, dense)
        # the layer's sorted table is not kept after the read; a second read rebuilds it
        assert layer_stats.pairs._table is None
        for again, first in zip(stats.unigram_table(layer), (neuron, token, count), strict=True):
            np.testing.assert_array_equal(again, first)
        # Pearson column: per-window |r| against numpy's corrcoef
        a = act.double().numpy()
        expected = np.zeros(act.shape[-1])
        for w in range(a.shape[0]):
            for j in range(a.shape[2]):
                if a[w, :, j].var() > PEARSON_CONSTANT_VARIANCE * np.mean(a[w, :, j] ** 2):
                    expected[j] += abs(np.corrcoef(a[w, :, j], np.arange(a.shape[1]))[0, 1])
        np.testing.assert_allclose(layer_stats.pearson_abs_sum.numpy(), expected, rtol=1e-4)


def test_trigram_counts_exclude_only_bos(random_model):
    """METHODS §3: every trigram x[k-2..k] with no BOS among its tokens counts, the one
    ending at window position 2 (its first token the window start) included."""
    windows = _windows(n=4)
    windows[1, 0] = BOS  # a window that starts with a document start
    stats = _stats(random_model, windows)
    occurrences = dict(zip(*(a.tolist() for a in stats.trigram_occurrences()), strict=True))
    expected: dict[int, int] = {}
    for row in windows.tolist():
        for k in range(2, len(row)):
            if BOS not in row[k - 2 : k + 1]:
                key = (row[k - 2] * VOCAB + row[k - 1]) * VOCAB + row[k]
                expected[key] = expected.get(key, 0) + 1
    assert occurrences == expected
    first = [(row[0] * VOCAB + row[1]) * VOCAB + row[2] for row in windows.tolist()]
    assert first[0] in occurrences and first[1] not in expected  # row 1 starts with BOS
    # firings: a dense recomputation over the same trigrams
    for layer in range(random_model.n_layers):
        pre, _ = _dense(random_model, windows, layer)
        fires = pre > 0  # (n, T, W)
        dense: dict[tuple[int, int], int] = {}
        for w, row in enumerate(windows.tolist()):
            for k in range(2, len(row)):
                if BOS in row[k - 2 : k + 1]:
                    continue
                key = (row[k - 2] * VOCAB + row[k - 1]) * VOCAB + row[k]
                for n in torch.nonzero(fires[w, k]).flatten().tolist():
                    dense[n, key] = dense.get((n, key), 0) + 1
        neuron, key, count = stats.trigram_table(layer)
        table = dict(
            zip(zip(neuron.tolist(), key.tolist(), strict=True), count.tolist(), strict=True)
        )
        assert table == dense


def test_merge_of_halves_equals_whole(random_model):
    windows = _windows()
    whole = _stats(random_model, windows)
    # split on a batch boundary: the same forward passes, so the merge must be exact
    merged = _stats(random_model, windows[:4]).merge(
        _stats(random_model, windows[4:], window_offset=4)
    )
    a, b = whole.to_tensors(table_only=True), merged.to_tensors(table_only=True)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name, rtol=1e-12, atol=1e-12)
    assert merged.n_windows == whole.n_windows


def test_batch_size_does_not_change_results(random_model):
    windows = _windows()
    a = _stats(random_model, windows, batch_size=1).to_tensors(table_only=True)
    b = _stats(random_model, windows, batch_size=12).to_tensors(table_only=True)
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_choice_of_dense_tokens_does_not_change_results(random_model, backend):
    """All tokens dense, none dense, or a mix picked by other frequencies: same tables."""
    windows = _windows()
    every = torch.ones(VOCAB)
    reversed_ranks = torch.arange(VOCAB, 0, -1).double()  # favours small ids, not the corpus's
    results = [
        _stats(random_model, windows, backend=backend).to_tensors(table_only=True),
        collect_stats(random_model, windows, bos_id=BOS, config=CONFIG, backend=backend,
                      token_frequency=every).to_tensors(table_only=True),
        collect_stats(random_model, windows, bos_id=BOS, config=CONFIG, backend=backend,
                      token_frequency=reversed_ranks).to_tensors(table_only=True),
    ]  # fmt: skip
    with_tail = NeuronStats.empty([8], windows.shape[1], VOCAB, CONFIG, torch.zeros(VOCAB))
    assert len(with_tail.layers[0].pairs.row_tokens) == 0  # zero frequency: nothing dense
    for other in results[1:]:
        for name, tensor in results[0].items():
            if tensor.is_floating_point():  # torch matmul sums may round differently per run
                torch.testing.assert_close(tensor, other[name], rtol=1e-12, atol=1e-12)
            else:
                assert torch.equal(tensor, other[name]), name


def test_serialisation_round_trip(random_model):
    odd_tokens_dense = (torch.arange(VOCAB) % 2).double()
    stats = collect_stats(
        random_model, _windows(), bos_id=BOS, config=CONFIG, token_frequency=odd_tokens_dense
    )
    stored = stats.to_tensors()
    assert stored["layer0.pair_dense"].numel() and stored["layer0.pair_key"].numel()  # both parts
    again = NeuronStats.from_tensors(stored, stats.meta())
    for name, tensor in stored.items():
        assert torch.equal(tensor, again.to_tensors()[name]), name
    for name, tensor in stats.to_tensors(table_only=True).items():
        assert torch.equal(tensor, again.to_tensors(table_only=True)[name]), name


def _kill_gpt2_neurons(model, layer, neurons):
    with torch.no_grad():
        fc = model.transformer.h[layer].mlp.c_fc  # Conv1D: weight (d, 4d)
        fc.weight[:, neurons] = 0.0
        fc.bias[neurons] = -1.0


def _kill_mamba_neurons(model, layer, neurons):
    with torch.no_grad():
        in_proj = model.backbone.layers[layer].mixer.in_proj  # weight (2·d_inner, d)
        d_inner = in_proj.weight.shape[0] // 2
        in_proj.weight[[d_inner + n for n in neurons]] = 0.0  # gate z ≡ 0: SiLU(z) = 0


@pytest.mark.parametrize("family_name", ["gpt2", "mamba"])
def test_planted_dead_neurons_are_exactly_found(family_name):
    planted = {0: [1, 7, 30], 1: [2]}
    if family_name == "gpt2":
        model = make_gpt2(seed=5)
        kill = _kill_gpt2_neurons
    else:
        model = make_mamba(seed=5)
        kill = _kill_mamba_neurons
    for layer, neurons in planted.items():
        kill(model, layer, neurons)
    loaded = wrap(model, f"planted-{family_name}")
    stats = _stats(loaded, _windows(n=64, length=32), batch_size=16, config=StatsConfig())
    for layer in range(loaded.n_layers):
        finding = dead_neurons(stats, layer)
        assert finding.dead_neurons == tuple(planted.get(layer, [])), layer
        assert finding.n_dead == len(planted.get(layer, []))
        assert finding.dead_fraction == pytest.approx(finding.n_dead / finding.n_neurons)
        assert finding.n_tokens == 64 * 32
        assert 0 < finding.mean_alive_frequency < 1
    with pytest.raises(TooFewTokensError, match="2048 tokens but 10000 were required"):
        dead_neurons(stats, 0, min_tokens=10_000)


def test_memory_is_independent_of_corpus_length():
    """The accumulators have the same dense size after 8 or 64 windows (sparse tables aside)."""
    loaded = wrap(make_mamba(), "random-mamba")
    small = _stats(loaded, _windows(n=8), config=StatsConfig(unigrams=False)).to_tensors()
    large = _stats(loaded, _windows(n=64), config=StatsConfig(unigrams=False)).to_tensors()
    assert {k: v.shape for k, v in small.items()} == {k: v.shape for k, v in large.items()}


def test_layer_out_of_range_is_a_clear_error(random_model):
    stats = _stats(random_model, _windows(n=4))
    with pytest.raises(LayerOutOfRangeError, match=r"statistics have 2 layers \(0\.\.1\)"):
        dead_neurons(stats, 2)
    with pytest.raises(LayerOutOfRangeError):
        stats.unigram_table(-1)


class _FireCounts:
    """Just the firing counts ``dead_neurons`` reads, with frequencies chosen by hand."""

    def __init__(self, counts: list[int], n_tokens: int):
        self.n_tokens, self.n_layers, self.n_windows = n_tokens, 1, n_tokens // 10
        self._layer = type("Layer", (), {"fire_count": torch.tensor(counts)})()

    def group_bootstrap(self):
        return None  # no window groups: no standard errors

    def require_tokens(self, min_tokens):
        assert min_tokens is None

    def layer(self, layer):
        return self._layer


def test_dead_and_rare_sets_are_disjoint():
    """Rare is freq_cutoff < freq < rare_cutoff: with a positive cutoff no dead neuron is
    also counted as rare (frequencies 0, 0.005, 0.01, 0.02, 0.04, 0.06, 0.5)."""
    stats = _FireCounts([0, 5, 10, 20, 40, 60, 500], n_tokens=1000)
    finding = dead_neurons(stats, 0, freq_cutoff=0.01, rare_cutoff=0.05)
    assert finding.dead_neurons == (0, 1, 2)
    assert finding.rare_fraction == pytest.approx(2 / 7)  # 0.02 and 0.04 only
    default = dead_neurons(stats, 0)
    assert default.dead_neurons == (0,)
    assert default.rare_fraction == pytest.approx(4 / 7)
