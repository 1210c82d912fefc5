"""What the streamed statistics pass collects (:class:`StatsConfig`, part of the cache key)
and how it computes (:data:`STATS_BACKENDS`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from neuronspec.errors import NeuronSpecError
from neuronspec.options import default

FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)  # smallest normal float32
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
STATS_BACKENDS = ("auto", "native", "torch")
"""``native``: ``neuronspec/native/stats.c`` (float32 CPU activations); ``torch``: torch
ops; ``auto``: native where it applies and builds, else torch. Both compute the same
definitions, but float sums may round differently, so the backend ``auto`` resolves to is
part of the cache key (:func:`neuronspec.capture.runner.computation_path`)."""


@dataclass(frozen=True)
class StatsConfig:
    """What the streamed pass collects. Part of the cache key."""

    fire_threshold: float = 0.0  # METHODS §1: a neuron fires when mlp_pre > 0
    unigrams: bool = True  # sparse (neuron, token) firing counts for METHODS §3
    trigrams: bool = default("stats.trigrams")  # sparse (neuron, trigram) counts: large, opt-in
    # |a| quantile sketch (METHODS §9): 116 bins per decade, bin ratio γ = 10^(1/116), so a
    # bin's representative 2·lo·γ/(γ+1) is within (γ-1)/(γ+1) = 0.99% of every value in it;
    # every decade is a bin edge (thresholds 1e-5, 0.01 count exactly)
    sketch_per_decade: int = 116
    sketch_min: float = 1e-12
    sketch_max: float = 1e6
    # window groups (capture/window_groups.py): per-group parts of the firing counts by
    # position, the sparsity accumulators and the window-mean moments, for bootstrap
    # standard errors of every corpus statistic; 0 turns them off. Memory: G·T·W uint8
    # per layer (20 groups, T = 64, W = 3072: 3.9 MB), and as much int32 once a group
    # passes 255 windows (window_groups.GroupFires)
    window_groups: int = 20
    # (neuron, token) firings of each window group (key (n·V + token)·G + g), for bootstrap
    # SEs of the token-detector counts (analyses/ngram.py); opt-in: a sparse table of up
    # to G times the unigram pairs, counted by sort (the native packed rows do not apply)
    detector_intervals: bool = default("stats.detector_intervals")
    # top-activating contexts per mlp neuron (capture/top_contexts.py) for the neuron cards;
    # 0 off. Off by default: keeping 16 costs 1.20x (GPT-2 shape) and 1.16x (Mamba shape)
    # the pass without them (python -m neuronspec.bench --only capture), over the 5% a
    # default may cost. A run that writes a report or a card turns them on
    # (options.REPORT_TOP_CONTEXTS).
    top_contexts: int = 0

    def __post_init__(self) -> None:
        if not FLOAT32_TINY <= self.sketch_min < self.sketch_max <= FLOAT32_MAX:
            raise NeuronSpecError(
                f"need {FLOAT32_TINY:.4g} <= sketch_min < sketch_max <= {FLOAT32_MAX:.4g} "
                f"(normal float32 numbers), got {self.sketch_min} and {self.sketch_max}"
            )
        if self.window_groups < 0 or self.window_groups == 1:
            raise NeuronSpecError(
                f"window_groups must be 0 (off) or at least 2, got {self.window_groups}"
            )
        if self.detector_intervals and not (self.unigrams and self.window_groups):
            raise NeuronSpecError(
                "detector_intervals needs the unigram counts and window groups "
                f"(unigrams={self.unigrams}, window_groups={self.window_groups})"
            )
        if self.top_contexts < 0:
            raise NeuronSpecError(f"top_contexts must be 0 (off) or more, got {self.top_contexts}")
        if not 1 <= self.sketch_bins <= 65533:  # bin indices (with the ends) fit in uint16
            raise NeuronSpecError(f"the sketch needs 1..65533 bins, got {self.sketch_bins}")

    @property
    def sketch_bins(self) -> int:
        """Bins of ``abs_sketch`` between ``sketch_min`` and ``sketch_max`` (plus 2 ends)."""
        return round(self.sketch_per_decade * math.log10(self.sketch_max / self.sketch_min))

    def sketch_edges(self) -> np.ndarray:
        """The ``sketch_bins + 1`` edges of ``abs_sketch`` (bin 0 is < sketch_min)."""
        lo, hi = math.log10(self.sketch_min), math.log10(self.sketch_max)
        return np.logspace(lo, hi, self.sketch_bins + 1)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)
