"""Packed (neuron, token) firing counts: one row of W counts per frequent token, each count
a field of as few bits as the token's frequency needs; a sparse table for the other tokens.

The unigram counts of METHODS §3 for every layer. A row's fields are 1, 2, 4, 8, 16 or 32
bits (:data:`COUNT_BITS`; ``neuronspec/native/stats.c``, ``add_packed``, writes them in the
pass), so a token seen once costs W bits, not W·16. :func:`packed_layout` is the shared
layout in which the rows of shards add up field by field (torchrun ``collect``).
"""

from __future__ import annotations

import numpy as np
import torch

from neuronspec.capture.sparse_counts import (
    INT32_KEYS,
    SparseCounter,
    mapped_zeros,
    merge_disjoint_sorted,
)
from neuronspec.native import load_library

DENSE_UNIGRAM_BYTES = 2**31
"""Budget of the packed (neuron, token) rows of all layers together (the same tokens in
every layer), at the widths the token frequencies ask for. Memory in use is the rows of the
tokens a pass has seen: about this at most (plus rows widened past their frequency)."""
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


def packed_tokens(token_frequency: torch.Tensor | None, total_width: int) -> torch.Tensor | None:
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
    ``token_count (V,)`` times: the tokens :func:`packed_tokens` picks, each with fields as
    wide as its count needs, ordered by (width, token) so that :func:`packed_regions` are
    contiguous. The statistics of any shard of that corpus fit it, and in it they add up
    field by field (:meth:`NeuronStats.to_tensors` ``layout=``)."""
    tokens = torch.sort(packed_tokens(token_count, total_width)).values
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


def store_fields(
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


class UnigramCounter:
    """(neuron, token) firing counts: one packed row of counts per token for the corpus's
    tokens (:data:`DENSE_UNIGRAM_BYTES` over all layers), a sparse table for the rest.

    A row holds the token's W counts as fields of 1, 2, 4, 8, 16 or 32 bits (``stats.c``,
    ``add_packed``): the fewest that hold the token's count bound (its ``token_frequency``,
    occurrences in the corpus), so a token seen once costs W bits, not W·16. Before a batch
    could take a count past its field (``row_fill`` bounds every count of a row by the
    occurrences counted into it), the row moves to a wider one (:meth:`_widen`): the counts
    are exact whatever the bound said. Rows are assigned to eligible tokens when first seen,
    at the end of one byte arena in memory the OS zeroes on first touch (:func:`mapped_zeros`,
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
        self.arena = mapped_zeros((max(expected, 64),), torch.uint8)  # the packed rows
        self.used = 0  # bytes of the arena in use
        # (D,) upper bound of each row's counts; None: not known yet (rows read from a cache)
        self.row_fill: torch.Tensor | None = torch.zeros(capacity, dtype=torch.long)
        self.native = native  # build the table with stats.c
        self.tail = SparseCounter(key_space=width * vocab_size)
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
    ) -> UnigramCounter:
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
        counter.tail = SparseCounter(tail_keys, tail_counts, width * vocab_size)
        return counter

    def parts(self) -> dict[str, torch.Tensor]:
        """The counts as stored: the assigned rows, their tokens, the tail table."""
        self.tail.consolidate()
        compact = self.width * self.vocab_size <= INT32_KEYS
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
            grown = mapped_zeros((max(needed, 2 * len(self.arena)),), torch.uint8)
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
        arena = mapped_zeros((int(sizes.sum()),), torch.uint8)
        row_of = np.full(self.vocab_size, -1, dtype=np.int64)
        row_of[tokens.numpy()] = np.arange(len(tokens))
        row = row_of[keys % self.vocab_size]  # (P,) row of each entry's token, or -1
        inside = row >= 0
        store_fields(
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
        compact = self.width * self.vocab_size <= INT32_KEYS
        if self.native and compact:
            return self._table_native()
        rows, tokens = self._rows_by_token()  # (D',) each
        by_neuron = self.counts_of(rows).t().flatten()  # (W·D',) neuron-major copy
        (flat,) = torch.nonzero(by_neuron, as_tuple=True)  # increasing
        n_dense = len(rows)
        dense_keys = (flat // n_dense) * self.vocab_size + tokens[flat % n_dense]
        dense_counts = by_neuron[flat].long()
        keys, counts = merge_disjoint_sorted(
            (self.tail.keys, self.tail.counts), (dense_keys, dense_counts)
        )
        return (keys.int(), counts.int()) if compact else (keys, counts)

    def _table_native(self) -> tuple[torch.Tensor, torch.Tensor]:
        lib, threads = load_library(), torch.get_num_threads()
        width, vocab = self.width, self.vocab_size
        rows, dense_tokens = self._rows_by_token()  # (D',) each
        n_dense = len(rows)
        row_offset, row_bits = self.row_offset[rows], self.row_bits[rows]  # (D',) each
        tail_keys, tail_counts = self.tail.keys.int(), self.tail.counts.int()  # (P,) each
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
