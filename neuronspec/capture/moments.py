"""Per-window moments of the streamed pass: the window-mean moments of METHODS §5
(delta-sensitive / high-variance neurons) and |Pearson r(activation, position)| of §4."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

WINDOW_MEAN_SITES = ("mlp", "dt")
"""Sites whose window-mean moments the pass collects, where the model has them."""


@dataclass
class WindowMeanMoments:
    """Σ over windows of the window-mean activation ``m_w = (1/T) Σ_t a_t`` and of ``m_w²``,
    per channel ``(W,)`` float64, and the same sums per window group ``(G, W)``
    (:mod:`neuronspec.capture.window_groups`); merges by addition (window count:
    ``tokens_by_pos[0]``, per group ``group_windows``)."""

    sum: torch.Tensor  # (W,)
    sumsq: torch.Tensor  # (W,)
    group_sum: torch.Tensor  # (G, W)
    group_sumsq: torch.Tensor  # (G, W)

    @classmethod
    def empty(cls, width: int, groups: int) -> WindowMeanMoments:
        zeros = functools.partial(torch.zeros, dtype=torch.float64)
        return cls(zeros(width), zeros(width), zeros(groups, width), zeros(groups, width))

    def add_window_sums(self, sums: torch.Tensor, window: int, groups: torch.Tensor | None) -> None:
        """Add the windows' sums over their ``window`` positions, ``(B, W)`` float64, of the
        window groups ``groups (B,)`` (None: the pass keeps no groups)."""
        means = (sums / window).cpu()  # (B, W)
        squares = means * means
        self.sum += means.sum(0)
        self.sumsq += squares.sum(0)
        if groups is not None:
            self.group_sum.index_add_(0, groups, means)
            self.group_sumsq.index_add_(0, groups, squares)


PEARSON_CONSTANT_VARIANCE = 1e-6  # relative to the mean square: float32 noise level


def position_basis(window: int, device: torch.device) -> torch.Tensor:
    """``(2, T)`` float32: a row of ones and the standardised positions (mean 0, std 1)."""
    pos = torch.arange(window, dtype=torch.float64)
    pos = (pos - pos.mean()) / pos.std(unbiased=False)
    return torch.stack([torch.ones_like(pos), pos]).to(device=device, dtype=torch.float32)


def abs_pearson_with_position(
    position_moment: torch.Tensor,
    window_sum: torch.Tensor,
    window_sumsq: torch.Tensor,
    window: int,
) -> torch.Tensor:
    """Σ over windows of |Pearson r(a, position)| per neuron, ``(W,)`` float64.

    Inputs are ``(B, W)`` per-window sums over positions t: ``Σ_t z_t·a_t`` with z the
    standardised position, ``Σ_t a_t`` and ``Σ_t a_t²``. r is taken as 0 where the activation
    is constant within the window (variance ≤ ``PEARSON_CONSTANT_VARIANCE`` × mean square),
    where it is undefined."""
    cov = position_moment / window  # (B, W); z has mean 0, so this is the covariance
    mean_square = window_sumsq / window  # (B, W)
    variance = (mean_square - (window_sum / window).square()).clamp_min(0)  # (B, W)
    constant = variance <= PEARSON_CONSTANT_VARIANCE * mean_square
    r = torch.where(constant, torch.zeros_like(cov), cov / variance.sqrt().clamp_min(1e-300))
    return r.abs().sum(0)


# -- sparsity accumulators (METHODS §9) -------------------------------------------------------
