"""Positional neurons (Voita et al. 2023, §5; METHODS.md §4): I(act; pos) > 0.05."""

from __future__ import annotations

import pytest

from neuronspec.plots.figure import plot_path
from neuronspec.plots.voita import plot_positional

pytestmark = pytest.mark.positional


def test_positional_neurons_snapshot(
    model_id, positional_findings, record_finding, findings_snapshot, plots_dir
):
    """Number of positional neurons per layer and the strongest ones must not drift."""
    for finding in positional_findings:
        record_finding("positional", finding, layer=finding.layer)
    if plots_dir is not None:
        busiest = max(positional_findings, key=lambda f: (f.n_positional, -f.layer))
        plot_positional(
            busiest, plot_path(plots_dir, f"positional_layer{busiest.layer}", model_id), top_k=6
        )
    layers = [
        {
            "layer": f.layer,
            "n_positional": f.n_positional,
            "top_neurons": f.top_neurons[:5],
            "top_mutual_information": f.top_mutual_information[:5],
        }
        for f in positional_findings
    ]
    assert layers == findings_snapshot
