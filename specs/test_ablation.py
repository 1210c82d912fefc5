"""Ablation and pruning with held-out perplexity, each next to its random control
(METHODS.md §10). Neuron sets come from the dead and positional analyses; the study runs
with the defaults of :mod:`neuronspec.analyses.ablation` (mean ablation, 64 held-out
windows, 5 control seeds)."""

from __future__ import annotations

import pytest

from neuronspec.analyses.ablation import ablation_study, pruning_study, standard_conditions
from neuronspec.interventions.ablation import Condition, corpus_means
from neuronspec.plots.ablation import plot_ablation, plot_pruning
from neuronspec.plots.figure import plot_path

pytestmark = pytest.mark.ablation


@pytest.fixture(scope="session")
def sensitive_condition(sensitive_sets):
    """The fifth condition, ablated at the site where the set was found."""
    return Condition(sensitive_sets.kind, sensitive_sets.site, sensitive_sets.by_layer)


@pytest.fixture(scope="session")
def protected_neurons(sensitive_sets):
    """``{layer: mlp neuron ids}`` the pruning never removes: the sensitive set (Mamba's Δ
    channel c is inner channel c, i.e. ``mlp`` neuron c)."""
    return {layer: tuple(ids) for layer, ids in sensitive_sets.by_layer.items()}


@pytest.fixture(scope="session")
def ablation_finding(
    neuronspec_session,
    model_id,
    loaded_model,
    corpus,
    neuron_stats,
    dead_findings,
    positional_findings,
    sensitive_condition,
):
    conditions = standard_conditions(
        dead_findings, positional_findings, sensitive=sensitive_condition
    )
    means = corpus_means(neuron_stats)  # mlp, and dt (the Δ channels) for Mamba
    study = ablation_study(loaded_model, corpus.heldout, conditions, means=means)
    neuronspec_session.record(model_id, "ablation", study)
    return study


@pytest.fixture(scope="session")
def pruning_finding(
    neuronspec_session,
    model_id,
    loaded_model,
    corpus,
    neuron_stats,
    dead_findings,
    positional_findings,
    protected_neurons,
):
    finding = pruning_study(
        loaded_model,
        corpus.heldout,
        neuron_stats,
        dead_findings,
        positional_findings,
        ratio=neuronspec_session.config.pruning_ratio,
        protected=protected_neurons,
    )
    neuronspec_session.record(model_id, "pruning", finding)
    return finding


def _xfail_where_measured(request, model_id: str, measured: dict[str, str]) -> None:
    if model_id in measured:
        request.applymarker(pytest.mark.xfail(strict=True, reason=measured[model_id]))


def test_dead_neuron_ablation_barely_changes_perplexity(model_id, ablation_finding):
    """Dead neurons never fire on the analysis corpus: ablating them all changes held-out PPL
    by less than 0.5%."""
    dead = ablation_finding.condition("dead")
    if dead.n_neurons == 0:
        pytest.skip(f"{model_id} has no dead neurons")
    assert abs(dead.change) < 0.005, dead


POSITIONAL_MEASURED = {
    "tiny-gpt2": "measured: ablating the 66 positional neurons changes PPL by -0.039% "
    "(3.78098 -> 3.77950); random sets of the same size per layer +0.039% +- 0.016% "
    "(mean + 2 std = +0.070%)",
}


def test_positional_ablation_raises_perplexity_more_than_random(
    request, model_id, ablation_finding
):
    """Positional neurons carry information a random set of the same size per layer does
    not: PPL change > random control mean + 2 std."""
    _xfail_where_measured(request, model_id, POSITIONAL_MEASURED)
    positional = ablation_finding.condition("positional")
    if positional.n_neurons == 0:
        pytest.skip(f"{model_id} has no positional neurons")
    assert positional.exceeds_control, positional


def test_sensitive_neurons_matter_more_than_random(model_id, ablation_finding, sensitive_condition):
    """Delta-sensitive (Mamba) / high-variance (GPT-2) neurons raise PPL more than random
    ones: change > control mean + 2 std."""
    found = ablation_finding.condition(sensitive_condition.name)
    assert found.exceeds_control, found


def test_ablation_table_snapshot(model_id, default_selection, ablation_finding, findings_snapshot):
    """Condition sizes, PPLs and their random controls must not drift."""
    table = {
        "baseline_ppl": ablation_finding.baseline_ppl,
        "method": ablation_finding.method,
        "n_targets": ablation_finding.n_targets,
        "conditions": [
            {
                "name": c.name,
                "n_neurons": c.n_neurons,
                "ppl": c.ppl,
                "control_ppl_mean": None if c.control is None else c.control.ppl_mean,
                "control_ppl_std": None if c.control is None else c.control.ppl_std,
            }
            for c in ablation_finding.conditions
        ],
    }
    assert table == findings_snapshot


PRUNING_MEASURED = {
    "tiny-mamba": "measured: pruning 152 neurons (15% per layer, the 40 delta-sensitive "
    "channels protected) by priority changes PPL by +0.042%; random pruning +28.4% +- 37.6% "
    "(5 seeds, one at +95.7%; mean - 2 std = -46.9%)",
}


def test_pruning_by_priority_hurts_less_than_random(request, model_id, pruning_finding):
    """Pruning dead, then positional, then the smallest-variance neurons raises PPL less than
    random pruning of the same count per layer: change < control mean − 2 std."""
    _xfail_where_measured(request, model_id, PRUNING_MEASURED)
    control = pruning_finding.control
    assert pruning_finding.change < control.change_mean - 2 * control.change_std, pruning_finding


def test_pruning_snapshot(model_id, default_selection, pruning_finding, findings_snapshot):
    summary = {
        "ratio": pruning_finding.ratio,
        "n_pruned": pruning_finding.n_pruned,
        "pruned_by_class": pruning_finding.pruned_by_class,
        "ppl": pruning_finding.ppl,
        "control_ppl_mean": pruning_finding.control.ppl_mean,
        "control_ppl_std": pruning_finding.control.ppl_std,
    }
    assert summary == findings_snapshot


def test_ablation_figures(model_id, ablation_finding, pruning_finding, plots_dir):
    if plots_dir is None:
        pytest.skip("no --plots-dir given")
    written = [
        plot_ablation(ablation_finding, plot_path(plots_dir, "ablation", model_id)),
        plot_pruning(pruning_finding, plot_path(plots_dir, "pruning", model_id)),
    ]
    assert all(path.stat().st_size > 0 for path in written)
