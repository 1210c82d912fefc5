"""Per-model findings shared by several specs, computed once per worker from the cached stats."""

from __future__ import annotations

import pytest

from neuronspec.analyses.ngram import ngram_layer_from_stats
from neuronspec.analyses.positional import positional_layer_from_stats


@pytest.fixture(scope="session")
def ngram_findings(model_id, neuron_stats):
    """Voita §4 n-gram findings of every layer: ``[NgramLayerFinding]``."""
    return [
        ngram_layer_from_stats(neuron_stats, layer, model=model_id)
        for layer in range(neuron_stats.n_layers)
    ]


@pytest.fixture(scope="session")
def positional_findings(model_id, neuron_stats):
    """Voita §5 positional findings of every layer: ``[PositionalLayerFinding]``."""
    return [
        positional_layer_from_stats(neuron_stats, layer, model=model_id)
        for layer in range(neuron_stats.n_layers)
    ]
