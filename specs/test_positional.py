"""Positional neurons (Voita et al. 2023, §5; METHODS.md §4): I(act; pos) > 0.05."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.positional


def test_positional_neurons_snapshot(model_id, positional, findings_snapshot):
    """Number of positional neurons per layer and the strongest ones must not drift: the top
    5 mutual informations, with the neurons' ids where their rank is not within tolerance of
    a neighbour's (:func:`~neuronspec.snapshot.stable_ranking`)."""
    assert positional.snapshot_view() == findings_snapshot


def test_positional_neurons_concentrate_in_first_layer_with_learned_positions(
    model_id, model_files, positional, record_property
):
    """Voita et al. §5: positional neurons live in the early layers. With learned absolute
    position embeddings (GPT-2) the first layer reads position directly, so it should hold
    more positional neurons than every other layer: each difference's one-sided bound above
    0 at α = 0.01, Bonferroni over the L − 1 comparisons (window-group bootstrap SEs,
    combined as independent: conservative)."""
    if model_files.model_type != "gpt2":
        pytest.skip("hypothesis about models with learned absolute position embeddings")
    record_property("positional_by_layer", [f.n_positional for f in positional])
    first, others = positional[0], [positional[layer] for layer in range(1, len(positional))]
    alpha = 0.01 / max(len(others), 1)
    differences = [first.estimate().minus(f.estimate()) for f in others]
    assert all(d.above(0.0, alpha=alpha) for d in differences), [
        (f.layer, d.value, d.se) for f, d in zip(others, differences, strict=True)
    ]


def test_mamba_first_layer_gate_carries_no_position(
    model_id, model_files, positional, record_property
):
    """In Mamba the layer-0 gate z = in_proj(RMSNorm(embedding)) is a function of the current
    token alone, so its firing cannot depend on position beyond sampling noise: no neuron of
    layer 0 reaches I > 0.05."""
    if model_files.model_type != "mamba":
        pytest.skip("hypothesis about Mamba's gate")
    record_property("layer0_positional", positional[0].n_positional)
    assert positional[0].n_positional == 0, positional[0].top_neurons
