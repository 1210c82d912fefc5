"""Figures of the ablation study, pruning and causal neurons (METHODS.md §6, §10): every
ablation bar stands next to its random control (mean, and a band of ± 2 std)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from neuronspec.analyses.ablation import AblationStudyFinding, PruningFinding
from neuronspec.analyses.causal import CausalFinding
from neuronspec.plots.figure import new_figure, save_figure


def plot_ablation(study: AblationStudyFinding, path: str | Path) -> Path:
    """Relative PPL change (%) per condition; beside it the random control's mean ± 2 std."""
    figure = new_figure(7, 4.2)
    axis = figure.subplots()
    names = [c.name for c in study.conditions]
    xs = range(len(names))
    axis.bar(
        [x - 0.2 for x in xs],
        [100 * c.change for c in study.conditions],
        yerr=_interval_bars(study.conditions),
        width=0.4,
        capsize=4,
        label="ablated set (95% interval over windows)",
        color="tab:red",
    )
    control_x = [x + 0.2 for x, c in zip(xs, study.conditions, strict=True) if c.control]
    controls = [c.control for c in study.conditions if c.control]
    axis.bar(
        control_x,
        [100 * c.change_mean for c in controls],
        yerr=[200 * c.change_std for c in controls],
        width=0.4,
        color="tab:gray",
        capsize=4,
        label="random, same count per layer (mean ± 2 std)",
    )
    for x, condition in zip(xs, study.conditions, strict=True):
        p = "" if condition.p_value is None else f", p={condition.p_value:.2g}"
        axis.annotate(f"n={condition.n_neurons}{p}", (x, 0), ha="center", va="bottom", fontsize=8)
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xticks(list(xs), names)
    axis.set(
        ylabel="held-out PPL change (%)",
        title=f"{study.model}: {study.method} ablation, baseline PPL {study.baseline_ppl:.3f} "
        f"({study.n_targets} tokens)",
    )
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3, axis="y")
    return save_figure(figure, path)


def _interval_bars(conditions) -> list[list[float]]:
    """Asymmetric 95% error bars (percent) of each condition's change."""
    low, high = [], []
    for condition in conditions:
        interval = condition.interval(0.95)
        low.append(100 * (condition.change - interval.low))
        high.append(100 * (interval.high - condition.change))
    return [low, high]


def plot_pruning(finding: PruningFinding, path: str | Path) -> Path:
    """PPL after pruning by priority beside random pruning of the same count per layer."""
    figure = new_figure(5, 4)
    axis = figure.subplots()
    control = finding.control
    axis.bar([0], [finding.baseline_ppl], color="tab:blue")
    interval = finding.interval(0.95)  # of the relative change, paired over windows
    bar = [
        [finding.baseline_ppl * (finding.change - interval.low)],
        [finding.baseline_ppl * (interval.high - finding.change)],
    ]
    axis.bar([1], [finding.ppl], yerr=bar, color="tab:red", capsize=4)
    axis.bar([2], [control.ppl_mean], yerr=[2 * control.ppl_std], color="tab:gray", capsize=4)
    p = "" if finding.p_value is None else f"\np = {finding.p_value:.2g}"
    axis.set_xticks([0, 1, 2], ["baseline", f"by priority (95%){p}", "random (± 2 std)"])
    low = min(finding.baseline_ppl, finding.ppl, control.ppl_mean - 2 * control.ppl_std)
    high = max(finding.ppl, control.ppl_mean + 2 * control.ppl_std)
    axis.set_ylim(low - 0.1 * (high - low + 1e-9), high + 0.1 * (high - low + 1e-9))
    axis.set(
        ylabel="held-out PPL",
        title=f"{finding.model}: pruning {finding.n_pruned} neurons "
        f"({100 * finding.ratio:.0f}% per layer, {finding.method})",
    )
    axis.grid(alpha=0.3, axis="y")
    return save_figure(figure, path)


def plot_causal_neurons(finding: CausalFinding, path: str | Path) -> Path:
    """KL impact of each layer's candidates (ranked), with the random control's band."""
    n = len(finding.layers)
    figure = new_figure(3.2 * n, 3.4)
    axes = figure.subplots(1, n, squeeze=False)[0]
    for axis, layer in zip(axes, finding.layers, strict=True):
        kls = [c.kl for c in layer.candidates]
        axis.bar(range(len(kls)), kls, color="tab:red")
        axis.set_xticks(range(len(kls)), [str(c.neuron) for c in layer.candidates], rotation=90)
        top = float(np.quantile(layer.control_kl, 0.99))
        axis.axhspan(0, top, color="tab:gray", alpha=0.3, label="random: 99% quantile")
        axis.axhline(layer.control_kl_mean, color="tab:gray")
        axis.annotate(
            f"rank-sum p = {layer.rank_sum_p_value:.2g}", (0.02, 0.95), xycoords="axes fraction",
            va="top", fontsize=7,
        )  # fmt: skip
        axis.set(title=f"layer {layer.layer}", xlabel=f"{finding.site} channel")
    axes[0].set_ylabel("KL(p_base ‖ p_mod) per position")
    axes[0].legend(fontsize=7)
    figure.suptitle(
        f"{finding.model}: single-neuron {finding.method} interventions, "
        f"{finding.site} site, candidates by {finding.candidates_by.replace('_', ' ')}"
    )
    return save_figure(figure, path)


def plot_cross_layer(finding: CausalFinding, path: str | Path) -> Path:
    """Cross-layer matrix (source × target) of the candidates and of the random control."""
    figure = new_figure(9, 4)
    axes = figure.subplots(1, 2)
    top = max(max(row) for row in finding.cross_layer + finding.control_cross_layer)
    for axis, matrix, title in (
        (axes[0], finding.cross_layer, "top candidates"),
        (axes[1], finding.control_cross_layer, "random control"),
    ):
        image = axis.imshow(matrix, vmin=0, vmax=top, cmap="viridis")
        axis.set_yticks(range(len(finding.source_layers)), finding.source_layers)
        axis.set(xlabel="target layer", ylabel="source layer", title=title)
    figure.colorbar(image, ax=axes, label="‖a' − a‖ / ‖a‖ (baseline subtracted)")
    figure.suptitle(
        f"{finding.model}: cross-layer impact of single-neuron interventions "
        f"({finding.site} site, candidates by {finding.candidates_by.replace('_', ' ')})"
    )
    return save_figure(figure, path)
