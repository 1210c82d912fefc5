"""Dead neurons (Voita et al. 2023, "Neurons in Large Language Models: Dead, N-gram,
Positional", §3; METHODS.md §2).

A neuron is *dead* if its firing frequency (fraction of tokens with ``mlp_pre`` > 0) is
≤ ``freq_cutoff`` (default 0: it never fires on the corpus); *rarely firing* if
``freq_cutoff`` < frequency < ``rare_cutoff`` (default 0.05), so the two sets are disjoint
for every cutoff. Per layer we report both fractions and
the mean frequency of the alive neurons (their Figure 1a/1b against relative depth).
"""

from __future__ import annotations

from dataclasses import dataclass

from neuronspec.capture.stats import NeuronStats
from neuronspec.findings import Finding


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
    return DeadLayerFinding(
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


def dead_neurons_all_layers(stats: NeuronStats, **options) -> list[DeadLayerFinding]:
    return [dead_neurons(stats, layer, **options) for layer in range(stats.n_layers)]
