"""Knowledge neurons (Dai et al. 2022; METHODS.md §8): integrated gradients on the ``mlp``
site at the last prompt position, refined sets (t = 0.2, p = 0.7), suppress/enhance with
unrelated-fact controls, intra- vs inter-relation overlap.

Facts: ``--facts FILE``, else the toy world for the embedded models and the shipped English
set for real models; ``--knowledge-facts-per-relation`` (default 3: 21 toy-world facts ×
3 training prompts) bounds the run; ``--ig-steps`` sets m (default 20).
"""

from __future__ import annotations

import pytest

from neuronspec.analyses.knowledge import knowledge_neurons
from neuronspec.data.facts import run_facts, select_per_relation
from neuronspec.models.registry import EMBEDDED_MODELS
from neuronspec.plots.figure import plot_path
from neuronspec.plots.knowledge import plot_attribution_heatmap, plot_interventions, plot_overlap

pytestmark = pytest.mark.knowledge

# Hypotheses measured not to hold with the default options (never tuned): model -> reason.
ENHANCE_DOES_NOT_HOLD = {
    "tiny-mamba": "measured (21 facts, m=20): mean relative change of P(gold) when the refined "
    "neurons are doubled is -0.0017 (control -0.0005); P(gold) is already ~0.999",
}


def _facts(config, model_id: str):
    option = config.getoption
    facts = run_facts(
        option("--facts"),
        embedded=model_id in EMBEDDED_MODELS,
        templates=option("--knowledge-templates"),
    )
    per_relation = option("--knowledge-facts-per-relation")
    return select_per_relation(facts, per_relation if per_relation > 0 else None)


@pytest.fixture(scope="session")
def knowledge_findings(request, neuronspec_session, model_id, loaded_model):
    """``(KnowledgeNeuronsFinding, [KnowledgeOverlapFinding per layer..., overall])``, recorded
    under ``knowledge_neurons`` and ``knowledge_overlap``; refined sets join the neuron-type
    overlap as ``knowledge`` (union over facts, per layer)."""
    summary, overlaps = knowledge_neurons(
        loaded_model.model,
        loaded_model.adapter,
        loaded_model.tokenizer,
        _facts(request.config, model_id),
        steps=request.config.getoption("--ig-steps"),
        top_k=neuronspec_session.config.top_k,
    )
    neuronspec_session.record(model_id, "knowledge_neurons", summary)
    for overlap in overlaps:
        neuronspec_session.record(model_id, "knowledge_overlap", overlap, layer=overlap.layer)
    for j, layer in enumerate(summary.facts[0].layers):
        union = set().union(*(set(f.refined[j]) for f in summary.facts))
        neuronspec_session.record_neuron_set(model_id, "knowledge", layer, union)
    return summary, overlaps


def test_knowledge_neurons_snapshot(
    model_id, default_selection, knowledge_findings, findings_snapshot
):
    """Refined-set sizes per fact and layer, the intervention means and the overlaps must not drift."""
    summary, overlaps = knowledge_findings
    finding = {
        "refined_sizes": {f.name: [len(r) for r in f.refined] for f in summary.facts},
        "means": {
            "n_with_refined": summary.n_with_refined,
            "suppress": summary.mean_suppress_change,
            "control_suppress": summary.mean_control_suppress_change,
            "enhance": summary.mean_enhance_change,
            "control_enhance": summary.mean_control_enhance_change,
        },
        "overlap": [o.to_json() for o in overlaps],
    }
    assert finding == findings_snapshot


def test_suppressing_refined_neurons_lowers_gold_probability_more_than_for_unrelated_facts(
    model_id, knowledge_findings
):
    """Dai et al. §4.3: zeroing a fact's knowledge neurons lowers the fact's probability,
    and lowers unrelated facts' probabilities less (mean relative change over facts)."""
    summary, _ = knowledge_findings
    own, control = summary.mean_suppress_change, summary.mean_control_suppress_change
    assert own < 0 and own < control, (own, control, summary.n_with_refined)


def test_enhancing_refined_neurons_raises_gold_probability(request, model_id, knowledge_findings):
    """Dai et al. §4.3: doubling a fact's knowledge neurons raises the fact's probability."""
    if model_id in ENHANCE_DOES_NOT_HOLD:
        request.applymarker(pytest.mark.xfail(strict=True, reason=ENHANCE_DOES_NOT_HOLD[model_id]))
    summary, _ = knowledge_findings
    own, control = summary.mean_enhance_change, summary.mean_control_enhance_change
    assert own > 0 and own > control, (own, control, summary.n_with_refined)


def test_intra_relation_overlap_exceeds_inter_relation_overlap(model_id, knowledge_findings):
    """Dai et al. §4.2: facts of one relation share more knowledge neurons than facts of
    different relations (overall Jaccard over (layer, neuron) pairs)."""
    _, overlaps = knowledge_findings
    overall = overlaps[-1]
    assert overall.layer is None
    assert overall.intra_jaccard > overall.inter_jaccard, overall


def test_knowledge_figures(model_id, knowledge_findings, plots_dir):
    """The attribution heatmap of the fact with the largest refined set, overlap per layer,
    and suppress/enhance effects with their controls."""
    if plots_dir is None:
        pytest.skip("no --plots-dir given")
    summary, overlaps = knowledge_findings
    fact = max(summary.facts, key=lambda f: f.n_refined)
    written = [
        plot_attribution_heatmap(fact, plot_path(plots_dir, "knowledge_attribution", model_id)),
        plot_overlap(overlaps, plot_path(plots_dir, "knowledge_overlap", model_id)),
        plot_interventions(summary, plot_path(plots_dir, "knowledge_interventions", model_id)),
    ]
    assert all(path.stat().st_size > 0 for path in written)
