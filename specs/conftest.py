"""Per-model findings shared by several specs: computed once per worker from the cached
statistics, and recorded for the run's results file (``--neuronspec-results``) and overlays.

The fixtures also record the neuron sets they find (``record_neuron_set``: dead, rarely
firing, token-detecting, positional) for the neuron-type overlap, which the plugin computes
at the end of the session from every set recorded by any worker."""

from __future__ import annotations

import pytest

from neuronspec.analyses.dead import dead_neurons_all_layers
from neuronspec.analyses.efficiency import efficiency, measure_throughput
from neuronspec.analyses.ngram import ngram_layer_from_stats, summarise_token_detectors
from neuronspec.analyses.positional import positional_layer_from_stats
from neuronspec.analyses.sparsity import default_tau, sparsity_all_layers

RARE_CUTOFF = 0.05  # METHODS §2: rarely firing is 0 < frequency < 0.05


def _record(session, model_id, analysis, findings):
    for finding in findings:
        session.record(model_id, analysis, finding, layer=finding.layer)
    return findings


@pytest.fixture(scope="session")
def dead_findings(neuronspec_session, model_id, neuron_stats):
    """Voita §3 dead neurons of every layer: ``[DeadLayerFinding]``."""
    findings = dead_neurons_all_layers(neuron_stats, rare_cutoff=RARE_CUTOFF)
    for finding in findings:
        layer = finding.layer
        neuronspec_session.record_neuron_set(model_id, "dead", layer, finding.dead_neurons)
        frequency = neuron_stats.layer(layer).fire_count.double() / neuron_stats.n_tokens
        rare = ((frequency > 0) & (frequency < RARE_CUTOFF)).nonzero().flatten().tolist()
        neuronspec_session.record_neuron_set(model_id, "rarely_firing", layer, rare)
    return _record(neuronspec_session, model_id, "dead", findings)


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
    for finding in findings:
        neuronspec_session.record_neuron_set(
            model_id, "token_detecting", finding.layer, finding.detector_tokens
        )
    return _record(neuronspec_session, model_id, "ngram", findings)


@pytest.fixture(scope="session")
def positional_findings(neuronspec_session, model_id, neuron_stats):
    """Voita §5 positional findings of every layer: ``[PositionalLayerFinding]``."""
    findings = [
        positional_layer_from_stats(neuron_stats, layer, model=model_id)
        for layer in range(neuron_stats.n_layers)
    ]
    for finding in findings:
        neuronspec_session.record_neuron_set(
            model_id, "positional", finding.layer, finding.positional_neurons
        )
    return _record(neuronspec_session, model_id, "positional", findings)


@pytest.fixture(scope="session")
def sparsity_findings(neuronspec_session, model_id, model_files, neuron_stats):
    """METHODS §9 sparsity of every layer, τ = the family default: ``[SparsityLayerFinding]``."""
    tau = default_tau(model_files.model_type)
    findings = sparsity_all_layers(neuron_stats, tau=tau)
    return _record(neuronspec_session, model_id, "sparsity", findings)


@pytest.fixture(scope="session")
def efficiency_finding(neuronspec_session, model_id, loaded_model, corpus, neuron_stats):
    """METHODS §11 efficiency: ``(EfficiencyFinding, ThroughputFinding)``; tokens/s of the
    plain LM forward over (at most) the first 16 analysis windows."""
    finding = efficiency(loaded_model.model, neuron_stats)
    throughput = measure_throughput(loaded_model.model, corpus.analysis[:16])
    neuronspec_session.record(
        model_id, "efficiency", finding.to_json() | {"throughput": throughput.to_json()}
    )
    return finding, throughput
