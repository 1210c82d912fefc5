"""Sparse count tables ``(keys, counts)``: growing, sorted, mergeable by key union.

They hold the (neuron, token) firings of tokens without a packed row
(:mod:`neuronspec.capture.packed_rows`), the (neuron, trigram) firings and the trigram
occurrences (keys: :mod:`neuronspec.capture.ngram_keys`). Counting is torch's
``unique`` and a merge of sorted tables; nothing ``(tokens, neurons)``-shaped is kept.
"""

from __future__ import annotations

import math
import mmap

import torch

INT32_KEYS = 2**31 - 1  # key spaces up to this size are sorted as int32 (about twice as fast)


def _sortable(keys: torch.Tensor) -> torch.Tensor:
    """``keys`` as int32 when every key fits (same order, sorts about twice as fast)."""
    if keys.numel() and int(keys.min()) >= 0 and int(keys.max()) <= INT32_KEYS:
        return keys.to(torch.int32)
    return keys


def merge_sparse(keys: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum ``counts`` of equal ``keys``; returns sorted unique int64 keys and their totals."""
    if keys.numel() == 0:
        return keys.to(torch.long), counts.to(torch.long)
    unique, inverse = torch.unique(_sortable(keys), sorted=True, return_inverse=True)
    totals = torch.zeros(unique.numel(), dtype=torch.long).index_add_(0, inverse, counts.long())
    return unique.long(), totals


def merge_disjoint_sorted(
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


def mapped_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros of ``shape`` in an anonymous memory map of their own: the OS zeroes each page
    on its first touch, so memory never used costs no memory and no time (numpy's lazy
    ``zeros`` faulted pages in about 9x slower here); it is returned when the tensor is
    freed."""
    size = math.prod(shape) * dtype.itemsize
    if size == 0:
        return torch.zeros(shape, dtype=dtype)
    memory = mmap.mmap(-1, size)  # the tensor keeps a reference to it
    return torch.frombuffer(memory, dtype=dtype).view(shape)


PENDING_KEYS_MIN = 4_000_000  # keys that wait uncounted before the first consolidation


class SparseCounter:
    """A growing sparse count table ``(keys, counts)`` int64, sorted by key after
    :meth:`consolidate`.

    Added keys wait, uncounted, in a pending buffer (int32 when ``key_space`` fits:
    :attr:`compact`) and are counted (``unique``) and merged in when the buffer is full; it
    holds at least as many keys as the table (amortised: each key is sorted a constant
    number of times), so per batch there is no sort at all. The pending buffer is one
    memory map (:func:`mapped_zeros`), reused after each consolidation: its pages are
    faulted in once.
    """

    def __init__(
        self,
        keys: torch.Tensor | None = None,
        counts: torch.Tensor | None = None,
        key_space: int | None = None,
    ):
        self.compact = key_space is not None and key_space <= INT32_KEYS
        self.keys = keys.long() if keys is not None else torch.zeros(0, dtype=torch.long)
        self.counts = counts.long() if counts is not None else torch.zeros(0, dtype=torch.long)
        self._pending_dtype = torch.int32 if self.compact else torch.long
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
                self._pending = mapped_zeros((capacity,), self._pending_dtype)
        for chunk in chunks:
            end = self._pending_size + chunk.numel()
            self._pending[self._pending_size : end] = chunk
            self._pending_size = end

    def consolidate(self) -> None:
        if self._pending_size == 0:
            return
        pending = self.pending
        self._pending_size = 0  # the buffer is refilled from its start after this
        fresh, fresh_counts = torch.unique(pending, return_counts=True)
        if self.keys.numel() == 0:
            self.keys, self.counts = fresh.long(), fresh_counts.long()
        else:
            self.keys, self.counts = merge_sparse(
                torch.cat([self.keys, fresh.long()]), torch.cat([self.counts, fresh_counts])
            )
