"""Dead neurons (Voita et al. 2023, "Neurons in Large Language Models: Dead, N-gram,
Positional", §3; METHODS.md §2).

A neuron is *dead* if its firing frequency (fraction of tokens with ``mlp_pre`` > 0) is
≤ ``freq_cutoff`` (default 0: it never fires on the corpus); *rarely firing* if
``freq_cutoff`` < frequency < ``rare_cutoff`` (default 0.05), so the two sets are disjoint
for every cutoff. Per layer we report both fractions and
the mean frequency of the alive neurons (their Figure 1a/1b against relative depth).

Uncertainty: each fraction, the mean alive frequency and each neuron's firing frequency
have a standard error from the bootstrap over the pass's window groups
(:mod:`neuronspec.capture.window_groups`): the statistic recomputed on 200 resamples of
the groups of windows, G − 1 degrees of freedom (``se_df``). ``estimate("dead_fraction")``
gives it as an :class:`~neuronspec.uncertainty.Estimate` (``interval(0.95)``,
``below(0.1, alpha=0.01)``, Student-t quantiles). A count's interval is one for the count
a corpus of this size shows, its expectation over corpora. No resampling sees firing the
corpus never showed: a neuron dead on the corpus is dead in every resample. What the
corpus does bound is reported beside it: a neuron that fired in none of n windows fires in
a window with probability below 3/n at 95% (the rule of three, ``dead_window_rate_bound``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neuronspec.capture.stats import NeuronStats
from neuronspec.errors import NeuronSpecError
from neuronspec.findings import Finding
from neuronspec.uncertainty import NO_WINDOW_GROUPS, Estimate


@dataclass(frozen=True)
class DeadLayerFinding(Finding):
    layer: int
    relative_depth: float  # l / (L - 1), the x-axis of Figure 1
    n_neurons: int
    n_tokens: int
    freq_cutoff: float
    rare_cutoff: float
    n_dead: int
    dead_fraction: float
    rare_fraction: float  # freq_cutoff < freq < rare_cutoff, as a fraction of all neurons
    mean_alive_frequency: float  # nan-free: 0.0 when no neuron is alive
    dead_neurons: tuple[int, ...]
    # bootstrap SEs over window groups (None when the pass kept no window groups)
    dead_fraction_se: float | None = None
    rare_fraction_se: float | None = None
    mean_alive_frequency_se: float | None = None
    uncertainty: str = ""
    se_df: int | None = None  # degrees of freedom of the SEs: non-empty window groups − 1
    dead_window_rate_bound: float | None = None  # 3 / n_windows: 95% bound, rule of three

    def snapshot_view(self) -> dict:
        """Every field but the dead neurons' ids (their count stays)."""
        return {k: v for k, v in self.to_json().items() if k != "dead_neurons"}

    def estimate(self, name: str) -> Estimate:
        """``dead_fraction``, ``rare_fraction`` or ``mean_alive_frequency`` with its SE."""
        se = getattr(self, f"{name}_se", None)
        if se is None:
            raise NeuronSpecError(f"no standard error of {name!r}: {NO_WINDOW_GROUPS}")
        return Estimate(getattr(self, name), se, self.uncertainty, self.se_df)


def dead_neurons(
    stats: NeuronStats,
    layer: int,
    *,
    freq_cutoff: float = 0.0,
    rare_cutoff: float = 0.05,
    min_tokens: int | None = None,
) -> DeadLayerFinding:
    """Dead and rarely firing neurons of ``layer`` from the streamed firing counts."""
    stats.require_tokens(min_tokens)
    n_tokens = stats.n_tokens
    frequency = stats.layer(layer).fire_count.double() / n_tokens  # (W,)
    dead = frequency <= freq_cutoff
    rare = (frequency > freq_cutoff) & (frequency < rare_cutoff)  # disjoint from dead
    alive = ~dead
    width = frequency.numel()
    errors = _bootstrap_errors(stats, layer, freq_cutoff, rare_cutoff)
    if freq_cutoff == 0.0 and stats.n_windows:
        errors["dead_window_rate_bound"] = 3.0 / stats.n_windows
    return DeadLayerFinding(
        **errors,
        layer=layer,
        relative_depth=layer / max(stats.n_layers - 1, 1),
        n_neurons=width,
        n_tokens=n_tokens,
        freq_cutoff=freq_cutoff,
        rare_cutoff=rare_cutoff,
        n_dead=int(dead.sum()),
        dead_fraction=float(dead.sum()) / width,
        rare_fraction=float(rare.sum()) / width,
        mean_alive_frequency=float(frequency[alive].mean()) if alive.any() else 0.0,
        dead_neurons=tuple(int(i) for i in dead.nonzero().flatten()),
    )


def _bootstrap_errors(stats: NeuronStats, layer: int, freq_cutoff: float, rare_cutoff: float):
    bootstrap = stats.group_bootstrap()
    if bootstrap is None:
        return {}
    fire, tokens = stats.fire_count_resampled(layer, bootstrap)  # (R, W), (R,)
    frequency = (fire / tokens[:, None]).numpy()  # (R, W)
    dead = frequency <= freq_cutoff
    rare = (frequency > freq_cutoff) & (frequency < rare_cutoff)
    alive = np.where(~dead, frequency, np.nan)
    with np.errstate(invalid="ignore"):
        mean_alive = np.nan_to_num(np.nanmean(alive, axis=1), nan=0.0)  # (R,)
    return {
        "dead_fraction_se": float(bootstrap.se(dead.mean(1))),
        "rare_fraction_se": float(bootstrap.se(rare.mean(1))),
        "mean_alive_frequency_se": float(bootstrap.se(mean_alive)),
        "uncertainty": bootstrap.method,
        "se_df": bootstrap.df,
    }


def firing_frequency_se(stats: NeuronStats, layer: int) -> np.ndarray:
    """``(W,)`` SE of each neuron's firing frequency, by the bootstrap over window groups."""
    bootstrap = stats.group_bootstrap()
    if bootstrap is None:
        raise NeuronSpecError(f"no standard error of firing frequencies: {NO_WINDOW_GROUPS}")
    fire, tokens = stats.fire_count_resampled(layer, bootstrap)  # (R, W), (R,)
    return bootstrap.se((fire / tokens[:, None]).numpy())


def dead_neurons_all_layers(stats: NeuronStats, **options) -> list[DeadLayerFinding]:
    return [dead_neurons(stats, layer, **options) for layer in range(stats.n_layers)]
