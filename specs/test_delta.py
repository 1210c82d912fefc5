"""Delta-sensitive neurons (Mamba Δ, site dt) and GPT-2's high-variance mlp neurons (METHODS §5)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.delta


def test_delta_sensitive_snapshot(model_id, default_selection, delta_sensitive, findings_snapshot):
    """The top channels by variance across texts and by token-substitution perturbation."""
    assert [f.snapshot_view() for f in delta_sensitive.findings] == findings_snapshot


def test_text_variance_and_substitution_sensitivity_agree(model_id, delta_sensitive):
    """Channels whose text-mean varies most across texts are the ones a single token
    substitution moves most: the two scores' rank correlation is positive in every layer."""
    correlations = {f.layer: f.rank_correlation for f in delta_sensitive.findings}
    assert all(value > 0 for value in correlations.values()), correlations


def test_delta_figure(model_id, delta_sensitive, plots_dir):
    if plots_dir is None:
        pytest.skip("no --plots-dir given")
    from neuronspec.plots.attention import plot_delta_ranking
    from neuronspec.plots.figure import plot_path

    kind = delta_sensitive.findings[0].kind
    path = plot_delta_ranking(
        delta_sensitive.variance,
        delta_sensitive.perturbation,
        plot_path(plots_dir, f"{kind}_ranking", model_id),
        title=f"{model_id}: {kind} channels ({delta_sensitive.findings[0].site} site)",
    )
    assert path.stat().st_size > 0
