"""N-gram and token-detecting neurons, from sparse firing counts (METHODS.md §3).

Voita, Ferrando, Nalmpantis (2023), "Neurons in Large Language Models: Dead, N-gram,
Positional", §4. A neuron *fires* at position k when its gate pre-activation is > 0; the
n-gram ending at k *triggered* it. Fig. 2 bins every alive neuron by the smallest number of
distinct unigrams, taken by descending count, whose counts cover ≥95% of its firings. A
neuron is *token-detecting* when 1–5 unigrams cover ≥95% of its firings and each of them is
*covered*: the neuron fires on ≥95% of that token's occurrences (trigram variant: 1–50
trigrams, same 95% rules). BOS/document-start positions are excluded by the counting pass.

Everything here works on sorted sparse ``(neuron, key, count)`` triples — ``key`` is a token
id for unigrams, ``(t[k-2]·V + t[k-1])·V + t[k]`` for trigrams — plus the occurrences of
each key. No function materialises a dense ``[neurons, vocab]`` matrix; memory is O(pairs).

Decisions where METHODS.md is silent (a reviewer should check these):

- **Exact thresholds.** A coverage such as 0.95 is read as the nearest fraction with
  denominator ≤ 10 000 (0.95 → 19/20) and every "≥ 95%" is decided in integer arithmetic,
  ``covered·20 ≥ 19·total``: 19 of 20 firings is exactly 95% and qualifies, with no float
  round-off at the boundary.
- **Ties.** Unigrams are ranked by descending count, ties by ascending key. Ties never change
  a covering count (it only depends on the sorted multiset of counts) nor whether a neuron
  is a detector; they only decide which of two equally frequent tokens is *listed* when just
  one of them is needed.
- **Never-firing neurons** have covering count 0 (:data:`NEVER_FIRES`); they are not binned
  in Fig. 2, which is over alive neurons.
- **Which tokens a detector detects.** Take the tokens the neuron covers (fires on ≥95% of
  their occurrences), by descending count; the neuron's tokens are the shortest such prefix
  whose counts reach ≥95% of all its firings. It is a detector when that prefix exists and
  has 1–5 tokens. This meets all three rules literally (1–5 unigrams covering ≥95% of its
  firings, each covered, the covered tokens accounting for ≥95%). Further covered tokens
  that are not needed (for example a rare token seen twice) neither disqualify the neuron
  nor are listed. The covering count of a detector is therefore ≤ its number of tokens.
- **Fig. 4 at layer 0.** With no lower layer, every token of layer 0 is "new overall" and
  "new versus the previous layer".
- **Uncertainty of the detector count** (``--detector-intervals``, opt-in). The pass then
  also counts the (neuron, token) firings and the token occurrences of each window group
  (:mod:`neuronspec.capture.window_groups`); a resample's counts are the groups' counts
  weighted by its multinomial draw (integers, so every "≥ 95%" is decided exactly as on
  the corpus), the detectors are found again on them, and the count's SE is the group
  bootstrap's. The window stays the resampled unit: a token's occurrences and the
  neuron's firings on them move together, as they did in the corpus. Opt-in because the
  per-group table is up to G times the unigram pairs and is counted by sort: on the
  embedded models the pass takes about twice as long with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from neuronspec.analyses.covering import (
    DEFAULT_COVERING_BIN_EDGES,
    covering_count,
    covering_histogram,
    exact_fraction,
    greedy_cover,
    int_array,
    neuron_totals,
    sorted_pairs,
)
from neuronspec.capture.stats import NeuronStats
from neuronspec.errors import CountTableError, NeuronSpecError
from neuronspec.findings import Finding, LayerFindings
from neuronspec.uncertainty import NO_WINDOW_GROUPS, Estimate

MAX_DETECTOR_UNIGRAMS = 5  # Voita et al.: "triggered by at most 5 unigrams"
MAX_DETECTOR_TRIGRAMS = 50  # Voita et al., trigram variant


def ngram_detectors(
    neuron: np.ndarray,
    key: np.ndarray,
    count: np.ndarray,
    occurrence_key: np.ndarray,
    occurrence_count: np.ndarray,
    *,
    n_neurons: int,
    max_ngrams: int = MAX_DETECTOR_UNIGRAMS,
    coverage: float = 0.95,
    occurrence_coverage: float = 0.95,
) -> dict[int, list[int]]:
    """Detector neurons and the keys each detects (module docstring: "Which tokens").

    A key is *covered* by a neuron when ``count ≥ occurrence_coverage · occurrences(key)``.
    The neuron is a detector when the covered keys, by descending count (ties: ascending key),
    reach ``coverage`` of all its firings within ``max_ngrams`` keys.

    Args:
        neuron, key, count: int64[P] firing counts, unique (neuron, key) pairs.
        occurrence_key, occurrence_count: int64[R] how often each key occurred at the counted
            positions; unique keys, every fired key must be listed.
        n_neurons: layer width W.
        max_ngrams: 5 for unigrams, 50 for trigrams (Voita et al.).

    Returns:
        ``{neuron: [key, …]}`` for each detector neuron, in ascending neuron order; keys by
        descending count.
    """
    if max_ngrams < 1:
        raise CountTableError(f"max_ngrams must be ≥ 1, got {max_ngrams}")
    frac = exact_fraction("coverage", coverage)
    occ_frac = exact_fraction("occurrence_coverage", occurrence_coverage)
    neuron, key, count = sorted_pairs(neuron, key, count, n_neurons)
    occurrences = _occurrences_of(key, count, occurrence_key, occurrence_count)  # (P,)
    totals = neuron_totals(neuron, count, n_neurons)
    covered = count * occ_frac.denominator >= occurrences * occ_frac.numerator  # (P,)
    del occurrences
    cover = greedy_cover(neuron[covered], key[covered], count[covered], totals, frac, n_neurons)
    is_detector = cover.reached & (cover.needed <= max_ngrams)
    keep = is_detector[cover.neuron] & (cover.rank < cover.needed[cover.neuron])
    det_neuron, det_key = cover.neuron[keep], cover.key[keep]
    if len(det_neuron) == 0:
        return {}
    bounds = np.flatnonzero(np.r_[True, det_neuron[1:] != det_neuron[:-1]])
    return {
        int(n): keys.tolist()
        for n, keys in zip(det_neuron[bounds], np.split(det_key, bounds[1:]), strict=True)
    }


def _occurrences_of(
    key: np.ndarray, count: np.ndarray, occurrence_key: np.ndarray, occurrence_count: np.ndarray
) -> np.ndarray:
    """Occurrences of each triple's key, int64[P]; checks that firings ≤ occurrences."""
    occ_key = int_array("occurrence_key", occurrence_key)
    occ_count = int_array("occurrence_count", occurrence_count)
    if len(occ_key) != len(occ_count):
        raise CountTableError(
            f"occurrence_key and occurrence_count must have the same length, got "
            f"{len(occ_key)}, {len(occ_count)}"
        )
    if len(key) == 0:
        return np.zeros(0, dtype=np.int64)
    if len(occ_key) and np.any(np.diff(occ_key) <= 0):
        order = np.argsort(occ_key, kind="stable")
        occ_key, occ_count = occ_key[order], occ_count[order]
        if np.any(np.diff(occ_key) <= 0):
            raise CountTableError("occurrence_key holds duplicate keys")
    where = np.searchsorted(occ_key, key)  # (P,)
    found = where < len(occ_key)
    found[found] = occ_key[where[found]] == key[found]
    if not found.all():
        missing = key[~found][:5].tolist()
        raise CountTableError(f"keys fired on but missing from the occurrence table: {missing}…")
    occurrences = occ_count[where]
    if np.any(count > occurrences):
        bad = np.flatnonzero(count > occurrences)[0]
        raise CountTableError(
            f"key {key[bad]} fired {count[bad]} times but occurred only {occurrences[bad]} "
            "times; the firing and occurrence tables come from different passes?"
        )
    return occurrences


def token_detectors(
    pair_neuron: np.ndarray,
    pair_token: np.ndarray,
    pair_count: np.ndarray,
    token_count: np.ndarray,
    *,
    n_neurons: int,
    max_tokens: int = MAX_DETECTOR_UNIGRAMS,
    coverage: float = 0.95,
    occurrence_coverage: float = 0.95,
) -> dict[int, list[int]]:
    """Token-detecting neurons (unigrams) from the dense ``token_count: int64[V]``."""
    token_count = int_array("token_count", token_count)
    return ngram_detectors(
        pair_neuron,
        pair_token,
        pair_count,
        np.arange(len(token_count), dtype=np.int64),
        token_count,
        n_neurons=n_neurons,
        max_ngrams=max_tokens,
        coverage=coverage,
        occurrence_coverage=occurrence_coverage,
    )


def trigram_key(t0: np.ndarray, t1: np.ndarray, t2: np.ndarray, *, vocab_size: int) -> np.ndarray:
    """Key of the trigram (t[k-2], t[k-1], t[k]): ``(t0·V + t1)·V + t2``."""
    t0, t1, t2 = (np.asarray(t, dtype=np.int64) for t in (t0, t1, t2))
    return (t0 * vocab_size + t1) * vocab_size + t2


def decode_trigram_key(key: np.ndarray, *, vocab_size: int) -> np.ndarray:
    """Inverse of :func:`trigram_key`: int64[..., 3] with (t[k-2], t[k-1], t[k])."""
    key = np.asarray(key, dtype=np.int64)
    return np.stack([key // vocab_size**2, (key // vocab_size) % vocab_size, key % vocab_size], -1)


# --------------------------------------------------------------------------- findings


def relative_depth(layer: int, n_layers: int) -> float:
    """l / (L-1), the x-axis of cross-model figures; 0 for a one-layer model."""
    return layer / (n_layers - 1) if n_layers > 1 else 0.0


@dataclass(frozen=True)
class NgramLayerFinding(Finding):
    """N-gram statistics of one layer (Voita et al. Fig. 2 and the detectors of Fig. 3-4)."""

    model: str
    layer: int
    n_layers: int  # layers in the model, for the relative depth l/(L-1)
    n_neurons: int
    n_tokens: int  # counted (non-BOS) positions
    n_alive: int  # neurons that fired at least once at a counted position
    coverage: float  # share of a neuron's firings its unigrams must cover (0.95)
    occurrence_coverage: float  # share of a token's occurrences a neuron must fire on (0.95)
    max_tokens: int  # a detector has 1..max_tokens tokens (5)
    covering_histogram: dict[str, int]  # Fig. 2: alive neurons per covering-count bin
    n_token_detectors: int  # Fig. 3a
    detector_tokens: dict[int, list[int]]  # neuron -> tokens it detects
    detected_tokens: list[int]  # sorted distinct tokens with a detector in this layer (Fig. 3b)
    n_trigram_detectors: int | None = None  # None: no trigram tables were given
    detector_trigrams: dict[int, list[int]] | None = None  # neuron -> trigram keys
    # bootstrap SE over window groups (None without --detector-intervals)
    n_token_detectors_se: float | None = None
    uncertainty: str = ""
    se_df: int | None = None

    @property
    def relative_depth(self) -> float:
        return relative_depth(self.layer, self.n_layers)

    def estimate(self, name: str = "n_token_detectors") -> Estimate:
        """``n_token_detectors`` with its bootstrap SE (Student-t, ``se_df``)."""
        if self.n_token_detectors_se is None:
            raise NeuronSpecError(
                f"no standard error of {name!r}: the statistics were collected without "
                "--detector-intervals, or " + NO_WINDOW_GROUPS
            )
        return Estimate(
            getattr(self, name), self.n_token_detectors_se, self.uncertainty, self.se_df
        )


def analyse_ngram_layer(
    *,
    model: str,
    layer: int,
    n_layers: int,
    n_neurons: int,
    vocab_size: int,
    pair_neuron: np.ndarray,
    pair_token: np.ndarray,
    pair_count: np.ndarray,
    token_count: np.ndarray,
    tri_neuron: np.ndarray | None = None,
    tri_key: np.ndarray | None = None,
    tri_count: np.ndarray | None = None,
    tri_occ_key: np.ndarray | None = None,
    tri_occ_count: np.ndarray | None = None,
    coverage: float = 0.95,
    occurrence_coverage: float = 0.95,
    max_tokens: int = MAX_DETECTOR_UNIGRAMS,
    max_trigrams: int = MAX_DETECTOR_TRIGRAMS,
    bin_edges: Sequence[int] = DEFAULT_COVERING_BIN_EDGES,
) -> NgramLayerFinding:
    """Fig. 2 histogram and token (and, if given, trigram) detectors of one layer."""
    if not 0 <= layer < n_layers:
        raise CountTableError(f"layer {layer} outside [0, {n_layers})")
    token_count = int_array("token_count", token_count)
    if len(token_count) != vocab_size:
        raise CountTableError(
            f"token_count has {len(token_count)} entries, vocab_size is {vocab_size}"
        )
    pair_token = int_array("pair_token", pair_token)
    if len(pair_token) and pair_token.max() >= vocab_size:
        raise CountTableError(f"token id {pair_token.max()} ≥ vocab_size {vocab_size}")
    counts = np.zeros(n_neurons, dtype=np.int64)
    detectors: dict[int, list[int]] = {}
    for block in _neuron_blocks(pair_neuron, n_neurons):  # every neuron is in one block
        neuron, token, count = pair_neuron[block], pair_token[block], pair_count[block]
        counts += covering_count(neuron, token, count, n_neurons=n_neurons, coverage=coverage)
        detectors |= token_detectors(
            neuron,
            token,
            count,
            token_count,
            n_neurons=n_neurons,
            max_tokens=max_tokens,
            coverage=coverage,
            occurrence_coverage=occurrence_coverage,
        )
    trigram_tables = (tri_neuron, tri_key, tri_count, tri_occ_key, tri_occ_count)
    trigrams: dict[int, list[int]] | None = None
    if any(t is not None for t in trigram_tables):
        if any(t is None for t in trigram_tables):
            raise CountTableError(
                "give all five trigram tables (tri_neuron, tri_key, tri_count, tri_occ_key, "
                "tri_occ_count) or none"
            )
        trigrams = ngram_detectors(
            tri_neuron,
            tri_key,
            tri_count,
            tri_occ_key,
            tri_occ_count,
            n_neurons=n_neurons,
            max_ngrams=max_trigrams,
            coverage=coverage,
            occurrence_coverage=occurrence_coverage,
        )
    return NgramLayerFinding(
        model=model,
        layer=layer,
        n_layers=n_layers,
        n_neurons=n_neurons,
        n_tokens=int(token_count.sum()),
        n_alive=int(np.count_nonzero(counts)),
        coverage=coverage,
        occurrence_coverage=occurrence_coverage,
        max_tokens=max_tokens,
        covering_histogram=covering_histogram(counts, bin_edges=bin_edges),
        n_token_detectors=len(detectors),
        detector_tokens=detectors,
        detected_tokens=sorted({t for tokens in detectors.values() for t in tokens}),
        n_trigram_detectors=None if trigrams is None else len(trigrams),
        detector_trigrams=trigrams,
    )


NEURON_BLOCK_PAIRS = 8_000_000
"""Pairs per block of neurons that :func:`analyse_ngram_layer` analyses at once: its
working memory (about 100 bytes per pair) stays bounded however large the table."""


def _neuron_blocks(pair_neuron: np.ndarray, n_neurons: int) -> list[slice]:
    """Slices of a table sorted by neuron into blocks of whole neurons, about
    :data:`NEURON_BLOCK_PAIRS` pairs each (every neuron's quantities depend on its own
    pairs only); one slice for a table not sorted by neuron."""
    pair_neuron = np.asarray(pair_neuron)
    n_pairs = len(pair_neuron)
    if n_pairs <= NEURON_BLOCK_PAIRS or np.any(np.diff(pair_neuron) < 0):
        return [slice(0, n_pairs)]
    starts = np.searchsorted(pair_neuron, np.arange(n_neurons + 1))  # (W + 1,) first pair
    cuts, last = [0], 0
    for start in starts[1:-1].tolist():
        if start - last >= NEURON_BLOCK_PAIRS:
            cuts.append(start)
            last = start
    cuts.append(n_pairs)
    return [slice(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


@dataclass(frozen=True)
class TokenDetectorSummary(Finding):
    """Token detectors across layers of one model: Voita et al. Fig. 3a, 3b and 4."""

    model: str
    n_layers: int
    layers: list[int]
    relative_depth: list[float]  # l / (L-1)
    n_detectors: list[int]  # Fig. 3a: token-detecting neurons per layer
    n_tokens: list[int]  # Fig. 3b solid: distinct tokens with a detector in layer l
    n_tokens_cumulative: list[int]  # Fig. 3b dashed: … in layers 0..l
    n_new_overall: list[int]  # Fig. 4: tokens of layer l covered in no lower layer
    n_new_vs_previous: list[int]  # Fig. 4: tokens of layer l not covered in layer l-1
    # bootstrap SEs of n_detectors (--detector-intervals; None without) and their df
    n_detectors_se: list[float] | None = None
    se_df: int | None = None


class NgramFindings(LayerFindings):
    """The ``NgramLayerFinding`` of every layer of one model, with their Fig. 3-4 summary."""

    def __init__(self, findings: Sequence[NgramLayerFinding]):
        super().__init__("ngram", findings)
        self.summary = summarise_token_detectors(list(self))

    def snapshot_view(self) -> dict:
        """The summary, and per layer the alive neurons, the covering-unigram histogram
        (Fig. 2) and the number of token detectors."""
        layers = [
            {
                "layer": f.layer,
                "n_alive": f.n_alive,
                "covering_histogram": f.covering_histogram,
                "n_token_detectors": f.n_token_detectors,
                # with --detector-intervals only: a run without it keeps its snapshots
                **({} if f.n_token_detectors_se is None else
                   {"n_token_detectors_se": f.n_token_detectors_se}),
            }
            for f in self
        ]  # fmt: skip
        summary = self.summary.to_json()
        if summary["n_detectors_se"] is None:  # without --detector-intervals: as before
            del summary["n_detectors_se"], summary["se_df"]
        return {"summary": summary, "layers": layers}


def summarise_token_detectors(findings: Sequence[NgramLayerFinding]) -> TokenDetectorSummary:
    """Per-layer and cumulative token-detector counts (Fig. 3-4) of one model.

    ``findings`` must be layers 0, 1, …, m-1 of one model (any order): "new overall" means
    "in no lower layer", which is only known when every lower layer was analysed.
    """
    if not findings:
        raise CountTableError("no layer findings to summarise")
    ordered = sorted(findings, key=lambda f: f.layer)
    models = {(f.model, f.n_layers) for f in ordered}
    if len(models) != 1:
        raise CountTableError(f"findings mix models: {sorted(models)}")
    layers = [f.layer for f in ordered]
    if layers != list(range(len(layers))):
        raise CountTableError(
            f"need consecutive layers from 0 (Fig. 4 compares with every lower layer), got {layers}"
        )
    seen: set[int] = set()
    previous: set[int] = set()
    n_tokens, cumulative, new_overall, new_vs_previous = [], [], [], []
    for finding in ordered:
        tokens = set(finding.detected_tokens)
        n_tokens.append(len(tokens))
        new_overall.append(len(tokens - seen))
        new_vs_previous.append(len(tokens - previous))
        seen |= tokens
        previous = tokens
        cumulative.append(len(seen))
    n_layers = ordered[0].n_layers
    with_se = all(f.n_token_detectors_se is not None for f in ordered)
    return TokenDetectorSummary(
        model=ordered[0].model,
        n_layers=n_layers,
        layers=layers,
        relative_depth=[f.relative_depth for f in ordered],
        n_detectors=[f.n_token_detectors for f in ordered],
        n_tokens=n_tokens,
        n_tokens_cumulative=cumulative,
        n_new_overall=new_overall,
        n_new_vs_previous=new_vs_previous,
        n_detectors_se=[f.n_token_detectors_se for f in ordered] if with_se else None,
        se_df=ordered[0].se_df if with_se else None,
    )


def ngram_layer_from_stats(
    stats: NeuronStats, layer: int, *, model: str, trigrams: bool | None = None, **options
) -> NgramLayerFinding:
    """:func:`analyse_ngram_layer` on the streamed statistics of one layer.

    Trigram detectors are included when the statistics hold trigram counts (or when
    ``trigrams=True``, which then requires them)."""
    neuron, token, count = stats.unigram_table(layer)
    use_trigrams = stats.config.trigrams if trigrams is None else trigrams
    trigram_tables = {}
    if use_trigrams:
        tri_neuron, tri_key, tri_count = stats.trigram_table(layer)
        tri_occ_key, tri_occ_count = stats.trigram_occurrences()
        trigram_tables = dict(
            tri_neuron=tri_neuron,
            tri_key=tri_key,
            tri_count=tri_count,
            tri_occ_key=tri_occ_key,
            tri_occ_count=tri_occ_count,
        )
    finding = analyse_ngram_layer(
        model=model,
        layer=layer,
        n_layers=stats.n_layers,
        n_neurons=stats.layer(layer).width,
        vocab_size=stats.vocab_size,
        pair_neuron=neuron,
        pair_token=token,
        pair_count=count,
        token_count=stats.token_count.numpy(),
        **trigram_tables,
        **options,
    )
    bootstrap = stats.group_bootstrap()
    if not stats.config.detector_intervals or bootstrap is None:
        return finding
    detector_options = {k: v for k, v in options.items() if k in _DETECTOR_OPTIONS}
    resampled = token_detector_counts_resampled(stats, layer, bootstrap.weights, **detector_options)
    return dataclasses.replace(
        finding,
        n_token_detectors_se=float(bootstrap.se(resampled)),
        uncertainty=bootstrap.method,
        se_df=bootstrap.df,
    )


_DETECTOR_OPTIONS = ("coverage", "occurrence_coverage", "max_tokens")


def token_detector_counts_resampled(
    stats: NeuronStats, layer: int, weights: torch.Tensor, **options
) -> np.ndarray:
    """``(R,)`` int64: the token-detector count of ``layer`` on each resample of the window
    groups, ``weights (R, G)`` (integer draws, as
    :class:`~neuronspec.capture.window_groups.GroupBootstrap` makes them); ``options``:
    those of :func:`token_detectors`. A resample's (neuron, token) firings and token
    occurrences are the groups' weighted sums, exact in int64."""
    neuron, token, group, count = stats.unigram_group_table(layer)
    draws = weights.round().long().numpy()  # (R, G)
    if not torch.equal(weights.double(), torch.from_numpy(draws).double()):
        raise NeuronSpecError("resample weights of the detector counts must be integers")
    pair = np.r_[True, (neuron[1:] != neuron[:-1]) | (token[1:] != token[:-1])]
    starts = np.flatnonzero(pair)  # first entry of each (neuron, token) pair
    pair_neuron, pair_token = neuron[starts], token[starts]
    occurrences = draws @ stats.token_count_groups.numpy()  # (R, V)
    width = stats.layer(layer).width
    counts = np.empty(len(draws), dtype=np.int64)
    for r, draw in enumerate(draws):
        pair_count = np.add.reduceat(draw[group] * count, starts) if len(starts) else count[:0]
        fired = pair_count > 0
        counts[r] = len(
            token_detectors(
                pair_neuron[fired],
                pair_token[fired],
                pair_count[fired],
                occurrences[r],
                n_neurons=width,
                **options,
            )
        )
    return counts
