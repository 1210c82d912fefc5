"""Mamba's hidden attention, rollouts and attention neurons (METHODS §7; Ali, Zimerman, Wolf
2024), with GPT-2's real attention as the counterpart."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.attention


def _layer_finding(run, layer):
    return next(f for f in run.layer_findings if f.layer == layer)


def test_hidden_attention_is_causal_and_exact(model_id, layer, model_files, hidden_attention):
    """α̃ is zero above the diagonal, Σ_j α̃ x equals the scan output before the skip and the
    gate, and out_proj(((α̃x) + D⊙x) ⊙ SiLU(z)) equals the mixer output, on the run's model
    and prompts (float32 runs: to 1e-5 relative; the float64 identity is a unit test)."""
    if model_files.model_type != "mamba":
        pytest.skip("hidden attention is Mamba's; GPT-2 attention is causal by its mask")
    finding = _layer_finding(hidden_attention, layer)
    assert finding.above_diagonal_max == 0.0, finding
    assert finding.identity_rel_error < 1e-5, finding
    assert finding.mixer_rel_error < 1e-5, finding


# measured: mean over the 182 toy-world fact prompts of the per-token relevance
SUBJECT_RELEVANCE = [
    pytest.param("rollout", marks=pytest.mark.measured({
        "tiny-mamba": "clamped mean α̃, unit rows: subject 0.0411 < template 0.0917 per "
        "token; subject higher on 22% of prompts",
    })),
    pytest.param("gradient_rollout", marks=pytest.mark.measured({
        "tiny-mamba": "min-max, unit rows: subject 0.0733 < template 0.1094 per token; "
        "subject higher on 20% of prompts",
    })),
]  # fmt: skip


@pytest.mark.parametrize("method", SUBJECT_RELEVANCE)
def test_rollout_prefers_subject_tokens_on_fact_prompts(
    model_id, model_files, hidden_attention, method
):
    """On toy-world fact prompts ("The capital of Velmora is"), the last token's rollout
    relevance per token is higher on the subject's tokens than on the template's other tokens
    (BOS and the last token excluded)."""
    if method == "gradient_rollout" and model_files.model_type != "mamba":
        pytest.skip("the gradient-guided rollout is defined on Mamba's hidden attention")
    finding = next(f for f in hidden_attention.fact_relevance if f.method == method)
    assert finding.mean_subject > finding.mean_template, finding


def test_rollout_rows_are_distributions(model_id, hidden_attention):
    """Each rollout's last-token relevance sums to 1 over the prompt (row-stochastic product)."""
    for method, relevance in hidden_attention.relevance.items():
        assert abs(relevance.sum(-1) - 1).max() < 1e-4, method


def test_attention_neuron_summaries_snapshot(
    model_id, default_selection, hidden_attention, findings_snapshot
):
    """Per (method, layer): neurons analysed, top neurons, diversity, must not drift."""
    assert hidden_attention.snapshot_view() == findings_snapshot
