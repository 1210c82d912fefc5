"""The native statistics kernel (``neuronspec/native/stats.c``) equals the torch form.

Both backends fill the same accumulators from the same batches; counts must agree
exactly, float sums to float32 rounding, the histogram up to values within rounding of a
bin edge. ``tests/test_stats.py`` checks both against a dense recomputation on models.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuronspec.capture.config import StatsConfig
from neuronspec.capture.packed_rows import _bits_for, _pack_counts, _row_bytes, _unpack_counts
from neuronspec.capture.stats import NeuronStats
from neuronspec.errors import NeuronSpecError

VOCAB, WINDOW, WIDTH = 300, 37, 53  # width not a multiple of the kernel's 16 lanes
CONFIG = StatsConfig(trigrams=True)


def _batch(seed: int, batch: int = 5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, WINDOW), generator=g)
    ids[:, 3] = 7  # a frequent token (dense row)
    ids[1, 10] = 0  # BOS inside a window
    pre = torch.randn(batch, WINDOW, WIDTH, generator=g)
    act = pre * torch.rand(batch, WINDOW, WIDTH, generator=g).exp()
    act[:, :, 0] = 0.0  # a dead column: |a| = 0 falls in the sketch's underflow bin
    act[0, :, 1] = 2.5  # a constant window: Pearson r is taken as 0
    act[:, 4, 2] = 1e-13  # below sketch_min
    act[:, 5, 3] = 3e6  # above sketch_max
    pre[:, :, 4] = 0.0  # exactly at the firing threshold: never fires
    return ids, pre, act


def _collect(backend: str, batches) -> NeuronStats:
    frequency = torch.bincount(torch.cat([ids.flatten() for ids, _, _ in batches]), minlength=VOCAB)
    frequency[frequency < 3] = 0  # rare tokens go to the sparse tail
    stats = NeuronStats.empty([WIDTH] * 2, WINDOW, VOCAB, CONFIG, frequency, backend=backend)
    for ids, pre, act in batches:
        counted = stats.add_tokens(ids, bos_id=0)
        for layer in range(2):
            stats.add_layer(layer, pre + layer, act, ids, counted)
    return stats


def _assert_same(native: NeuronStats, torch_stats: NeuronStats) -> None:
    for layer in range(2):
        a, b = native.layers[layer], torch_stats.layers[layer]
        assert torch.equal(a.fire_by_pos, b.fire_by_pos)
        assert torch.equal(a.fire_by_pos_groups, b.fire_by_pos_groups)  # counted in the kernel
        assert a.fire_by_pos_groups.sum() == a.fire_by_pos.sum() > 0
        torch.testing.assert_close(
            a.token_sparsity_groups, b.token_sparsity_groups, rtol=2e-6, atol=1e-9
        )
        for name in ("act_sum", "act_sumsq", "act_absmax", "pearson_abs_sum"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=2e-6, atol=1e-9)
        total = int(a.abs_sketch.sum())
        assert total == int(b.abs_sketch.sum())
        # a value within float32 rounding of a bin edge may land in either bin (the native
        # bin index is float32: about 1e-4 of a bin)
        assert int((a.abs_sketch - b.abs_sketch).abs().sum()) <= 4 + total // 1000
        for table in (native.unigram_table(layer), native.trigram_table(layer)):
            assert table[0].size > 0
        for x, y in zip(native.unigram_table(layer), torch_stats.unigram_table(layer), strict=True):
            assert (x == y).all()
        for x, y in zip(native.trigram_table(layer), torch_stats.trigram_table(layer), strict=True):
            assert (x == y).all()


def test_native_equals_torch_backend():
    batches = [_batch(seed) for seed in range(3)]
    native, reference = _collect("native", batches), _collect("torch", batches)
    assert native.layers[0].pairs.arena.sum() > 0 and native.layers[0].pairs.tail.pending.numel()
    _assert_same(native, reference)
    assert native.layers[0].abs_sketch[0] >= 3 * 5 * (WINDOW + 1)  # column 0, the 1e-13 entries
    assert native.layers[0].abs_sketch[-1] == 3 * 5  # the 3e6 entries


def test_native_result_does_not_depend_on_thread_count():
    batches = [_batch(seed) for seed in range(2)]
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(_collect("native", batches))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for layer in range(2):
            a, b = results[0].layers[layer], other.layers[layer]
            assert torch.equal(a.fire_by_pos, b.fire_by_pos)
            assert torch.equal(a.fire_by_pos_groups, b.fire_by_pos_groups)
            assert torch.equal(a.abs_sketch, b.abs_sketch)
            assert torch.equal(a.act_sum, b.act_sum)  # column sums do not depend on the split
            assert torch.equal(a.pearson_abs_sum, b.pearson_abs_sum)
            # each thread writes the tail keys of its own columns
            for x, y in zip(
                results[0].unigram_table(layer), other.unigram_table(layer), strict=True
            ):
                assert (x == y).all()


def test_native_with_keys_too_wide_for_int32_counts_the_tail_in_torch(monkeypatch):
    """Where neuron·V + token does not fit int32, the kernel leaves the sparse tail to torch
    (int64 keys); the counts are the same (the int32 limit is lowered to reach that path)."""
    from neuronspec.capture import packed_rows, sparse_counts

    for module in (packed_rows, sparse_counts):
        monkeypatch.setattr(module, "INT32_KEYS", WIDTH * VOCAB - 1)
    batches = [_batch(seed) for seed in range(2)]
    native, reference = _collect("native", batches), _collect("torch", batches)
    tail = native.layers[0].pairs.tail
    assert not tail.compact and tail.pending.numel() and tail.pending.dtype == torch.long
    _assert_same(native, reference)


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activations_are_refused(bad, backend):
    ids, pre, act = _batch(0)
    act[2, 7, 9] = bad
    stats = NeuronStats.empty([WIDTH], WINDOW, VOCAB, CONFIG, backend=backend)
    counted = stats.add_tokens(ids, bos_id=0)
    with pytest.raises(NeuronSpecError, match="non-finite activations"):
        stats.add_layer(0, pre, act, ids, counted)


def test_backend_errors_are_clear():
    with pytest.raises(NeuronSpecError, match="backend must be one of"):
        NeuronStats.empty([WIDTH], WINDOW, VOCAB, CONFIG, backend="gpu")
    ids, pre, act = _batch(0)
    stats = NeuronStats.empty([WIDTH], WINDOW, VOCAB, CONFIG, backend="native")
    counted = stats.add_tokens(ids, bos_id=0)
    with pytest.raises(NeuronSpecError, match="float32 CPU"):
        stats.add_layer(0, pre.double(), act.double(), ids, counted)


def test_sketch_range_must_be_normal_float32():
    with pytest.raises(NeuronSpecError, match="normal float32"):
        StatsConfig(sketch_min=1e-40)


def _unigram_counter(dense_rows: int, width: int, seed: int, native: bool = True):
    """A counter with random packed rows of every width (half their counts zero, some at
    the largest count their width holds) and a sparse tail of other tokens: some neurons
    with no tail, some with only tail entries. Rows go to two thirds of the eligible
    tokens, in random order, then are widened (their first bytes left behind); the arena
    past the rows holds garbage that the tables must never read."""
    from neuronspec.capture.packed_rows import COUNT_BITS, UnigramCounter

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randperm(VOCAB, generator=g)
    counter = UnigramCounter(width, VOCAB, tokens[:dense_rows], native)
    seen = tokens[: dense_rows - dense_rows // 3]  # eligible tokens seen, first-seen order
    for batch in seen.chunk(4):  # each batch's new tokens get rows in token order
        counter.rows_for(batch, torch.ones(len(batch), dtype=torch.bool))
    assert sorted(counter.row_tokens[: counter.n_rows].tolist()) == sorted(seen.tolist())
    rows = torch.arange(counter.n_rows)
    bits = torch.tensor([COUNT_BITS[row % len(COUNT_BITS)] for row in range(len(rows))])
    counter._widen(rows, bits.to(torch.uint8))
    largest = (2 ** bits.long() - 1).clamp(max=1000)[:, None]  # (D, 1)
    counts = torch.randint(0, 4, (len(rows), width), generator=g) // 2 * largest
    counts[:, 3:6] = torch.randint(0, 2, counts[:, 3:6].shape, generator=g) * largest
    counts[:, :3] = 0  # neurons 0-2: tail only (or nothing)
    counter._write_rows(rows, counts.int())
    counter.arena[counter.used :] = 99  # never assigned
    tail_tokens = tokens[dense_rows:]
    if tail_tokens.numel():
        neurons = torch.randint(3, width, (500,), generator=g)
        neurons = neurons[neurons % 5 != 0]  # every fifth neuron: dense only
        neurons = torch.cat([neurons, torch.tensor([1, 1, 2])])
        picks = tail_tokens[torch.randint(0, len(tail_tokens), (len(neurons),), generator=g)]
        for part in (neurons * VOCAB + picks).chunk(3):  # consolidated, then more pending
            counter.tail.add(part)
            counter.tail.consolidate()
        counter.tail.add(neurons[:50] * VOCAB + picks[:50])
    return counter


def _brute_force_table(counter) -> dict[int, int]:
    table = {}
    rows = counter.counts_of(torch.arange(counter.n_rows)).tolist()
    for row, token in enumerate(counter.row_tokens[: counter.n_rows].tolist()):
        for neuron, count in enumerate(rows[row]):
            if count:
                table[neuron * VOCAB + token] = count
    counter.tail.consolidate()
    for key, count in zip(counter.tail.keys.tolist(), counter.tail.counts.tolist(), strict=True):
        assert key not in table  # dense and tail tokens are disjoint
        table[key] = count
    return table


@pytest.mark.parametrize(
    "dense_rows, width", [(40, WIDTH), (40, 16), (0, WIDTH), (VOCAB, 33), (1, 4)]
)
def test_unigram_table_native_and_torch_equal_brute_force(dense_rows, width):
    expected = _brute_force_table(_unigram_counter(dense_rows, width, dense_rows + width, False))
    before = torch.get_num_threads()
    try:
        for native, threads in [(False, 1), (True, 1), (True, 2), (True, 3)]:
            torch.set_num_threads(threads)
            counter = _unigram_counter(dense_rows, width, dense_rows + width, native)
            keys, counts = counter.table()
            assert keys.dtype == counts.dtype == torch.int32  # W·V < 2^31
            assert keys.tolist() == sorted(expected), (native, threads)
            assert counts.tolist() == [expected[k] for k in sorted(expected)], (native, threads)
    finally:
        torch.set_num_threads(before)


def test_unigram_table_kernel_writes_nothing_past_its_entries():
    """Neurons with no entries at the end of the table (and of a 16-lane block) must not
    make the branch-free writes of the neuron before them spill past the table's end."""
    from neuronspec.native import load_library

    counter = _unigram_counter(40, 53, seed=7)
    rows, dense_tokens = counter._rows_by_token()
    counts = counter.counts_of(rows)
    counts[:, 45:] = 0  # no dense entries in neurons 45..52 ...
    counts[-1, 44] = 0  # ... and a trailing zero in the last neuron with entries
    counter._write_rows(rows, counts)
    row_offset, row_bits = counter.row_offset[rows], counter.row_bits[rows]
    counter.tail.consolidate()
    keep = counter.tail.keys < 45 * VOCAB  # ... nor tail entries
    tail_keys, tail_counts = counter.tail.keys[keep].int(), counter.tail.counts[keep].int()
    counter.tail.keys, counter.tail.counts = tail_keys, tail_counts
    expected = _brute_force_table(counter)
    width, sentinel = 53, -12345
    nnz = torch.empty(width, dtype=torch.long)
    lib = load_library()
    lib.neuronspec_unigram_dense_nnz(
        2,
        len(rows),
        width,
        counter.arena.data_ptr(),
        row_offset.data_ptr(),
        row_bits.data_ptr(),
        nnz.data_ptr(),
    )
    bounds = torch.arange(width + 1, dtype=torch.int32) * VOCAB
    tail_starts = torch.searchsorted(tail_keys, bounds)
    offsets = torch.zeros(width + 1, dtype=torch.long)
    torch.cumsum(nnz + tail_starts.diff(), 0, out=offsets[1:])
    assert int(offsets[-1]) == len(expected)
    keys = torch.full((len(expected) + 8,), sentinel, dtype=torch.int32)
    counts = torch.full_like(keys, sentinel)
    status = lib.neuronspec_unigram_table(
        2, len(rows), width, VOCAB, counter.arena.data_ptr(), row_offset.data_ptr(),
        row_bits.data_ptr(), dense_tokens.data_ptr(),
        tail_keys.data_ptr(), tail_counts.data_ptr(), tail_starts.data_ptr(),
        offsets.data_ptr(), keys.data_ptr(), counts.data_ptr(),
    )  # fmt: skip
    assert status == 0
    assert keys[: len(expected)].tolist() == sorted(expected)
    assert (keys[len(expected) :] == sentinel).all() and (counts[len(expected) :] == sentinel).all()


def test_pending_buffer_fills_consolidates_and_grows(monkeypatch):
    """Keys added in several chunks per call, past a small pending buffer (consolidated when
    full, reused, grown for a chunk larger than it or a table larger than it), are counted
    as ``torch.unique`` counts them all at once."""
    from neuronspec.capture import sparse_counts

    monkeypatch.setattr(sparse_counts, "PENDING_KEYS_MIN", 50)
    key_space = 1000
    g = torch.Generator().manual_seed(7)
    calls = [
        [torch.randint(0, key_space, (n,), generator=g) for n in sizes]
        for sizes in ([20, 10], [30], [0, 15], [400], [40, 40, 40], [5])
    ]
    counter = sparse_counts.SparseCounter(key_space=key_space)
    for chunks in calls:
        counter.add(*chunks)
    assert counter.pending.numel() > 0  # the last keys wait, uncounted
    counter.consolidate()
    keys, counts = torch.unique(
        torch.cat([c for chunks in calls for c in chunks]), return_counts=True
    )
    assert counter.keys.tolist() == keys.tolist()
    assert counter.counts.tolist() == counts.tolist()


def _brute_unigrams(batches, layers: int = 1) -> dict[int, np.ndarray]:
    """(W, V) int64 firing counts at counted positions (bos 0, not position 0)."""
    counts = {layer: np.zeros((WIDTH, VOCAB), dtype=np.int64) for layer in range(layers)}
    for ids, pre, _ in batches:
        counted = torch.ones_like(ids, dtype=torch.bool)
        counted[:, 0] = False
        counted &= ids != 0
        for layer in range(layers):
            b, t, n = torch.nonzero((pre + layer > 0) & counted[:, :, None], as_tuple=True)
            np.add.at(counts[layer], (n.numpy(), ids[b, t].numpy()), 1)
    return counts


def _table_as_dense(stats: NeuronStats, layer: int) -> np.ndarray:
    neuron, token, count = stats.unigram_table(layer)
    dense = np.zeros((WIDTH, VOCAB), dtype=np.int64)
    dense[neuron, token] = count
    return dense


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("frequency_known", [True, False])
def test_rows_widen_before_a_count_overflows(backend, frequency_known):
    """Token 7 at 9 in 10 positions of 17 batches of 128 windows (>65535 occurrences: past
    what 16 bits hold): the table has the exact counts. With its frequency known its row is
    32 bits from the start; told every token occurs once, every row starts at 1 bit and
    widens, token 7's through every width, within a batch too. The stored form reads back
    and counting resumes on it with the same result."""
    g = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(17):
        ids = torch.randint(1, VOCAB, (128, WINDOW), generator=g)
        ids[torch.rand(ids.shape, generator=g) < 0.9] = 7
        pre = torch.randn(128, WINDOW, WIDTH, generator=g)
        pre[..., 5] = 1.0  # neuron 5 fires on every token: its count of token 7 is largest
        batches.append((ids, pre, pre.abs()))
    frequency = torch.bincount(torch.cat([ids.flatten() for ids, _, _ in batches]), minlength=VOCAB)
    if not frequency_known:
        frequency = torch.ones(VOCAB, dtype=torch.long)
    stats = NeuronStats.empty([WIDTH], WINDOW, VOCAB, StatsConfig(), frequency, backend=backend)
    for index, (ids, pre, act) in enumerate(batches):
        if index == len(batches) - 1:  # the last batch counted into statistics read back
            stats = NeuronStats.from_tensors(stats.to_tensors(), stats.meta())
            stats.backend = backend
        stats.add_layer(0, pre, act, ids, stats.add_tokens(ids, bos_id=0))
    expected = _brute_unigrams(batches)[0]
    assert expected[5, 7] > 65535
    pairs = stats.layers[0].pairs
    assert int(pairs.row_bits[pairs.remap[7]]) == 32
    live = int(_row_bytes(WIDTH, pairs.row_bits[: pairs.n_rows]).sum())
    assert (pairs.used > live) == (not frequency_known)  # widened rows left their old bytes
    np.testing.assert_array_equal(_table_as_dense(stats, 0), expected)
    stored = stats.to_tensors()
    assert stored["layer0.pair_dense"].dtype == torch.uint8
    reread = NeuronStats.from_tensors(stored, stats.meta())
    np.testing.assert_array_equal(_table_as_dense(reread, 0), expected)


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32])
def test_packed_rows_round_trip_and_layout(bits):
    """Field w of a row is bits [w·bits, (w + 1)·bits), little-endian (stats.c's layout)."""
    g = torch.Generator().manual_seed(bits)
    counts = torch.randint(0, 2**bits if bits < 32 else 2**31, (5, 37), generator=g)
    packed = _pack_counts(counts.numpy(), bits)
    assert packed.shape == (5, int(_row_bytes(37, torch.tensor([bits]))[0]))
    np.testing.assert_array_equal(_unpack_counts(packed, bits, 37), counts.numpy())
    as_integer = sum(int(c) << (w * bits) for w, c in enumerate(counts[0].tolist()))
    assert int.from_bytes(packed[0].tobytes(), "little") == as_integer
    assert _bits_for(torch.tensor([2**bits - 1])).item() == bits
