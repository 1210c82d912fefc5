"""Figures across all models of a run, drawn from the run's merged results (also under xdist,
where each worker saw only some models)."""

from __future__ import annotations

from pathlib import Path

from neuronspec.plots.dead import plot_dead_neurons


def write_overlays(results: dict, plots_dir: Path) -> list[Path]:
    """Write every overlay figure whose findings are in ``results``; returns the paths."""
    written = []
    dead = {
        model_id: list(entry["analyses"]["dead"].values())
        for model_id, entry in results["models"].items()
        if "dead" in entry["analyses"]
    }
    if dead:
        written.append(
            plot_dead_neurons(dead, Path(plots_dir) / "fig1_dead_neurons_all_models.png")
        )
    return written
