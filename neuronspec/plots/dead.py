"""Voita et al. (2023) Figure 1: (a) fraction of dead neurons and (b) mean firing frequency of
alive neurons, against relative depth l/(L-1), one line per model; error bars are 95%
intervals (the window-group bootstrap, Student-t) where the findings carry SEs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from neuronspec.plots.figure import interval_half_widths, new_figure, save_figure


def _as_dict(finding) -> dict:
    return finding.to_json() if hasattr(finding, "to_json") else dict(finding)


def plot_dead_neurons(findings_by_model: Mapping[str, Sequence], path: str | Path) -> Path:
    """Figure 1a/1b from ``{model_id: [DeadLayerFinding or its JSON, one per layer]}``."""
    figure = new_figure(10, 4)
    dead_axis, freq_axis = figure.subplots(1, 2)
    for model_id, findings in sorted(findings_by_model.items()):
        rows = sorted((_as_dict(f) for f in findings), key=lambda row: row["layer"])
        depth = [row["relative_depth"] for row in rows]
        dead = [100 * row["dead_fraction"] for row in rows]
        freq = [row["mean_alive_frequency"] for row in rows]
        dead_axis.errorbar(
            depth, dead, yerr=interval_half_widths(rows, "dead_fraction", 100), fmt="o-", capsize=3,
            label=model_id,
        )  # fmt: skip
        freq_axis.errorbar(
            depth, freq, yerr=interval_half_widths(rows, "mean_alive_frequency"), fmt="o-", capsize=3,
            label=model_id,
        )  # fmt: skip
    tokens = sorted({_as_dict(f)["n_tokens"] for fs in findings_by_model.values() for f in fs})
    dead_axis.set(title="(a) dead neurons", xlabel="relative depth l/(L-1)", ylabel="dead (%)")
    freq_axis.set(
        title="(b) firing frequency of alive neurons",
        xlabel="relative depth l/(L-1)",
        ylabel="mean frequency",
    )
    for axis in (dead_axis, freq_axis):
        axis.legend(title="model")
        axis.grid(alpha=0.3)
    figure.suptitle(
        f"Dead neurons (Voita et al. 2023, Fig. 1); tokens: {tokens}; bars: 95% (window-group bootstrap)"
    )
    return save_figure(figure, path)
