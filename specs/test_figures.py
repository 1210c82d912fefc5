"""Figures of Voita et al. (2023) for every model of the run, written to ``--plots-dir``.

Figures across models (overlays) are drawn at the end of the run from the recorded findings.
"""

from __future__ import annotations

import pytest

from neuronspec.analyses.ngram import summarise_token_detectors
from neuronspec.analyses.positional import positional_measures
from neuronspec.plots.dead import plot_dead_neurons
from neuronspec.plots.figure import plot_path
from neuronspec.plots.voita import (
    plot_covering_bins,
    plot_detected_tokens,
    plot_new_tokens,
    plot_positional,
    plot_positional_measures,
    plot_token_detectors,
)


@pytest.fixture
def figures_dir(plots_dir):
    if plots_dir is None:
        pytest.skip("no --plots-dir given")
    return plots_dir


def test_voita_figures(model_id, dead, ngram, positional, neuron_stats, figures_dir):
    """Fig. 1 (dead), Fig. 2 (covering unigrams), Fig. 3a/3b (detectors, tokens), Fig. 4 (new
    tokens), firing frequency against position for the layer with most positional neurons,
    and I(act; pos) against the mean |Pearson r| for every neuron of each layer."""
    summary = summarise_token_detectors(ngram)
    busiest = max(positional, key=lambda f: (f.n_positional, -f.layer))
    written = [
        plot_dead_neurons(
            {model_id: dead},
            plot_path(figures_dir, "fig1_dead_neurons", model_id),
        ),
        plot_covering_bins(ngram, plot_path(figures_dir, "fig2_covering_unigrams", model_id)),
        plot_token_detectors(summary, plot_path(figures_dir, "fig3a_token_detectors", model_id)),
        plot_detected_tokens(summary, plot_path(figures_dir, "fig3b_detected_tokens", model_id)),
        plot_new_tokens(summary, plot_path(figures_dir, "fig4_new_tokens", model_id)),
        plot_positional(
            busiest, plot_path(figures_dir, f"positional_layer{busiest.layer}", model_id), top_k=6
        ),
        plot_positional_measures(
            {f.layer: positional_measures(neuron_stats, f.layer) for f in positional},
            plot_path(figures_dir, "positional_measures", model_id),
            model=model_id,
            threshold=positional[0].threshold,
        ),
    ]
    assert all(path.stat().st_size > 0 for path in written)
