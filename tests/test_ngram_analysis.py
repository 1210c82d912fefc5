"""N-gram / token-detecting neurons (METHODS.md §3) on count tables checkable by hand."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest
import torch

from neuronspec.analyses.covering import (
    NEVER_FIRES,
    covering_bin_labels,
    covering_count,
    covering_histogram,
)
from neuronspec.analyses.ngram import (
    CountTableError,
    _neuron_blocks,
    analyse_ngram_layer,
    decode_trigram_key,
    ngram_detectors,
    ngram_layer_from_stats,
    summarise_token_detectors,
    token_detectors,
    trigram_key,
)
from neuronspec.capture.config import StatsConfig
from neuronspec.capture.stats import NeuronStats
from neuronspec.native import kernels_available


def _triples(rows: list[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = sorted(rows)
    return tuple(np.array([r[i] for r in rows], dtype=np.int64) for i in range(3))


# --------------------------------------------------------------------------- covering count


def test_covering_count_by_hand() -> None:
    neuron, token, count = _triples(
        [
            # neuron 0: 100 firings, 60 + 35 = 95 → exactly 95% with 2 tokens
            (0, 7, 60),
            (0, 3, 35),
            (0, 9, 5),
            # neuron 1 never fires
            # neuron 2: one token
            (2, 4, 12),
            # neuron 3: four tokens of 25 → 3 give 75%, all 4 needed
            (3, 0, 25),
            (3, 1, 25),
            (3, 2, 25),
            (3, 5, 25),
        ]
    )
    result = covering_count(neuron, token, count, n_neurons=5)
    assert result.tolist() == [2, NEVER_FIRES, 1, 4, NEVER_FIRES]
    assert covering_count(neuron, token, count, n_neurons=5, coverage=0.6).tolist() == [
        1,
        0,
        1,
        3,
        0,
    ]


def test_covering_count_ties_and_order_do_not_matter() -> None:
    # 94 + 3 + 3: the top token gives 94%, either tied token completes 97%.
    rows = [(0, 1, 94), (0, 8, 3), (0, 2, 3), (1, 5, 1), (1, 6, 1)]
    neuron, token, count = _triples(rows)
    assert covering_count(neuron, token, count, n_neurons=2).tolist() == [2, 2]
    shuffled = np.array([3, 0, 4, 2, 1])
    assert covering_count(
        neuron[shuffled], token[shuffled], count[shuffled], n_neurons=2
    ).tolist() == [2, 2]


def test_covering_count_ignores_zero_counts() -> None:
    neuron, token, count = _triples([(0, 1, 0), (1, 1, 3), (1, 2, 0)])
    assert covering_count(neuron, token, count, n_neurons=2).tolist() == [0, 1]


@pytest.mark.parametrize(
    ("neuron", "token", "count", "match"),
    [
        ([0, 1], [0], [1, 1], "same length"),
        ([0, 5], [0, 0], [1, 1], r"\[0, 3\)"),
        ([0, 1], [0, 0], [1, -1], "≥ 0"),
        ([0, 0], [1, 1], [1, 1], "duplicate"),
        ([0.0, 1.0], [0, 0], [1, 1], "integers"),
    ],
)
def test_bad_tables_raise(neuron, token, count, match) -> None:
    with pytest.raises(CountTableError, match=match):
        covering_count(np.array(neuron), np.array(token), np.array(count), n_neurons=3)


def test_histogram_bins() -> None:
    assert covering_bin_labels() == [
        "1",
        "2-5",
        "6-10",
        "11-20",
        "21-50",
        "51-100",
        "101-500",
        "501+",
    ]
    counts = np.array([0, 1, 1, 2, 5, 6, 10, 11, 50, 51, 100, 101, 500, 501, 9000, 0])
    assert covering_histogram(counts) == {
        "1": 2,
        "2-5": 2,
        "6-10": 2,
        "11-20": 1,
        "21-50": 1,
        "51-100": 2,
        "101-500": 2,
        "501+": 2,
    }
    assert covering_histogram(counts, bin_edges=(1, 3)) == {"1-2": 3, "3+": 11}
    with pytest.raises(CountTableError, match="starting at 1"):
        covering_histogram(counts, bin_edges=(2, 5))


# --------------------------------------------------------------------------- detectors


def test_three_95_percent_rules() -> None:
    token_count = np.zeros(10, dtype=np.int64)
    token_count[[1, 2, 3, 4]] = [192, 50, 47, 1000]
    neuron, token, count = _triples(
        [
            # neuron 0: token 1 is 96 of its 100 firings, but fires on only 96/192 = 50%
            (0, 1, 96),
            (0, 4, 4),
            # neuron 1: fires on 100% of tokens 2 and 3 (50 + 47 = 97 of 100 firings)
            (1, 2, 50),
            (1, 3, 47),
            (1, 4, 3),
            # neuron 2: covers token 3 fully, but that is only 47 of its 100 firings
            (2, 3, 47),
            (2, 4, 53),
        ]
    )
    detectors = token_detectors(neuron, token, count, token_count, n_neurons=3)
    assert detectors == {1: [2, 3]}


def test_exactly_95_percent_qualifies() -> None:
    token_count = np.array([20, 1000], dtype=np.int64)
    # fires on 19 of 20 occurrences of token 0 (95%), and that is 19 of 20 firings (95%)
    neuron, token, count = _triples([(0, 0, 19), (0, 1, 1)])
    assert token_detectors(neuron, token, count, token_count, n_neurons=1) == {0: [0]}
    # 18 of 20 is 90%: not covered
    neuron, token, count = _triples([(0, 0, 18), (0, 1, 1)])
    assert token_detectors(neuron, token, count, token_count, n_neurons=1) == {}


def test_at_most_five_tokens() -> None:
    token_count = np.full(8, 10, dtype=np.int64)
    five = [(0, t, 10) for t in range(5)]
    six = [(1, t, 10) for t in range(6)]
    neuron, token, count = _triples(five + six)
    detectors = token_detectors(neuron, token, count, token_count, n_neurons=2)
    assert detectors == {0: [0, 1, 2, 3, 4]}
    assert covering_count(neuron, token, count, n_neurons=2).tolist() == [5, 6]
    relaxed = token_detectors(neuron, token, count, token_count, n_neurons=2, max_tokens=6)
    assert relaxed == {0: [0, 1, 2, 3, 4], 1: [0, 1, 2, 3, 4, 5]}


def test_detector_tokens_by_descending_count_ties_by_token() -> None:
    token_count = np.array([0, 0, 0, 30, 0, 0, 0, 30, 50], dtype=np.int64)
    neuron, token, count = _triples([(0, 7, 30), (0, 3, 30), (0, 8, 50)])
    assert token_detectors(neuron, token, count, token_count, n_neurons=1) == {0: [8, 3, 7]}


def test_unneeded_rare_covered_token_is_not_listed() -> None:
    # token 5 (96 of 100 firings) is the detected token; token 6 occurs twice and is also
    # covered, but is not needed to reach 95%.
    token_count = np.array([0, 0, 0, 0, 500, 96, 2], dtype=np.int64)
    neuron, token, count = _triples([(0, 4, 2), (0, 5, 96), (0, 6, 2)])
    assert token_detectors(neuron, token, count, token_count, n_neurons=1) == {0: [5]}


def test_firing_more_than_occurring_raises() -> None:
    neuron, token, count = _triples([(0, 1, 5)])
    with pytest.raises(CountTableError, match="occurred only 4"):
        token_detectors(neuron, token, count, np.array([0, 4]), n_neurons=1)
    with pytest.raises(CountTableError, match="missing"):
        ngram_detectors(neuron, token, count, np.array([0]), np.array([9]), n_neurons=1)


def test_trigram_variant() -> None:
    vocab = 7
    key_a = int(trigram_key(1, 2, 3, vocab_size=vocab))
    key_b = int(trigram_key(4, 4, 0, vocab_size=vocab))
    key_c = int(trigram_key(6, 5, 4, vocab_size=vocab))
    assert decode_trigram_key(np.array([key_a, key_c]), vocab_size=vocab).tolist() == [
        [1, 2, 3],
        [6, 5, 4],
    ]
    occ_key = np.array([key_c, key_a, key_b])  # unsorted on purpose
    occ_count = np.array([1000, 40, 60])
    neuron, key, count = _triples(
        [
            (0, key_a, 40),  # neuron 0: two whole trigrams, 100 of 103 firings
            (0, key_b, 60),
            (0, key_c, 3),
            (1, key_c, 10),  # neuron 1: only the frequent trigram, 1% of its occurrences
        ]
    )
    found = ngram_detectors(neuron, key, count, occ_key, occ_count, n_neurons=2, max_ngrams=50)
    assert found == {0: [key_b, key_a]}
    assert ngram_detectors(neuron, key, count, occ_key, occ_count, n_neurons=2, max_ngrams=1) == {}


# --------------------------------------------------------------------------- layer, summary


def _layer(layer: int, detector_tokens: dict[int, list[int]], *, n_layers: int = 3):
    """One layer whose neuron n fires exactly on all occurrences of its tokens."""
    vocab = 10
    token_count = np.full(vocab, 10, dtype=np.int64)
    rows = [(n, t, 10) for n, tokens in detector_tokens.items() for t in tokens]
    rows += [(7, t, 10) for t in range(vocab)]  # neuron 7: every token, not a detector
    neuron, token, count = _triples(rows)
    return analyse_ngram_layer(
        model="toy",
        layer=layer,
        n_layers=n_layers,
        n_neurons=8,
        vocab_size=vocab,
        pair_neuron=neuron,
        pair_token=token,
        pair_count=count,
        token_count=token_count,
    )


def test_layer_finding() -> None:
    finding = _layer(0, {0: [1], 2: [2, 3]})
    assert finding.n_alive == 3
    assert finding.n_token_detectors == 2
    assert finding.detector_tokens == {0: [1], 2: [2, 3]}
    assert finding.detected_tokens == [1, 2, 3]
    assert finding.covering_histogram["1"] == 1
    assert finding.covering_histogram["2-5"] == 1
    assert finding.covering_histogram["6-10"] == 1  # neuron 7 needs all 10 tokens
    assert finding.n_trigram_detectors is None
    plain = finding.to_json()
    assert plain["detector_tokens"] == {"0": [1], "2": [2, 3]}
    with pytest.raises(CountTableError, match="all five trigram tables"):
        analyse_ngram_layer(
            model="toy",
            layer=0,
            n_layers=1,
            n_neurons=1,
            vocab_size=2,
            pair_neuron=np.array([0]),
            pair_token=np.array([0]),
            pair_count=np.array([1]),
            token_count=np.array([1, 0]),
            tri_neuron=np.array([0]),
        )


def test_summary_fig3_fig4_on_three_layers() -> None:
    # layer 0 detects {1, 2}; layer 1 {2, 3}; layer 2 {1, 4, 5}
    layers = [
        _layer(2, {0: [1], 1: [4, 5]}),
        _layer(0, {0: [1], 3: [2]}),
        _layer(1, {4: [2, 3], 5: [3]}),
    ]
    summary = summarise_token_detectors(layers)
    assert summary.layers == [0, 1, 2]
    assert summary.relative_depth == [0.0, 0.5, 1.0]
    assert summary.n_detectors == [2, 2, 2]
    assert summary.n_tokens == [2, 2, 3]
    assert summary.n_tokens_cumulative == [2, 3, 5]
    assert summary.n_new_overall == [2, 1, 2]  # layer 2: 4 and 5 (1 was seen in layer 0)
    assert summary.n_new_vs_previous == [2, 1, 3]  # layer 2: none of 1, 4, 5 in layer 1
    with pytest.raises(CountTableError, match="consecutive layers from 0"):
        summarise_token_detectors(layers[:1])


def _reference(neuron, token, count, token_count, n_neurons, max_tokens=5):
    """Plain per-neuron loops over the same definitions, with exact fractions."""
    from fractions import Fraction

    need = Fraction(19, 20)
    covering, detectors = [], {}
    for n in range(n_neurons):
        rows = sorted(
            ((c, t) for nn, t, c in zip(neuron, token, count, strict=True) if nn == n and c),
            key=lambda ct: (-ct[0], ct[1]),
        )
        total = sum(c for c, _ in rows)
        k, running = 0, 0
        while total and running < need * total:
            running += rows[k][0]
            k += 1
        covering.append(k)
        chosen, running = [], 0
        for c, t in rows:
            if total and running < need * total and c >= need * token_count[t]:
                chosen.append(t)
                running += c
        if total and running >= need * total and 1 <= len(chosen) <= max_tokens:
            detectors[n] = chosen
    return covering, detectors


def _detector_table(n_neurons: int, vocab: int, seed: int):
    """A layer's (neuron, token, count) table with token detectors among its neurons."""
    rng = np.random.default_rng(seed)
    token_count = rng.integers(1, 30, size=vocab)
    rows = []
    for n in range(n_neurons):
        tokens = rng.choice(vocab, size=rng.integers(0, 8), replace=False)
        for t in tokens:  # often fire on (nearly) all occurrences, so detectors appear
            full = rng.random() < 0.6
            rows.append(
                (n, int(t), int(token_count[t] if full else rng.integers(0, token_count[t])))
            )
    return (*_triples(rows), token_count)


def test_matches_plain_loop_reference() -> None:
    n_neurons, vocab = 40, 12
    neuron, token, count, token_count = _detector_table(n_neurons, vocab, seed=3)
    covering, detectors = _reference(neuron, token, count, token_count, n_neurons)
    assert covering_count(neuron, token, count, n_neurons=n_neurons).tolist() == covering
    assert token_detectors(neuron, token, count, token_count, n_neurons=n_neurons) == detectors
    assert len(detectors) >= 5


# --------------------------------------------------------------------------- memory


def test_gpt2_sized_table_stays_sparse() -> None:
    """3072 neurons × 50257 tokens, 3M pairs: peak numpy memory far below a dense matrix."""
    n_neurons, vocab, n_pairs = 3072, 50257, 3_000_000
    rng = np.random.default_rng(0)
    flat = np.unique(rng.integers(0, n_neurons * vocab, size=n_pairs, dtype=np.int64))
    neuron, token = flat // vocab, flat % vocab
    count = rng.geometric(0.3, size=len(flat)).astype(np.int64)
    token_count = np.bincount(token, weights=count, minlength=vocab).astype(np.int64) + 5
    del flat
    dense_bytes = n_neurons * vocab * 8  # 1.24 GB
    bound = 80 * len(neuron)  # 10 int64 arrays of P ≈ 240 MB, < 20% of dense (measured ≈ 49)
    tracemalloc.start()
    try:
        start = time.perf_counter()
        counts = covering_count(neuron, token, count, n_neurons=n_neurons)
        detectors = token_detectors(neuron, token, count, token_count, n_neurons=n_neurons)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert counts.shape == (n_neurons,) and counts.min() > 0
    assert isinstance(detectors, dict)
    assert peak < bound < dense_bytes, f"peak {peak / 1e6:.0f} MB"
    assert elapsed < 30, f"{elapsed:.1f} s"


def _random_layer_table(n_neurons: int, vocab: int, n_pairs: int, seed: int):
    rng = np.random.default_rng(seed)
    flat = np.unique(rng.integers(0, n_neurons * vocab, size=n_pairs, dtype=np.int64))
    neuron, token = flat // vocab, flat % vocab  # sorted by (neuron, token), as stats give
    count = rng.geometric(0.3, size=len(flat)).astype(np.int64)
    token_count = np.bincount(token, weights=count, minlength=vocab).astype(np.int64) + 5
    return neuron, token, count, token_count


def _analyse(neuron, token, count, token_count, n_neurons, vocab):
    return analyse_ngram_layer(
        model="toy", layer=0, n_layers=1, n_neurons=n_neurons, vocab_size=vocab,
        pair_neuron=neuron, pair_token=token, pair_count=count, token_count=token_count,
    )  # fmt: skip


def test_neuron_blocks_give_the_whole_tables_finding(monkeypatch) -> None:
    """Analysed in blocks of whole neurons (a few pairs each), a layer's finding equals the
    finding of the whole table: every quantity is per neuron."""
    n_neurons, vocab = 40, 12
    table = _detector_table(n_neurons, vocab, seed=3)
    whole = _analyse(*table, n_neurons, vocab)
    assert whole.n_token_detectors > 0 and len(whole.covering_histogram) > 1
    monkeypatch.setattr("neuronspec.analyses.ngram.NEURON_BLOCK_PAIRS", 7)
    assert len(_neuron_blocks(table[0], n_neurons)) > 10
    assert _analyse(*table, n_neurons, vocab) == whole


def test_neuron_blocks_bound_the_working_memory(monkeypatch) -> None:
    """3M pairs of a 3072-neuron layer: analysed in blocks of 300k pairs, the peak numpy
    memory beyond the inputs is a fraction of the whole table's."""
    n_neurons, vocab = 3072, 50257
    table = _random_layer_table(n_neurons, vocab, 3_000_000, seed=0)
    peaks = []
    for block_pairs in (10**9, 300_000):
        monkeypatch.setattr("neuronspec.analyses.ngram.NEURON_BLOCK_PAIRS", block_pairs)
        tracemalloc.start()
        try:
            finding = _analyse(*table, n_neurons, vocab)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert finding.n_alive == n_neurons
    assert peaks[1] < 0.25 * peaks[0], [f"{p / 1e6:.0f} MB" for p in peaks]


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_planted_trigram_detector_end_to_end(backend) -> None:
    """Planted firings through the real counting pass (``NeuronStats``, trigrams on) and
    :func:`ngram_layer_from_stats`: neuron 0 fires exactly where the trigram (5, 6, 7) ends,
    neuron 1 on every token 9 (in many contexts), neuron 2 at random. Only neuron 0 is a
    trigram detector, of that one trigram; only neuron 1 is a token detector, of token 9."""
    if backend == "native" and not kernels_available():
        pytest.skip("native kernels unavailable")
    vocab, n, length = 20, 96, 24
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, vocab, (n, length), generator=g)  # (n, T); 0 is BOS, never drawn
    ids[:, 0] = 0
    for row in range(0, n, 2):  # plant (5, 6, 7) once in every other window
        start = int(torch.randint(1, length - 2, (1,), generator=g))
        ids[row, start : start + 3] = torch.tensor([5, 6, 7])
    ends = torch.zeros(n, length, dtype=torch.bool)
    ends[:, 2:] = (ids[:, :-2] == 5) & (ids[:, 1:-1] == 6) & (ids[:, 2:] == 7)
    fires = torch.stack(
        [ends, ids == 9, torch.rand(n, length, generator=g) < 0.5], dim=-1
    )  # (n, T, 3)
    pre = torch.where(fires, 1.0, -1.0).float()  # (n, T, 3): fires where mlp_pre > 0
    stats = NeuronStats.empty([3], length, vocab, StatsConfig(trigrams=True), backend=backend)
    for batch in range(0, n, 32):
        window_ids = ids[batch : batch + 32]
        counted = stats.add_tokens(window_ids, bos_id=0)
        stats.add_layer(0, pre[batch : batch + 32], pre[batch : batch + 32], window_ids, counted)
    finding = ngram_layer_from_stats(stats, 0, model="planted")
    planted = int(trigram_key(5, 6, 7, vocab_size=vocab))
    assert int(ends.sum()) >= n // 2
    assert finding.detector_trigrams == {0: [planted]}
    assert finding.n_trigram_detectors == 1
    assert list(finding.detector_tokens) == [1]
    assert list(finding.detector_tokens[1]) == [9]
