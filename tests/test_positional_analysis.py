"""Positional neurons (METHODS.md §4): mutual information against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from builders import VOCAB, make_gpt2, wrap

from neuronspec.analyses.positional import (
    above_rate_ranges,
    analyse_positional_layer,
    firing_by_position,
    main_range,
    overall_firing_rate,
    positional_layer_from_stats,
    positional_measures,
    positional_mutual_information,
)
from neuronspec.capture.runner import collect_stats
from neuronspec.errors import CountTableError


def test_mutual_information_by_hand() -> None:
    tokens = np.array([10, 10])
    fire = np.array(
        [
            # n0: always at p=0, never at p=1 (both 0·ln0 terms)
            # n1: flat; n2: never fires; n3: always fires; n4: 2/10 then 6/10
            [10, 5, 0, 10, 2],
            [0, 5, 0, 10, 6],
        ]
    )
    mi = positional_mutual_information(fire, tokens)
    n4 = 0.5 * (
        0.2 * math.log(0.2 / 0.4)
        + 0.8 * math.log(0.8 / 0.6)
        + 0.6 * math.log(0.6 / 0.4)
        + 0.4 * math.log(0.4 / 0.6)
    )
    assert mi == pytest.approx([math.log(2), 0.0, 0.0, 0.0, n4], abs=1e-12)


def test_overall_rate_is_token_weighted() -> None:
    tokens = np.array([10, 5])
    fire = np.array([[5], [0]])  # fr(0) = 0.5, fr(1) = 0, overall = 5/15
    assert overall_firing_rate(fire, tokens) == pytest.approx([1 / 3])
    assert firing_by_position(fire, tokens)[:, 0] == pytest.approx([0.5, 0.0])
    expected = 0.5 * (
        0.5 * math.log(0.5 / (1 / 3))
        + 0.5 * math.log(0.5 / (2 / 3))
        + 1.0 * math.log(1.0 / (2 / 3))
    )
    assert positional_mutual_information(fire, tokens) == pytest.approx([expected])


def test_early_positions_neuron_is_positional_uniform_is_not() -> None:
    n_positions = 16
    tokens = np.full(n_positions, 100)
    fire = np.zeros((n_positions, 3), dtype=np.int64)
    fire[:4, 0] = 100  # fires only at positions 0-3
    fire[:, 1] = 30  # uniform
    fire[:, 2] = 30 + np.arange(n_positions) % 2  # 30/31 alternating: tiny I
    finding = analyse_positional_layer(
        model="toy",
        layer=1,
        n_layers=3,
        fire_by_pos=fire,
        tokens_by_pos=tokens,
        pearson_sum=np.array([8.0, 0.8, 1.0]),
        n_windows=10,
        top_k=2,
    )
    expected = (4 * math.log(4) + 12 * math.log(4 / 3)) / 16  # fr = 1/4
    assert finding.positional_neurons == [0]
    assert finding.n_positional == 1
    assert finding.mutual_information == pytest.approx([expected])
    assert finding.mean_abs_pearson == pytest.approx([0.8])
    assert finding.main_ranges == [[0, 3]]
    assert finding.above_rate_ranges == {0: [[0, 3]]}
    assert finding.top_neurons == [0, 2]
    assert finding.top_overall_rate[0] == pytest.approx(0.25)
    assert finding.top_firing_by_position[0][:5] == pytest.approx([1, 1, 1, 1, 0])
    assert finding.relative_depth == 0.5
    assert finding.to_json()["above_rate_ranges"] == {"0": [[0, 3]]}


def test_threshold_is_a_parameter() -> None:
    tokens = np.full(16, 100)
    fire = np.zeros((16, 1), dtype=np.int64)
    fire[:4, 0] = 100
    finding = analyse_positional_layer(
        model="toy", layer=0, n_layers=1, fire_by_pos=fire, tokens_by_pos=tokens, threshold=0.6
    )
    assert finding.n_positional == 0
    assert finding.mean_abs_pearson is None


def test_ranges() -> None:
    rates = np.array([0.5, 0.1, 0.6, 0.7, 0.1])
    assert above_rate_ranges(rates, 0.3) == [[0, 0], [2, 3]]
    assert main_range(rates, 0.3) == [2, 3]
    assert main_range(rates, 0.9) is None


@pytest.mark.parametrize(
    ("fire", "tokens", "match"),
    [
        (np.zeros((3, 2), dtype=int), np.ones(4, dtype=int), "tokens_by_pos must be"),
        (np.zeros((2, 2), dtype=int), np.array([1, 0]), r"positions \[1\] saw no tokens"),
        (np.full((2, 2), 3), np.array([2, 2]), "cannot fire more"),
        (np.zeros((2, 2)), np.array([2, 2]), "integers"),
        (np.zeros(2, dtype=int), np.array([2, 2]), r"\[T, W\]"),
    ],
)
def test_bad_input_raises(fire, tokens, match) -> None:
    with pytest.raises(CountTableError, match=match):
        positional_mutual_information(fire, tokens)


def test_pearson_needs_both() -> None:
    with pytest.raises(CountTableError, match="both pearson_sum and n_windows"):
        analyse_positional_layer(
            model="toy",
            layer=0,
            n_layers=1,
            fire_by_pos=np.ones((2, 2), dtype=int),
            tokens_by_pos=np.array([2, 2]),
            pearson_sum=np.zeros(2),
        )


def test_positional_measures_agree_with_the_finding() -> None:
    """``positional_measures`` (every neuron, the scatter figure's axes) gives the finding's
    I and mean |r| for its positional neurons, from the same streamed statistics."""
    loaded = wrap(make_gpt2(), "random-gpt2")
    windows = torch.randint(1, VOCAB, (16, 24), generator=torch.Generator().manual_seed(5))
    stats = collect_stats(loaded, windows, bos_id=None, batch_size=8)
    for layer in range(stats.n_layers):
        finding = positional_layer_from_stats(stats, layer, model="m", threshold=0.01)
        mi, pearson = positional_measures(stats, layer)
        assert mi.shape == pearson.shape == (finding.n_neurons,)
        assert finding.positional_neurons == [
            n for n in np.argsort(-mi, kind="stable") if mi[n] > 0.01
        ]
        np.testing.assert_array_equal(mi[finding.positional_neurons], finding.mutual_information)
        np.testing.assert_array_equal(pearson[finding.positional_neurons], finding.mean_abs_pearson)
    assert any(
        positional_layer_from_stats(stats, layer, model="m", threshold=0.01).n_positional
        for layer in range(stats.n_layers)
    )
