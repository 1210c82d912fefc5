"""Sparsity (METHODS.md §9) and efficiency (§11) of every model of the run."""

from __future__ import annotations

import pytest

from neuronspec.analyses.sparsity import default_tau

pytestmark = pytest.mark.sparsity


def test_sparsity_per_layer_snapshot(model_id, sparsity, findings_snapshot):
    """Threshold sparsity (with τ), percentile profile, entropy, Gini, Hoyer and the optimal
    threshold of every layer must not drift."""
    assert sparsity.snapshot_view() == findings_snapshot


def test_threshold_sparsity_uses_family_tau(model_id, model_files, sparsity):
    """The family default τ (0.01 Mamba, 1e-5 Transformer) is what each row reports, and
    it is a sketch edge, so the fraction below it is counted exactly."""
    tau = default_tau(model_files.model_type)
    assert all(f.tau == tau and f.threshold_exact for f in sparsity)


def test_efficiency_snapshot(model_id, efficiency, findings_snapshot):
    """Parameters, neurons per layer, firing fraction per token and analytic FLOPs per token
    must not drift (tokens/s is measured, not snapshotted)."""
    finding, throughput = efficiency
    assert finding.snapshot_view() == findings_snapshot
    assert throughput.tokens_per_second > 0


def test_fewer_than_half_of_neurons_fire_per_token(model_id, efficiency):
    """Hypothesis: with GELU/SiLU gates, fewer than half of a layer's neurons fire (gate
    pre-activation > 0) on a typical token, in every layer."""
    finding, _ = efficiency
    assert max(finding.firing_fraction_by_layer) < 0.5, finding.firing_fraction_by_layer
