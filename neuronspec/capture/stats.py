"""Streaming, mergeable neuron statistics (one pass over the corpus fills all of them).

Per layer, from the ``mlp_pre`` site (firing = pre-activation > threshold, METHODS §1)
and the ``mlp`` site (activation values):

==================  =====================  ==================================================
name                shape / dtype          meaning
==================  =====================  ==================================================
fire_by_pos         (T, W) int32           firings of neuron n at window position p
act_sum             (W,) float64           Σ a over all tokens (``mlp`` site)
act_sumsq           (W,) float64           Σ a²
act_absmax          (W,) float64           max |a|                                 (merge: max)
pearson_abs_sum     (W,) float64           Σ over windows of |Pearson r(a, position)|
abs_sketch          (n_sketch + 2,) int64  |a| over all (token, neuron) in finer log-spaced
                                           bins (quantiles within 1%, METHODS §9; below
                                           sketch_min / at or above sketch_max at the ends)
token_sparsity      (4,) float64           over tokens whose |a| row is not all zero: count,
                                           Σ normalised entropy, Σ Gini, Σ Hoyer (METHODS §9)
pair_dense_token    (D,) int64             unigram firings at counted positions (not window
pair_dense_offset   (D,) int64             start, not BOS), for the corpus's tokens: row r
pair_dense_bits     (D,) uint8             counts token pair_dense_token[r] (distinct, any
pair_dense          (bytes,) uint8         order), W fields of pair_dense_bits[r] bits at
                                           byte pair_dense_offset[r] (packed, see
                                           _UnigramCounter)
pair_key/count      (P,) int32             ... and for the other tokens: sparse, sorted, key =
                                           n·V + token; int64 where W·V >= 2^31
                                           (:meth:`NeuronStats.unigram_table` joins both)
tri_key/count       (Q,) int64             sparse trigram firings: key = n·V³ + trigram
==================  =====================  ==================================================

Shared by all layers: ``tokens_by_pos (T,)`` (its entry 0 is the number of windows),
``token_count (V,)`` (occurrences at counted positions), ``tri_occ_key/count`` (trigram
occurrences).

Window-mean moments (a separate block, METHODS §5; :class:`WindowMeanMoments`): per site in
``WINDOW_MEAN_SITES`` that the model has (``mlp``; ``dt`` for Mamba) and layer,
``{site}_wmean_sum (W,) float64`` = Σ over windows of the window-mean activation and
``{site}_wmean_sumsq`` = Σ of its square (``mlp``: from the window sums that
:meth:`NeuronStats.add_layer` takes anyway; ``dt``: :meth:`NeuronStats.add_window_sums`). A
text is a corpus window; the variance across texts and the corpus mean (equal-length
windows: mean of window means = mean over tokens) follow.

Every field merges by addition (``act_absmax`` by maximum, sparse tables by key union),
so shards of a corpus give the same statistics as the whole. Memory is independent of
corpus length: nothing ``(tokens, neurons)``-shaped is kept beyond the current batch.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
from dataclasses import dataclass

import numpy as np
import torch

from neuronspec.capture.replicates import poisson_weights
from neuronspec.errors import LayerOutOfRangeError, NeuronSpecError, TooFewTokensError
from neuronspec.native import kernels_available, load_library
from neuronspec.options import default

FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)  # smallest normal float32
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
STATS_BACKENDS = ("auto", "native", "torch")
"""``native``: ``neuronspec/native/stats.c`` (float32 CPU activations); ``torch``: torch
ops; ``auto``: native where it applies and builds, else torch. Both compute the same
definitions, but float sums may round differently, so the backend ``auto`` resolves to is
part of the cache key (:func:`neuronspec.capture.runner.computation_path`)."""
STATS_FORMAT = "neuronspec-stats-v9"  # v9: Poisson-bootstrap firing replicates; v5: trigrams ending at window position 2 count; v6: window-mean moments, sparsity sketch; v7: packed (neuron, token) rows, no abs_hist (abs_sketch bins the same |a| finer); v8: Mamba dt window sums from the scan, in float64  # part of the cache key: bump when an accumulator changes


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
    # Poisson-bootstrap replicates of the firing counts over windows (capture/replicates.py):
    # standard errors of firing frequencies and dead / rare fractions; 0 turns them off
    replicates: int = 64

    def __post_init__(self) -> None:
        if not FLOAT32_TINY <= self.sketch_min < self.sketch_max <= FLOAT32_MAX:
            raise NeuronSpecError(
                f"need {FLOAT32_TINY:.4g} <= sketch_min < sketch_max <= {FLOAT32_MAX:.4g} "
                f"(normal float32 numbers), got {self.sketch_min} and {self.sketch_max}"
            )
        if self.replicates < 0 or self.replicates == 1:
            raise NeuronSpecError(
                f"replicates must be 0 (off) or at least 2, got {self.replicates}"
            )
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


_INT32_KEYS = 2**31 - 1  # key spaces up to this size are sorted as int32 (about twice as fast)


def _sortable(keys: torch.Tensor) -> torch.Tensor:
    """``keys`` as int32 when every key fits (same order, sorts about twice as fast)."""
    if keys.numel() and int(keys.min()) >= 0 and int(keys.max()) <= _INT32_KEYS:
        return keys.to(torch.int32)
    return keys


def _merge_sparse(keys: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum ``counts`` of equal ``keys``; returns sorted unique int64 keys and their totals."""
    if keys.numel() == 0:
        return keys.to(torch.long), counts.to(torch.long)
    unique, inverse = torch.unique(_sortable(keys), sorted=True, return_inverse=True)
    totals = torch.zeros(unique.numel(), dtype=torch.long).index_add_(0, inverse, counts.long())
    return unique.long(), totals


def _merge_disjoint_sorted(
    a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two ``(keys, counts)`` tables whose keys are sorted, unique and disjoint.

    An entry's place in the result is its rank in its own table plus the number of keys
    of the other table below it (one ``searchsorted`` each), so nothing is sorted."""
    (a_keys, a_counts), (b_keys, b_counts) = a, b
    n = a_keys.numel() + b_keys.numel()
    keys = torch.empty(n, dtype=torch.long)
    counts = torch.empty(n, dtype=torch.long)
    a_at = torch.arange(a_keys.numel()) + torch.searchsorted(b_keys, a_keys)  # (|a|,)
    b_at = torch.arange(b_keys.numel()) + torch.searchsorted(a_keys, b_keys)  # (|b|,)
    keys[a_at], counts[a_at] = a_keys, a_counts
    keys[b_at], counts[b_at] = b_keys, b_counts
    return keys, counts


def _count_keys_native(keys: torch.Tensor, max_key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted distinct ``keys`` (int32, in ``0..max_key``; sorted in place) and their
    counts, both int32, by ``stats.c``."""
    lib = load_library()
    scratch = torch.empty_like(keys)
    distinct = lib.neuronspec_sort_keys(keys.numel(), keys.data_ptr(), scratch.data_ptr(), max_key)
    del scratch
    out_keys = torch.empty(distinct, dtype=torch.int32)
    out_counts = torch.empty(distinct, dtype=torch.int32)
    lib.neuronspec_run_lengths(
        keys.numel(), keys.data_ptr(), out_keys.data_ptr(), out_counts.data_ptr()
    )
    return out_keys, out_counts


def _merge_counts_native(
    a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Union of two count tables with sorted unique int32 keys and int32 counts (equal
    keys' counts summed; totals fit, a shard has fewer than 2^31 tokens), in one linear
    pass of ``stats.c``."""
    lib = load_library()
    (a_keys, a_counts), (b_keys, b_counts) = a, b
    if a_keys.numel() == 0:
        return b_keys, b_counts
    pointers = (a_keys.data_ptr(), a_counts.data_ptr(), b_keys.numel())
    pointers += (b_keys.data_ptr(), b_counts.data_ptr())
    size = lib.neuronspec_merge_counts(a_keys.numel(), *pointers, None, None)
    keys = torch.empty(size, dtype=torch.int32)
    counts = torch.empty(size, dtype=torch.int32)
    lib.neuronspec_merge_counts(a_keys.numel(), *pointers, keys.data_ptr(), counts.data_ptr())
    return keys, counts


PENDING_KEYS_MIN = 4_000_000  # keys that wait uncounted before the first consolidation


class _SparseCounter:
    """A growing sparse count table ``(keys, counts)``, sorted by key after :meth:`consolidate`.

    Added keys wait, uncounted, in a pending buffer (int32 when ``key_space`` fits) and are
    sorted and merged in when the buffer is full; it holds at least as many keys as the
    table (amortised: each key is sorted a constant number of times), so per batch there is
    no sort at all. With ``native`` and int32 keys, ``stats.c`` counts them (radix sort, run
    lengths, linear merge) and the table is int32 (keys and counts); else torch (``unique``,
    a sort of the union), int64. The pending buffer is one memory map (:func:`_mapped_zeros`),
    reused after each consolidation: its pages are faulted in once.
    """

    def __init__(
        self,
        keys: torch.Tensor | None = None,
        counts: torch.Tensor | None = None,
        key_space: int | None = None,
        native: bool = False,
    ):
        compact = key_space is not None and key_space <= _INT32_KEYS
        self._native = native and compact
        table_dtype = torch.int32 if self._native else torch.long
        self.keys = keys if keys is not None else torch.zeros(0, dtype=table_dtype)
        self.counts = counts if counts is not None else torch.zeros(0, dtype=table_dtype)
        self._max_key = key_space - 1 if compact else None
        self._pending_dtype = torch.int32 if compact else torch.long
        self._pending = torch.zeros(0, dtype=self._pending_dtype)  # buffer of raw keys
        self._pending_size = 0  # keys in use at the start of the buffer, one count each

    @property
    def pending(self) -> torch.Tensor:
        """The keys added since the last :meth:`consolidate` ``(n,)``, uncounted."""
        return self._pending[: self._pending_size]

    def add(self, *chunks: torch.Tensor) -> None:
        """Count each key of ``chunks`` (1-d tensors) once."""
        size = sum(chunk.numel() for chunk in chunks)
        if self._pending_size + size > self._pending.numel():
            self.consolidate()
            capacity = max(PENDING_KEYS_MIN, self.keys.numel(), size)
            if capacity > self._pending.numel():  # else the buffer (and its pages) is reused
                self._pending = _mapped_zeros((capacity,), self._pending_dtype)
        for chunk in chunks:
            end = self._pending_size + chunk.numel()
            self._pending[self._pending_size : end] = chunk
            self._pending_size = end

    def consolidate(self) -> None:
        if self._pending_size == 0:
            return
        pending = self.pending
        self._pending_size = 0  # the buffer's keys are consumed (sorted in place) below
        if self._native:
            self.keys, self.counts = _merge_counts_native(
                (self.keys, self.counts), _count_keys_native(pending, self._max_key)
            )
            return
        fresh, fresh_counts = torch.unique(pending, return_counts=True)
        if self.keys.numel() == 0:
            self.keys, self.counts = fresh.long(), fresh_counts.long()
        else:
            self.keys, self.counts = _merge_sparse(
                torch.cat([self.keys, fresh.long()]), torch.cat([self.counts, fresh_counts])
            )


class _UnigramCounter:
    """(neuron, token) firing counts: one packed row of counts per token for the corpus's
    tokens (:data:`DENSE_UNIGRAM_BYTES` over all layers), a sparse table for the rest.

    A row holds the token's W counts as fields of 1, 2, 4, 8, 16 or 32 bits (``stats.c``,
    ``add_packed``): the fewest that hold the token's count bound (its ``token_frequency``,
    occurrences in the corpus), so a token seen once costs W bits, not W·16. Before a batch
    could take a count past its field (``row_fill`` bounds every count of a row by the
    occurrences counted into it), the row moves to a wider one (:meth:`_widen`): the counts
    are exact whatever the bound said. Rows are assigned to eligible tokens when first seen,
    at the end of one byte arena in memory the OS zeroes on first touch (:func:`_mapped_zeros`,
    grown by doubling), so memory grows with the tokens seen. Counting a token densely
    replaces a sort per firing by an add into its row; :meth:`table` returns the one sparse
    form either way.
    """

    def __init__(
        self,
        width: int,
        vocab_size: int,
        dense_tokens: torch.Tensor | None = None,
        native: bool = False,
        token_frequency: torch.Tensor | None = None,
    ):
        self.width, self.vocab_size = width, vocab_size
        dense_tokens = (
            dense_tokens if dense_tokens is not None else torch.zeros(0, dtype=torch.long)
        )
        self.eligible = torch.zeros(vocab_size, dtype=torch.bool)  # (V,) may get a row
        self.eligible[dense_tokens.long()] = True
        # (V,) count bound of each token (0: unknown), which sets the width of its row
        self.bound = torch.zeros(vocab_size, dtype=torch.long)
        if token_frequency is not None:
            self.bound[dense_tokens.long()] = token_frequency[dense_tokens.long()].long()
        capacity = int(self.eligible.sum())
        self.remap = torch.full((vocab_size,), -1, dtype=torch.long)  # (V,) token -> row or -1
        self.row_tokens = torch.empty(capacity, dtype=torch.long)  # (D,) row -> token
        self.row_offset = torch.empty(capacity, dtype=torch.long)  # (D,) byte offset in arena
        self.row_bits = torch.empty(capacity, dtype=torch.uint8)  # (D,) bits per count
        self.n_rows = 0  # rows assigned (the first n_rows of the row_* vectors)
        expected = int(_row_bytes(width, _bits_for(self.bound[dense_tokens.long()])).sum())
        self.arena = _mapped_zeros((max(expected, 64),), torch.uint8)  # the packed rows
        self.used = 0  # bytes of the arena in use
        # (D,) upper bound of each row's counts; None: not known yet (rows read from a cache)
        self.row_fill: torch.Tensor | None = torch.zeros(capacity, dtype=torch.long)
        self.native = native  # count and build the table with stats.c
        self.tail = _SparseCounter(key_space=width * vocab_size, native=native)
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None  # memo of table()

    @classmethod
    def from_parts(
        cls,
        width: int,
        vocab_size: int,
        row_tokens: torch.Tensor,
        row_offset: torch.Tensor,
        row_bits: torch.Tensor,
        arena: torch.Tensor,
        tail_keys: torch.Tensor,
        tail_counts: torch.Tensor,
        native: bool,
    ) -> _UnigramCounter:
        """The counter whose :meth:`parts` these are (packed rows of the distinct
        ``row_tokens (D,)`` at ``row_offset (D,)`` of ``arena`` with ``row_bits (D,)``; the
        tail table, sorted, without those tokens)."""
        counter = cls(width, vocab_size, native=native)
        counter.eligible[row_tokens] = True
        counter.remap[row_tokens] = torch.arange(len(row_tokens))
        counter.row_tokens, counter.n_rows = row_tokens, len(row_tokens)
        counter.row_offset, counter.row_bits = row_offset, row_bits
        counter.arena, counter.used = arena, len(arena)
        counter.row_fill = None  # bounded from the rows when counting resumes
        dtype = counter.tail.keys.dtype  # int32 where W·V fits (the native tables'), else int64
        counter.tail = _SparseCounter(
            tail_keys.to(dtype), tail_counts.to(dtype), width * vocab_size, native
        )
        return counter

    def parts(self) -> dict[str, torch.Tensor]:
        """The counts as stored: the assigned rows, their tokens, the tail table."""
        self.tail.consolidate()
        compact = self.width * self.vocab_size <= _INT32_KEYS
        tail_keys, tail_counts = self.tail.keys, self.tail.counts
        return {
            "pair_dense_token": self.row_tokens[: self.n_rows],
            "pair_dense_offset": self.row_offset[: self.n_rows],
            "pair_dense_bits": self.row_bits[: self.n_rows],
            "pair_dense": self.arena[: self.used],
            "pair_key": tail_keys.int() if compact else tail_keys,
            "pair_count": tail_counts.int() if compact else tail_counts,
        }

    def rows_for(self, tokens: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
        """The row of each of ``tokens (M,)`` at a ``counted (M,)`` position, or -1 (tail
        token, or not counted); rows are assigned to eligible tokens seen first, every
        row wide enough for this batch. Called before counting each batch."""
        self._table = None
        rows = torch.where(counted, self.remap[tokens], -1)  # (M,)
        new = tokens[counted & (rows < 0) & self.eligible[tokens]]
        if new.numel():
            new, occurrences = torch.unique(new, return_counts=True)
            first, self.n_rows = self.n_rows, self.n_rows + new.numel()
            self.remap[new] = torch.arange(first, self.n_rows)
            self.row_tokens[first : self.n_rows] = new
            bits = _bits_for(torch.maximum(self.bound[new], occurrences))
            self.row_bits[first : self.n_rows] = bits
            self.row_offset[first : self.n_rows] = self._allocate(bits)
            rows = torch.where(counted, self.remap[tokens], -1)
        self._make_room(rows)
        return rows

    def _allocate(self, bits: torch.Tensor) -> torch.Tensor:
        """Byte offsets ``(R,)`` of fresh zeroed rows of ``bits (R,)`` at the arena's end."""
        sizes = _row_bytes(self.width, bits)  # (R,)
        ends = self.used + torch.cumsum(sizes, 0)
        needed = int(ends[-1]) if len(ends) else self.used
        if needed > len(self.arena):
            grown = _mapped_zeros((max(needed, 2 * len(self.arena)),), torch.uint8)
            grown[: self.used] = self.arena[: self.used]
            self.arena = grown
        self.used = needed
        return ends - sizes

    def _make_room(self, rows: torch.Tensor) -> None:
        """Widen the rows that the coming batch (row of each position ``rows (M,)``, -1 for
        none) could take past the largest count their fields hold."""
        n = self.n_rows
        if self.row_fill is None:
            self.row_fill = torch.zeros(len(self.row_tokens), dtype=torch.long)
            for start in range(0, n, 1024):  # (1024, W) int32 at a time
                block = self.counts_of(torch.arange(start, min(start + 1024, n)))
                self.row_fill[start : start + len(block)] = block.amax(1)
        occurrences = torch.bincount(rows[rows >= 0], minlength=n)  # (n,)
        fill = self.row_fill[:n] + occurrences
        full = torch.nonzero(fill > _field_max(self.row_bits[:n])).flatten()
        if full.numel():
            room = torch.maximum(2 * fill[full], self.bound[self.row_tokens[full]])
            self._widen(full, _bits_for(room))
        self.row_fill[:n] = fill

    def _widen(self, rows: torch.Tensor, bits: torch.Tensor) -> None:
        """Move ``rows (R,)`` to fresh rows of ``bits (R,)`` (the old bytes are left unused)."""
        counts = self.counts_of(rows)  # (R, W) int32
        self.row_offset[rows] = self._allocate(bits)
        self.row_bits[rows] = bits
        self._write_rows(rows, counts)

    def _row_bytes_by_width(self, rows: torch.Tensor):
        """For each field width among ``rows (R,)``: the width, the indices ``(R',)`` into
        ``rows`` of that width, and the arena positions ``(R', bytes)`` of their bytes."""
        for bits in torch.unique(self.row_bits[rows]).tolist():
            (index,) = torch.nonzero(self.row_bits[rows] == bits, as_tuple=True)
            size = int(_row_bytes(self.width, torch.tensor([bits]))[0])
            starts = self.row_offset[rows[index]].numpy()
            yield bits, index, starts[:, None] + np.arange(size)

    def counts_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The counts of ``rows (R,)``: ``(R, W)`` int32."""
        counts = torch.empty(len(rows), self.width, dtype=torch.int32)
        arena = self.arena.numpy()
        for bits, index, where in self._row_bytes_by_width(rows):
            counts[index] = torch.from_numpy(_unpack_counts(arena[where], bits, self.width))
        return counts

    def _write_rows(self, rows: torch.Tensor, counts: torch.Tensor) -> None:
        """Store ``counts (R, W)`` into ``rows (R,)`` (each count fits its row's fields)."""
        arena = self.arena.numpy()
        for bits, index, where in self._row_bytes_by_width(rows):
            arena[where] = _pack_counts(counts[index].numpy(), bits)

    def add(self, tokens: torch.Tensor, fires: torch.Tensor, counted: torch.Tensor) -> None:
        """``tokens (M,)``, their firing pattern ``fires (M, W)``, and which positions
        count ``counted (M,)`` (not a window start, not BOS)."""
        tokens, fires, counted = tokens.cpu(), fires.cpu(), counted.cpu()
        rows = self.rows_for(tokens, counted)  # (M,)
        dense = rows >= 0
        tail = counted & ~self.eligible[tokens]
        if bool(dense.any()):
            used, inverse = torch.unique(rows[dense], return_inverse=True)
            block = self.counts_of(used)  # (R, W) int32
            block.index_add_(0, inverse, fires[dense].to(torch.int32))
            self._write_rows(used, block)
        if bool(tail.any()):
            position, neuron = torch.nonzero(fires[tail], as_tuple=True)
            self.tail.add(neuron * self.vocab_size + tokens[tail][position])

    def laid_out(self, tokens: torch.Tensor, bits: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`parts` in the shared layout of :func:`packed_layout`: rows for ``tokens
        (R,)`` with fields of ``bits (R,)``, in that order, at consecutive offsets; counts of
        other tokens in the tail table. Every count must fit its field (true for a shard of
        the corpus the layout was made for)."""
        keys, counts = (part.numpy() for part in self.table())  # (P,) each, sorted
        self.release_table()
        sizes = _row_bytes(self.width, bits)  # (R,)
        offsets = torch.cumsum(sizes, 0) - sizes
        arena = _mapped_zeros((int(sizes.sum()),), torch.uint8)
        row_of = np.full(self.vocab_size, -1, dtype=np.int64)
        row_of[tokens.numpy()] = np.arange(len(tokens))
        row = row_of[keys % self.vocab_size]  # (P,) row of each entry's token, or -1
        inside = row >= 0
        _store_fields(
            arena.numpy(),
            offsets.numpy()[row[inside]],
            bits.numpy()[row[inside]],
            keys[inside] // self.vocab_size,
            counts[inside],
        )
        return {
            "pair_dense_token": tokens,
            "pair_dense_offset": offsets,
            "pair_dense_bits": bits,
            "pair_dense": arena,
            "pair_key": torch.from_numpy(keys[~inside]),
            "pair_count": torch.from_numpy(counts[~inside]),
        }

    def _rows_by_token(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The assigned rows in ascending token order ``(D',)``, and their tokens ``(D',)``."""
        tokens, rows = torch.sort(self.row_tokens[: self.n_rows])
        return rows, tokens

    def release_table(self) -> None:
        """Drop the memoised :meth:`table` (its memory); the next call builds it again."""
        self._table = None

    def table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All counts as sorted unique ``(key = neuron·V + token, count)``: int32 when every
        key fits (``W·V < 2^31``; counts always fit, a shard has fewer than 2^31 tokens),
        else int64.

        Both parts are sorted (dense rows read neuron-major with ascending token ids; the
        tail consolidated) and their keys are disjoint (a token is dense or tail), so they
        are merged without sorting: by ``stats.c`` in one pass over the dense rows when
        ``native`` (and int32), else by rank with torch ops. Memoised until the next batch.
        """
        if self._table is None:
            self._table = self._build_table()
        return self._table

    def _build_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.tail.consolidate()
        compact = self.width * self.vocab_size <= _INT32_KEYS
        if self.native and compact:
            return self._table_native()
        rows, tokens = self._rows_by_token()  # (D',) each
        by_neuron = self.counts_of(rows).t().flatten()  # (W·D',) neuron-major copy
        (flat,) = torch.nonzero(by_neuron, as_tuple=True)  # increasing
        n_dense = len(rows)
        dense_keys = (flat // n_dense) * self.vocab_size + tokens[flat % n_dense]
        dense_counts = by_neuron[flat].long()
        keys, counts = _merge_disjoint_sorted(
            (self.tail.keys, self.tail.counts), (dense_keys, dense_counts)
        )
        return (keys.int(), counts.int()) if compact else (keys, counts)

    def _table_native(self) -> tuple[torch.Tensor, torch.Tensor]:
        lib, threads = load_library(), torch.get_num_threads()
        width, vocab = self.width, self.vocab_size
        rows, dense_tokens = self._rows_by_token()  # (D',) each
        n_dense = len(rows)
        row_offset, row_bits = self.row_offset[rows], self.row_bits[rows]  # (D',) each
        tail_keys, tail_counts = self.tail.keys, self.tail.counts  # (P,) int32 each
        nnz = torch.empty(width, dtype=torch.long)  # (W,) dense entries per neuron
        lib.neuronspec_unigram_dense_nnz(
            threads, n_dense, width, self.arena.data_ptr(), row_offset.data_ptr(),
            row_bits.data_ptr(), nnz.data_ptr(),
        )  # fmt: skip
        bounds = torch.arange(width + 1, dtype=torch.int32) * vocab  # (W + 1,) first key of n
        tail_starts = torch.searchsorted(tail_keys, bounds)  # (W + 1,)
        offsets = torch.zeros(width + 1, dtype=torch.long)  # (W + 1,) first output of n
        torch.cumsum(nnz + tail_starts.diff(), 0, out=offsets[1:])
        total = int(offsets[-1])
        keys = torch.empty(total, dtype=torch.int32)
        counts = torch.empty(total, dtype=torch.int32)
        status = lib.neuronspec_unigram_table(
            threads, n_dense, width, vocab, self.arena.data_ptr(), row_offset.data_ptr(),
            row_bits.data_ptr(), dense_tokens.data_ptr(),
            tail_keys.data_ptr(), tail_counts.data_ptr(), tail_starts.data_ptr(),
            offsets.data_ptr(), keys.data_ptr(), counts.data_ptr(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("unigram table kernel: cannot allocate its scratch memory")
        return keys, counts


@dataclass
class LayerStats:
    """Accumulators of one layer (see the module docstring for the fields)."""

    fire_by_pos: torch.Tensor
    act_sum: torch.Tensor
    act_sumsq: torch.Tensor
    act_absmax: torch.Tensor
    pearson_abs_sum: torch.Tensor
    abs_sketch: torch.Tensor
    token_sparsity: torch.Tensor
    fire_replicates: torch.Tensor  # (R, W) float64: firing counts, windows Poisson-weighted
    pairs: _UnigramCounter
    trigrams: _SparseCounter

    @classmethod
    def empty(
        cls,
        window: int,
        width: int,
        vocab_size: int,
        config: StatsConfig,
        dense_tokens=None,
        native: bool = False,
        token_frequency: torch.Tensor | None = None,
    ) -> LayerStats:
        return cls(
            fire_by_pos=torch.zeros(window, width, dtype=torch.int32),
            act_sum=torch.zeros(width, dtype=torch.float64),
            act_sumsq=torch.zeros(width, dtype=torch.float64),
            act_absmax=torch.zeros(width, dtype=torch.float64),
            pearson_abs_sum=torch.zeros(width, dtype=torch.float64),
            abs_sketch=torch.zeros(config.sketch_bins + 2, dtype=torch.long),
            token_sparsity=torch.zeros(4, dtype=torch.float64),
            fire_replicates=torch.zeros(config.replicates, width, dtype=torch.float64),
            pairs=_UnigramCounter(width, vocab_size, dense_tokens, native, token_frequency),
            trigrams=_SparseCounter(),
        )

    @property
    def width(self) -> int:
        return self.fire_by_pos.shape[1]

    @property
    def fire_count(self) -> torch.Tensor:
        """(W,) int64: firings of each neuron over all positions."""
        return self.fire_by_pos.sum(0)


@dataclass
class NeuronStats:
    """Streamed statistics of one model on one corpus, for every layer."""

    config: StatsConfig
    vocab_size: int
    window: int
    layers: list[LayerStats]
    tokens_by_pos: torch.Tensor  # (T,) int64
    token_count: torch.Tensor  # (V,) int64, counted positions only
    token_replicates: torch.Tensor  # (R,) float64: tokens, windows Poisson-weighted
    tri_occurrences: _SparseCounter
    # per-batch work buffers, reused across layers and batches (fresh 10 MB tensors per op
    # cost more in allocation and cache misses than the arithmetic); not statistics
    _buffers: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
    # "auto" (native kernel for float32 CPU batches when it builds), "native" or "torch"
    backend: str = dataclasses.field(default="auto", repr=False, compare=False)
    # the BOS id of the batch add_tokens accounted last (trigram validity in add_layer)
    _bos_id: int | None = dataclasses.field(default=None, repr=False, compare=False)
    # (R, B) Poisson weights of the windows add_tokens accounted last (add_layer uses them)
    _weights: torch.Tensor | None = dataclasses.field(default=None, repr=False, compare=False)
    # window-mean moments per (site, layer): delta-sensitive / high-variance neurons
    window_means: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def empty(
        cls,
        widths: list[int],
        window: int,
        vocab_size: int,
        config: StatsConfig,
        token_frequency: torch.Tensor | None = None,
        *,
        backend: str = "auto",
        window_mean_sites: tuple[str, ...] = (),
    ):
        """Empty accumulators. ``token_frequency (V,)`` (optional) picks the tokens whose
        unigram counts are kept densely; it changes speed and memory, never the counts.
        ``backend`` (:data:`STATS_BACKENDS`) chooses how :meth:`add_layer` computes and how
        the sparse counts are counted and merged."""
        if backend not in STATS_BACKENDS:
            raise NeuronSpecError(f"stats backend must be one of {STATS_BACKENDS}, got {backend!r}")
        if config.trigrams and max(widths) * vocab_size**3 >= 2**63:
            raise NeuronSpecError(
                f"trigram keys overflow int64 for width {max(widths)} and vocab {vocab_size}"
            )
        return cls(
            config=config,
            vocab_size=vocab_size,
            window=window,
            layers=[
                LayerStats.empty(
                    window,
                    width,
                    vocab_size,
                    config,
                    _dense_tokens(token_frequency, sum(widths)),
                    native=_use_native(backend),
                    token_frequency=token_frequency,
                )
                for width in widths
            ],
            tokens_by_pos=torch.zeros(window, dtype=torch.long),
            token_count=torch.zeros(vocab_size, dtype=torch.long),
            token_replicates=torch.zeros(config.replicates, dtype=torch.float64),
            tri_occurrences=_SparseCounter(),
            backend=backend,
            window_means={
                (site, layer): WindowMeanMoments.empty(width)
                for site in window_mean_sites
                for layer, width in enumerate(widths)
            },
        )

    # -- derived counts --------------------------------------------------------------------
    @property
    def n_windows(self) -> int:
        return int(self.tokens_by_pos[0])

    @property
    def n_tokens(self) -> int:
        return int(self.tokens_by_pos.sum())

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def layer(self, layer: int) -> LayerStats:
        """The accumulators of ``layer``; a clear error when it is out of range."""
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise LayerOutOfRangeError(
                f"layer {layer!r} is out of range: these statistics have {self.n_layers} "
                f"layers (0..{self.n_layers - 1})"
            )
        return self.layers[layer]

    def require_tokens(self, min_tokens: int | None) -> None:
        """Raise if the statistics cover fewer tokens than a spec asks for (METHODS §2)."""
        if min_tokens is not None and self.n_tokens < min_tokens:
            raise TooFewTokensError(
                f"statistics cover {self.n_tokens} tokens but {min_tokens} were required; "
                "raise --max-tokens / --text-limit or use a larger corpus"
            )

    # -- streaming ---------------------------------------------------------------------------
    def add_tokens(self, input_ids: torch.Tensor, bos_id: int | None) -> torch.Tensor:
        """Account one batch of windows ``(B, T)``; returns the counted-position mask ``(B, T)``."""
        batch, window = input_ids.shape
        if window != self.window:
            raise NeuronSpecError(f"batch window {window} != statistics window {self.window}")
        if self.n_tokens + input_ids.numel() >= 2**31:
            raise NeuronSpecError(
                "one statistics shard holds at most 2^31 tokens (int32 counts); "
                "collect shards of the corpus separately and merge them"
            )
        self.tokens_by_pos += batch
        self._bos_id = bos_id
        if self.config.replicates:
            self._weights = poisson_weights(input_ids, self.config.replicates)  # (R, B)
            self.token_replicates += self._weights.sum(1) * window
        counted = _counted_positions(input_ids, bos_id)  # (B, T)
        self.token_count += torch.bincount(input_ids[counted].cpu(), minlength=self.vocab_size)
        if self.config.trigrams:
            keys, valid = _trigram_keys(input_ids, counted, self.vocab_size, bos_id)
            self.tri_occurrences.add(keys[valid])
        return counted

    def add_layer(
        self,
        layer: int,
        pre: torch.Tensor,
        act: torch.Tensor,
        input_ids: torch.Tensor,
        counted: torch.Tensor,
    ) -> None:
        """Accumulate one layer for one batch. ``pre`` and ``act`` are ``(B, T, W)``.

        Runs the native kernel (``neuronspec/native/stats.c``, one pass over memory) for
        float32 CPU inputs when it is available, else the torch form; both compute the
        same definitions (float sums may differ by rounding, bin edges by one bin).
        """
        stats = self.layers[layer]
        wmeans = self.window_means.get(("mlp", layer))  # from the layer's window sums
        input_ids, counted = input_ids.to(pre.device), counted.to(pre.device)
        if _use_native_stats(self.backend, pre, act):
            fires = self._add_layer_native(stats, pre, act, input_ids, counted, wmeans)
        else:
            fires = self._add_layer_torch(stats, pre, act, input_ids, counted, wmeans)
        _add_token_sparsity(stats, act, self.config, self.backend)
        if self.config.replicates:
            if fires is None:  # the native kernel counted without materialising them
                fires = torch.gt(
                    pre, self.config.fire_threshold, out=self._buffer("fires", pre, torch.bool)
                )
            per_window = fires.sum(1, dtype=torch.int32).double().cpu()  # (B, W)
            stats.fire_replicates += self._weights @ per_window  # (R, W)
        if self.config.trigrams:
            keys, valid = _trigram_keys(input_ids, counted, self.vocab_size, self._bos_id)
            b, t, n = torch.nonzero(fires & valid[:, :, None], as_tuple=True)
            stats.trigrams.add(n * self.vocab_size**3 + keys[b, t])

    def _add_layer_torch(self, stats, pre, act, input_ids, counted, wmeans) -> torch.Tensor:
        """Torch form of :meth:`add_layer`; returns the firing pattern ``(B, T, W)`` bool."""
        fires = torch.gt(
            pre, self.config.fire_threshold, out=self._buffer("fires", pre, torch.bool)
        )
        # summing bytes in uint8 (exact while B < 256) avoids an int64 copy of the batch
        count_dtype = torch.uint8 if fires.shape[0] < 256 else torch.int32
        stats.fire_by_pos += fires.view(torch.uint8).sum(0, dtype=count_dtype).cpu()
        act32 = act.float()  # (B, T, W); per-window sums in float32, totals in float64
        basis = _position_basis(act32.shape[1], act32.device)  # (2, T)
        moments = torch.matmul(basis, act32).double()  # (B, 2, W): Σ_t a, Σ_t pos_t·a
        window_sum, position_moment = moments[:, 0], moments[:, 1]  # (B, W) each
        work = self._buffer("work", act32, torch.float32)  # (B, T, W)
        window_sumsq = torch.mul(act32, act32, out=work).sum(1).double()  # (B, W)
        finite = torch.isfinite(window_sumsq) & torch.isfinite(moments).all(1)  # (B, W)
        _refuse_non_finite(int((~finite).sum()))
        stats.act_sum += window_sum.sum(0).cpu()
        stats.act_sumsq += window_sumsq.sum(0).cpu()
        if wmeans is not None:
            wmeans.add_window_sums(window_sum, act32.shape[1])
        absact = torch.abs(act32, out=work)  # (B, T, W)
        torch.maximum(stats.act_absmax, absact.amax((0, 1)).double().cpu(), out=stats.act_absmax)
        stats.pearson_abs_sum += _abs_pearson_with_position(
            position_moment, window_sum, window_sumsq, act32.shape[1]
        ).cpu()
        if self.config.unigrams:
            width = fires.shape[-1]
            stats.pairs.add(input_ids.flatten(), fires.reshape(-1, width), counted.flatten())
        return fires

    def _add_layer_native(self, stats, pre, act, input_ids, counted, wmeans) -> torch.Tensor | None:
        """:meth:`add_layer` through ``stats.c``: every accumulator in one pass, the sparse
        (neuron, token) tail keys included (int32 key spaces; else the tail is left to
        torch), and the window sums for ``wmeans`` (the ``mlp`` window-mean moments, or
        None). Returns ``fires`` ``(B, T, W)`` when trigrams need it, else None."""
        batch, window, width = pre.shape
        pre, act = _unit_channel_stride(pre), _unit_channel_stride(act)
        pairs = stats.pairs if self.config.unigrams else None
        threads = torch.get_num_threads()
        tail_keys = tail_spans = None
        n_tail = 0
        if pairs is not None:
            ids, counted_flat = input_ids.flatten(), counted.flatten()  # (B·T,) each
            rows = pairs.rows_for(ids, counted_flat)  # (B·T,) row or -1
            has_row = rows >= 0
            row_offset = torch.full_like(rows, -1)  # (B·T,) byte offset of the row, or -1
            row_offset[has_row] = pairs.row_offset[rows[has_row]]
            row_bits = torch.zeros_like(rows)  # (B·T,) bits per count of the row
            row_bits[has_row] = pairs.row_bits[rows[has_row]].long()
            tail = counted_flat & ~pairs.eligible[ids]
            tail_tokens = torch.where(tail, ids, -1)  # (B·T,) token or -1
            arena = pairs.arena
            if pairs.tail._native:
                n_tail = int((tail_tokens >= 0).sum())
                tail_keys = self._flat_buffer("tail_keys", n_tail * width, torch.int32)
                tail_spans = torch.zeros(threads, 2, dtype=torch.long)  # (start, count)
        else:
            row_offset = row_bits = tail_tokens = torch.full((batch * window,), -1)
            arena = torch.zeros(0, dtype=torch.uint8)
        torch_tail = pairs is not None and tail_keys is None
        fires = None
        if self.config.trigrams or torch_tail:
            fires = self._buffer("fires", pre, torch.bool)  # (B, T, W)
        config = self.config
        zpos = _position_basis(window, pre.device)[1].contiguous()  # (T,)
        window_sums = None if wmeans is None else torch.empty(batch, width, dtype=torch.float64)
        found = load_library().neuronspec_layer_stats_f32(
            threads, batch, window, width,
            pre.data_ptr(), pre.stride(0), pre.stride(1),
            act.data_ptr(), act.stride(0), act.stride(1),
            config.fire_threshold, zpos.data_ptr(), row_offset.data_ptr(), row_bits.data_ptr(),
            arena.data_ptr(), _data_ptr(fires), stats.fire_by_pos.data_ptr(),
            tail_tokens.data_ptr(), self.vocab_size, n_tail, _data_ptr(tail_keys),
            _data_ptr(tail_spans),
            stats.act_sum.data_ptr(), stats.act_sumsq.data_ptr(),
            stats.act_absmax.data_ptr(), stats.pearson_abs_sum.data_ptr(),
            _data_ptr(window_sums), PEARSON_CONSTANT_VARIANCE,
        )  # fmt: skip
        if found < 0:
            raise MemoryError("stats kernel: cannot allocate its scratch memory")
        _refuse_non_finite(found)
        if wmeans is not None:
            wmeans.add_window_sums(window_sums, window)
        if tail_keys is not None:
            spans = [tail_keys[start : start + count] for start, count in tail_spans.tolist()]
            pairs.tail.add(*spans)  # copied: the work buffer is reused
        elif torch_tail:
            tail = (tail_tokens >= 0).view(batch, window)  # (B, T)
            if bool(tail.any()):
                position, neuron = torch.nonzero(fires[tail], as_tuple=True)
                pairs.tail.add(neuron * pairs.vocab_size + input_ids[tail][position])
        return fires

    def _buffer(self, name: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A reusable work tensor of ``like``'s shape and device."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != like.shape or buffer.device != like.device:
            buffer = self._buffers[name] = torch.empty(like.shape, dtype=dtype, device=like.device)
        return buffer

    def _flat_buffer(self, name: str, size: int, dtype: torch.dtype) -> torch.Tensor:
        """A reusable CPU work vector of at least ``size`` elements (its first ``size``)."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < size:
            buffer = self._buffers[name] = torch.empty(size, dtype=dtype)
        return buffer[:size]

    # -- window-mean moments (METHODS §5) --------------------------------------------------------
    def add_window_sums(self, site: str, layer: int, sums: torch.Tensor, window: int) -> None:
        """Accumulate one batch of ``site`` at ``layer``: ``sums`` ``(B, W)`` float64, each
        window's sum over its ``window`` positions."""
        self._window_moments(site, layer).add_window_sums(sums, window)

    def window_mean_variance(self, site: str, layer: int) -> torch.Tensor:
        """(W,) float64: variance across windows of the window-mean activation (population
        variance, ddof 0)."""
        moments = self._window_moments(site, layer)
        n = self._windows_for_moments()
        mean = moments.sum / n
        return (moments.sumsq / n - mean * mean).clamp_min(0.0)

    def site_mean(self, site: str, layer: int) -> torch.Tensor:
        """(W,) float64: corpus mean of ``site`` (mean of the equal-length windows' means)."""
        return self._window_moments(site, layer).sum / self._windows_for_moments()

    def _windows_for_moments(self) -> int:
        if self.n_windows == 0:
            raise TooFewTokensError("these statistics cover no windows")
        return self.n_windows

    def _window_moments(self, site: str, layer: int) -> WindowMeanMoments:
        self.layer(layer)  # range check
        if (site, layer) not in self.window_means:
            have = sorted({s for s, _ in self.window_means}) or "none"
            raise NeuronSpecError(
                f"these statistics hold no window-mean moments of site {site!r} (sites: {have}); "
                "collect them with window_mean_sites (the runner does for mlp and dt)"
            )
        return self.window_means[site, layer]

    # -- merging and serialisation ------------------------------------------------------------
    def merge(self, other: NeuronStats) -> NeuronStats:
        """Statistics of the union of both corpora (new object; inputs unchanged)."""
        if (self.config, self.vocab_size, self.window) != (
            other.config,
            other.vocab_size,
            other.window,
        ) or [s.width for s in self.layers] != [s.width for s in other.layers]:
            raise NeuronSpecError("cannot merge statistics of different models or configs")
        if set(self.window_means) != set(other.window_means):
            raise NeuronSpecError("cannot merge statistics with different window-mean sites")
        if self.n_tokens + other.n_tokens >= 2**31:
            raise NeuronSpecError(
                "merged statistics would cover 2^31 tokens or more (int32 counts); keep the "
                "shards apart and combine their findings instead"
            )
        merged = _merge_tensor_dicts(
            self.to_tensors(table_only=True), other.to_tensors(table_only=True)
        )
        return NeuronStats.from_tensors(merged, self.meta())

    def meta(self) -> dict:
        return {
            "format": STATS_FORMAT,
            "config": self.config.to_json(),
            "vocab_size": self.vocab_size,
            "window": self.window,
            "widths": [s.width for s in self.layers],
            "window_mean_sites": sorted({site for site, _ in self.window_means}),
        }

    def to_tensors(
        self,
        *,
        table_only: bool = False,
        layout: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The statistics as named tensors (the cache's form, :data:`STATS_FORMAT`).

        ``table_only``: each layer's unigram counts as the one sorted table, no packed
        rows: a canonical form, the same whichever tokens were counted densely. ``layout``
        (:func:`packed_layout` of the whole corpus): packed rows in that shared layout,
        so that the tensors of shards add up field by field (:func:`merge_rules`)."""
        self.tri_occurrences.consolidate()
        tensors = {
            "tokens_by_pos": self.tokens_by_pos,
            "token_count": self.token_count,
            "token_replicates": self.token_replicates,
            "tri_occ_key": self.tri_occurrences.keys,
            "tri_occ_count": self.tri_occurrences.counts,
        }
        for index, stats in enumerate(self.layers):
            pairs = stats.pairs.parts() if layout is None else stats.pairs.laid_out(*layout)
            if table_only:
                pairs["pair_key"], pairs["pair_count"] = stats.pairs.table()
                for name in _DENSE_PAIR_FIELDS:
                    pairs[name] = pairs[name][:0]
            stats.trigrams.consolidate()
            for name in _DENSE_FIELDS:
                tensors[f"layer{index}.{name}"] = getattr(stats, name)
            for name, tensor in pairs.items():
                tensors[f"layer{index}.{name}"] = tensor
            tensors[f"layer{index}.tri_key"] = stats.trigrams.keys
            tensors[f"layer{index}.tri_count"] = stats.trigrams.counts
        for (site, index), moments in self.window_means.items():
            tensors[f"layer{index}.{site}_wmean_sum"] = moments.sum
            tensors[f"layer{index}.{site}_wmean_sumsq"] = moments.sumsq
        return {name: tensor.contiguous() for name, tensor in tensors.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> NeuronStats:
        if meta.get("format") != STATS_FORMAT:
            raise NeuronSpecError(f"statistics format {meta.get('format')!r} != {STATS_FORMAT}")
        layers = []
        native = _use_native("auto")
        for index, width in enumerate(meta["widths"]):
            get = lambda name, i=index: tensors[f"layer{i}.{name}"]  # noqa: E731
            pairs = _UnigramCounter.from_parts(
                width,
                meta["vocab_size"],
                get("pair_dense_token"),
                get("pair_dense_offset"),
                get("pair_dense_bits"),
                get("pair_dense"),
                get("pair_key"),
                get("pair_count"),
                native,
            )
            layers.append(
                LayerStats(
                    **{name: get(name) for name in _DENSE_FIELDS},
                    pairs=pairs,
                    trigrams=_SparseCounter(get("tri_key"), get("tri_count")),
                )
            )
        return cls(
            config=StatsConfig(**meta["config"]),
            vocab_size=meta["vocab_size"],
            window=meta["window"],
            layers=layers,
            tokens_by_pos=tensors["tokens_by_pos"],
            token_count=tensors["token_count"],
            token_replicates=tensors["token_replicates"],
            tri_occurrences=_SparseCounter(tensors["tri_occ_key"], tensors["tri_occ_count"]),
            window_means={
                (site, index): WindowMeanMoments(
                    tensors[f"layer{index}.{site}_wmean_sum"],
                    tensors[f"layer{index}.{site}_wmean_sumsq"],
                )
                for site in meta.get("window_mean_sites", ())
                for index in range(len(meta["widths"]))
            },
        )

    # -- views for analyses ----------------------------------------------------------------------
    def unigram_table(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sparse unigram firings of ``layer``: ``(neuron, token, count)`` sorted by (neuron, token).

        The arrays are the caller's own; the layer's sorted table is then released (not
        memoised for the session: at a large corpus it is ~8 bytes per (neuron, token) pair
        and layer), so a second read of the same layer builds it again."""
        if not self.config.unigrams:
            raise NeuronSpecError("these statistics were collected without unigram counts")
        pairs = self.layer(layer).pairs
        keys, counts = (part.numpy() for part in pairs.table())  # int32 where keys fit
        neuron = np.floor_divide(keys, self.vocab_size, out=np.empty(len(keys), np.int64))
        token = np.remainder(keys, self.vocab_size, out=np.empty(len(keys), np.int64))
        count = counts.astype(np.int64)  # a copy
        pairs.release_table()
        return neuron, token, count

    def trigram_occurrences(self) -> tuple[np.ndarray, np.ndarray]:
        """Occurrences of each trigram at counted positions: ``(key, count)`` sorted by key."""
        if not self.config.trigrams:
            raise NeuronSpecError(
                "these statistics were collected without trigram counts (StatsConfig.trigrams)"
            )
        self.tri_occurrences.consolidate()
        return self.tri_occurrences.keys.numpy(), self.tri_occurrences.counts.numpy()

    def trigram_table(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sparse trigram firings of ``layer``: ``(neuron, trigram key, count)``."""
        if not self.config.trigrams:
            raise NeuronSpecError(
                "these statistics were collected without trigram counts (StatsConfig.trigrams)"
            )
        table = self.layer(layer).trigrams
        table.consolidate()
        keys = table.keys.numpy()
        cube = self.vocab_size**3
        return keys // cube, keys % cube, table.counts.numpy()


WINDOW_MEAN_SITES = ("mlp", "dt")
"""Sites whose window-mean moments the pass collects, where the model has them."""


@dataclass
class WindowMeanMoments:
    """Σ over windows of the window-mean activation ``m_w = (1/T) Σ_t a_t`` and of ``m_w²``,
    per channel ``(W,)`` float64; merges by addition (window count: ``tokens_by_pos[0]``)."""

    sum: torch.Tensor  # (W,)
    sumsq: torch.Tensor  # (W,)

    @classmethod
    def empty(cls, width: int) -> WindowMeanMoments:
        return cls(torch.zeros(width, dtype=torch.float64), torch.zeros(width, dtype=torch.float64))

    def add_window_sums(self, sums: torch.Tensor, window: int) -> None:
        """Add the windows' sums over their ``window`` positions, ``(B, W)`` float64."""
        means = sums / window  # (B, W)
        self.sum += means.sum(0).cpu()
        self.sumsq += (means * means).sum(0).cpu()


_DENSE_FIELDS = (
    "fire_by_pos",
    "act_sum",
    "act_sumsq",
    "act_absmax",
    "pearson_abs_sum",
    "abs_sketch",
    "token_sparsity",
    "fire_replicates",
)


DENSE_UNIGRAM_BYTES = 2**31
"""Budget of the packed (neuron, token) rows of all layers together (the same tokens in
every layer), at the widths the token frequencies ask for. Memory in use is the rows of the
tokens a pass has seen: about this at most (plus rows widened past their frequency)."""
_DENSE_PAIR_FIELDS = ("pair_dense_token", "pair_dense_offset", "pair_dense_bits", "pair_dense")
COUNT_BITS = (1, 2, 4, 8, 16, 32)
"""Field widths of the packed count rows (``stats.c``, ``add_packed``)."""
_WHOLE_FIELDS = {8: np.uint8, 16: np.uint16, 32: np.uint32}  # fields of whole bytes: arrays


def _bits_for(bound: torch.Tensor) -> torch.Tensor:
    """``(R,)`` uint8: the fewest :data:`COUNT_BITS` whose fields hold counts up to ``bound (R,)``."""
    bits = torch.full(bound.shape, COUNT_BITS[-1], dtype=torch.uint8)
    for width in reversed(COUNT_BITS[:-1]):
        bits[bound <= 2**width - 1] = width
    return bits


def _field_max(bits: torch.Tensor) -> torch.Tensor:
    """``(R,)`` int64: the largest count a field of ``bits (R,)`` holds."""
    return (1 << bits.long()) - 1


def _row_bytes(width: int, bits: torch.Tensor) -> torch.Tensor:
    """``(R,)`` int64 bytes of a packed row of ``width`` fields of ``bits (R,)``: rounded up
    to 4, so every row of 16 or 32 bits is aligned for its integer type."""
    return (width * bits.long() + 31) // 32 * 4


def _unpack_counts(packed: np.ndarray, bits: int, width: int) -> np.ndarray:
    """``(R, width)`` int32 counts of packed rows ``(R, bytes)`` uint8 of ``bits``."""
    if bits >= 8:
        dtype = _WHOLE_FIELDS[bits]
        return np.ascontiguousarray(packed).view(dtype)[:, :width].astype(np.int32)
    shifts = np.arange(0, 8, bits, dtype=np.uint8)  # field k of a byte at bit k·bits
    fields = (packed[:, :, None] >> shifts) & np.uint8((1 << bits) - 1)
    return fields.reshape(len(packed), -1)[:, :width].astype(np.int32)


def _pack_counts(counts: np.ndarray, bits: int) -> np.ndarray:
    """Packed rows ``(R, bytes)`` uint8 of ``counts (R, W)`` (each < 2^bits), the inverse of
    :func:`_unpack_counts`."""
    rows, width = counts.shape
    size = int(_row_bytes(width, torch.tensor([bits]))[0])
    if bits >= 8:
        dtype = _WHOLE_FIELDS[bits]
        out = np.zeros((rows, size // dtype().itemsize), dtype=dtype)
        out[:, :width] = counts
        return out.view(np.uint8)
    per = 8 // bits
    fields = np.zeros((rows, size * per), dtype=np.uint8)
    fields[:, :width] = counts
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    return (fields.reshape(rows, size, per) << shifts).sum(2, dtype=np.uint8)


def _dense_tokens(token_frequency: torch.Tensor | None, total_width: int) -> torch.Tensor | None:
    """The most frequent tokens (that occur at all) whose packed rows, one per layer of
    ``total_width`` neurons in all, at the width their frequency asks for, fit
    :data:`DENSE_UNIGRAM_BYTES`."""
    if token_frequency is None:
        return None
    order = torch.argsort(token_frequency, descending=True, stable=True)
    order = order[: int((token_frequency > 0).sum())]
    sizes = _row_bytes(total_width, _bits_for(token_frequency[order]))
    return order[: int((torch.cumsum(sizes, 0) <= DENSE_UNIGRAM_BYTES).sum())]


def packed_layout(token_count: torch.Tensor, total_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed rows ``(tokens (R,), bits (R,))`` of a corpus whose tokens occur
    ``token_count (V,)`` times: the tokens :func:`_dense_tokens` picks, each with fields as
    wide as its count needs, ordered by (width, token) so that :func:`packed_regions` are
    contiguous. The statistics of any shard of that corpus fit it, and in it they add up
    field by field (:meth:`NeuronStats.to_tensors` ``layout=``)."""
    tokens = torch.sort(_dense_tokens(token_count, total_width)).values
    bits = _bits_for(token_count[tokens])
    order = torch.argsort(bits, stable=True)
    return tokens[order], bits[order]


def packed_regions(
    offsets: torch.Tensor, bits: torch.Tensor, size: int
) -> list[tuple[int, int, type]]:
    """Byte ranges ``[start, end)`` of a :func:`packed_layout` arena of ``size`` bytes, each
    with the numpy dtype in which its rows add field by field without carries: uint8 for
    fields of up to 8 bits (a byte's fields never overflow, so bytes add), uint16 and
    uint32 for the wider ones."""
    starts = [0]
    for width in (16, 32):
        (first,) = torch.nonzero(bits >= width, as_tuple=True)
        starts.append(int(offsets[first[0]]) if len(first) else size)
    ends = starts[1:] + [size]
    return [
        (start, end, dtype)
        for start, end, dtype in zip(starts, ends, (np.uint8, np.uint16, np.uint32), strict=True)
        if end > start
    ]


def _store_fields(
    arena: np.ndarray, offset: np.ndarray, bits: np.ndarray, neuron: np.ndarray, count: np.ndarray
) -> None:
    """Write ``count (P,)`` into field ``neuron (P,)`` of the zeroed rows at byte ``offset
    (P,)`` with fields of ``bits (P,)`` (the layout of ``stats.c``'s ``add_packed``)."""
    for width in COUNT_BITS:
        mine = bits == width
        if width >= 8:
            dtype = _WHOLE_FIELDS[width]
            step = width // 8  # offsets are multiples of 4 (_row_bytes)
            arena.view(dtype)[offset[mine] // step + neuron[mine]] = count[mine]
        else:  # fields of one byte are distinct entries: add them in
            bit = neuron[mine] * width
            values = count[mine].astype(np.uint8) << (bit % 8).astype(np.uint8)
            np.add.at(arena, offset[mine] + bit // 8, values)


def _mapped_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros of ``shape`` in an anonymous memory map of their own: the OS zeroes each page
    on its first touch, so memory never used costs no memory and no time (numpy's lazy
    ``zeros`` faulted pages in about 9x slower here); it is returned when the tensor is
    freed."""
    size = math.prod(shape) * dtype.itemsize
    if size == 0:
        return torch.zeros(shape, dtype=dtype)
    memory = mmap.mmap(-1, size)  # the tensor keeps a reference to it
    return torch.frombuffer(memory, dtype=dtype).view(shape)


def merge_rules(names: list[str]) -> dict[str, str]:
    """How each tensor of :meth:`NeuronStats.to_tensors` (``table_only=True``, or in one
    ``layout``) merges across shards: ``"sum"`` (counts, sums, histograms: the default for
    any new field), ``"max"`` (``act_absmax``), ``"keys"`` / ``"counts"`` (a sparse table
    ``X_key`` / ``X_count``: union of keys, counts summed), ``"packed"`` (the packed rows
    ``pair_dense``: added field by field, see :func:`packed_regions`) or ``"layout"`` (their
    tokens, offsets and widths: equal in every shard). In the table-only form the last two
    are empty. The one place merge semantics live: :func:`NeuronStats.merge` and the
    distributed merge (:mod:`neuronspec.capture.collect`) both follow it."""
    present = set(names)
    rules: dict[str, str] = {}
    for name in names:
        if name.endswith("pair_dense"):
            rules[name] = "packed"
        elif name.endswith(_DENSE_PAIR_FIELDS):
            rules[name] = "layout"
        elif name.endswith("_key") and name[: -len("_key")] + "_count" in present:
            rules[name] = "keys"
        elif name.endswith("_count") and name[: -len("_count")] + "_key" in present:
            rules[name] = "counts"
        elif name.endswith("act_absmax"):
            rules[name] = "max"
        else:
            rules[name] = "sum"
    return rules


def _merge_tensor_dicts(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    merged: dict[str, torch.Tensor] = {}
    for name, rule in merge_rules(list(a)).items():
        if rule == "keys":
            continue  # merged with its counts
        if rule == "layout":
            if not torch.equal(a[name], b[name]):
                raise NeuronSpecError("merge statistics in one packed layout, or table_only")
            merged[name] = a[name]
        elif rule == "packed":  # table_only forms: empty
            offsets, bits = (a[name + suffix] for suffix in ("_offset", "_bits"))
            merged[name] = a[name].clone()
            for start, end, dtype in packed_regions(offsets, bits, len(a[name])):
                into = merged[name].numpy()[start:end].view(dtype)
                into += b[name].numpy()[start:end].view(dtype)
        elif rule == "counts":
            key = name[: -len("_count")] + "_key"
            keys, counts = _merge_sparse(torch.cat([a[key], b[key]]), torch.cat([a[name], b[name]]))
            # same dtypes as the inputs: keys keep their range; counts fit (< 2^31 tokens)
            merged[key], merged[name] = keys.to(a[key].dtype), counts.to(a[name].dtype)
        elif rule == "max":
            merged[name] = torch.maximum(a[name], b[name])
        else:
            merged[name] = a[name] + b[name]
    return merged


def _counted_positions(input_ids: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    """(B, T) bool: positions n-gram counts use: not the window start, not a BOS token."""
    counted = torch.ones_like(input_ids, dtype=torch.bool)
    counted[:, 0] = False
    if bos_id is not None:
        counted &= input_ids != bos_id
    return counted


def _use_native_stats(backend: str, pre: torch.Tensor, act: torch.Tensor) -> bool:
    if backend == "torch":
        return False
    fits = all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (pre, act))
    if backend == "native" and not fits:
        raise NeuronSpecError("the native stats kernel takes float32 CPU activations only")
    return fits and _use_native(backend)


def _use_native(backend: str) -> bool:
    """Whether the native kernels run for ``backend`` (inputs already known to fit)."""
    if backend == "torch":
        return False
    if backend == "native":
        load_library()  # raises KernelUnavailableError with the compiler's message
        return True
    return kernels_available()  # else the torch form (one warning per process)


def _refuse_non_finite(pairs: int) -> None:
    if pairs:
        raise NeuronSpecError(
            f"non-finite activations (NaN or inf) in {pairs} (window, neuron) pairs of one "
            "batch; check the model's weights and dtype"
        )


def _data_ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _unit_channel_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _trigram_keys(
    input_ids: torch.Tensor, counted: torch.Tensor, vocab: int, bos_id: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Trigram key ``(t[k-2]·V + t[k-1])·V + t[k]`` per position ``(B, T)``, and where it is valid.

    Valid (METHODS §3): k is a counted position (not the window start, not BOS) and all three
    tokens lie in the window with no BOS among them (a trigram across a document boundary
    is not text). The window start may be the trigram's first token: the trigram ending at
    position 2 counts; only BOS is excluded, not the window start as a token.
    """
    ids = input_ids.long()
    keys = torch.zeros_like(ids)
    keys[:, 2:] = (ids[:, :-2] * vocab + ids[:, 1:-1]) * vocab + ids[:, 2:]
    not_bos = torch.ones_like(counted) if bos_id is None else input_ids != bos_id  # (B, T)
    valid = torch.zeros_like(counted)
    valid[:, 2:] = not_bos[:, :-2] & not_bos[:, 1:-1] & counted[:, 2:]
    return keys, valid


PEARSON_CONSTANT_VARIANCE = 1e-6  # relative to the mean square: float32 noise level


def _position_basis(window: int, device: torch.device) -> torch.Tensor:
    """``(2, T)`` float32: a row of ones and the standardised positions (mean 0, std 1)."""
    pos = torch.arange(window, dtype=torch.float64)
    pos = (pos - pos.mean()) / pos.std(unbiased=False)
    return torch.stack([torch.ones_like(pos), pos]).to(device=device, dtype=torch.float32)


def _abs_pearson_with_position(
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


def _sketch_scale(config: StatsConfig) -> tuple[float, float]:
    """``(per_log2, offset)``: bin index = floor(log2|a| · per_log2 + offset) inside the range."""
    per_log2 = config.sketch_per_decade / math.log2(10)
    return per_log2, 1 - math.log2(config.sketch_min) * per_log2


def _add_token_sparsity(
    stats: LayerStats, act: torch.Tensor, config: StatsConfig, backend: str
) -> None:
    """Add one batch ``act (B, T, W)`` into ``abs_sketch`` and ``token_sparsity``: by
    ``neuronspec/native/sparsity.c`` for float32 CPU activations where it builds, else by
    :func:`token_sparsity_torch` (same definitions)."""
    batch, window, width = act.shape
    if width < 2:
        raise NeuronSpecError("sparsity over neurons needs a site of at least 2 neurons")
    native = act.device.type == "cpu" and act.dtype == torch.float32 and _use_native(backend)
    if not native:
        sketch, sums = token_sparsity_torch(act, config)
        stats.abs_sketch += sketch
        stats.token_sparsity += sums
        return
    act = _unit_channel_stride(act)
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
    stats.abs_sketch += sketch.sum(0)
    stats.token_sparsity += sums.sum(0)


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
