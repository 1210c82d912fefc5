"""Neuron cards: the evidence behind a neuron that a finding names, from the one streamed
pass (no further forward).

A card of ``mlp`` neuron n of layer l holds its firing frequency with a 95% interval (the
bootstrap over the window groups of :mod:`neuronspec.capture.window_groups`), its firing by window position
fr_n(p) = firings at p / windows (Voita et al. Fig. 5's curve), the tokens that cover most
of its firings (count, share of its firings, and the share of the token's occurrences it
fires on; counted positions as in METHODS §3), its top-activating contexts (the streamed
top k of :mod:`neuronspec.capture.top_contexts`, each with :data:`BEFORE` tokens of
context before and :data:`AFTER` after), and the neuron sets of the run that name it with
each finding's own numbers for it (the ``evidence`` of ``SpecSession.record_neuron_set``:
KL impact, IG attribution, Δ variance, ...).
Token ids stay ids (``token``, ``context_tokens``); the report shows their text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from neuronspec.analyses.dead import firing_frequency_se
from neuronspec.capture.stats import NeuronStats
from neuronspec.errors import NeuronSpecError
from neuronspec.findings import Finding
from neuronspec.uncertainty import normal_interval

BEFORE, AFTER = 8, 3  # context tokens around a top activation
TOP_TOKENS = 10
MAX_CARDS_PER_SET = 32  # cards per (layer, neuron set) in a run: the lowest ids


@dataclass(frozen=True)
class NeuronCard(Finding):
    model: str
    layer: int
    neuron: int
    n_tokens: int
    firing_frequency: float
    firing_frequency_se: float | None
    firing_frequency_interval: tuple[float, float] | None  # 95%, window-group bootstrap
    firing_by_position: list[float]  # fr_n(p), p = 0 .. T-1
    token_coverage: list[dict[str, Any]]  # token, count, share_of_firings, share_of_occurrences
    contexts: list[dict[str, Any]]  # value, window, position, context_tokens, at
    named_by: list[str]  # neuron sets of the run naming it (dead, positional, causal, ...)
    evidence: dict[str, dict[str, Any]]  # set -> that finding's numbers for this neuron


def _top_tokens(stats: NeuronStats, table, neuron: int, fires: int) -> list[dict[str, Any]]:
    if table is None or fires == 0:
        return []
    neurons, tokens, counts = table
    start, stop = np.searchsorted(neurons, [neuron, neuron + 1])
    tokens, counts = tokens[start:stop], counts[start:stop]
    order = np.lexsort((tokens, -counts))[:TOP_TOKENS]
    occurrences = stats.token_count.numpy()
    counted_fires = int(counts.sum())
    return [
        {
            "token": int(tokens[i]),
            "count": int(counts[i]),
            "share_of_firings": float(counts[i] / counted_fires),
            "share_of_occurrences": float(counts[i] / occurrences[tokens[i]]),
        }
        for i in order
    ]


def _contexts(stats: NeuronStats, windows: torch.Tensor, layer: int, neuron: int) -> list[dict]:
    layer_stats = stats.layer(layer)
    out = []
    length = windows.shape[1]
    for value, index in zip(
        layer_stats.top_value[:, neuron].tolist(), layer_stats.top_index[:, neuron].tolist(),
        strict=True,
    ):  # fmt: skip
        if index < 0:
            break
        window, position = divmod(int(index), length)
        start = max(0, position - BEFORE)
        out.append(
            {
                "value": float(value),
                "window": window,
                "position": position,
                "context_tokens": windows[window, start : position + AFTER + 1].tolist(),
                "at": position - start,  # index of the activating token in context_tokens
            }
        )
    return out


def neuron_card(
    model_id: str,
    stats: NeuronStats,
    windows: torch.Tensor,
    layer: int,
    neuron: int,
    *,
    named_by: list[str] = (),
    evidence: dict[str, dict[str, Any]] | None = None,
    table: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> NeuronCard:
    """The card of ``mlp`` neuron ``neuron`` of ``layer`` (``windows``: the analysis windows
    ``(n, T)`` the statistics were collected on; ``table``: the layer's
    :meth:`~NeuronStats.unigram_table`, built when not given)."""
    layer_stats = stats.layer(layer)
    if not 0 <= neuron < layer_stats.width:
        raise NeuronSpecError(
            f"neuron {neuron} is out of range: layer {layer} has {layer_stats.width} neurons "
            f"(0..{layer_stats.width - 1})"
        )
    if windows.shape[0] != stats.n_windows or windows.shape[1] != stats.window:
        raise NeuronSpecError(
            f"the windows ({tuple(windows.shape)}) are not the ones the statistics cover "
            f"({stats.n_windows} windows of {stats.window} tokens)"
        )
    fires = int(layer_stats.fire_by_pos[:, neuron].sum())
    if table is None and stats.config.unigrams:
        table = stats.unigram_table(layer)
    frequency = fires / stats.n_tokens
    se = interval = None
    bootstrap = stats.group_bootstrap()
    if bootstrap is not None:
        se = float(firing_frequency_se(stats, layer)[neuron])
        bounds = normal_interval(frequency, se, 0.95, bootstrap.method, df=bootstrap.df)
        interval = (bounds.low, bounds.high)
    by_position = layer_stats.fire_by_pos[:, neuron].double() / stats.tokens_by_pos.double()
    return NeuronCard(
        model=model_id,
        layer=layer,
        neuron=neuron,
        n_tokens=stats.n_tokens,
        firing_frequency=frequency,
        firing_frequency_se=se,
        firing_frequency_interval=interval,
        firing_by_position=by_position.tolist(),
        token_coverage=_top_tokens(stats, table, neuron, fires),
        contexts=_contexts(stats, windows, layer, neuron) if stats.config.top_contexts else [],
        named_by=sorted(named_by),
        evidence=dict(sorted((evidence or {}).items())),
    )


def card_key(layer: int | str, neuron: int | str) -> str:
    """The key of a card in the results (``models.<id>.cards``): ``"<layer>:<neuron>"``."""
    return f"{layer}:{neuron}"


def named_neurons(neuron_sets: dict[str, Any]) -> dict[tuple[int, int], dict[str, dict]]:
    """``{(layer, neuron): {kind: evidence}}`` of the run's neuron sets (results
    ``neuron_sets``; evidence ``{}`` where the set recorded none), at most
    :data:`MAX_CARDS_PER_SET` per (layer, kind), ``mlp`` site only."""
    named: dict[tuple[int, int], dict[str, dict]] = {}
    for layer, kinds in neuron_sets.items():
        for kind, entry in kinds.items():
            if entry.get("site", "mlp") != "mlp":
                continue
            evidence = entry.get("evidence", {})
            for neuron in entry["neurons"][:MAX_CARDS_PER_SET]:
                numbers = evidence.get(str(neuron), {})
                named.setdefault((int(layer), int(neuron)), {})[kind] = numbers
    return named


def cards_for_run(
    model_id: str, stats: NeuronStats, windows: torch.Tensor, neuron_sets: dict
) -> dict:
    """``{card_key: card JSON}`` for every neuron the run's neuron sets name (each layer's
    unigram table built once)."""
    cards, tables = {}, {}
    for (layer, neuron), kinds in sorted(named_neurons(neuron_sets).items()):
        if layer not in tables:
            tables = {layer: stats.unigram_table(layer) if stats.config.unigrams else None}
        card = neuron_card(
            model_id,
            stats,
            windows,
            layer,
            neuron,
            named_by=list(kinds),
            evidence={kind: numbers for kind, numbers in kinds.items() if numbers},
            table=tables[layer],
        )
        cards[card_key(layer, neuron)] = card.to_json()
    return cards
