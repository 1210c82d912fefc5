"""Sparsity of the ``mlp`` site's |activation| (METHODS.md §9), from the streamed pass.

Per layer, over all (token, neuron) values m = |a| of the ``mlp`` site (``(B, T, W)``
batches folded into ``abs_sketch`` and ``token_sparsity``, see
:mod:`neuronspec.capture.sketch`):

- threshold sparsity: fraction of (token, neuron) with m < τ; family defaults τ = 0.01
  (Mamba) and 1e-5 (Transformer); always reported with τ. Exact when τ
  is an edge of the sketch (every decade is); otherwise interpolated log-linearly inside
  the bin holding τ, with the bin's bounds reported.
- percentile profile P5..P95: values of m. P_q is the nearest-rank quantile (the smallest
  value with at least q·n values ≤ it; numpy's ``method="inverted_cdf"``), read from the
  sketch as its bin's representative 2·lo·γ/(γ+1): within (γ−1)/(γ+1) = 0.99% of the true
  value (DDSketch, Masson et al. 2019). A quantile below ``sketch_min`` is reported as 0
  (absolute error < sketch_min).
- per token, over the W neurons: normalised Shannon entropy of p = m/Σm (1 = uniform),
  Gini (Hurley & Rickard 2009), Hoyer (2004); each averaged over the tokens whose row is
  not all zero (the count is reported).
- optimal threshold: the τ at which threshold sparsity reaches a target (default 0.3),
  i.e. the target-quantile of m, from the sketch (same accuracy).

Uncertainty: threshold sparsity, the three per-token means and the optimal threshold get
a standard error by the bootstrap over the pass's window groups (each
group's sketch and per-token sums, :mod:`neuronspec.capture.window_groups`), G − 1
degrees of freedom (``se_df``). The SE is of the sampling of windows; the sketch's own
relative accuracy is reported beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from neuronspec.capture.config import StatsConfig
from neuronspec.capture.stats import NeuronStats
from neuronspec.errors import NeuronSpecError
from neuronspec.findings import Finding
from neuronspec.uncertainty import NO_WINDOW_GROUPS, Estimate

PERCENTILES = (5, 10, 25, 50, 75, 90, 95)
FAMILY_TAU = {"mamba": 0.01, "gpt2": 1e-5}  # METHODS §9
TARGET_SPARSITY = 0.3


def default_tau(model_type: str) -> float:
    """The family default τ for a HF ``model_type`` (``mamba`` or a Transformer)."""
    return FAMILY_TAU["mamba"] if model_type == "mamba" else FAMILY_TAU["gpt2"]


def sketch_accuracy(config: StatsConfig) -> float:
    """Relative accuracy (γ−1)/(γ+1) of a quantile read from the sketch."""
    gamma = 10 ** (1 / config.sketch_per_decade)
    return (gamma - 1) / (gamma + 1)


@dataclass(frozen=True)
class SparsityLayerFinding(Finding):
    layer: int
    relative_depth: float
    site: str
    n_neurons: int
    n_tokens: int
    tau: float
    threshold_sparsity: float  # fraction of (token, neuron) with |a| < tau
    threshold_exact: bool  # tau is a sketch edge (else interpolated within its bin)
    percentiles: dict[str, float]  # "P5" .. "P95": values of |a|
    sketch_relative_accuracy: float
    entropy: float  # mean normalised entropy per token
    gini: float
    hoyer: float
    n_tokens_measured: int  # tokens whose |a| row is not all zero
    target_sparsity: float
    optimal_threshold: float
    # bootstrap SEs over window groups (None when the pass kept no window groups)
    threshold_sparsity_se: float | None = None
    entropy_se: float | None = None
    gini_se: float | None = None
    hoyer_se: float | None = None
    optimal_threshold_se: float | None = None
    uncertainty: str = ""
    se_df: int | None = None

    def estimate(self, name: str) -> Estimate:
        """``threshold_sparsity``, ``entropy``, ``gini``, ``hoyer`` or ``optimal_threshold``
        with its bootstrap SE (Student-t, ``se_df``)."""
        se = getattr(self, f"{name}_se", None)
        if se is None:
            raise NeuronSpecError(f"no standard error of {name!r}: {NO_WINDOW_GROUPS}")
        return Estimate(getattr(self, name), se, self.uncertainty, self.se_df)


def sketch_quantile(stats: NeuronStats, layer: int, q: float) -> float:
    """Nearest-rank ``q``-quantile (0 < q ≤ 1) of the layer's |a|, from the sketch."""
    return _sketch_quantile(stats.layer(layer).abs_sketch.numpy(), stats.config, q, layer)


def _sketch_quantile(counts: np.ndarray, config: StatsConfig, q: float, layer: int) -> float:
    total = int(counts.sum())
    if total == 0:
        raise NeuronSpecError(f"layer {layer} has no activations in its sketch")
    rank = max(1, math.ceil(q * total - 1e-9))
    k = int(np.searchsorted(np.cumsum(counts), rank))
    if k == 0:
        return 0.0
    if k == config.sketch_bins + 1:
        raise NeuronSpecError(
            f"the {q:.0%} quantile of |a| in layer {layer} is >= sketch_max "
            f"({config.sketch_max}); raise StatsConfig.sketch_max"
        )
    edges = config.sketch_edges()
    lo, hi = edges[k - 1], edges[k]
    return float(2 * lo * hi / (lo + hi))  # 2·lo·γ/(γ+1)


def threshold_sparsity(stats: NeuronStats, layer: int, tau: float) -> tuple[float, bool]:
    """Fraction of (token, neuron) with |a| < ``tau`` and whether it is exact (tau on an edge)."""
    return _threshold_sparsity(stats.layer(layer).abs_sketch.numpy(), stats.config, tau)


def _threshold_sparsity(counts: np.ndarray, config: StatsConfig, tau: float) -> tuple[float, bool]:
    counts = counts.astype(np.float64)
    total = counts.sum()
    if tau <= config.sketch_min or tau >= config.sketch_max:
        raise NeuronSpecError(
            f"tau {tau} is outside the sketch range ({config.sketch_min}, {config.sketch_max})"
        )
    position = math.log10(tau / config.sketch_min) * config.sketch_per_decade  # edge index
    nearest = round(position)
    if abs(position - nearest) < 1e-6:
        return float(counts[: nearest + 1].sum() / total), True  # bins 0..nearest lie below
    k = int(position)  # tau inside bin k + 1 (edges k .. k + 1)
    below = counts[: k + 1].sum() + counts[k + 1] * (position - k)
    return float(below / total), False


def sparsity_layer(
    stats: NeuronStats,
    layer: int,
    *,
    tau: float,
    target: float = TARGET_SPARSITY,
) -> SparsityLayerFinding:
    """METHODS §9 sparsity measures of ``layer`` from the streamed statistics."""
    layer_stats = stats.layer(layer)
    measured, entropy, gini, hoyer = layer_stats.token_sparsity.tolist()
    if measured == 0:
        raise NeuronSpecError(f"layer {layer}: every token's |a| row is zero; no sparsity")
    sparsity, exact = threshold_sparsity(stats, layer, tau)
    return SparsityLayerFinding(
        **_bootstrap_errors(stats, layer, tau, target),
        layer=layer,
        relative_depth=layer / max(stats.n_layers - 1, 1),
        site="mlp",
        n_neurons=layer_stats.width,
        n_tokens=stats.n_tokens,
        tau=tau,
        threshold_sparsity=sparsity,
        threshold_exact=exact,
        percentiles={f"P{p}": sketch_quantile(stats, layer, p / 100) for p in PERCENTILES},
        sketch_relative_accuracy=sketch_accuracy(stats.config),
        entropy=entropy / measured,
        gini=gini / measured,
        hoyer=hoyer / measured,
        n_tokens_measured=int(measured),
        target_sparsity=target,
        optimal_threshold=sketch_quantile(stats, layer, target),
    )


def _bootstrap_errors(stats: NeuronStats, layer: int, tau: float, target: float) -> dict:
    bootstrap = stats.group_bootstrap()
    if bootstrap is None:
        return {}
    layer_stats = stats.layer(layer)
    sketches = bootstrap.resample(layer_stats.abs_sketch_groups).round().long().numpy()  # (R, S)
    sums = bootstrap.resample(layer_stats.token_sparsity_groups)  # (R, 4)
    means = (sums[:, 1:] / sums[:, :1]).numpy()  # (R, 3): entropy, Gini, Hoyer
    sparsity = [_threshold_sparsity(c, stats.config, tau)[0] for c in sketches]
    optimal = [_sketch_quantile(c, stats.config, target, layer) for c in sketches]
    entropy_se, gini_se, hoyer_se = bootstrap.se(means).tolist()
    return {
        "threshold_sparsity_se": float(bootstrap.se(sparsity)),
        "entropy_se": entropy_se,
        "gini_se": gini_se,
        "hoyer_se": hoyer_se,
        "optimal_threshold_se": float(bootstrap.se(optimal)),
        "uncertainty": bootstrap.method,
        "se_df": bootstrap.df,
    }


def sparsity_all_layers(stats: NeuronStats, **options) -> list[SparsityLayerFinding]:
    return [sparsity_layer(stats, layer, **options) for layer in range(stats.n_layers)]
