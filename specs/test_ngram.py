"""N-gram and token-detecting neurons (Voita et al. 2023, §4; METHODS.md §3), Figures 2–4."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.ngram


def test_token_detectors_snapshot(model_id, ngram, findings_snapshot):
    """Fig. 2–4 numbers per layer: covering-unigram bins, detectors, tokens covered."""
    assert ngram.snapshot_view() == findings_snapshot


@pytest.mark.measured({
    "tiny-mamba": "no token-detecting neuron on the toy world; its gate neurons fire broadly "
    "(every alive neuron needs >20 unigrams to cover 95% of its firings)",
})  # fmt: skip
def test_model_has_token_detecting_neurons(model_id, ngram, record_property):
    """Voita et al. §4: a trained LM has token-detecting neurons (1–5 tokens covering ≥95% of
    a neuron's firings, each token ≥95% covered)."""
    record_property("token_detectors_by_layer", [f.n_token_detectors for f in ngram])
    assert sum(f.n_token_detectors for f in ngram) > 0
