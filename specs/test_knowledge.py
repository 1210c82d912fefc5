"""Knowledge neurons (Dai et al. 2022; METHODS.md §8): integrated gradients on the ``mlp``
site at the last prompt position, refined sets (t = 0.2, p = 0.7), suppress/enhance with
unrelated-fact controls, intra- vs inter-relation overlap.

Facts: ``--facts FILE``, else the toy world for the embedded models and the shipped English
set for real models; ``--knowledge-facts-per-relation`` (default 3: 21 toy-world facts ×
3 training prompts) bounds the run; ``--ig-steps`` sets m (default 20).
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.knowledge


def test_knowledge_neurons_snapshot(
    model_id, default_selection, knowledge_neurons, findings_snapshot
):
    """Refined-set sizes per fact and layer, the intervention means and the overlaps must not drift."""
    assert knowledge_neurons.snapshot_view() == findings_snapshot


def test_suppressing_refined_neurons_lowers_gold_probability_more_than_for_unrelated_facts(
    model_id, knowledge_neurons
):
    """Dai et al. §4.3: zeroing a fact's knowledge neurons lowers the fact's probability,
    and lowers unrelated facts' probabilities less: own − control change per fact, paired
    sign-flip test over facts at α = 0.01."""
    summary, _ = knowledge_neurons
    assert summary.mean_suppress_change < 0, summary.mean_suppress_change
    assert summary.suppress_exceeds_control(alpha=0.01), (
        summary.suppress_difference, summary.suppress_p_value, summary.n_with_refined,
    )  # fmt: skip


@pytest.mark.measured({
    "tiny-gpt2": "(21 facts, m=20): doubling the refined neurons changes P(gold) by "
    "+0.018% (controls -0.036%); own - control +0.054% +- 0.035% (SE), sign-flip p = 0.076",
    "tiny-mamba": "(15 facts with refined neurons, m=20): doubling them changes P(gold) by "
    "-0.17% (controls -0.05%), p = 0.75; P(gold) is already ~0.999",
})  # fmt: skip
def test_enhancing_refined_neurons_raises_gold_probability(model_id, knowledge_neurons):
    """Dai et al. §4.3: doubling a fact's knowledge neurons raises the fact's probability,
    more than its controls' (paired sign-flip test over facts at α = 0.01)."""
    summary, _ = knowledge_neurons
    assert summary.mean_enhance_change > 0, summary.mean_enhance_change
    assert summary.enhance_exceeds_control(alpha=0.01), (
        summary.enhance_difference, summary.enhance_p_value, summary.n_with_refined,
    )  # fmt: skip


def test_intra_relation_overlap_exceeds_inter_relation_overlap(model_id, knowledge_neurons):
    """Dai et al. §4.2: facts of one relation share more knowledge neurons than facts of
    different relations (overall Jaccard over (layer, neuron) pairs)."""
    _, overlaps = knowledge_neurons
    overall = overlaps[-1]
    assert overall.layer is None
    assert overall.intra_jaccard > overall.inter_jaccard, overall
