"""Each Voita et al. figure function writes a non-empty PNG from synthetic findings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from neuronspec.analyses.covering import covering_bin_labels
from neuronspec.analyses.ngram import (
    NgramLayerFinding,
    TokenDetectorSummary,
    summarise_token_detectors,
)
from neuronspec.analyses.positional import PositionalLayerFinding, analyse_positional_layer
from neuronspec.plots.voita import (
    PlotInputError,
    plot_covering_bins,
    plot_detected_tokens,
    plot_new_tokens,
    plot_positional,
    plot_positional_measures,
    plot_token_detectors,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_ngram_findings(model: str, n_layers: int, seed: int) -> list[NgramLayerFinding]:
    """Layers with shrinking numbers of detectors and a drifting covering-count histogram."""
    rng = np.random.default_rng(seed)
    labels = covering_bin_labels()
    findings = []
    for layer in range(n_layers):
        depth = layer / (n_layers - 1)
        weights = np.exp(-np.arange(len(labels)) * (1.5 - depth))
        histogram = rng.multinomial(800, weights / weights.sum())
        n_detectors = int(120 * (1 - depth) ** 2)
        detectors = {
            n: sorted(rng.choice(400, size=rng.integers(1, 4), replace=False).tolist())
            for n in range(n_detectors)
        }
        findings.append(
            NgramLayerFinding(
                model=model,
                layer=layer,
                n_layers=n_layers,
                n_neurons=1024,
                n_tokens=100_000,
                n_alive=int(histogram.sum()),
                coverage=0.95,
                occurrence_coverage=0.95,
                max_tokens=5,
                covering_histogram=dict(zip(labels, histogram.tolist(), strict=True)),
                n_token_detectors=n_detectors,
                detector_tokens=detectors,
                detected_tokens=sorted({t for ts in detectors.values() for t in ts}),
            )
        )
    return findings


def synthetic_positional_finding() -> PositionalLayerFinding:
    n_positions = 64
    tokens = np.full(n_positions, 1000)
    p = np.arange(n_positions)[:, None]
    centres = np.array([4, 16, 32, 48, 60, 0])
    rates = np.exp(-(((p - centres) / 6.0) ** 2))  # (T, W) bumps: position-range indicators
    rates[:, -1] = 0.3  # one flat neuron
    fire = np.round(rates * 1000).astype(np.int64)
    return analyse_positional_layer(
        model="toy-gpt2", layer=0, n_layers=4, fire_by_pos=fire, tokens_by_pos=tokens, top_k=6
    )


@pytest.fixture(scope="module")
def summaries() -> list[TokenDetectorSummary]:
    return [
        summarise_token_detectors(synthetic_ngram_findings("tiny-gpt2", 6, 0)),
        summarise_token_detectors(synthetic_ngram_findings("tiny-mamba", 9, 1)),
    ]


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5_000


def test_fig2(tmp_path: Path) -> None:
    one = synthetic_ngram_findings("tiny-gpt2", 6, 0)
    _assert_png(plot_covering_bins(one, tmp_path / "fig2.png"))
    two = one + synthetic_ngram_findings("tiny-mamba", 9, 1)
    _assert_png(plot_covering_bins(two, tmp_path / "fig2_overlay.png", depth_fraction=1.0))


@pytest.mark.parametrize("plot", [plot_token_detectors, plot_detected_tokens, plot_new_tokens])
def test_fig3_fig4(plot, summaries, tmp_path: Path) -> None:
    _assert_png(plot(summaries[0], tmp_path / "single.png"))
    _assert_png(plot(summaries, tmp_path / "overlay.png"))


def test_positional_plot(tmp_path: Path) -> None:
    _assert_png(plot_positional(synthetic_positional_finding(), tmp_path / "pos.png"))


def test_positional_measures_plot(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    measures = {layer: (rng.random(32) * 0.1, rng.random(32)) for layer in (0, 1)}
    path = plot_positional_measures(measures, tmp_path / "m.png", model="m", threshold=0.05)
    _assert_png(path)
    with pytest.raises(PlotInputError, match="no layers"):
        plot_positional_measures({}, tmp_path / "x.png", model="m", threshold=0.05)


def test_nothing_to_plot_raises(tmp_path: Path) -> None:
    with pytest.raises(PlotInputError, match="no token-detector summaries"):
        plot_token_detectors([], tmp_path / "x.png")
