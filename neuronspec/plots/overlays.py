"""Figures across all models of a run, drawn from the run's merged results (also under xdist,
where each worker saw only some models)."""

from __future__ import annotations

from pathlib import Path

from neuronspec.analyses.ngram import NgramLayerFinding, TokenDetectorSummary
from neuronspec.plots.dead import plot_dead_neurons
from neuronspec.plots.voita import (
    plot_covering_bins,
    plot_detected_tokens,
    plot_new_tokens,
    plot_token_detectors,
)


def _per_model(results: dict, analysis: str) -> dict[str, dict]:
    return {
        model_id: entry["analyses"][analysis]
        for model_id, entry in sorted(results["models"].items())
        if analysis in entry["analyses"]
    }


def _ngram_finding(data: dict) -> NgramLayerFinding:
    """Rebuild a finding from its JSON (JSON object keys are strings; neuron ids are ints)."""
    data = dict(data)
    for field in ("detector_tokens", "detector_trigrams"):
        if data.get(field) is not None:
            data[field] = {int(k): v for k, v in data[field].items()}
    return NgramLayerFinding(**data)


def write_overlays(results: dict, plots_dir: Path) -> list[Path]:
    """Write every overlay figure whose findings are in ``results``; returns the paths."""
    plots_dir = Path(plots_dir)
    written = []
    dead = _per_model(results, "dead")
    if dead:
        findings = {model_id: list(layers.values()) for model_id, layers in dead.items()}
        written.append(plot_dead_neurons(findings, plots_dir / "fig1_dead_neurons_all_models.png"))
    ngram = _per_model(results, "ngram")
    if len(ngram) > 1:
        layers = [_ngram_finding(f) for per_layer in ngram.values() for f in per_layer.values()]
        written.append(
            plot_covering_bins(layers, plots_dir / "fig2_covering_unigrams_all_models.png")
        )
    summaries = [
        TokenDetectorSummary(**entry["all"])
        for entry in _per_model(results, "token_detector_summary").values()
    ]
    if len(summaries) > 1:
        written += [
            plot_token_detectors(summaries, plots_dir / "fig3a_token_detectors_all_models.png"),
            plot_detected_tokens(summaries, plots_dir / "fig3b_detected_tokens_all_models.png"),
            plot_new_tokens(summaries, plots_dir / "fig4_new_tokens_all_models.png"),
        ]
    return written
