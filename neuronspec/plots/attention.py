"""Figures of the hidden-attention, attention-neuron and delta-sensitivity analyses (METHODS
§5, §7): the channel-mean α̃ heatmap, rollout relevance over a prompt's tokens, the six-panel
attention-neuron figure per (method, layer), and the delta-sensitivity ranking."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from neuronspec.plots.figure import new_figure, save_figure


def _ticks(axis, labels: Sequence[str], *, x: bool = True, y: bool = True) -> None:
    positions = np.arange(len(labels))
    step = max(1, len(labels) // 32)  # at most ~32 labels per axis
    shown = positions[::step]
    if x:
        axis.set_xticks(shown, [labels[i] for i in shown], rotation=90, fontsize=6)
    if y:
        axis.set_yticks(shown, [labels[i] for i in shown], fontsize=6)


def plot_hidden_attention(
    attention: np.ndarray, tokens: Sequence[str], path: str | Path, *, title: str
) -> Path:
    """Heatmap of one layer's channel-mean α̃ ``(L, L)`` (query rows, key columns)."""
    figure = new_figure(7, 6.2)
    axis = figure.subplots()
    limit = float(np.abs(attention).max()) or 1.0
    image = axis.imshow(attention, cmap="RdBu_r", vmin=-limit, vmax=limit)
    _ticks(axis, tokens)
    axis.set(xlabel="key token j", ylabel="query token i", title=title)
    figure.colorbar(image, ax=axis, shrink=0.8, label="mean over channels of α̃[i, j]")
    return save_figure(figure, path)


def plot_rollout_relevance(
    relevance: Mapping[str, np.ndarray], tokens: Sequence[str], path: str | Path, *, title: str
) -> Path:
    """Bars of the last token's relevance ``(L,)`` over the prompt's tokens, one row per method."""
    figure = new_figure(max(6.4, 0.18 * len(tokens)), 2.2 + 1.8 * len(relevance))
    axes = np.atleast_1d(figure.subplots(len(relevance), 1))
    for axis, (method, values) in zip(axes, relevance.items(), strict=True):
        axis.bar(np.arange(len(values)), values, color="tab:blue")
        axis.set(ylabel="relevance", title=method)
        _ticks(axis, tokens, y=False)
    figure.suptitle(title)
    return save_figure(figure, path)


def plot_attention_neurons(scores, finding, path: str | Path) -> Path:
    """Six panels for one (method, layer): activation histogram, top neurons, activation vs
    importance, per-prompt importance heatmap of the top neurons, diversity, summary table."""
    importance = scores.importance.mean(0)  # (W,)
    activation = scores.activation  # (W,)
    top = list(finding.top_neurons)
    figure = new_figure(13, 8)
    axes = figure.subplots(2, 3)
    axes[0, 0].hist(activation, bins=50, color="tab:gray")
    axes[0, 0].set(title="mean activation ŷ per neuron", xlabel="activation", ylabel="neurons")
    axes[0, 1].barh([str(n) for n in top][::-1], list(finding.top_importances)[::-1])
    axes[0, 1].set(title=f"top {len(top)} neurons", xlabel="importance")
    axes[0, 2].scatter(activation, importance, s=6, alpha=0.6)
    axes[0, 2].scatter(activation[top], importance[top], s=14, color="tab:red", label="top")
    axes[0, 2].set(title="activation vs importance", xlabel="activation", ylabel="importance")
    axes[0, 2].legend()
    image = axes[1, 0].imshow(scores.importance[:, top].T, aspect="auto", cmap="viridis")
    axes[1, 0].set_yticks(range(len(top)), [str(n) for n in top], fontsize=7)
    axes[1, 0].set(title="importance per prompt", xlabel="prompt", ylabel="neuron")
    figure.colorbar(image, ax=axes[1, 0])
    share = np.sort(importance)[::-1] / max(float(importance.sum()), 1e-300)
    axes[1, 1].plot(np.cumsum(share))
    axes[1, 1].set(
        title=f"diversity H = {finding.diversity:.3f} of max {finding.max_diversity:.3f} nats",
        xlabel="neurons, by importance",
        ylabel="cumulative share",
    )
    axes[1, 2].axis("off")
    rows = [
        ("model", finding.model),
        ("method", finding.method),
        ("layer", str(finding.layer)),
        ("neurons analysed", str(finding.n_neurons)),
        ("prompts", str(finding.n_prompts)),
        ("mean activation", f"{finding.mean_activation:.4g}"),
        ("mean importance", f"{finding.mean_importance:.4g}"),
        ("diversity (nats)", f"{finding.diversity:.4g}"),
    ]
    axes[1, 2].table(cellText=rows, loc="center", colWidths=[0.5, 0.5])
    axes[1, 2].set(title="summary")
    figure.suptitle(f"Attention neurons: {finding.method}, layer {finding.layer}, {finding.model}")
    return save_figure(figure, path)


def plot_delta_ranking(
    variance: Mapping[int, np.ndarray],
    perturbation: Mapping[int, np.ndarray],
    path: str | Path,
    *,
    title: str,
    top_k: int = 10,
) -> Path:
    """Per layer: sorted variance scores (top-k marked) and variance vs perturbation."""
    layers = sorted(variance)
    figure = new_figure(10, 2.6 * len(layers) + 0.6)
    axes = np.atleast_2d(figure.subplots(len(layers), 2))
    for row, layer in zip(axes, layers, strict=True):
        order = np.argsort(-variance[layer], kind="stable")
        row[0].semilogy(np.maximum(variance[layer][order], 1e-30), ".", ms=3)
        row[0].semilogy(np.arange(top_k), np.maximum(variance[layer][order[:top_k]], 1e-30), "r.")
        row[0].set(title=f"layer {layer}: variance across texts", xlabel="rank", ylabel="variance")
        row[1].scatter(variance[layer], perturbation[layer], s=5, alpha=0.6)
        row[1].scatter(
            variance[layer][order[:top_k]], perturbation[layer][order[:top_k]], s=12, color="r"
        )
        row[1].set(title="variance vs perturbation", xlabel="variance", ylabel="perturbation")
    figure.suptitle(title)
    return save_figure(figure, path)
