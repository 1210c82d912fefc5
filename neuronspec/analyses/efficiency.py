"""Efficiency of a model (METHODS.md §11): parameters, neurons per layer, the fraction of
neurons firing per token, forward FLOPs per token, measured tokens/s.

FLOPs are analytic, per family, 2 per multiply-add, for one token of the full LM forward:

- ``matmul_flops_per_token``: the weight matrix products, i.e. what
  ``torch.utils.flop_counter.FlopCounterMode`` counts on the path neuronspec runs (CPU
  SDPA attention and the fast Mamba scan are not counted by it):
  GPT-2 ``L·24·d² + 2·d·V`` (QKV 6d², attention out 2d², MLP 16d², LM head);
  Mamba ``L·(4·d·E + 2·E·(R + 2N) + 2·R·E + 2·E·d) + 2·d·V`` (in_proj, x_proj, dt_proj,
  out_proj with E = d_inner, R = dt rank, N = state size; LM head).
- ``other_flops_per_token``: the rest, at window length T: GPT-2 attention scores and
  weighted sum, ``L·4·d·(T + 1)/2`` (causal: (T+1)/2 keys per query on average);
  Mamba the depthwise conv ``L·2·E·K`` and the selective scan ``L·8·E·N`` (per state and
  token: exp(Δ·A) 2, Δ·B·x 2, h = dA·h + dBx 2, y += C·h 2). An estimate of the
  elementwise work (exp counted as one FLOP), not checked against a counter.

The fraction firing per token is the mean over tokens of (neurons with ``mlp_pre`` > 0)/W,
which equals Σ firings / (tokens · W) from the streamed counts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from neuronspec.capture.stats import NeuronStats
from neuronspec.errors import NeuronSpecError
from neuronspec.findings import Finding


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
    """``(matmul, other)`` analytic forward FLOPs per token for a HF GPT-2 or Mamba config."""
    vocab = int(config.vocab_size)
    if config.model_type == "gpt2":
        d, layers = int(config.n_embd), int(config.n_layer)
        inner = int(config.n_inner or 4 * d)
        matmul = layers * (2 * d * 3 * d + 2 * d * d + 2 * 2 * d * inner) + 2 * d * vocab
        other = layers * 4 * d * (window + 1) // 2
        return matmul, other
    if config.model_type == "mamba":
        d, layers = int(config.hidden_size), int(config.num_hidden_layers)
        inner, n = int(config.intermediate_size), int(config.state_size)
        rank = int(config.time_step_rank)
        per_layer = 2 * d * 2 * inner + 2 * inner * (rank + 2 * n) + 2 * rank * inner
        per_layer += 2 * inner * d
        matmul = layers * per_layer + 2 * d * vocab
        other = layers * (2 * inner * int(config.conv_kernel) + 8 * inner * n)
        return matmul, other
    raise NeuronSpecError(
        f"no analytic FLOPs for model_type {config.model_type!r}; known: gpt2, mamba"
    )


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
