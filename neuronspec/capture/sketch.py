"""The sparsity accumulators of METHODS §9: a log-binned sketch of |a| over all (token,
neuron) pairs and per-token sums of normalised entropy, Gini and Hoyer."""

from __future__ import annotations

import math

import torch

from neuronspec.capture.config import StatsConfig
from neuronspec.capture.native_stats import unit_channel_stride, use_native
from neuronspec.errors import NeuronSpecError
from neuronspec.native import load_library


def _sketch_scale(config: StatsConfig) -> tuple[float, float]:
    """``(per_log2, offset)``: bin index = floor(log2|a| · per_log2 + offset) inside the range."""
    per_log2 = config.sketch_per_decade / math.log2(10)
    return per_log2, 1 - math.log2(config.sketch_min) * per_log2


def add_token_sparsity(
    stats, act: torch.Tensor, config: StatsConfig, backend: str, groups: torch.Tensor | None
) -> None:
    """Add one batch ``act (B, T, W)`` into ``abs_sketch`` and ``token_sparsity`` and, for
    the window groups ``groups (B,)`` (None: the pass keeps none), into each window's
    group part: by ``neuronspec/native/sparsity.c`` for float32 CPU activations where it
    builds, else by :func:`token_sparsity_torch` (same definitions)."""
    if act.shape[-1] < 2:
        raise NeuronSpecError("sparsity over neurons needs a site of at least 2 neurons")
    native = act.device.type == "cpu" and act.dtype == torch.float32 and use_native(backend)
    measure = _token_sparsity_native if native else token_sparsity_torch
    if groups is None:
        parts = [(None, act)]
    else:  # one window at a time: its counts go to its group too
        parts = [(group, act[b : b + 1]) for b, group in enumerate(groups.tolist())]
    for group, part in parts:
        sketch, sums = measure(part, config)
        stats.abs_sketch += sketch
        stats.token_sparsity += sums
        if group is not None:
            stats.abs_sketch_groups[group] += sketch
            stats.token_sparsity_groups[group] += sums


def _token_sparsity_native(
    act: torch.Tensor, config: StatsConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_sparsity_torch` by the native kernel (float32 CPU ``act``)."""
    batch, window, width = act.shape
    act = unit_channel_stride(act)
    threads = torch.get_num_threads()
    sketch = torch.zeros(threads, config.sketch_bins + 2, dtype=torch.long)
    sums = torch.zeros(threads, 4, dtype=torch.float64)
    per_log2, offset = _sketch_scale(config)
    status = load_library().neuronspec_token_sparsity_f32(
        threads, batch, window, width, act.data_ptr(), act.stride(0), act.stride(1),
        sketch.data_ptr(), config.sketch_bins, config.sketch_min, config.sketch_max,
        per_log2, offset, sums.data_ptr(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("sparsity kernel: cannot allocate its scratch memory")
    return sketch.sum(0), sums.sum(0)


def token_sparsity_torch(
    act: torch.Tensor, config: StatsConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sketch counts ``(sketch_bins + 2,)`` and per-token sums ``(4,)`` of ``act (B, T, W)``.

    Per token row, m = |a| over the W neurons, S = Σ m (rows with S = 0 are skipped: no
    distribution over neurons): normalised entropy (ln S − Σ m ln m / S) / ln W, i.e.
    −Σ p ln p / ln W with p = m / S; Gini Σ_k (2k − W − 1) m_(k) / (W·S) with m_(k)
    ascending (Hurley & Rickard 2009); Hoyer (√W − S/‖m‖₂) / (√W − 1) (Hoyer 2004).
    Sums: ``[rows measured, Σ entropy, Σ Gini, Σ Hoyer]``. Computed in float64."""
    width = act.shape[-1]
    m = act.detach().reshape(-1, width).double().abs()  # (B·T, W)
    per_log2, offset = _sketch_scale(config)
    index = torch.floor(torch.log2(m) * per_log2 + offset).clamp(1, config.sketch_bins)
    index[m < config.sketch_min] = 0
    index[m >= config.sketch_max] = config.sketch_bins + 1
    sketch = torch.bincount(index.long().flatten(), minlength=config.sketch_bins + 2).cpu()
    s1 = m.sum(1)  # (B·T,)
    rows = s1 > 0
    m, s1 = m[rows], s1[rows]
    entropy = (torch.log(s1) - torch.xlogy(m, m).sum(1) / s1) / math.log(width)
    ranks = torch.arange(1, width + 1, dtype=torch.float64, device=m.device)  # (W,)
    gini = (torch.sort(m, dim=1).values @ (2 * ranks - width - 1)) / (width * s1)
    root = math.sqrt(width)
    hoyer = (root - s1 / m.square().sum(1).sqrt()) / (root - 1)
    sums = torch.stack([rows.sum().double(), entropy.sum(), gini.sum(), hoyer.sum()]).cpu()
    return sketch, sums
