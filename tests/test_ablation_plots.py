"""The ablation, pruning and causal figures render from findings (random tiny models)."""

from __future__ import annotations

import torch
from test_ablation_study import _findings, _windows

from neuronspec.analyses.ablation import ablation_study, pruning_study
from neuronspec.analyses.causal import causal_neurons
from neuronspec.capture.runner import collect_stats
from neuronspec.interventions.ablation import Condition
from neuronspec.plots.ablation import (
    plot_ablation,
    plot_causal_neurons,
    plot_cross_layer,
    plot_pruning,
)


def test_figures_render(random_model, tmp_path):
    stats = collect_stats(random_model, _windows(6, seed=7), bos_id=None, batch_size=6)
    windows = _windows(4, seed=3)
    study = ablation_study(
        random_model,
        windows,
        [Condition("x", "mlp", {0: (1, 2)}), Condition("empty", "mlp", {})],
        method="zero",
        n_windows=4,
        n_seeds=2,
    )
    dead, positional = _findings({0: (3,)}, {1: (4,)})
    pruning = pruning_study(random_model, windows, stats, dead, positional, n_windows=4, n_seeds=2)
    causal = causal_neurons(random_model, windows[:2], stats, top_k=2, max_rows=16)
    written = [
        plot_ablation(study, tmp_path / "ablation.png"),
        plot_pruning(pruning, tmp_path / "pruning.png"),
        plot_causal_neurons(causal, tmp_path / "causal.png"),
        plot_cross_layer(causal, tmp_path / "cross.png"),
    ]
    assert all(path.stat().st_size > 1000 for path in written)
    assert torch.isfinite(torch.tensor(causal.cross_layer)).all()
