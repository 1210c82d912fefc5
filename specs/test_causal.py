"""Causal neurons (METHODS.md §6): every neuron screened by a second-order KL estimate, the
``top_k`` candidates of each layer (``--top-k``, ``--layers``) measured exactly by single-
neuron zero interventions on 8 held-out windows (the screen ran on 8 others), their KL
against random neurons of the layer measured exactly (``--control-seeds``: empirical
p-values per candidate, and a rank-sum test), and the cross-layer matrix. The same for
the delta-sensitive Δ channels (Mamba, ``dt`` site) or high-variance ``mlp`` neurons
(GPT-2) of METHODS §5, recorded under ``causal_delta_sensitive``."""

from __future__ import annotations

import pytest

from neuronspec.analyses.causal import upstream_leaks

pytestmark = pytest.mark.causal


def test_no_layer_upstream_of_an_intervention_changes(model_id, causal):
    """Cross-layer matrix: every target layer before the source is exactly unchanged."""
    assert upstream_leaks(causal) == []


ALPHA = 0.01


def test_candidates_are_more_causal_than_random(model_id, layer, causal):
    """The layer's candidates (the KL screen's top, chosen on other windows than their KL is
    measured on) have larger KL impact than random neurons of the same layer: one-sided
    rank-sum test at α = 0.01."""
    found = causal.of_layer(layer)
    assert found.candidates_exceed(alpha=ALPHA), found


def test_top_causal_neurons_snapshot(model_id, default_selection, causal, findings_snapshot):
    assert causal.snapshot_view() == findings_snapshot


def test_sensitive_channel_interventions_leave_upstream_layers_unchanged(
    model_id, causal_delta_sensitive
):
    assert upstream_leaks(causal_delta_sensitive) == []


def test_sensitive_channels_are_more_causal_than_random(model_id, layer, causal_delta_sensitive):
    """The pairing of delta-sensitive and causal neurons: the layer's delta-sensitive Δ
    channels (Mamba) or high-variance neurons (GPT-2) have larger KL impact than random
    channels of the same site and layer: one-sided rank-sum test at α = 0.01."""
    found = causal_delta_sensitive.of_layer(layer)
    assert found.candidates_exceed(alpha=ALPHA), found


def test_sensitive_causal_snapshot(
    model_id, default_selection, causal_delta_sensitive, findings_snapshot
):
    assert causal_delta_sensitive.snapshot_view() == findings_snapshot
