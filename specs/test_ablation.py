"""Ablation and pruning with held-out perplexity, each next to its random control
(METHODS.md §10). Neuron sets come from the dead and positional analyses; the study runs
with the defaults of :mod:`neuronspec.analyses.ablation` (mean ablation, 64 held-out
windows, 5 control seeds)."""

from __future__ import annotations

import pytest

from neuronspec.plots.ablation import plot_ablation, plot_pruning
from neuronspec.plots.figure import plot_path

pytestmark = pytest.mark.ablation


def test_dead_neuron_ablation_barely_changes_perplexity(model_id, ablation):
    """Dead neurons never fire on the analysis corpus: ablating them all changes held-out PPL
    by less than 0.5%."""
    dead = ablation.condition("dead")
    if dead.n_neurons == 0:
        pytest.skip(f"{model_id} has no dead neurons")
    assert abs(dead.change) < 0.005, dead


@pytest.mark.measured({
    "tiny-gpt2": "ablating the 66 positional neurons changes PPL by -0.039% "
    "(3.78098 -> 3.77950); random sets of the same size per layer +0.039% +- 0.016% "
    "(mean + 2 std = +0.070%)",
})  # fmt: skip
def test_positional_ablation_raises_perplexity_more_than_random(model_id, ablation):
    """Positional neurons carry information a random set of the same size per layer does
    not: PPL change > random control mean + 2 std."""
    positional = ablation.condition("positional")
    if positional.n_neurons == 0:
        pytest.skip(f"{model_id} has no positional neurons")
    assert positional.exceeds_control, positional


def test_sensitive_neurons_matter_more_than_random(model_id, ablation, delta_sensitive_sets):
    """Delta-sensitive (Mamba) / high-variance (GPT-2) neurons raise PPL more than random
    ones: change > control mean + 2 std."""
    found = ablation.condition(delta_sensitive_sets.kind)
    assert found.exceeds_control, found


def test_ablation_table_snapshot(model_id, default_selection, ablation, findings_snapshot):
    """Condition sizes, PPLs and their random controls must not drift."""
    table = {
        "baseline_ppl": ablation.baseline_ppl,
        "method": ablation.method,
        "n_targets": ablation.n_targets,
        "conditions": [
            {
                "name": c.name,
                "n_neurons": c.n_neurons,
                "ppl": c.ppl,
                "control_ppl_mean": None if c.control is None else c.control.ppl_mean,
                "control_ppl_std": None if c.control is None else c.control.ppl_std,
            }
            for c in ablation.conditions
        ],
    }
    assert table == findings_snapshot


@pytest.mark.measured({
    "tiny-mamba": "pruning 152 neurons (15% per layer, the 40 delta-sensitive "
    "channels protected) by priority changes PPL by +0.042%; random pruning +28.4% +- 37.6% "
    "(5 seeds, one at +95.7%; mean - 2 std = -46.9%)",
})  # fmt: skip
def test_pruning_by_priority_hurts_less_than_random(model_id, pruning):
    """Pruning dead, then positional, then the smallest-variance neurons raises PPL less than
    random pruning of the same count per layer: change < control mean − 2 std."""
    control = pruning.control
    assert pruning.change < control.change_mean - 2 * control.change_std, pruning


def test_pruning_snapshot(model_id, default_selection, pruning, findings_snapshot):
    summary = {
        "ratio": pruning.ratio,
        "n_pruned": pruning.n_pruned,
        "pruned_by_class": pruning.pruned_by_class,
        "ppl": pruning.ppl,
        "control_ppl_mean": pruning.control.ppl_mean,
        "control_ppl_std": pruning.control.ppl_std,
    }
    assert summary == findings_snapshot


def test_ablation_figures(model_id, ablation, pruning, plots_dir):
    if plots_dir is None:
        pytest.skip("no --plots-dir given")
    written = [
        plot_ablation(ablation, plot_path(plots_dir, "ablation", model_id)),
        plot_pruning(pruning, plot_path(plots_dir, "pruning", model_id)),
    ]
    assert all(path.stat().st_size > 0 for path in written)
