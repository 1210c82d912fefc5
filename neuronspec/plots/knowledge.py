"""Knowledge-neuron figures (Dai et al. 2022; METHODS.md §8): the attribution heatmap of a
fact (layer × its top neurons), intra- vs inter-relation overlap per layer, and the
suppress/enhance effects next to their unrelated-fact controls."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from neuronspec.plots.figure import new_figure, save_figure


def plot_attribution_heatmap(fact, path: str | Path) -> Path:
    """Mean attribution over prompts of each layer's top neurons (``KnowledgeFactFinding``);
    cells carry the neuron id, refined neurons are starred."""
    values = np.array(fact.top_attributions, dtype=float)  # (n_layers, k)
    figure = new_figure(1.2 + 0.75 * values.shape[1], 1.2 + 0.55 * values.shape[0])
    axis = figure.subplots()
    limit = float(np.abs(values).max()) or 1.0
    image = axis.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    for j, (ids, refined) in enumerate(zip(fact.top_neurons, fact.refined, strict=True)):
        for r, neuron in enumerate(ids):
            star = "*" if neuron in set(refined) else ""
            axis.text(r, j, f"{neuron}{star}", ha="center", va="center", fontsize=7)
    axis.set(
        xlabel="rank by mean attribution",
        ylabel="layer",
        yticks=range(values.shape[0]),
        yticklabels=[str(layer) for layer in fact.layers],
        title=f"{fact.relation}({fact.subject}) → {fact.object!r}: IG attribution (* refined)",
    )
    figure.colorbar(image, ax=axis, label="attribution to P(gold)")
    return save_figure(figure, path)


def plot_overlap(overlaps: Sequence, path: str | Path) -> Path:
    """Mean Jaccard of refined sets per layer (and overall), intra- vs inter-relation pairs."""
    figure = new_figure(6.4, 3.8)
    axis = figure.subplots()
    labels = ["all" if o.layer is None else str(o.layer) for o in overlaps]
    x = np.arange(len(overlaps))
    intra = [np.nan_to_num(o.intra_jaccard) for o in overlaps]
    inter = [np.nan_to_num(o.inter_jaccard) for o in overlaps]
    axis.bar(x - 0.2, intra, 0.4, label="intra-relation pairs")
    axis.bar(x + 0.2, inter, 0.4, label="inter-relation pairs")
    axis.set(
        xticks=x,
        xticklabels=labels,
        xlabel="layer",
        ylabel="mean Jaccard of refined sets",
        title="Knowledge-neuron overlap",
    )
    axis.legend()
    axis.grid(alpha=0.3, axis="y")
    return save_figure(figure, path)


def plot_interventions(summary, path: str | Path) -> Path:
    """Relative change of P(gold) when a fact's refined neurons are suppressed / enhanced, for
    the fact itself and for unrelated facts (control), per fact with a refined set."""
    facts = [f for f in summary.facts if f.n_refined > 0]
    figure = new_figure(max(6.4, 0.3 * len(facts) + 2), 5.5)
    suppress_axis, enhance_axis = figure.subplots(2, 1, sharex=True)
    x = np.arange(len(facts))
    for axis, mode in ((suppress_axis, "suppress"), (enhance_axis, "enhance")):
        own = [100 * getattr(f, f"{mode}_change") for f in facts]
        control = [100 * getattr(f, f"control_{mode}_change") for f in facts]
        axis.bar(x - 0.2, own, 0.4, label="the fact")
        axis.bar(x + 0.2, control, 0.4, label="unrelated facts (control)")
        axis.axhline(0, color="black", linewidth=0.6)
        axis.set(ylabel="Δ P(gold) (%)", title=f"{mode} refined neurons")
        axis.grid(alpha=0.3, axis="y")
    suppress_axis.legend()
    enhance_axis.set_xticks(x, [f.name for f in facts], rotation=90, fontsize=6)
    return save_figure(figure, path)
