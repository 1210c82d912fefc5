"""Sparsity (METHODS.md §9) and efficiency (§11) of every model of the run."""

from __future__ import annotations

import pytest

from neuronspec.analyses.sparsity import default_tau
from neuronspec.plots.figure import plot_path
from neuronspec.plots.sparsity import plot_percentile_profile, plot_sparsity, plot_table

pytestmark = pytest.mark.sparsity


def test_sparsity_per_layer_snapshot(model_id, sparsity, findings_snapshot, plots_dir):
    """Threshold sparsity (with τ), percentile profile, entropy, Gini, Hoyer and the optimal
    threshold of every layer must not drift."""
    if plots_dir is not None:
        plot_sparsity({model_id: sparsity}, plot_path(plots_dir, "sparsity", model_id))
        plot_percentile_profile({model_id: sparsity}, plot_path(plots_dir, "percentiles", model_id))
    assert [f.to_json() for f in sparsity] == findings_snapshot


def test_threshold_sparsity_uses_family_tau(model_id, model_files, sparsity):
    """The family default τ (0.01 Mamba, 1e-5 Transformer) is what each row reports, and
    it is a sketch edge, so the fraction below it is counted exactly."""
    tau = default_tau(model_files.model_type)
    assert all(f.tau == tau and f.threshold_exact for f in sparsity)


def test_efficiency_snapshot(model_id, efficiency, findings_snapshot, plots_dir):
    """Parameters, neurons per layer, firing fraction per token and analytic FLOPs per token
    must not drift (tokens/s is measured, not snapshotted)."""
    finding, throughput = efficiency
    if plots_dir is not None:
        row = finding.to_json() | {
            "tokens/s": f"{throughput.tokens_per_second:.0f} ({throughput.device}, "
            f"{throughput.dtype})"
        }
        del row["firing_fraction_by_layer"]
        plot_table(list(row), [list(row.values())], plot_path(plots_dir, "efficiency", model_id),
                   f"Efficiency, {model_id}")  # fmt: skip
    assert finding.to_json() == findings_snapshot
    assert throughput.tokens_per_second > 0


def test_fewer_than_half_of_neurons_fire_per_token(model_id, efficiency):
    """Hypothesis: with GELU/SiLU gates, fewer than half of a layer's neurons fire (gate
    pre-activation > 0) on a typical token, in every layer."""
    finding, _ = efficiency
    assert max(finding.firing_fraction_by_layer) < 0.5, finding.firing_fraction_by_layer
