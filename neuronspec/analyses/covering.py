"""Covering counts: how many n-grams, by descending count, cover a share of a neuron's
firings (Voita et al. 2023, §4 and Fig. 2; METHODS.md §3).

The counting core of :mod:`neuronspec.analyses.ngram`, whose docstring states the
definitions and the decisions (exact thresholds, ties, never-firing neurons). Inputs are
sorted sparse ``(neuron, key, count)`` triples; memory is O(pairs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from itertools import pairwise

import numpy as np

from neuronspec.errors import CountTableError

NEVER_FIRES = 0
"""Covering count reported for a neuron that never fired (it needs no unigram at all)."""

DEFAULT_COVERING_BIN_EDGES: tuple[int, ...] = (1, 2, 6, 11, 21, 51, 101, 501)
"""Lower edges of the Fig. 2 bins: 1, 2-5, 6-10, 11-20, 21-50, 51-100, 101-500, 501+."""

_MAX_DENOMINATOR = 10_000  # coverage → exact fraction; keeps count·den far below 2**63


# --------------------------------------------------------------------------- validation


def exact_fraction(name: str, value: float) -> Fraction:
    if not 0.0 < value <= 1.0:
        raise CountTableError(f"{name} must be in (0, 1], got {value!r}")
    return Fraction(value).limit_denominator(_MAX_DENOMINATOR)


def int_array(name: str, values: np.ndarray) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise CountTableError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise CountTableError(f"{name} must hold integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def sorted_pairs(
    neuron: np.ndarray, key: np.ndarray, count: np.ndarray, n_neurons: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate (neuron, key, count) triples; return them sorted by (neuron, key), count > 0."""
    if n_neurons < 0:
        raise CountTableError(f"n_neurons must be ≥ 0, got {n_neurons}")
    neuron = int_array("neuron", neuron)
    key = int_array("key", key)
    count = int_array("count", count)
    if not len(neuron) == len(key) == len(count):
        raise CountTableError(
            f"neuron, key and count must have the same length, got "
            f"{len(neuron)}, {len(key)}, {len(count)}"
        )
    if len(neuron) == 0:
        return neuron, key, count
    if neuron.min() < 0 or neuron.max() >= n_neurons:
        raise CountTableError(
            f"neuron ids must lie in [0, {n_neurons}), got range "
            f"[{neuron.min()}, {neuron.max()}]; is n_neurons the layer width?"
        )
    if key.min() < 0:
        raise CountTableError(f"keys must be ≥ 0, got {key.min()}")
    if count.min() < 0:
        raise CountTableError(f"counts must be ≥ 0, got {count.min()}")
    if not _strictly_sorted(neuron, key):
        order = np.lexsort((key, neuron))
        neuron, key, count = neuron[order], key[order], count[order]
        if not _strictly_sorted(neuron, key):
            raise CountTableError(
                "duplicate (neuron, key) pairs; merge shards by adding their counts first"
            )
    if count.min() == 0:  # a pair that never fired carries no information
        keep = count > 0
        neuron, key, count = neuron[keep], key[keep], count[keep]
    return neuron, key, count


def _strictly_sorted(neuron: np.ndarray, key: np.ndarray) -> bool:
    neuron_step = np.diff(neuron)
    return bool(np.all((neuron_step > 0) | ((neuron_step == 0) & (np.diff(key) > 0))))


def neuron_totals(neuron: np.ndarray, count: np.ndarray, n_neurons: int) -> np.ndarray:
    """Firings per neuron, int64[n_neurons], from triples sorted by neuron."""
    totals = np.zeros(n_neurons, dtype=np.int64)
    if len(neuron):
        starts = np.flatnonzero(np.r_[True, neuron[1:] != neuron[:-1]])
        totals[neuron[starts]] = np.add.reduceat(count, starts)
    return totals


# --------------------------------------------------------------------------- greedy cover


@dataclass(frozen=True)
class _Cover:
    """Triples ranked per neuron by descending count, and how many of them each neuron needs."""

    neuron: np.ndarray  # (P,) sorted by (neuron, -count, key)
    key: np.ndarray  # (P,)
    rank: np.ndarray  # (P,) 0-based rank of the triple within its neuron
    needed: np.ndarray  # (n_neurons,) entries needed to reach the target; 0 if none/not reached
    reached: np.ndarray  # (n_neurons,) bool: the neuron's entries reach its target at all


def greedy_cover(
    neuron: np.ndarray,
    key: np.ndarray,
    count: np.ndarray,
    target: np.ndarray,
    coverage: Fraction,
    n_neurons: int,
) -> _Cover:
    """Per neuron, the fewest entries (by descending count) whose counts reach coverage·target.

    Inputs are sorted by (neuron, key) with count > 0; ``target`` is int64[n_neurons]. Ties in
    count keep ascending key order because the sort below is stable.
    """
    num, den = coverage.numerator, coverage.denominator
    n_pairs = len(neuron)
    if n_pairs == 0:
        empty = np.zeros(0, dtype=np.int64)
        zeros = np.zeros(n_neurons, dtype=np.int64)
        return _Cover(empty, empty, empty, zeros, zeros.astype(bool))
    cmax = int(count.max())
    if n_neurons * (cmax + 1) < 2**62:  # one int64 sort key: (neuron, -count), stable on key
        order = np.argsort(neuron * (cmax + 1) + (cmax - count), kind="stable")
    else:
        order = np.lexsort((key, -count, neuron))
    neuron, key, count = neuron[order], key[order], count[order]  # (P,) each
    del order
    starts = np.flatnonzero(np.r_[True, neuron[1:] != neuron[:-1]])  # (S,) segment starts
    seg_len = np.diff(np.r_[starts, n_pairs])  # (S,)
    seg_neuron = neuron[starts]  # (S,)
    csum = np.cumsum(count)  # (P,) running total over all segments
    before = csum[starts] - count[starts]  # (S,) running total before each segment
    csum -= np.repeat(before, seg_len)  # (P,) running total within the segment
    seg_sum = csum[np.r_[starts[1:], n_pairs] - 1]  # (S,)
    seg_target = target[seg_neuron] * num  # (S,) compare ·den against ·num, exactly
    short = csum * den < np.repeat(seg_target, seg_len)  # (P,) prefix still below target
    del csum
    reached = np.zeros(n_neurons, dtype=bool)
    reached[seg_neuron] = seg_sum * den >= seg_target
    needed = np.bincount(neuron[short], minlength=n_neurons).astype(np.int64) + 1
    del short
    needed[~reached] = 0
    rank = np.arange(n_pairs, dtype=np.int64) - np.repeat(starts, seg_len)  # (P,)
    return _Cover(neuron, key, rank, needed, reached)


def covering_count(
    neuron: np.ndarray,
    key: np.ndarray,
    count: np.ndarray,
    *,
    n_neurons: int,
    coverage: float = 0.95,
) -> np.ndarray:
    """Smallest number of distinct keys, by descending count, covering ``coverage`` of firings.

    Args:
        neuron, key, count: int64[P] sparse firing counts (``pair_neuron``, ``pair_token``,
            ``pair_count``; or the trigram triples), unique (neuron, key) pairs. Sorted by
            (neuron, key) is the fast path; unsorted input is sorted here.
        n_neurons: layer width W.
        coverage: fraction of the neuron's firings to cover (Voita et al.: 0.95).

    Returns:
        int64[W]; :data:`NEVER_FIRES` (0) for a neuron that never fired.
    """
    frac = exact_fraction("coverage", coverage)
    neuron, key, count = sorted_pairs(neuron, key, count, n_neurons)
    totals = neuron_totals(neuron, count, n_neurons)
    return greedy_cover(neuron, key, count, totals, frac, n_neurons).needed


# --------------------------------------------------------------------------- Fig. 2 bins


def covering_bin_labels(bin_edges: Sequence[int] = DEFAULT_COVERING_BIN_EDGES) -> list[str]:
    """Labels for the bins [e_i, e_{i+1} - 1] and the last, open one: "1", "2-5", …, "501+"."""
    edges = _check_edges(bin_edges)
    labels = []
    for lo, hi in zip(edges, [*edges[1:], None], strict=True):
        if hi is None:
            labels.append(f"{lo}+")
        elif hi - 1 == lo:
            labels.append(f"{lo}")
        else:
            labels.append(f"{lo}-{hi - 1}")
    return labels


def _check_edges(bin_edges: Sequence[int]) -> list[int]:
    edges = [int(e) for e in bin_edges]
    if not edges or edges[0] != 1 or any(b <= a for a, b in pairwise(edges)):
        raise CountTableError(
            f"bin_edges must be strictly increasing lower edges starting at 1 (so every alive "
            f"neuron falls in a bin), got {list(bin_edges)}"
        )
    return edges


def covering_histogram(
    covering_counts: np.ndarray,
    *,
    bin_edges: Sequence[int] = DEFAULT_COVERING_BIN_EDGES,
) -> dict[str, int]:
    """Number of alive neurons per covering-count bin (Fig. 2), in bin order; dead ones skipped."""
    counts = int_array("covering_counts", covering_counts)
    edges = _check_edges(bin_edges)
    alive = counts[counts > 0]
    per_bin = np.bincount(np.searchsorted(edges, alive, side="right") - 1, minlength=len(edges))
    return {label: int(n) for label, n in zip(covering_bin_labels(edges), per_bin, strict=True)}


# --------------------------------------------------------------------------- detectors
