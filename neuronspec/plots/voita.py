"""Figures of Voita, Ferrando, Nalmpantis (2023) §4–5 from neuronspec findings.

Fig. 2 (alive neurons binned by covering-unigram count), Fig. 3a (token-detecting neurons
per layer), Fig. 3b (distinct tokens with a detector, per layer and cumulative), Fig. 4
(tokens new overall and new versus the previous layer) and firing frequency against position
for positional neurons. Every function takes findings and an output path, writes one PNG and
returns the path. Given one model the x-axis is the layer; given several, the models are
overlaid against relative depth l/(L-1).

Matplotlib is used through ``Figure`` objects and the Agg canvas, never ``pyplot``, so no
global backend or figure state is touched.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from neuronspec.analyses.ngram import NgramLayerFinding, TokenDetectorSummary
from neuronspec.analyses.positional import PositionalLayerFinding
from neuronspec.errors import NeuronSpecError
from neuronspec.plots.figure import new_figure, save_figure
from neuronspec.uncertainty import t_quantile

if TYPE_CHECKING:
    from matplotlib.axes import Axes


class PlotInputError(NeuronSpecError, ValueError):
    """Findings that cannot be drawn together (none given, mixed models in one series, …)."""


def _as_list(items, kind: str) -> list:
    listed = [items] if not isinstance(items, Sequence) else list(items)
    if not listed:
        raise PlotInputError(f"no {kind} to plot")
    return listed


def _x_values(summary: TokenDetectorSummary, overlay: bool) -> list[float]:
    return summary.relative_depth if overlay else [float(layer) for layer in summary.layers]


def _x_label(overlay: bool) -> str:
    return "relative depth l/(L-1)" if overlay else "layer"


def _bin_lower(label: str) -> int:
    return int(re.match(r"\d+", label).group())  # "2-5" -> 2, "501+" -> 501


# --------------------------------------------------------------------------- Fig. 2


def plot_covering_bins(
    findings: Sequence[NgramLayerFinding],
    path: str | Path,
    *,
    depth_fraction: float = 0.5,
) -> Path:
    """Fig. 2: stacked bars of alive neurons per covering-unigram bin against layer.

    Only layers l < ceil(depth_fraction·L) are drawn (the first half by default). Findings of
    several models give one panel per model, with the layer axis as relative depth.
    """
    if not 0 < depth_fraction <= 1:
        raise PlotInputError(f"depth_fraction must be in (0, 1], got {depth_fraction}")
    by_model: dict[str, list[NgramLayerFinding]] = {}
    for finding in _as_list(findings, "n-gram findings"):
        by_model.setdefault(finding.model, []).append(finding)
    overlay = len(by_model) > 1
    fig = new_figure(5.0 * len(by_model) + 1.5, 4.2)
    axes = fig.subplots(1, len(by_model), squeeze=False, sharey=True)[0]
    labels = sorted(
        {label for fs in by_model.values() for f in fs for label in f.covering_histogram},
        key=_bin_lower,
    )
    colors = _bin_colors(len(labels))
    for ax, (model, model_findings) in zip(axes, by_model.items(), strict=True):
        n_layers = model_findings[0].n_layers
        shown = sorted(
            (f for f in model_findings if f.layer < np.ceil(depth_fraction * n_layers)),
            key=lambda f: f.layer,
        )
        if not shown:
            raise PlotInputError(f"{model}: no layer below {depth_fraction:g} of the depth")
        x = np.array([f.relative_depth if overlay else f.layer for f in shown], dtype=float)
        width = 0.8 * (np.min(np.diff(x)) if len(x) > 1 else 1.0)
        bottom = np.zeros(len(shown))
        for label, color in zip(labels, colors, strict=True):
            heights = np.array([f.covering_histogram.get(label, 0) for f in shown], dtype=float)
            ax.bar(x, heights, width, bottom=bottom, color=color, label=label)
            bottom += heights
        ax.set_title(model)
        ax.set_xlabel(_x_label(overlay))
        if not overlay:
            _integer_ticks(ax)
    axes[0].set_ylabel("alive neurons")
    handles, legend_labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles[::-1],  # top of the stack first
        legend_labels[::-1],
        title="unigrams covering\n95% of firings",
        fontsize="small",
        loc="outside right upper",
    )
    depth = "all layers" if depth_fraction == 1 else f"layers in the first {depth_fraction:.0%}"
    fig.suptitle(f"Alive neurons by number of unigrams covering their firings ({depth})")
    return save_figure(fig, path)


def _integer_ticks(ax: Axes) -> None:
    """Layer numbers on the x axis: integer ticks only."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _bin_colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


# --------------------------------------------------------------------------- Fig. 3, 4


def _line_figure(
    summaries: TokenDetectorSummary | Sequence[TokenDetectorSummary],
    path: str | Path,
    *,
    series: Sequence[tuple[str, str, str]],
    title: str,
    y_label: str,
) -> Path:
    """Lines of the named summary fields; ``series`` = (field, legend suffix, line style)."""
    listed: list[TokenDetectorSummary] = _as_list(summaries, "token-detector summaries")
    overlay = len(listed) > 1
    fig = new_figure(6.4, 4.4)
    ax: Axes = fig.subplots()
    for index, summary in enumerate(listed):
        color = f"C{index % 10}"
        x = _x_values(summary, overlay)
        for field, suffix, style in series:
            label = f"{summary.model}{': ' + suffix if suffix else ''}"
            errors = getattr(summary, f"{field}_se", None)  # 95% bars where the SE is known
            if errors is not None:
                errors = [t_quantile(0.975, summary.se_df) * e for e in errors]
            values = getattr(summary, field)
            ax.errorbar(x, values, yerr=errors, fmt=style, color=color, marker="o", ms=3,
                        capsize=3, label=label)  # fmt: skip
    ax.set_xlabel(_x_label(overlay))
    ax.set_ylabel(y_label)
    if not overlay:
        _integer_ticks(ax)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title)
    return save_figure(fig, path)


def plot_token_detectors(
    summaries: TokenDetectorSummary | Sequence[TokenDetectorSummary], path: str | Path
) -> Path:
    """Fig. 3a: number of token-detecting neurons per layer."""
    return _line_figure(
        summaries,
        path,
        series=[("n_detectors", "", "-")],
        title="Token-detecting neurons per layer",
        y_label="token-detecting neurons",
    )


def plot_detected_tokens(
    summaries: TokenDetectorSummary | Sequence[TokenDetectorSummary], path: str | Path
) -> Path:
    """Fig. 3b: distinct tokens with a detector, per layer (solid) and cumulative (dashed)."""
    return _line_figure(
        summaries,
        path,
        series=[("n_tokens", "this layer", "-"), ("n_tokens_cumulative", "cumulative", "--")],
        title="Tokens with a detecting neuron",
        y_label="distinct tokens",
    )


def plot_new_tokens(
    summaries: TokenDetectorSummary | Sequence[TokenDetectorSummary], path: str | Path
) -> Path:
    """Fig. 4: covered tokens new overall (solid) and new versus layer l-1 (dashed)."""
    return _line_figure(
        summaries,
        path,
        series=[
            ("n_new_overall", "new overall", "-"),
            ("n_new_vs_previous", "new vs layer l-1", "--"),
        ],
        title="Detected tokens not covered by lower layers",
        y_label="new tokens",
    )


# --------------------------------------------------------------------------- positional


def plot_positional(
    finding: PositionalLayerFinding, path: str | Path, *, top_k: int | None = None
) -> Path:
    """Firing frequency against position for the top-k neurons (by I) of one layer."""
    neurons = finding.top_neurons if top_k is None else finding.top_neurons[:top_k]
    if not neurons:
        raise PlotInputError(
            f"{finding.model} layer {finding.layer}: the finding keeps no top neurons "
            "(analyse with top_k > 0)"
        )
    fig = new_figure(9.0, 4.4)
    ax: Axes = fig.subplots()
    positions = np.arange(finding.window_length)
    for index, (neuron, mi) in enumerate(
        zip(neurons, finding.top_mutual_information[: len(neurons)], strict=True)
    ):
        color = f"C{index % 10}"
        marker = "" if mi > finding.threshold else " (not positional)"
        ax.plot(
            positions,
            finding.top_firing_by_position[neuron],
            color=color,
            lw=1.2,
            label=f"neuron {neuron}, I={mi:.3f}{marker}",
        )
        ax.axhline(finding.top_overall_rate[index], color=color, lw=0.8, ls=":")
    ax.set_xlabel("position in window")
    ax.set_ylabel("firing frequency fr_n(p)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    fig.legend(fontsize="x-small", title="dotted: overall rate", loc="outside right upper")
    count = f"{finding.n_positional}"
    if finding.n_positional_se is not None:
        interval = finding.estimate().interval(0.95)
        count += f" (95%: {interval.low:.1f}–{interval.high:.1f})"
    ax.set_title(
        f"{finding.model} layer {finding.layer}: {count} positional neurons "
        f"(I > {finding.threshold:g})"
    )
    return save_figure(fig, path)


def plot_positional_measures(
    measures: dict[int, tuple[np.ndarray, np.ndarray]],
    path: str | Path,
    *,
    model: str,
    threshold: float,
) -> Path:
    """Per layer, every neuron's mean |Pearson r(act, pos)| (the secondary measure, x)
    against I(act; pos) (the definition, y; positional above ``threshold``), from
    ``{layer: (I (W,), |r| (W,))}`` (:func:`~neuronspec.analyses.positional.positional_measures`)."""
    if not measures:
        raise PlotInputError("no layers to plot")
    layers = sorted(measures)
    fig = new_figure(3.0 * len(layers), 3.4)
    axes = fig.subplots(1, len(layers), squeeze=False, sharey=True)[0]
    for ax, layer in zip(axes, layers, strict=True):
        mi, pearson = measures[layer]
        positional = mi > threshold
        ax.scatter(pearson[~positional], mi[~positional], s=4, color="tab:gray", alpha=0.5)
        ax.scatter(pearson[positional], mi[positional], s=6, color="tab:red", label="positional")
        ax.axhline(threshold, color="tab:red", lw=0.8, ls=":")
        ax.set(title=f"layer {layer}: {int(positional.sum())} positional", xlabel="mean |r|")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("I(act; pos), nats")
    axes[0].legend(fontsize="x-small")
    fig.suptitle(f"{model}: positional information against |Pearson r(act, pos)|")
    return save_figure(fig, path)
