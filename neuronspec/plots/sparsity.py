"""Figures of METHODS §9 and §11: sparsity against relative depth, the percentile profile,
the efficiency table, the Mamba-vs-Transformer comparison, and the neuron-type overlap."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from neuronspec.plots.figure import interval_half_widths, new_figure, plot_path, save_figure

LOG_SCALE = ("tau", "P50", "optimal_threshold")  # values of |a| spanning decades


def _rows(findings) -> list[dict]:
    rows = [f.to_json() if hasattr(f, "to_json") else dict(f) for f in findings]
    return sorted(rows, key=lambda row: row["layer"])


def plot_measures_vs_depth(
    rows_by_model: Mapping[str, Sequence[dict]],
    measures: Sequence[str],
    path: str | Path,
    title: str,
) -> Path:
    """One panel per measure (a key of each row), one line per model, x = relative depth;
    95% error bars where the rows carry the measure's SE."""
    figure = new_figure(3.6 * len(measures), 3.4)
    axes = figure.subplots(1, len(measures), squeeze=False)[0]
    for axis, measure in zip(axes, measures, strict=True):
        for model_id, rows in sorted(rows_by_model.items()):
            rows = _rows(rows)
            axis.errorbar([r["relative_depth"] for r in rows], [r[measure] for r in rows],
                          yerr=interval_half_widths(rows, measure), fmt="o-", capsize=3,
                          label=model_id)  # fmt: skip
        axis.set(title=measure, xlabel="relative depth l/(L-1)")
        if measure in LOG_SCALE:
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
    axes[0].legend(title="model")
    figure.suptitle(title)
    return save_figure(figure, path)


def plot_sparsity(findings_by_model: Mapping[str, Sequence], path: str | Path) -> Path:
    """Threshold sparsity (τ in the legend), entropy, Gini, Hoyer against relative depth."""
    rows = {
        f"{model} (τ={_rows(fs)[0]['tau']:g})": _rows(fs) for model, fs in findings_by_model.items()
    }
    measures = ("threshold_sparsity", "entropy", "gini", "hoyer", "optimal_threshold")
    return plot_measures_vs_depth(rows, measures, path, "Sparsity of |mlp activation|")


def plot_percentile_profile(findings_by_model: Mapping[str, Sequence], path: str | Path) -> Path:
    """P5..P95 of |a| per layer (log scale), one panel per model."""
    figure = new_figure(5 * len(findings_by_model), 3.6)
    axes = figure.subplots(1, len(findings_by_model), squeeze=False)[0]
    for axis, (model_id, findings) in zip(axes, sorted(findings_by_model.items()), strict=True):
        for row in _rows(findings):
            names = list(row["percentiles"])
            names.sort(key=lambda name: int(name[1:]))
            values = [max(row["percentiles"][n], 1e-12) for n in names]
            axis.plot(names, values, "o-", label=f"layer {row['layer']}")
        axis.set(yscale="log", title=model_id, xlabel="percentile", ylabel="|a|")
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    figure.suptitle("Percentile profile of |mlp activation| (sketch, ≤1% relative error)")
    return save_figure(figure, path)


def plot_table(columns: Sequence[str], rows: Sequence[Sequence], path: str | Path, title: str):
    """A table as a figure (the efficiency and comparison tables)."""
    figure = new_figure(min(2 + 1.6 * len(columns), 24), 1 + 0.3 * len(rows))
    axis = figure.subplots()
    axis.axis("off")
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    table = axis.table(cellText=cells, colLabels=list(columns), loc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    axis.set_title(title)
    return save_figure(figure, path)


def plot_overlap(overlap_by_layer: Mapping[str, dict], path: str | Path, title: str) -> Path:
    """Per layer, the Jaccard matrix of the recorded neuron kinds (set sizes on the diagonal)."""
    layers = sorted(overlap_by_layer, key=lambda key: (len(key), key))
    figure = new_figure(3.4 * len(layers), 3.6)
    axes = figure.subplots(1, len(layers), squeeze=False)[0]
    for axis, layer in zip(axes, layers, strict=True):
        finding = overlap_by_layer[layer]
        kinds = list(finding["kinds"])
        matrix = [
            [1.0 if a == b else _pair(finding["jaccard"], a, b) for b in kinds] for a in kinds
        ]
        axis.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        for i, a in enumerate(kinds):
            for j, b in enumerate(kinds):
                text = str(finding["sizes"][a]) if i == j else _pair(finding["intersections"], a, b)
                axis.text(j, i, str(text), ha="center", va="center", color="w", fontsize=7)
        axis.set_xticks(range(len(kinds)), kinds, rotation=60, fontsize=7)
        axis.set_yticks(range(len(kinds)), kinds, fontsize=7)
        axis.set_title(f"layer {layer}")
    figure.suptitle(title + " (colour: Jaccard; numbers: sizes, intersections)")
    return save_figure(figure, path)


def _pair(table: dict, a: str, b: str):
    return table.get(f"{a}&{b}", table.get(f"{b}&{a}", 0))


def write_overlap_figures(results: dict, plots_dir: Path) -> list[Path]:
    """The overlap figure of every model with ``neuron_overlap`` in the merged results."""
    written = []
    for model_id, entry in sorted(results.get("models", {}).items()):
        overlap = entry.get("analyses", {}).get("neuron_overlap")
        if overlap:
            path = plot_path(Path(plots_dir), "neuron_overlap", model_id)
            written.append(plot_overlap(overlap, path, f"Neuron-type overlap, {model_id}"))
    return written
