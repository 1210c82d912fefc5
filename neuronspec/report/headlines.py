"""Headline numbers of an analysis: one line per model for the terminal summary and the
report. A new analysis gets a headline by one entry: ``@headline("my_analysis")`` on a
function ``(layers, tokens) -> str`` where ``layers`` is the analysis' ``{layer key:
finding}`` from the results file and ``tokens(id)`` gives a token's text.

Analyses without an entry are listed by name ("also recorded"), and the report renders
their findings generically.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from neuronspec.report.results import layer_sort_key

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


def _percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "n/a"


@headline("dead")
def _dead(layers: dict[str, Any], tokens: TokenText) -> str:
    found = _per_layer(layers)
    n_dead = sum(f["n_dead"] for f in found)
    n_neurons = sum(f["n_neurons"] for f in found)
    rare = sum(f["rare_fraction"] * f["n_neurons"] for f in found)
    return (
        f"{n_dead} of {n_neurons} neurons dead ({_percent(n_dead, n_neurons)}), "
        f"rarely firing {_percent(rare, n_neurons)}; dead by layer {_by_layer([f['n_dead'] for f in found])}"
    )


@headline("ngram", "token detectors")
def _ngram(layers: dict[str, Any], tokens: TokenText) -> str:
    found = _per_layer(layers)
    n_detectors = sum(f["n_token_detectors"] for f in found)
    detected = sorted({t for f in found for t in f.get("detected_tokens", [])})
    shown = ", ".join(tokens(t) for t in detected[:8]) + (", …" if len(detected) > 8 else "")
    text = (
        f"{n_detectors} token-detecting neurons, by layer "
        f"{_by_layer([f['n_token_detectors'] for f in found])}; {len(detected)} tokens detected"
    )
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
