"""N-gram and token-detecting neurons (Voita et al. 2023, §4; METHODS.md §3), Figures 2–4."""

from __future__ import annotations

import pytest

from neuronspec.analyses.ngram import summarise_token_detectors
from neuronspec.plots.figure import plot_path
from neuronspec.plots.voita import (
    plot_covering_bins,
    plot_detected_tokens,
    plot_new_tokens,
    plot_token_detectors,
)

pytestmark = pytest.mark.ngram


def test_token_detectors_snapshot(
    model_id, ngram_findings, record_finding, findings_snapshot, plots_dir
):
    """Fig. 2–4 numbers per layer: covering-unigram bins, detectors, tokens covered."""
    summary = summarise_token_detectors(ngram_findings)
    for finding in ngram_findings:
        record_finding("ngram", finding, layer=finding.layer)
    record_finding("token_detector_summary", summary)
    if plots_dir is not None:
        plot_covering_bins(ngram_findings, plot_path(plots_dir, "fig2_covering_unigrams", model_id))
        plot_token_detectors(summary, plot_path(plots_dir, "fig3a_token_detectors", model_id))
        plot_detected_tokens(summary, plot_path(plots_dir, "fig3b_detected_tokens", model_id))
        plot_new_tokens(summary, plot_path(plots_dir, "fig4_new_tokens", model_id))
    layers = [
        {
            "layer": f.layer,
            "n_alive": f.n_alive,
            "covering_histogram": f.covering_histogram,
            "n_token_detectors": f.n_token_detectors,
        }
        for f in ngram_findings
    ]
    assert {"summary": summary.to_json(), "layers": layers} == findings_snapshot


def test_model_has_token_detecting_neurons(model_id, ngram_findings, request):
    """Voita et al. §4: a trained LM has token-detecting neurons (1–5 tokens covering ≥95% of
    a neuron's firings, each token ≥95% covered)."""
    if model_id == "tiny-mamba":
        request.applymarker(
            pytest.mark.xfail(
                strict=True,
                reason="observed: tiny-mamba has no token-detecting neuron on the toy world; "
                "its gate neurons fire broadly (every alive neuron needs >20 unigrams to "
                "cover 95% of its firings)",
            )
        )
    assert sum(f.n_token_detectors for f in ngram_findings) > 0
