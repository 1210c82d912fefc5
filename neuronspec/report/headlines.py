"""Headline numbers of an analysis: one line per model for the terminal summary and the
report. A new analysis gets a headline by one entry: ``@headline("my_analysis")`` on a
function ``(layers, tokens) -> str`` where ``layers`` is the analysis' ``{layer key:
finding}`` from the results file and ``tokens(id)`` gives a token's text.

Analyses without an entry are listed by name ("also recorded"), and the report renders
their findings generically.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from neuronspec.report.results import layer_sort_key
from neuronspec.uncertainty import t_quantile

TokenText = Callable[[int], str]
Headline = Callable[[dict[str, Any], TokenText], str]

HEADLINES: dict[str, tuple[str, Headline]] = {}  # analysis -> (label, headline function)


def headline(analysis: str, label: str | None = None) -> Callable[[Headline], Headline]:
    """Register the headline of ``analysis`` (shown as ``label``, default the analysis name)."""

    def register(function: Headline) -> Headline:
        HEADLINES[analysis] = (label or analysis, function)
        return function

    return register


def _per_layer(layers: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        layers[key]
        for key in sorted(layers, key=layer_sort_key)
        if key != "all" and isinstance(layers[key], dict)
    ]


def _by_layer(values: list[int]) -> str:
    return "/".join(str(v) for v in values)


def _plus_minus(finding: dict[str, Any], name: str, digits: int, scale: float = 1.0) -> str:
    """``value ± half-width`` of the 95% interval (Student-t with the finding's ``se_df``),
    or the value alone when the finding has no SE of ``name``."""
    value = f"{scale * finding[name]:.{digits}f}"
    se = finding.get(f"{name}_se")
    if se is None:
        return value
    return f"{value} ± {scale * t_quantile(0.975, finding.get('se_df')) * se:.{digits}f}"


def _percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "n/a"


@headline("dead")
def _dead(layers: dict[str, Any], tokens: TokenText) -> str:
    found = _per_layer(layers)
    n_dead = sum(f["n_dead"] for f in found)
    n_neurons = sum(f["n_neurons"] for f in found)
    rare = sum(f["rare_fraction"] * f["n_neurons"] for f in found)
    text = (
        f"{n_dead} of {n_neurons} neurons dead ({_percent(n_dead, n_neurons)}), "
        f"rarely firing {_percent(rare, n_neurons)}; dead by layer {_by_layer([f['n_dead'] for f in found])}"
    )
    if all(f.get("dead_fraction_se") is not None for f in found):
        dead = ", ".join(_plus_minus(f, "dead_fraction", 2, 100) for f in found)
        rare = ", ".join(_plus_minus(f, "rare_fraction", 2, 100) for f in found)
        alive = ", ".join(_plus_minus(f, "mean_alive_frequency", 4) for f in found)
        text += (
            f"; by layer, with 95% intervals (window-group bootstrap): dead % [{dead}], "
            f"rarely firing % [{rare}], mean alive firing frequency [{alive}]"
        )
    return text


@headline("ngram", "token detectors")
def _ngram(layers: dict[str, Any], tokens: TokenText) -> str:
    found = _per_layer(layers)
    n_detectors = sum(f["n_token_detectors"] for f in found)
    detected = sorted({t for f in found for t in f.get("detected_tokens", [])})
    shown = ", ".join(tokens(t) for t in detected[:8]) + (", …" if len(detected) > 8 else "")
    text = f"{n_detectors} token-detecting neurons, by layer "
    text += _by_layer([f["n_token_detectors"] for f in found])
    if found and all(f.get("n_token_detectors_se") is not None for f in found):  # opt-in
        with_errors = ", ".join(_plus_minus(f, "n_token_detectors", 1) for f in found)
        text += f" (95% [{with_errors}])"
    text += f"; {len(detected)} tokens detected"
    return text + (f": {shown}" if detected else "")


@headline("token_detector_summary", "detected tokens")
def _token_detector_summary(layers: dict[str, Any], tokens: TokenText) -> str:
    summary = layers["all"]
    return (
        f"distinct tokens with a detector by layer {_by_layer(summary['n_tokens'])}, "
        f"cumulative {_by_layer(summary['n_tokens_cumulative'])}, "
        f"new overall {_by_layer(summary['n_new_overall'])}"
    )


@headline("positional")
def _positional(layers: dict[str, Any], tokens: TokenText) -> str:
    found = _per_layer(layers)
    counts = [f["n_positional"] for f in found]
    threshold = found[0]["threshold"] if found else float("nan")
    busiest = max(found, key=lambda f: (f["n_positional"], -f["layer"])) if found else None
    text = (
        f"{sum(counts)} positional neurons (I > {threshold:g} nats), by layer {_by_layer(counts)}"
    )
    if found and all(f.get("n_positional_se") is not None for f in found):
        with_errors = ", ".join(_plus_minus(f, "n_positional", 1) for f in found)
        text += f" (95% [{with_errors}])"
    if busiest is not None and busiest["n_positional"]:
        text += f"; most in layer {busiest['layer']}"
    return text


@headline("neuron_sets", "neuron sets")
def _neuron_sets(layers: dict[str, Any], tokens: TokenText) -> str:
    sizes: dict[str, int] = {}
    for key in sorted(layers, key=layer_sort_key):
        for kind, entry in layers[key].items():
            sizes[kind] = sizes.get(kind, 0) + len(entry.get("neurons", []))
    return ", ".join(f"{kind} {n}" for kind, n in sorted(sizes.items())) or "none"


@headline("delta_sensitive", "delta-sensitive")
def _delta_sensitive(layers: dict[str, Any], tokens: TokenText) -> str:
    found = _per_layer(layers)
    if not found:
        return "no layers"
    kind, site = found[0]["kind"], found[0]["site"]
    overlaps = _by_layer([f["top_overlap"] for f in found])
    correlations = "/".join(f"{f['rank_correlation']:.2f}" for f in found)
    return (
        f"{kind} ({site} site): top-{len(found[0]['top_by_variance'])} by variance per layer; "
        f"overlap with the perturbation top by layer {overlaps}; rank correlation {correlations}"
    )


@headline("hidden_attention", "hidden attention")
def _hidden_attention(layers: dict[str, Any], tokens: TokenText) -> str:
    found = _per_layer(layers)
    parts = []
    if found:
        shares = "/".join(f"{f['diagonal_share']:.2f}" for f in found)
        parts.append(f"α̃ diagonal share by layer {shares}")
    for method, fact in sorted(layers.get("all", {}).get("fact_relevance", {}).items()):
        parts.append(
            f"{method} relevance subject {fact['mean_subject']:.3g} vs template "
            f"{fact['mean_template']:.3g} ({fact['n_prompts']} fact prompts)"
        )
    return "; ".join(parts) or "recorded"


@headline("attention_neurons", "attention neurons")
def _attention_neurons(layers: dict[str, Any], tokens: TokenText) -> str:
    found = _per_layer(layers)
    methods = sorted({method for f in found for method in f})
    parts = []
    for method in methods:
        ratios = [f[method]["diversity"] / f[method]["max_diversity"] for f in found if method in f]
        parts.append(f"{method} diversity/max {min(ratios):.2f}-{max(ratios):.2f}")
    return f"{len(found)} layers; " + "; ".join(parts)


def _random_control(control: dict[str, Any]) -> str:
    """A random control's PPL change: mean ± std over its seeds, in percent."""
    return f"random {100 * control['change_mean']:+.3f}% ± {100 * control['change_std']:.3f}%"


def _interval_text(effect: dict[str, Any]) -> str:
    low, high = (
        100 * math.expm1(math.log1p(effect["change"]) + sign * 1.959964 * effect["log_ratio_se"])
        for sign in (-1, 1)
    )
    return f"{low:+.3f}%, {high:+.3f}%"


def _controlled(effect: dict[str, Any]) -> str:
    """A change with its 95% interval, next to its random control with the p-value."""
    text = f"{100 * effect['change']:+.3f}% [95% {_interval_text(effect)}]"
    if effect.get("control"):
        seeds = len(effect["control"]["seeds"])
        text += (
            f" vs {_random_control(effect['control'])} (p = {effect['p_value']:.3f}, {seeds} seeds)"
        )
    return text


@headline("ablation")
def _ablation(layers: dict[str, Any], tokens: TokenText) -> str:
    study = layers["all"]
    parts = [f"baseline PPL {study['baseline_ppl']:.4f}"]
    for c in study["conditions"]:
        parts.append(f"{c['name']} ({c['n_neurons']}) {_controlled(c)}")
    return "; ".join(parts)


@headline("pruning")
def _pruning(layers: dict[str, Any], tokens: TokenText) -> str:
    found = layers["all"]
    return (
        f"{found['n_pruned']} neurons pruned ({100 * found['ratio']:.0f}% per layer, "
        f"{found['n_protected']} protected): PPL {_controlled(found)}"
    )


@headline("causal")
def _causal(layers: dict[str, Any], tokens: TokenText) -> str:
    found = layers["all"]
    counts = [len(layer["causal_neurons"]) for layer in found["layers"]]
    p_values = ", ".join(f"{layer['rank_sum_p_value']:.2g}" for layer in found["layers"])
    n_controls = len(found["layers"][0]["control_neurons"]) if found["layers"] else 0
    rho = ", ".join(
        "n/a"
        if layer["screen_rank_correlation"] is None
        else f"{layer['screen_rank_correlation']:.2f}"
        for layer in found["layers"]
    )
    return (
        f"causal neurons (p <= 0.01 each) by layer {_by_layer(counts)} (candidates: the KL "
        f"screen's top-{found['top_k']} by KL and by residual share, vs {n_controls} random "
        f"neurons, rank-sum p by layer {p_values}; screen vs exact Spearman rho by layer "
        f"{rho}; "
        f"{found['method']} intervention on {found['site']})"
    )


@headline("knowledge_neurons", "knowledge neurons")
def _knowledge_neurons(layers: dict[str, Any], tokens: TokenText) -> str:
    found = layers["all"]
    return (
        f"{found['n_with_refined']} of {found['n_facts']} facts with refined neurons "
        f"(mean {found['mean_refined_size']:.2f}); suppress {100 * found['mean_suppress_change']:+.2f}% "
        f"vs control {100 * found['mean_control_suppress_change']:+.2f}% "
        f"(p = {found['suppress_p_value']:.3g}), enhance {100 * found['mean_enhance_change']:+.2f}% "
        f"vs {100 * found['mean_control_enhance_change']:+.2f}% (p = {found['enhance_p_value']:.3g}; "
        "paired sign-flip over facts)"
    )


@headline("knowledge_overlap", "knowledge overlap")
def _knowledge_overlap(layers: dict[str, Any], tokens: TokenText) -> str:
    found = layers["all"]

    def jaccard(kind: str) -> str:
        pairs = found[f"n_{kind}_pairs"]
        if not pairs:  # the mean of no pairs is NaN, recorded as the string "nan"
            return "undefined (no pairs)"
        return f"{float(found[f'{kind}_jaccard']):.3f} ({pairs} pairs)"

    return f"Jaccard intra-relation {jaccard('intra')} vs inter-relation {jaccard('inter')}"


@headline("sparsity")
def _sparsity(layers: dict[str, Any], tokens: TokenText) -> str:
    found = _per_layer(layers)
    if not found:
        return "no layers"
    sparsity = ", ".join(_plus_minus(f, "threshold_sparsity", 3) for f in found)
    gini = ", ".join(_plus_minus(f, "gini", 3) for f in found)
    hoyer = ", ".join(_plus_minus(f, "hoyer", 3) for f in found)
    return (
        f"threshold sparsity by layer [{sparsity}] (τ = {found[0]['tau']:g}); Gini [{gini}]; "
        f"Hoyer [{hoyer}] (95% where shown)"
    )


@headline("efficiency")
def _efficiency(layers: dict[str, Any], tokens: TokenText) -> str:
    found = layers["all"]
    flops = found["matmul_flops_per_token"] + found["other_flops_per_token"]
    return (
        f"{found['n_parameters']:,} parameters, {flops:,} FLOPs/token, "
        f"{100 * found['firing_fraction_per_token']:.1f}% of neurons fire per token"
    )


def headlines_of(
    analyses: dict[str, Any], tokens: TokenText
) -> tuple[list[tuple[str, str, str]], list[str]]:
    """``([(analysis, label, line)], [analyses without a headline])`` of one model.

    A headline function that fails on an unexpected shape (e.g. an older results file)
    gives a line saying so, never a crash of the summary.
    """
    lines, others = [], []
    for analysis in [*HEADLINES, *sorted(set(analyses) - set(HEADLINES))]:
        if analysis not in analyses:
            continue
        if analysis not in HEADLINES:
            others.append(analysis)
            continue
        label, function = HEADLINES[analysis]
        try:
            text = function(analyses[analysis], tokens)
        except (KeyError, TypeError, ValueError, IndexError) as error:
            text = f"(no headline: unexpected finding shape, {type(error).__name__}: {error})"
        lines.append((analysis, label, text))
    return lines, others
