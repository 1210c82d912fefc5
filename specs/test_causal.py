"""Causal neurons (METHODS.md §6): single-neuron zero interventions on the ``top_k``
candidates of each layer (``--top-k``, ``--layers``), KL impact next to random neurons,
and the cross-layer matrix on 8 held-out windows. The same for the delta-sensitive Δ
channels (Mamba, ``dt`` site) or high-variance ``mlp`` neurons (GPT-2) of METHODS §5,
recorded under ``causal_delta_sensitive``."""

from __future__ import annotations

import pytest

from neuronspec.analyses.causal import upstream_leaks
from neuronspec.plots.ablation import plot_causal_neurons, plot_cross_layer
from neuronspec.plots.figure import plot_path

pytestmark = pytest.mark.causal


def test_no_layer_upstream_of_an_intervention_changes(model_id, causal):
    """Cross-layer matrix: every target layer before the source is exactly unchanged."""
    assert upstream_leaks(causal) == []


@pytest.mark.measured({
    "tiny-gpt2-L0": "the strongest candidate (by E[a^2]) has KL 3.28e-05 per position; 10 "
    "random layer-0 neurons 4.37e-05 +- 8.74e-05 (mean + 2 std = 2.18e-04)",
})  # fmt: skip
def test_strongest_candidate_beats_random(model_id, layer, causal):
    """The candidate of the layer with the largest KL impact exceeds random single neurons
    of the same layer: KL > control mean + 2 std."""
    _assert_strongest_beats_random(causal, layer)


def _assert_strongest_beats_random(finding, layer: int):
    found = next(f for f in finding.layers if f.layer == layer)
    strongest = found.candidates[0].kl
    assert strongest > found.control_kl_mean + 2 * found.control_kl_std, (
        strongest, found.control_kl_mean, found.control_kl_std,
    )  # fmt: skip


def test_top_causal_neurons_snapshot(model_id, default_selection, causal, findings_snapshot):
    top = _top_candidates(causal)
    assert {"top": top, "cross_layer": causal.cross_layer} == findings_snapshot


def _top_candidates(finding) -> list[dict]:
    """Per layer: the 5 strongest candidates with their KL, and the number found causal."""
    return [
        {
            "layer": layer.layer,
            "neurons": [c.neuron for c in layer.candidates[:5]],
            "kl": [c.kl for c in layer.candidates[:5]],
            "n_causal": len(layer.causal_neurons),
        }
        for layer in finding.layers
    ]


def test_causal_figures(model_id, causal, plots_dir):
    if plots_dir is None:
        pytest.skip("no --plots-dir given")
    written = [
        plot_causal_neurons(causal, plot_path(plots_dir, "causal_neurons", model_id)),
        plot_cross_layer(causal, plot_path(plots_dir, "cross_layer", model_id)),
    ]
    assert all(path.stat().st_size > 0 for path in written)


def test_sensitive_channel_interventions_leave_upstream_layers_unchanged(
    model_id, causal_delta_sensitive
):
    assert upstream_leaks(causal_delta_sensitive) == []


@pytest.mark.measured({
    "tiny-gpt2-L0": "the strongest high-variance neuron (379) has KL 3.28e-05 per position; "
    "10 random layer-0 neurons 3.76e-05 +- 8.96e-05",
    "tiny-mamba-L0": "the strongest delta-sensitive channel (97) has KL 1.12e-06 per "
    "position; 10 random layer-0 Δ channels 2.74e-03 +- 6.76e-03 (one random channel "
    "dominates); layers 1-3 hold (top KL 1.49e-06, 1.68e-03, 3.0e-02)",
})  # fmt: skip
def test_strongest_sensitive_channel_beats_random(model_id, layer, causal_delta_sensitive):
    """The pairing of delta-sensitive and causal neurons: the delta-sensitive Δ channel
    (Mamba) or high-variance neuron (GPT-2) of the layer with the largest KL impact exceeds
    random channels of the same site and layer: KL > control mean + 2 std."""
    _assert_strongest_beats_random(causal_delta_sensitive, layer)


def test_sensitive_causal_snapshot(
    model_id, default_selection, causal_delta_sensitive, findings_snapshot
):
    finding = causal_delta_sensitive
    top = _top_candidates(finding)
    assert {"site": finding.site, "top": top, "cross_layer": finding.cross_layer} == (
        findings_snapshot
    )


def test_sensitive_causal_figures(model_id, causal_delta_sensitive, plots_dir):
    if plots_dir is None:
        pytest.skip("no --plots-dir given")
    finding = causal_delta_sensitive
    written = [
        plot_causal_neurons(finding, plot_path(plots_dir, "causal_delta_sensitive", model_id)),
        plot_cross_layer(finding, plot_path(plots_dir, "cross_layer_delta_sensitive", model_id)),
    ]
    assert all(path.stat().st_size > 0 for path in written)
