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
