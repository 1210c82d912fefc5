"""A Mamba and a Transformer side by side (METHODS.md §11), and the neuron-type overlap.

The comparison takes the first Mamba and the first Transformer of ``--models`` (by default
tiny-mamba and tiny-gpt2; ``--models mamba130m,gpt2`` compares the real ones) and reads both
models' statistics through the session (one test, two models; under xdist the cache's file
lock makes a worker wait for a pass another worker is computing)."""

from __future__ import annotations

import pytest

from neuronspec.analyses.comparison import family_rows, mean_estimate

pytestmark = pytest.mark.comparison


def _at_depth(comparison, model: str, family: str, min_depth: float) -> list[dict]:
    rows = family_rows(comparison.tables[family])[model]
    return [row for row in rows if row["relative_depth"] >= min_depth]


def test_comparison_snapshot(comparison, findings_snapshot):
    """Every family's table (relative depth, measures) of the two models must not drift."""
    name = "-vs-".join(comparison.models)  # one snapshot per pair of models
    assert comparison.snapshot_view() == findings_snapshot(name=name)


def test_mamba_sparser_than_transformer_in_deep_layers_by_gini(comparison):
    """Hypothesis: at relative depth ≥ 0.5, Mamba's ``mlp`` site (the gated SSM output) is
    sparser than the Transformer's post-GELU MLP by the per-token Gini, averaged over those
    layers: the difference's one-sided bound above 0 at α = 0.01 (window-group bootstrap
    SEs, combined as independent)."""
    mamba, transformer = comparison.models
    ginis = {m: mean_estimate(_at_depth(comparison, m, "sparsity", 0.5), "gini")
             for m in (mamba, transformer)}  # fmt: skip
    difference = ginis[mamba].minus(ginis[transformer])
    assert difference.above(0.0, alpha=0.01), (ginis, difference.interval(0.99))


def test_transformer_fires_fewer_neurons_per_token(comparison):
    """Hypothesis: a smaller fraction of the Transformer's MLP neurons fire (GELU input > 0)
    per token than of Mamba's gate channels (z > 0)."""
    rows = {
        row[0]: dict(zip(comparison.efficiency.columns, row, strict=True))
        for row in comparison.efficiency.rows
    }
    mamba, transformer = comparison.models
    fractions = {m: rows[m]["firing_fraction_per_token"] for m in (mamba, transformer)}
    assert fractions[transformer] < fractions[mamba], fractions


@pytest.mark.parametrize("family", ["mamba", "transformer"])
def test_gini_rises_with_depth(comparison, family, request):
    """Hypothesis: the per-token Gini of the ``mlp`` site rises from layer to layer: each
    consecutive difference above 0 at α = 0.01, Bonferroni over the L − 1 pairs."""
    model = comparison.models[0 if family == "mamba" else 1]
    if model == "tiny-gpt2":
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "measured on tiny-gpt2: Gini per layer 0.672, 0.806, 0.820, 0.693 (the last layer "
            "is less sparse)")))  # fmt: skip
    rows = sorted(family_rows(comparison.tables["sparsity"])[model], key=lambda r: r["layer"])
    ginis = [mean_estimate([row], "gini") for row in rows]
    alpha = 0.01 / max(len(rows) - 1, 1)  # Bonferroni over the consecutive pairs
    rises = [b.minus(a).above(0.0, alpha=alpha) for a, b in zip(ginis, ginis[1:], strict=False)]
    assert all(rises), [(g.value, g.se) for g in ginis]


def test_neuron_overlap_snapshot(model_id, default_selection, neuron_overlap, findings_snapshot):
    """Sizes, intersections and Jaccard of dead, rarely firing, token-detecting and positional
    neurons per layer must not drift."""
    assert neuron_overlap.snapshot_view() == findings_snapshot


def test_token_detectors_are_not_positional(model_id, neuron_overlap):
    """Hypothesis (Voita et al. §4–5 describe them as different neurons): no neuron is both
    token-detecting and positional."""
    both = {f.layer: f.intersections["positional&token_detecting"] for f in neuron_overlap}
    assert not any(both.values()), both
