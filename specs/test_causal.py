"""Causal neurons (METHODS.md §6): single-neuron zero interventions on the ``top_k``
candidates of each layer (``--top-k``, ``--layers``), KL impact next to random neurons,
and the cross-layer matrix on 8 held-out windows. The same for the delta-sensitive Δ
channels (Mamba, ``dt`` site) or high-variance ``mlp`` neurons (GPT-2) of METHODS §5,
recorded under ``causal_delta_sensitive``."""

from __future__ import annotations

import pytest

from neuronspec.analyses.causal import DEFAULT_N_PROMPTS, causal_neurons, upstream_leaks
from neuronspec.plots.ablation import plot_causal_neurons, plot_cross_layer
from neuronspec.plots.figure import plot_path

pytestmark = pytest.mark.causal


@pytest.fixture(scope="session")
def causal_finding(neuronspec_session, model_id, loaded_model, corpus, neuron_stats):
    config = neuronspec_session.config
    finding = causal_neurons(
        loaded_model,
        corpus.heldout[:DEFAULT_N_PROMPTS],
        neuron_stats,
        layers=config.layers_of(neuron_stats.n_layers, model=model_id),
        top_k=config.top_k,
    )
    neuronspec_session.record(model_id, "causal", finding)
    for layer in finding.layers:
        neuronspec_session.record_neuron_set(model_id, "causal", layer.layer, layer.causal_neurons)
    return finding


def test_no_layer_upstream_of_an_intervention_changes(model_id, causal_finding):
    """Cross-layer matrix: every target layer before the source is exactly unchanged."""
    assert upstream_leaks(causal_finding) == []


STRONGEST_MEASURED = {
    "tiny-gpt2": "measured: layer 0's strongest candidate (by E[a^2]) has KL 3.28e-05 per "
    "position; 10 random layer-0 neurons 4.37e-05 +- 8.74e-05 (mean + 2 std = 2.18e-04); "
    "layers 1-3 hold",
}


SENSITIVE_MEASURED = {  # layer 0 fails on both embedded models; layers 1-3 hold
    "tiny-gpt2": "measured: layer 0's strongest high-variance neuron (379) has KL 3.28e-05 per "
    "position; 10 random layer-0 neurons 3.76e-05 +- 8.96e-05; layers 1-3 hold",
    "tiny-mamba": "measured: layer 0's strongest delta-sensitive channel (97) has KL 1.12e-06 "
    "per position; 10 random layer-0 Δ channels 2.74e-03 +- 6.76e-03 (one random channel "
    "dominates); layers 1-3 hold (top KL 1.49e-06, 1.68e-03, 3.0e-02)",
}


def test_strongest_candidate_of_each_layer_beats_random(request, model_id, causal_finding):
    """In every layer, the candidate with the largest KL impact exceeds random single neurons
    of the same layer: KL > control mean + 2 std."""
    _assert_strongest_beats_random(request, model_id, causal_finding, STRONGEST_MEASURED)


def _assert_strongest_beats_random(request, model_id, finding, measured: dict[str, str]):
    """Every layer's top-KL candidate > control mean + 2 std; ``measured``: the models where
    layer 0 was measured to fail (a strict xfail with the numbers, when layer 0 is run)."""
    if model_id in measured and 0 in finding.source_layers:
        request.applymarker(pytest.mark.xfail(strict=True, reason=measured[model_id]))
    weak = [
        (layer.layer, layer.candidates[0].kl, layer.control_kl_mean, layer.control_kl_std)
        for layer in finding.layers
        if not layer.candidates[0].kl > layer.control_kl_mean + 2 * layer.control_kl_std
    ]
    assert weak == []


def test_top_causal_neurons_snapshot(
    model_id, default_selection, causal_finding, findings_snapshot
):
    top = _top_candidates(causal_finding)
    assert {"top": top, "cross_layer": causal_finding.cross_layer} == findings_snapshot


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


def test_causal_figures(model_id, causal_finding, plots_dir):
    if plots_dir is None:
        pytest.skip("no --plots-dir given")
    written = [
        plot_causal_neurons(causal_finding, plot_path(plots_dir, "causal_neurons", model_id)),
        plot_cross_layer(causal_finding, plot_path(plots_dir, "cross_layer", model_id)),
    ]
    assert all(path.stat().st_size > 0 for path in written)


@pytest.fixture(scope="session")
def sensitive_causal_finding(
    neuronspec_session, model_id, loaded_model, corpus, neuron_stats, sensitive_sets
):
    """Causal sweep of the delta-sensitive (or high-variance) channels at their own site."""
    finding = causal_neurons(
        loaded_model,
        corpus.heldout[:DEFAULT_N_PROMPTS],
        neuron_stats,
        top_k=neuronspec_session.config.top_k,
        neuron_sets=sensitive_sets,
    )
    neuronspec_session.record(model_id, "causal_delta_sensitive", finding)
    for layer in finding.layers:  # joins the neuron-type overlap, within its site
        neuronspec_session.record_neuron_set(
            model_id, "causal_delta_sensitive", layer.layer, layer.causal_neurons, site=finding.site
        )
    return finding


def test_sensitive_channel_interventions_leave_upstream_layers_unchanged(
    model_id, sensitive_causal_finding
):
    assert upstream_leaks(sensitive_causal_finding) == []


def test_strongest_sensitive_channel_of_each_layer_beats_random(
    request, model_id, sensitive_causal_finding
):
    """The pairing of delta-sensitive and causal neurons: in every layer, the
    delta-sensitive Δ channel (Mamba) or high-variance neuron (GPT-2) with the largest KL
    impact exceeds random channels of the same site and layer: KL > control mean + 2 std."""
    _assert_strongest_beats_random(request, model_id, sensitive_causal_finding, SENSITIVE_MEASURED)


def test_sensitive_causal_snapshot(
    model_id, default_selection, sensitive_causal_finding, findings_snapshot
):
    finding = sensitive_causal_finding
    top = _top_candidates(finding)
    assert {"site": finding.site, "top": top, "cross_layer": finding.cross_layer} == (
        findings_snapshot
    )


def test_sensitive_causal_figures(model_id, sensitive_causal_finding, plots_dir):
    if plots_dir is None:
        pytest.skip("no --plots-dir given")
    finding = sensitive_causal_finding
    written = [
        plot_causal_neurons(finding, plot_path(plots_dir, "causal_delta_sensitive", model_id)),
        plot_cross_layer(finding, plot_path(plots_dir, "cross_layer_delta_sensitive", model_id)),
    ]
    assert all(path.stat().st_size > 0 for path in written)
