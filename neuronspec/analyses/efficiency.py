"""Efficiency of a model (METHODS.md §11): parameters, neurons per layer, the fraction of
neurons firing per token, forward FLOPs per token, measured tokens/s.

FLOPs per token come from :func:`neuronspec.models.shapes.forward_flops`, the one formula
(its docstring says what it counts): ``matmul_flops_per_token`` = the weight products of the
layers and the LM head (FlopCounterMode's mm/addmm count), ``other_flops_per_token`` = what
mixes positions at the statistics window T (GPT-2 attention 4·T·d per layer; Mamba conv and
selective scan).

The fraction firing per token is the mean over tokens of (neurons with ``mlp_pre`` > 0)/W,
which equals Σ firings / (tokens · W) from the streamed counts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from neuronspec.capture.stats import NeuronStats
from neuronspec.findings import Finding
from neuronspec.models.shapes import forward_flops


@dataclass(frozen=True)
class EfficiencyFinding(Finding):
    model_type: str
    n_parameters: int
    n_layers: int
    neurons_per_layer: int
    firing_fraction_per_token: float  # mean over layers
    firing_fraction_by_layer: tuple[float, ...]
    matmul_flops_per_token: int
    other_flops_per_token: int
    window: int


@dataclass(frozen=True)
class ThroughputFinding(Finding):
    """Measured, not reproducible across machines: never snapshotted."""

    tokens_per_second: float
    device: str
    dtype: str
    n_tokens: int
    seconds: float


def flops_per_token(config, window: int) -> tuple[int, int]:
    """``(matmul, other)`` forward FLOPs per token (module docstring)."""
    flops = forward_flops(config, window)
    return flops.weights + flops.lm_head, flops.mixing


def efficiency(model: torch.nn.Module, stats: NeuronStats) -> EfficiencyFinding:
    """Efficiency figures of a loaded HF model and its streamed statistics."""
    config = model.config
    matmul, other = flops_per_token(config, stats.window)
    by_layer = tuple(
        float(stats.layer(layer).fire_count.sum()) / (stats.n_tokens * stats.layer(layer).width)
        for layer in range(stats.n_layers)
    )
    return EfficiencyFinding(
        model_type=config.model_type,
        n_parameters=sum(p.numel() for p in model.parameters()),
        n_layers=stats.n_layers,
        neurons_per_layer=stats.layers[0].width,
        firing_fraction_per_token=sum(by_layer) / len(by_layer),
        firing_fraction_by_layer=by_layer,
        matmul_flops_per_token=matmul,
        other_flops_per_token=other,
        window=stats.window,
    )


def measure_throughput(
    model: torch.nn.Module, windows: torch.Tensor, *, batch_size: int = 16, repeats: int = 2
) -> ThroughputFinding:
    """Tokens/s of the plain LM forward over ``windows (n, T)`` (best of ``repeats``)."""
    parameter = next(model.parameters())
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            for first in range(0, len(windows), batch_size):
                ids = windows[first : first + batch_size].to(parameter.device)
                model(input_ids=ids, use_cache=False)
            best = min(best, time.perf_counter() - start)
    return ThroughputFinding(
        tokens_per_second=windows.numel() / best,
        device=str(parameter.device),
        dtype=str(parameter.dtype).removeprefix("torch."),
        n_tokens=windows.numel(),
        seconds=best,
    )
