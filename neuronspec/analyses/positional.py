"""Positional neurons: mutual information between firing and position (METHODS.md §4).

Voita, Ferrando, Nalmpantis (2023), "Neurons in Large Language Models: Dead, N-gram,
Positional", §5. With fr_n(p) the firing frequency of neuron n at window position p and fr_n
its overall frequency,

    I(act; pos) = (1/T) Σ_p [ fr_n(p)·ln(fr_n(p)/fr_n) + (1−fr_n(p))·ln((1−fr_n(p))/(1−fr_n)) ]

(natural log, 0·ln0 = 0); a neuron is positional if I > 0.05. The secondary mean
|Pearson r(activation, position)| over windows is reported alongside, never used to decide.

Decisions where METHODS.md is silent:

- **Overall frequency** fr_n = Σ_p firings / Σ_p tokens (token-weighted), as "overall"
  reads. With full windows every position has the same token count and this equals the mean
  of fr_n(p), so I is exactly the mutual information between firing and a uniformly drawn
  position. Each summand is a Bernoulli KL divergence, so I ≥ 0 in every case.
- A neuron with fr_n ∈ {0, 1} fires never/always, hence fr_n(p) = fr_n at every p and I = 0.
- A position with no tokens makes fr_n(p) undefined: that is an error, not a skipped term.
- **Uncertainty**: the number of positional neurons and each top neuron's I get a
  standard error by the bootstrap over the pass's window groups
  (:mod:`neuronspec.capture.window_groups`): I recomputed from fr_n(p) on each resample
  of the groups of windows, G − 1 degrees of freedom (``se_df``). The count's interval is one for
  the count a corpus of this size shows (its expectation over corpora; the plug-in I is
  biased upwards by about (T − 1)/(2·n·fr_n·(1 − fr_n)) nats for n windows, Miller 1955,
  so a neuron whose true I sits just under the threshold can be counted).
- **Position range** of a positional neuron: the maximal runs of consecutive positions where
  fr_n(p) > fr_n, as inclusive ``[first, last]`` pairs. The *main* range is the run with the
  largest excess Σ_p (fr_n(p) − fr_n); a position-range indicator has one dominant run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neuronspec.analyses.ngram import relative_depth
from neuronspec.capture.stats import NeuronStats
from neuronspec.capture.window_groups import GroupBootstrap
from neuronspec.errors import CountTableError, NeuronSpecError
from neuronspec.findings import Finding
from neuronspec.uncertainty import NO_WINDOW_GROUPS, Estimate

DEFAULT_MI_THRESHOLD = 0.05  # Voita et al.: positional if I(act; pos) > 0.05 nats
DEFAULT_TOP_K = 10  # neurons whose firing curves a finding keeps for the positional plot


def firing_by_position(fire_by_pos: np.ndarray, tokens_by_pos: np.ndarray) -> np.ndarray:
    """fr_n(p) = fire_by_pos[p, n] / tokens_by_pos[p], float64[T, W]."""
    fire, tokens = _check_positional(fire_by_pos, tokens_by_pos)
    return fire / tokens[:, None]  # (T, W)


def overall_firing_rate(fire_by_pos: np.ndarray, tokens_by_pos: np.ndarray) -> np.ndarray:
    """fr_n = Σ_p firings / Σ_p tokens, float64[W]."""
    fire, tokens = _check_positional(fire_by_pos, tokens_by_pos)
    return fire.sum(axis=0) / tokens.sum()  # (W,)


def positional_mutual_information(fire_by_pos: np.ndarray, tokens_by_pos: np.ndarray) -> np.ndarray:
    """I(act; pos) per neuron in nats, float64[W] (formula in the module docstring)."""
    rate_by_pos = firing_by_position(fire_by_pos, tokens_by_pos)  # (T, W)
    rate = overall_firing_rate(fire_by_pos, tokens_by_pos)[None, :]  # (1, W)
    fires = _x_ln_x_over_y(rate_by_pos, rate)  # (T, W)
    silent = _x_ln_x_over_y(1.0 - rate_by_pos, 1.0 - rate)  # (T, W)
    return (fires + silent).mean(axis=0)  # (W,)


def mean_abs_pearson(pearson_sum: np.ndarray, n_windows: int) -> np.ndarray:
    """The secondary column: mean over windows of |Pearson r(act, pos)|."""
    values = np.asarray(pearson_sum, dtype=np.float64)
    if values.ndim != 1:
        raise CountTableError(f"pearson_sum must be 1-D, got shape {values.shape}")
    if n_windows <= 0:
        raise CountTableError(f"n_windows must be > 0, got {n_windows}")
    return values / n_windows


def above_rate_ranges(rate_by_pos: np.ndarray, rate: float) -> list[list[int]]:
    """Maximal runs of positions with fr_n(p) > fr_n, as inclusive [first, last] pairs."""
    above = np.asarray(rate_by_pos) > rate  # (T,)
    edges = np.diff(np.r_[0, above.astype(np.int8), 0])  # (T+1,) +1 at a run start, -1 after
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [[int(a), int(b) - 1] for a, b in zip(starts, stops, strict=True)]


def main_range(rate_by_pos: np.ndarray, rate: float) -> list[int] | None:
    """The above-rate run with the largest excess Σ (fr_n(p) − fr_n); None if there is none."""
    runs = above_rate_ranges(rate_by_pos, rate)
    if not runs:
        return None
    excess = [float(np.sum(np.asarray(rate_by_pos)[a : b + 1] - rate)) for a, b in runs]
    return runs[int(np.argmax(excess))]


def _x_ln_x_over_y(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x·ln(x/y) with 0·ln0 = 0; y > 0 wherever x > 0 (x = 0 whenever y = 0 here)."""
    x, y = np.broadcast_arrays(x, y)
    out = np.zeros(x.shape, dtype=np.float64)
    positive = x > 0
    out[positive] = x[positive] * np.log(x[positive] / y[positive])
    return out


def _check_positional(
    fire_by_pos: np.ndarray, tokens_by_pos: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    fire = np.asarray(fire_by_pos)
    tokens = np.asarray(tokens_by_pos)
    if fire.ndim != 2:
        raise CountTableError(f"fire_by_pos must be [T, W], got shape {fire.shape}")
    if tokens.ndim != 1 or len(tokens) != fire.shape[0]:
        raise CountTableError(
            f"tokens_by_pos must be [T] with T = {fire.shape[0]} (rows of fire_by_pos), "
            f"got shape {tokens.shape}"
        )
    for name, array in (("fire_by_pos", fire), ("tokens_by_pos", tokens)):
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise CountTableError(f"{name} must hold counts (integers), got {array.dtype}")
    if fire.shape[0] == 0:
        raise CountTableError("no positions: fire_by_pos has T = 0 rows")
    if np.any(tokens <= 0):
        raise CountTableError(
            f"positions {np.flatnonzero(tokens <= 0)[:5].tolist()} saw no tokens; fr_n(p) is "
            "undefined there — count with a window length every window reaches"
        )
    if fire.size and (fire.min() < 0 or np.any(fire > tokens[:, None])):
        raise CountTableError(
            "fire_by_pos must lie in [0, tokens_by_pos[p]]: a neuron cannot fire more often "
            "than there are tokens at that position"
        )
    return fire.astype(np.float64), tokens.astype(np.float64)


@dataclass(frozen=True)
class PositionalLayerFinding(Finding):
    """Positional neurons of one layer (Voita et al. §5).

    ``positional_neurons`` are sorted by descending I; the lists after it are aligned with it.
    ``top_*`` fields describe the ``top_k`` neurons with the largest I, positional or not.
    """

    model: str
    layer: int
    n_layers: int  # layers in the model, for the relative depth l/(L-1)
    n_neurons: int
    window_length: int  # T
    n_tokens: int
    threshold: float  # positional if I > threshold (nats)
    n_positional: int
    positional_neurons: list[int]
    mutual_information: list[float]  # I of each positional neuron
    mean_abs_pearson: list[float] | None  # secondary column; None without Pearson sums
    main_ranges: list[list[int]]  # [first, last] of each positional neuron's main range
    above_rate_ranges: dict[int, list[list[int]]]  # neuron -> all runs above its overall rate
    top_neurons: list[int]
    top_mutual_information: list[float]
    top_overall_rate: list[float]
    top_firing_by_position: dict[int, list[float]]  # neuron -> fr_n(p), p = 0..T-1
    # bootstrap SEs over window groups (None when the pass kept no window groups)
    n_positional_se: float | None = None
    top_mutual_information_se: list[float] | None = None
    uncertainty: str = ""
    se_df: int | None = None

    @property
    def relative_depth(self) -> float:
        return relative_depth(self.layer, self.n_layers)

    def snapshot_view(self) -> dict:
        """The number of positional neurons and the top 5 mutual informations, with the
        neurons' ids where their rank is not within tolerance of a neighbour's
        (:func:`~neuronspec.snapshot.stable_ranking`)."""
        from neuronspec.snapshot import stable_ranking

        return {
            "layer": self.layer,
            "n_positional": self.n_positional,
            "n_positional_se": self.n_positional_se,
            "top": stable_ranking(self.top_neurons, self.top_mutual_information, 5),
        }

    def estimate(self, name: str = "n_positional") -> Estimate:
        """``n_positional`` with its bootstrap SE (Student-t, ``se_df``)."""
        if self.n_positional_se is None:
            raise NeuronSpecError(f"no standard error of {name!r}: {NO_WINDOW_GROUPS}")
        return Estimate(getattr(self, name), self.n_positional_se, self.uncertainty, self.se_df)


def analyse_positional_layer(
    *,
    model: str,
    layer: int,
    n_layers: int,
    fire_by_pos: np.ndarray,
    tokens_by_pos: np.ndarray,
    pearson_sum: np.ndarray | None = None,
    n_windows: int | None = None,
    threshold: float = DEFAULT_MI_THRESHOLD,
    top_k: int = DEFAULT_TOP_K,
    resampled: tuple[GroupBootstrap, np.ndarray] | None = None,
) -> PositionalLayerFinding:
    """Positional neurons of one layer from ``fire_by_pos: int64[T, W]``, ``tokens_by_pos``;
    ``resampled`` (the window-group bootstrap and I of each neuron on its resamples,
    ``(R, W)``) adds the standard errors."""
    if not 0 <= layer < n_layers:
        raise CountTableError(f"layer {layer} outside [0, {n_layers})")
    if top_k < 0:
        raise CountTableError(f"top_k must be ≥ 0, got {top_k}")
    rate_by_pos = firing_by_position(fire_by_pos, tokens_by_pos)  # (T, W)
    rate = overall_firing_rate(fire_by_pos, tokens_by_pos)  # (W,)
    mi = positional_mutual_information(fire_by_pos, tokens_by_pos)  # (W,)
    n_positions, n_neurons = rate_by_pos.shape
    pearson = None
    if (pearson_sum is None) != (n_windows is None):
        raise CountTableError("give both pearson_sum and n_windows, or neither")
    if pearson_sum is not None and n_windows is not None:
        pearson = mean_abs_pearson(pearson_sum, n_windows)
        if len(pearson) != n_neurons:
            raise CountTableError(
                f"pearson_sum has {len(pearson)} entries, fire_by_pos has {n_neurons} neurons"
            )
    by_mi = np.argsort(-mi, kind="stable")  # (W,) descending I, ties by neuron id
    positional = by_mi[mi[by_mi] > threshold]
    top = by_mi[:top_k]
    errors = {}
    if resampled is not None:
        bootstrap, resampled_mi = resampled  # (R, W)
        errors = {
            "n_positional_se": float(bootstrap.se((resampled_mi > threshold).sum(1))),
            "top_mutual_information_se": bootstrap.se(resampled_mi[:, top]).tolist(),
            "uncertainty": bootstrap.method,
            "se_df": bootstrap.df,
        }
    return PositionalLayerFinding(
        **errors,
        model=model,
        layer=layer,
        n_layers=n_layers,
        n_neurons=n_neurons,
        window_length=n_positions,
        n_tokens=int(np.asarray(tokens_by_pos).sum()),
        threshold=threshold,
        n_positional=len(positional),
        positional_neurons=positional.tolist(),
        mutual_information=mi[positional].tolist(),
        mean_abs_pearson=None if pearson is None else pearson[positional].tolist(),
        main_ranges=[main_range(rate_by_pos[:, n], rate[n]) for n in positional],
        above_rate_ranges={
            int(n): above_rate_ranges(rate_by_pos[:, n], rate[n]) for n in positional
        },
        top_neurons=top.tolist(),
        top_mutual_information=mi[top].tolist(),
        top_overall_rate=rate[top].tolist(),
        top_firing_by_position={int(n): rate_by_pos[:, n].tolist() for n in top},
    )


def positional_measures(stats: NeuronStats, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """Both measures for every neuron of ``layer``: I(act; pos) in nats and the
    secondary mean |Pearson r(act, pos)|, each float64[W] (the scatter figure's axes)."""
    layer_stats = stats.layer(layer)
    mi = positional_mutual_information(
        layer_stats.fire_by_pos.numpy(), stats.tokens_by_pos.numpy()
    )  # (W,)
    return mi, mean_abs_pearson(layer_stats.pearson_abs_sum.numpy(), stats.n_windows)  # (W,)


def positional_layer_from_stats(
    stats: NeuronStats, layer: int, *, model: str, **options
) -> PositionalLayerFinding:
    """:func:`analyse_positional_layer` on the streamed statistics of one layer."""
    layer_stats = stats.layer(layer)
    bootstrap = stats.group_bootstrap()
    resampled = None
    if bootstrap is not None:
        resampled = (bootstrap, resampled_mutual_information(stats, layer, bootstrap))
    return analyse_positional_layer(
        resampled=resampled,
        model=model,
        layer=layer,
        n_layers=stats.n_layers,
        fire_by_pos=layer_stats.fire_by_pos.numpy(),
        tokens_by_pos=stats.tokens_by_pos.numpy(),
        pearson_sum=layer_stats.pearson_abs_sum.numpy(),
        n_windows=stats.n_windows,
        **options,
    )


RESAMPLE_CHUNK = 25  # resamples of fire_by_pos held at once: 25·T·W int64


def resampled_mutual_information(
    stats: NeuronStats, layer: int, bootstrap: GroupBootstrap
) -> np.ndarray:
    """``(R, W)``: I(act; pos) of every neuron on each resample of the window groups."""
    out = []
    for start in range(0, bootstrap.weights.shape[0], RESAMPLE_CHUNK):
        fire, tokens = stats.fire_by_pos_resampled(
            layer, bootstrap, slice(start, start + RESAMPLE_CHUNK)
        )
        out += [
            positional_mutual_information(f, t)
            for f, t in zip(fire.numpy(), tokens.numpy(), strict=True)
        ]
    return np.stack(out)
