"""The binding of the statistics pass to ``neuronspec/native/stats.c``: when the native
kernels run (:func:`use_native`), and one layer's accumulation in one pass over memory
(:func:`add_layer_native`, the native form of :meth:`NeuronStats.add_layer`)."""

from __future__ import annotations

import torch

from neuronspec.capture.moments import PEARSON_CONSTANT_VARIANCE, position_basis
from neuronspec.errors import NeuronSpecError
from neuronspec.native import kernels_available, load_library


def use_native_stats(backend: str, pre: torch.Tensor, act: torch.Tensor) -> bool:
    if backend == "torch":
        return False
    fits = all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (pre, act))
    if backend == "native" and not fits:
        raise NeuronSpecError("the native stats kernel takes float32 CPU activations only")
    return fits and use_native(backend)


def use_native(backend: str) -> bool:
    """Whether the native kernels run for ``backend`` (inputs already known to fit)."""
    if backend == "torch":
        return False
    if backend == "native":
        load_library()  # raises KernelUnavailableError with the compiler's message
        return True
    return kernels_available()  # else the torch form (one warning per process)


def refuse_non_finite(pairs: int) -> None:
    if pairs:
        raise NeuronSpecError(
            f"non-finite activations (NaN or inf) in {pairs} (window, neuron) pairs of one "
            "batch; check the model's weights and dtype"
        )


def _data_ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def unit_channel_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def add_layer_native(pass_stats, stats, pre, act, input_ids, counted, wmeans):
    """:meth:`NeuronStats.add_layer` of ``pass_stats`` into its layer's ``stats``
    (:class:`LayerStats`) through ``stats.c``: every accumulator in one pass, the sparse
    (neuron, token) tail keys included (int32 key spaces; else the tail is left to
    torch), the firing counts by position of each window's group, and the window sums for
    ``wmeans`` (the ``mlp`` window-mean moments, or None). Returns ``fires`` ``(B, T, W)``
    when trigrams or the detector intervals need it, else None."""
    batch, window, width = pre.shape
    pre, act = unit_channel_stride(pre), unit_channel_stride(act)
    pairs = stats.pairs if pass_stats.config.unigrams else None
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
        if pairs.tail.compact:
            n_tail = int((tail_tokens >= 0).sum())
            tail_keys = pass_stats.flat_buffer("tail_keys", n_tail * width, torch.int32)
            tail_spans = torch.zeros(threads, 2, dtype=torch.long)  # (start, count)
    else:
        row_offset = row_bits = tail_tokens = torch.full((batch * window,), -1)
        arena = torch.zeros(0, dtype=torch.uint8)
    torch_tail = pairs is not None and tail_keys is None
    fires = None
    if pass_stats.config.trigrams or pass_stats.config.detector_intervals or torch_tail:
        fires = pass_stats.buffer("fires", pre, torch.bool)  # (B, T, W)
    config = pass_stats.config
    zpos = position_basis(window, pre.device)[1].contiguous()  # (T,)
    window_sums = None if wmeans is None else torch.empty(batch, width, dtype=torch.float64)
    groups = pass_stats._groups  # (B,) int64 window groups, or None
    group_counts = None  # (G, T, W) uint8, the kernel adds each window into its group
    if groups is not None and stats.group_fires.fits_live(groups):
        group_counts = stats.group_fires.make_room(groups)
    elif groups is not None:  # over 255 windows of one group in this batch: torch adds them
        fires = pass_stats.buffer("fires", pre, torch.bool)
    found = load_library().neuronspec_layer_stats_f32(
        threads, batch, window, width,
        pre.data_ptr(), pre.stride(0), pre.stride(1),
        act.data_ptr(), act.stride(0), act.stride(1),
        config.fire_threshold, zpos.data_ptr(), row_offset.data_ptr(), row_bits.data_ptr(),
        arena.data_ptr(), _data_ptr(fires), stats.fire_by_pos.data_ptr(),
        _data_ptr(None if group_counts is None else groups), _data_ptr(group_counts),
        tail_tokens.data_ptr(), pass_stats.vocab_size, n_tail, _data_ptr(tail_keys),
        _data_ptr(tail_spans),
        stats.act_sum.data_ptr(), stats.act_sumsq.data_ptr(),
        stats.act_absmax.data_ptr(), stats.pearson_abs_sum.data_ptr(),
        _data_ptr(window_sums), PEARSON_CONSTANT_VARIANCE,
    )  # fmt: skip
    if found < 0:
        raise MemoryError("stats kernel: cannot allocate its scratch memory")
    refuse_non_finite(found)
    if groups is not None and group_counts is None:
        stats.group_fires.add(fires, groups)
    if wmeans is not None:
        wmeans.add_window_sums(window_sums, window, pass_stats._groups)
    if tail_keys is not None:
        spans = [tail_keys[start : start + count] for start, count in tail_spans.tolist()]
        pairs.tail.add(*spans)  # copied: the work buffer is reused
    elif torch_tail:
        tail = (tail_tokens >= 0).view(batch, window)  # (B, T)
        if bool(tail.any()):
            position, neuron = torch.nonzero(fires[tail], as_tuple=True)
            pairs.tail.add(neuron * pairs.vocab_size + input_ids[tail][position])
    return fires
