"""The figures of each finding fixture, drawn by the plugin when the finding is computed.

One function per fixture (:data:`FIGURES`, keyed by the fixture's name): it takes the
finding as the fixture returns it, the model id, ``--plots-dir`` and what else the figure
needs (the statistics, the tokenizer), and returns the paths it wrote. Specs draw nothing;
a figure error is an error of the fixture, so every spec that uses the finding shows it.
File names are those the report assigns to its sections (``report.html.assign_figures``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from neuronspec.plots.figure import plot_path


def draw_dead(finding, model_id: str, plots_dir: Path, **_: Any) -> list[Path]:
    """Voita et al. Fig. 1: the dead fraction per layer."""
    from neuronspec.plots.dead import plot_dead_neurons

    return [
        plot_dead_neurons({model_id: finding}, plot_path(plots_dir, "fig1_dead_neurons", model_id))
    ]


def draw_ngram(finding, model_id: str, plots_dir: Path, **_: Any) -> list[Path]:
    """Voita et al. Fig. 2 (covering unigrams), 3a/3b (detectors, detected tokens), 4 (new
    tokens per layer)."""
    from neuronspec.plots.voita import (
        plot_covering_bins,
        plot_detected_tokens,
        plot_new_tokens,
        plot_token_detectors,
    )

    summary = finding.summary  # an NgramFindings
    return [
        plot_covering_bins(finding, plot_path(plots_dir, "fig2_covering_unigrams", model_id)),
        plot_token_detectors(summary, plot_path(plots_dir, "fig3a_token_detectors", model_id)),
        plot_detected_tokens(summary, plot_path(plots_dir, "fig3b_detected_tokens", model_id)),
        plot_new_tokens(summary, plot_path(plots_dir, "fig4_new_tokens", model_id)),
    ]


def draw_positional(
    finding, model_id: str, plots_dir: Path, *, neuron_stats, **_: Any
) -> list[Path]:
    """Firing frequency against position for the layer with most positional neurons, and
    I(act; pos) against the mean |Pearson r| for every neuron of each layer."""
    from neuronspec.analyses.positional import positional_measures
    from neuronspec.plots.voita import plot_positional, plot_positional_measures

    busiest = max(finding, key=lambda f: (f.n_positional, -f.layer))
    return [
        plot_positional(
            busiest, plot_path(plots_dir, f"positional_layer{busiest.layer}", model_id), top_k=6
        ),
        plot_positional_measures(
            {f.layer: positional_measures(neuron_stats, f.layer) for f in finding},
            plot_path(plots_dir, "positional_measures", model_id),
            model=model_id,
            threshold=finding[0].threshold,
        ),
    ]


def draw_sparsity(finding, model_id: str, plots_dir: Path, **_: Any) -> list[Path]:
    from neuronspec.plots.sparsity import plot_percentile_profile, plot_sparsity

    return [
        plot_sparsity({model_id: finding}, plot_path(plots_dir, "sparsity", model_id)),
        plot_percentile_profile({model_id: finding}, plot_path(plots_dir, "percentiles", model_id)),
    ]


def draw_efficiency(finding, model_id: str, plots_dir: Path, **_: Any) -> list[Path]:
    """The efficiency row as a table, with the measured throughput."""
    from neuronspec.plots.sparsity import plot_table

    found, throughput = finding
    row = found.to_json() | {
        "tokens/s": f"{throughput.tokens_per_second:.0f} ({throughput.device}, {throughput.dtype})"
    }
    del row["firing_fraction_by_layer"]
    path = plot_path(plots_dir, "efficiency", model_id)
    return [plot_table(list(row), [list(row.values())], path, f"Efficiency, {model_id}")]


def draw_delta_sensitive(finding, model_id: str, plots_dir: Path, **_: Any) -> list[Path]:
    from neuronspec.plots.attention import plot_delta_ranking

    first = finding.findings[0]
    return [
        plot_delta_ranking(
            finding.variance,
            finding.perturbation,
            plot_path(plots_dir, f"{first.kind}_ranking", model_id),
            title=f"{model_id}: {first.kind} channels ({first.site} site)",
        )
    ]


def draw_hidden_attention(
    finding, model_id: str, plots_dir: Path, *, tokenizer, **_: Any
) -> list[Path]:
    """α̃ heatmap per layer (prompt 0), last-token rollout relevance per method, and the
    six-panel figure of every (method, layer) of attention neurons."""
    from neuronspec.plots.attention import (
        plot_attention_neurons,
        plot_hidden_attention,
        plot_rollout_relevance,
    )

    ids = finding.prompts[0].tolist()
    tokens = (
        tokenizer.convert_ids_to_tokens(ids) if tokenizer is not None else [str(i) for i in ids]
    )
    kind = "channel-mean α̃" if finding.family == "mamba" else "mean-over-heads attention"
    written = [
        plot_hidden_attention(
            attention,
            tokens,
            plot_path(plots_dir, f"hidden_attention_layer{layer}", model_id),
            title=f"{model_id} layer {layer}: {kind}, prompt 0",
        )
        for layer, attention in finding.mean_attention.items()
    ]
    written.append(
        plot_rollout_relevance(
            {method: values[0] for method, values in finding.relevance.items()},
            tokens,
            plot_path(plots_dir, "rollout_relevance", model_id),
            title=f"{model_id}: last-token rollout relevance, prompt 0",
        )
    )
    for neurons in finding.neuron_findings:
        scores = finding.scores[neurons.method, neurons.layer]
        name = f"attention_neurons_{neurons.method}_layer{neurons.layer}"
        written.append(
            plot_attention_neurons(scores, neurons, plot_path(plots_dir, name, model_id))
        )
    return written


def draw_ablation(finding, model_id: str, plots_dir: Path, **_: Any) -> list[Path]:
    from neuronspec.plots.ablation import plot_ablation

    return [plot_ablation(finding, plot_path(plots_dir, "ablation", model_id))]


def draw_pruning(finding, model_id: str, plots_dir: Path, **_: Any) -> list[Path]:
    from neuronspec.plots.ablation import plot_pruning

    return [plot_pruning(finding, plot_path(plots_dir, "pruning", model_id))]


def _causal_figures(name: str, cross_name: str) -> Callable[..., list[Path]]:
    def draw(finding, model_id: str, plots_dir: Path, **_: Any) -> list[Path]:
        from neuronspec.plots.ablation import plot_causal_neurons, plot_cross_layer

        return [
            plot_causal_neurons(finding, plot_path(plots_dir, name, model_id)),
            plot_cross_layer(finding, plot_path(plots_dir, cross_name, model_id)),
        ]

    draw.__doc__ = f"KL impact per layer ({name}) and the cross-layer impact ({cross_name})."
    return draw


def draw_knowledge_neurons(finding, model_id: str, plots_dir: Path, **_: Any) -> list[Path]:
    """The attribution heatmap of the fact with the largest refined set, the overlap per
    layer, and the suppress/enhance effects with their controls."""
    from neuronspec.plots.knowledge import (
        plot_attribution_heatmap,
        plot_interventions,
        plot_overlap,
    )

    summary, overlaps = finding
    fact = max(summary.facts, key=lambda f: f.n_refined)
    return [
        plot_attribution_heatmap(fact, plot_path(plots_dir, "knowledge_attribution", model_id)),
        plot_overlap(overlaps, plot_path(plots_dir, "knowledge_overlap", model_id)),
        plot_interventions(summary, plot_path(plots_dir, "knowledge_interventions", model_id)),
    ]


def draw_comparison(finding, model_id: str, plots_dir: Path, *, models, **_: Any) -> list[Path]:
    """Measures against relative depth and the table of each family of measures, and the
    efficiency table, for the compared pair."""
    from neuronspec.analyses.comparison import FAMILIES, family_rows
    from neuronspec.plots.sparsity import plot_measures_vs_depth, plot_table

    name = "_vs_".join(m.replace("/", "_") for m in models)
    title = " vs ".join(models)
    written = []
    for family, measures in FAMILIES.items():
        table = finding.tables[family]
        written.append(
            plot_measures_vs_depth(
                family_rows(table),
                measures,
                plots_dir / f"comparison_{family}_{name}.png",
                f"{family}: {title}",
            )  # fmt: skip
        )
        written.append(
            plot_table(
                table.columns,
                table.rows,
                plots_dir / f"comparison_{family}_table_{name}.png",
                f"{family}: {title}",
            )  # fmt: skip
        )
    written.append(
        plot_table(
            finding.efficiency.columns,
            finding.efficiency.rows,
            plots_dir / f"comparison_efficiency_table_{name}.png",
            "efficiency",
        )  # fmt: skip
    )
    return written


FIGURES: dict[str, Callable[..., list[Path]]] = {
    "dead": draw_dead,
    "ngram": draw_ngram,
    "positional": draw_positional,
    "sparsity": draw_sparsity,
    "efficiency": draw_efficiency,
    "delta_sensitive": draw_delta_sensitive,
    "hidden_attention": draw_hidden_attention,
    "ablation": draw_ablation,
    "pruning": draw_pruning,
    "causal": _causal_figures("causal_neurons", "cross_layer"),
    "causal_delta_sensitive": _causal_figures(
        "causal_delta_sensitive", "cross_layer_delta_sensitive"
    ),
    "knowledge_neurons": draw_knowledge_neurons,
    "comparison": draw_comparison,  # model_id: the pair, models=(mamba, transformer)
}


def draw_figures(session, fixture: str, model_id: str, finding, **context: Any) -> list[Path]:
    """The figures of ``fixture``'s finding in ``--plots-dir`` (none without it)."""
    plots_dir = session.config.plots_dir
    if plots_dir is None:
        return []
    plots_dir.mkdir(parents=True, exist_ok=True)
    return FIGURES[fixture](finding, model_id, plots_dir, **context)
