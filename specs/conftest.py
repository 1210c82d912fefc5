"""Per-model findings shared by several specs: computed once per worker from the cached
statistics, and recorded for the run's results file (``--neuronspec-results``) and overlays."""

from __future__ import annotations

import pytest

from neuronspec.analyses.dead import dead_neurons_all_layers
from neuronspec.analyses.ngram import ngram_layer_from_stats, summarise_token_detectors
from neuronspec.analyses.positional import positional_layer_from_stats


def _record(session, model_id, analysis, findings):
    for finding in findings:
        session.record(model_id, analysis, finding, layer=finding.layer)
    return findings


@pytest.fixture(scope="session")
def dead_findings(neuronspec_session, model_id, neuron_stats):
    """Voita §3 dead neurons of every layer: ``[DeadLayerFinding]``."""
    return _record(neuronspec_session, model_id, "dead", dead_neurons_all_layers(neuron_stats))


@pytest.fixture(scope="session")
def ngram_findings(neuronspec_session, model_id, neuron_stats):
    """Voita §4 n-gram findings of every layer: ``[NgramLayerFinding]``."""
    findings = [
        ngram_layer_from_stats(neuron_stats, layer, model=model_id)
        for layer in range(neuron_stats.n_layers)
    ]
    neuronspec_session.record(
        model_id, "token_detector_summary", summarise_token_detectors(findings)
    )
    return _record(neuronspec_session, model_id, "ngram", findings)


@pytest.fixture(scope="session")
def positional_findings(neuronspec_session, model_id, neuron_stats):
    """Voita §5 positional findings of every layer: ``[PositionalLayerFinding]``."""
    findings = [
        positional_layer_from_stats(neuron_stats, layer, model=model_id)
        for layer in range(neuron_stats.n_layers)
    ]
    return _record(neuronspec_session, model_id, "positional", findings)
