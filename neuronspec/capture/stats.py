"""Streaming, mergeable neuron statistics of one model on one corpus: one pass fills all.

:class:`NeuronStats` holds, per layer, the accumulators of :class:`LayerStats` (their names,
shapes and merge rules: :mod:`neuronspec.capture.format`). Its pieces live in modules named
after them: what to collect (:mod:`~neuronspec.capture.config`), the packed (neuron, token)
rows (:mod:`~neuronspec.capture.packed_rows`), sparse count tables
(:mod:`~neuronspec.capture.sparse_counts`), n-gram keys (:mod:`~neuronspec.capture.ngram_keys`),
window moments (:mod:`~neuronspec.capture.moments`), the sparsity sketch
(:mod:`~neuronspec.capture.sketch`), window groups (:mod:`~neuronspec.capture.window_groups`)
and the native kernels (:mod:`~neuronspec.capture.native_stats`).

Every field merges by addition (``act_absmax`` by maximum, sparse tables by key union),
so shards of a corpus give the same statistics as the whole. Memory is independent of
corpus length: nothing ``(tokens, neurons)``-shaped is kept beyond the current batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from neuronspec.capture.config import STATS_BACKENDS, StatsConfig
from neuronspec.capture.format import (
    LAYER_FIELDS,
    PACKED_FIELDS,
    STATS_FORMAT,
    check_format,
    merge_tensor_dicts,
)
from neuronspec.capture.moments import (
    WindowMeanMoments,
    abs_pearson_with_position,
    position_basis,
)
from neuronspec.capture.native_stats import (
    add_layer_native,
    refuse_non_finite,
    use_native,
    use_native_stats,
)
from neuronspec.capture.ngram_keys import counted_positions, trigram_keys
from neuronspec.capture.packed_rows import UnigramCounter, packed_tokens
from neuronspec.capture.sketch import add_token_sparsity
from neuronspec.capture.sparse_counts import SparseCounter
from neuronspec.capture.top_contexts import batch_top, empty_top, merge_top
from neuronspec.capture.window_groups import GroupBootstrap, GroupFires, window_groups
from neuronspec.errors import LayerOutOfRangeError, NeuronSpecError, TooFewTokensError


@dataclass
class LayerStats:
    """Accumulators of one layer (fields: :mod:`neuronspec.capture.format`)."""

    fire_by_pos: torch.Tensor
    act_sum: torch.Tensor
    act_sumsq: torch.Tensor
    act_absmax: torch.Tensor
    pearson_abs_sum: torch.Tensor
    abs_sketch: torch.Tensor
    token_sparsity: torch.Tensor
    group_fires: GroupFires  # (G, T, W): fire_by_pos of each window group
    abs_sketch_groups: torch.Tensor  # (G, n_sketch + 2) int64: abs_sketch of each group
    token_sparsity_groups: torch.Tensor  # (G, 4) float64: token_sparsity of each group
    top_value: torch.Tensor  # (k, W) float32: largest mlp activations (top_contexts.py)
    top_index: torch.Tensor  # (k, W) int64: their corpus token index window·T + position
    pairs: UnigramCounter
    trigrams: SparseCounter
    group_pairs: SparseCounter  # (neuron, token, group) firings: key (n·V + token)·G + g

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
        top_value, top_index = empty_top(config.top_contexts, width)
        return cls(
            fire_by_pos=torch.zeros(window, width, dtype=torch.int32),
            act_sum=torch.zeros(width, dtype=torch.float64),
            act_sumsq=torch.zeros(width, dtype=torch.float64),
            act_absmax=torch.zeros(width, dtype=torch.float64),
            pearson_abs_sum=torch.zeros(width, dtype=torch.float64),
            abs_sketch=torch.zeros(config.sketch_bins + 2, dtype=torch.long),
            token_sparsity=torch.zeros(4, dtype=torch.float64),
            group_fires=GroupFires((config.window_groups, window, width)),
            abs_sketch_groups=torch.zeros(
                config.window_groups, config.sketch_bins + 2, dtype=torch.long
            ),
            token_sparsity_groups=torch.zeros(config.window_groups, 4, dtype=torch.float64),
            top_value=top_value,
            top_index=top_index,
            pairs=UnigramCounter(width, vocab_size, dense_tokens, native, token_frequency),
            trigrams=SparseCounter(),
            group_pairs=SparseCounter(key_space=width * vocab_size * config.window_groups),
        )

    @property
    def width(self) -> int:
        return self.fire_by_pos.shape[1]

    @property
    def fire_count(self) -> torch.Tensor:
        """(W,) int64: firings of each neuron over all positions."""
        return self.fire_by_pos.sum(0)

    @property
    def fire_by_pos_groups(self) -> torch.Tensor:
        """``(G, T, W)`` uint8 or int32: ``fire_by_pos`` of each window group."""
        return self.group_fires.total()


@dataclass
class NeuronStats:
    """Streamed statistics of one model on one corpus, for every layer."""

    config: StatsConfig
    vocab_size: int
    window: int
    layers: list[LayerStats]
    tokens_by_pos: torch.Tensor  # (T,) int64
    token_count: torch.Tensor  # (V,) int64, counted positions only
    group_windows: torch.Tensor  # (G,) int64: windows in each window group
    # (G, V) int64: token_count of each window group with detector_intervals, else (0, V)
    token_count_groups: torch.Tensor
    tri_occurrences: SparseCounter
    # per-batch work buffers, reused across layers and batches (fresh 10 MB tensors per op
    # cost more in allocation and cache misses than the arithmetic); not statistics
    _buffers: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
    # "auto" (native kernel for float32 CPU batches when it builds), "native" or "torch"
    backend: str = dataclasses.field(default="auto", repr=False, compare=False)
    # the BOS id of the batch add_tokens accounted last (trigram validity in add_layer)
    _bos_id: int | None = dataclasses.field(default=None, repr=False, compare=False)
    # (B,) window groups of the windows add_tokens accounted last (add_layer uses them)
    _groups: torch.Tensor | None = dataclasses.field(default=None, repr=False, compare=False)
    # corpus index of this statistics' first window (a shard's offset): top-context indices
    window_offset: int = dataclasses.field(default=0, repr=False, compare=False)
    # corpus token index of the batch add_tokens accounted last
    _first_token: int = dataclasses.field(default=0, repr=False, compare=False)
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
        window_offset: int = 0,
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
                    packed_tokens(token_frequency, sum(widths)),
                    native=use_native(backend),
                    token_frequency=token_frequency,
                )
                for width in widths
            ],
            tokens_by_pos=torch.zeros(window, dtype=torch.long),
            token_count=torch.zeros(vocab_size, dtype=torch.long),
            group_windows=torch.zeros(config.window_groups, dtype=torch.long),
            token_count_groups=torch.zeros(
                config.window_groups * config.detector_intervals, vocab_size, dtype=torch.long
            ),
            tri_occurrences=SparseCounter(),
            backend=backend,
            window_offset=window_offset,
            window_means={
                (site, layer): WindowMeanMoments.empty(width, config.window_groups)
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
        self._first_token = (self.window_offset + self.n_windows) * window
        self.tokens_by_pos += batch
        self._bos_id = bos_id
        if self.config.window_groups:
            self._groups = window_groups(input_ids, self.config.window_groups)  # (B,)
            self.group_windows += torch.bincount(self._groups, minlength=self.config.window_groups)
        counted = counted_positions(input_ids, bos_id)  # (B, T)
        self.token_count += torch.bincount(input_ids[counted].cpu(), minlength=self.vocab_size)
        if self.config.detector_intervals:
            ids, groups = input_ids.cpu(), self._groups[:, None].expand_as(input_ids)
            keys = groups[counted.cpu()] * self.vocab_size + ids[counted.cpu()]
            self.token_count_groups += torch.bincount(
                keys, minlength=self.token_count_groups.numel()
            ).view_as(self.token_count_groups)
        if self.config.trigrams:
            keys, valid = trigram_keys(input_ids, counted, self.vocab_size, bos_id)
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
        if use_native_stats(self.backend, pre, act):
            fires = add_layer_native(self, stats, pre, act, input_ids, counted, wmeans)
        else:
            fires = self._add_layer_torch(stats, pre, act, input_ids, counted, wmeans)
        add_token_sparsity(stats, act, self.config, self.backend, self._groups)
        if self.config.trigrams:
            keys, valid = trigram_keys(input_ids, counted, self.vocab_size, self._bos_id)
            b, t, n = torch.nonzero(fires & valid[:, :, None], as_tuple=True)
            stats.trigrams.add(n * self.vocab_size**3 + keys[b, t])
        if self.config.detector_intervals:
            b, t, n = torch.nonzero(fires & counted[:, :, None], as_tuple=True)
            token_key = n * self.vocab_size + input_ids[b, t]  # (F,) n·V + token
            group = self._groups.to(b.device)[b]  # (F,)
            stats.group_pairs.add((token_key * self.config.window_groups + group).cpu())
        if self.config.top_contexts:
            k = self.config.top_contexts
            batch = batch_top(act, k, self._first_token)
            stats.top_value, stats.top_index = merge_top(
                [(stats.top_value, stats.top_index), batch], k
            )

    def _add_layer_torch(self, stats, pre, act, input_ids, counted, wmeans) -> torch.Tensor:
        """Torch form of :meth:`add_layer`; returns the firing pattern ``(B, T, W)`` bool."""
        fires = torch.gt(pre, self.config.fire_threshold, out=self.buffer("fires", pre, torch.bool))
        # summing bytes in uint8 (exact while B < 256) avoids an int64 copy of the batch
        count_dtype = torch.uint8 if fires.shape[0] < 256 else torch.int32
        stats.fire_by_pos += fires.view(torch.uint8).sum(0, dtype=count_dtype).cpu()
        if self.config.window_groups:
            stats.group_fires.add(fires, self._groups)
        act32 = act.float()  # (B, T, W); per-window sums in float32, totals in float64
        basis = position_basis(act32.shape[1], act32.device)  # (2, T)
        moments = torch.matmul(basis, act32).double()  # (B, 2, W): Σ_t a, Σ_t pos_t·a
        window_sum, position_moment = moments[:, 0], moments[:, 1]  # (B, W) each
        work = self.buffer("work", act32, torch.float32)  # (B, T, W)
        window_sumsq = torch.mul(act32, act32, out=work).sum(1).double()  # (B, W)
        finite = torch.isfinite(window_sumsq) & torch.isfinite(moments).all(1)  # (B, W)
        refuse_non_finite(int((~finite).sum()))
        stats.act_sum += window_sum.sum(0).cpu()
        stats.act_sumsq += window_sumsq.sum(0).cpu()
        if wmeans is not None:
            wmeans.add_window_sums(window_sum, act32.shape[1], self._groups)
        absact = torch.abs(act32, out=work)  # (B, T, W)
        torch.maximum(stats.act_absmax, absact.amax((0, 1)).double().cpu(), out=stats.act_absmax)
        stats.pearson_abs_sum += abs_pearson_with_position(
            position_moment, window_sum, window_sumsq, act32.shape[1]
        ).cpu()
        if self.config.unigrams:
            width = fires.shape[-1]
            stats.pairs.add(input_ids.flatten(), fires.reshape(-1, width), counted.flatten())
        return fires

    def buffer(self, name: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A reusable work tensor of ``like``'s shape and device."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != like.shape or buffer.device != like.device:
            buffer = self._buffers[name] = torch.empty(like.shape, dtype=dtype, device=like.device)
        return buffer

    def flat_buffer(self, name: str, size: int, dtype: torch.dtype) -> torch.Tensor:
        """A reusable CPU work vector of at least ``size`` elements (its first ``size``)."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < size:
            buffer = self._buffers[name] = torch.empty(size, dtype=dtype)
        return buffer[:size]

    # -- window groups: bootstrap SEs (capture/window_groups.py) ---------------------------
    def group_bootstrap(self) -> GroupBootstrap | None:
        """The resamples of the window groups; None when the pass kept no groups or fewer
        than 2 of them hold windows."""
        if not self.config.window_groups:
            return None
        return GroupBootstrap.of(self.group_windows)

    def fire_count_resampled(
        self, layer: int, bootstrap: GroupBootstrap
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Firing counts and token counts of each resample: ``(R, W)`` and ``(R,)`` float64."""
        per_group = self.layer(layer).fire_by_pos_groups.sum(1, dtype=torch.long)  # (G, W)
        tokens = bootstrap.resample(self.group_windows) * self.window
        return bootstrap.resample(per_group), tokens

    def fire_by_pos_resampled(
        self, layer: int, bootstrap: GroupBootstrap, rows: slice
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``fire_by_pos`` and ``tokens_by_pos`` of the resamples ``rows``: ``(r, T, W)`` and
        ``(r, T)`` int64 (every window adds 1 at each position)."""
        weights = bootstrap.weights[rows]  # (r, G)
        fire = torch.tensordot(weights, self.layer(layer).fire_by_pos_groups.double(), dims=1)
        tokens = (weights @ self.group_windows.double())[:, None].expand(-1, self.window)
        return fire.round().long(), tokens.round().long()  # integer weights: exact counts

    # -- window-mean moments (METHODS §5) --------------------------------------------------------
    def add_window_sums(self, site: str, layer: int, sums: torch.Tensor, window: int) -> None:
        """Accumulate one batch of ``site`` at ``layer``: ``sums`` ``(B, W)`` float64, each
        window's sum over its ``window`` positions."""
        self._window_moments(site, layer).add_window_sums(sums, window, self._groups)

    def window_mean_variance(self, site: str, layer: int) -> torch.Tensor:
        """(W,) float64: variance across windows of the window-mean activation (population
        variance, ddof 0)."""
        moments = self._window_moments(site, layer)
        n = self._windows_for_moments()
        mean = moments.sum / n
        return (moments.sumsq / n - mean * mean).clamp_min(0.0)

    def window_mean_variance_resampled(
        self, site: str, layer: int, bootstrap: GroupBootstrap
    ) -> torch.Tensor:
        """``(R, W)`` float64: :meth:`window_mean_variance` on each resample of the window
        groups (:mod:`neuronspec.capture.window_groups`)."""
        moments = self._window_moments(site, layer)
        self._windows_for_moments()
        n = bootstrap.resample(self.group_windows)[:, None]  # (R, 1)
        mean = bootstrap.resample(moments.group_sum) / n  # (R, W)
        square = bootstrap.resample(moments.group_sumsq) / n
        return (square - mean * mean).clamp_min(0.0)

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
        merged = merge_tensor_dicts(
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
            "group_windows": self.group_windows,
            "token_count_groups": self.token_count_groups,
            "tri_occ_key": self.tri_occurrences.keys,
            "tri_occ_count": self.tri_occurrences.counts,
        }
        for index, stats in enumerate(self.layers):
            pairs = stats.pairs.parts() if layout is None else stats.pairs.laid_out(*layout)
            if table_only:
                pairs["pair_key"], pairs["pair_count"] = stats.pairs.table()
                for name in PACKED_FIELDS:
                    pairs[name] = pairs[name][:0]
            stats.trigrams.consolidate()
            stats.group_pairs.consolidate()
            for name in LAYER_FIELDS:
                tensors[f"layer{index}.{name}"] = getattr(stats, name)
            for name, tensor in pairs.items():
                tensors[f"layer{index}.{name}"] = tensor
            tensors[f"layer{index}.tri_key"] = stats.trigrams.keys
            tensors[f"layer{index}.tri_count"] = stats.trigrams.counts
            tensors[f"layer{index}.group_pair_key"] = stats.group_pairs.keys
            tensors[f"layer{index}.group_pair_count"] = stats.group_pairs.counts
        for (site, index), moments in self.window_means.items():
            tensors[f"layer{index}.{site}_wmean_sum"] = moments.sum
            tensors[f"layer{index}.{site}_wmean_sumsq"] = moments.sumsq
            tensors[f"layer{index}.{site}_wmean_group_sum"] = moments.group_sum
            tensors[f"layer{index}.{site}_wmean_group_sumsq"] = moments.group_sumsq
        return {name: tensor.contiguous() for name, tensor in tensors.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> NeuronStats:
        check_format(meta)
        layers = []
        native = use_native("auto")
        for index, width in enumerate(meta["widths"]):
            get = lambda name, i=index: tensors[f"layer{i}.{name}"]  # noqa: E731
            pairs = UnigramCounter.from_parts(
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
            fields = {name: get(name) for name in LAYER_FIELDS if name != "fire_by_pos_groups"}
            group_counts = get("fire_by_pos_groups")
            layers.append(
                LayerStats(
                    **fields,
                    group_fires=GroupFires(
                        tuple(group_counts.shape), group_counts, tensors["group_windows"]
                    ),
                    pairs=pairs,
                    trigrams=SparseCounter(get("tri_key"), get("tri_count")),
                    group_pairs=SparseCounter(get("group_pair_key"), get("group_pair_count")),
                )
            )
        return cls(
            config=StatsConfig(**meta["config"]),
            vocab_size=meta["vocab_size"],
            window=meta["window"],
            layers=layers,
            tokens_by_pos=tensors["tokens_by_pos"],
            token_count=tensors["token_count"],
            group_windows=tensors["group_windows"],
            token_count_groups=tensors["token_count_groups"],
            tri_occurrences=SparseCounter(tensors["tri_occ_key"], tensors["tri_occ_count"]),
            window_means={
                (site, index): WindowMeanMoments(
                    tensors[f"layer{index}.{site}_wmean_sum"],
                    tensors[f"layer{index}.{site}_wmean_sumsq"],
                    tensors[f"layer{index}.{site}_wmean_group_sum"],
                    tensors[f"layer{index}.{site}_wmean_group_sumsq"],
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

    def unigram_group_table(
        self, layer: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The unigram firings of ``layer`` per window group: ``(neuron, token, group,
        count)`` int64, sorted by (neuron, token, group) (``--detector-intervals``)."""
        if not self.config.detector_intervals:
            raise NeuronSpecError(
                "these statistics were collected without the (neuron, token) firings of each "
                "window group; run with --detector-intervals (StatsConfig.detector_intervals)"
            )
        table = self.layer(layer).group_pairs
        table.consolidate()
        keys, groups = table.keys.numpy(), self.config.window_groups
        token_key, vocab = keys // groups, self.vocab_size
        return token_key // vocab, token_key % vocab, keys % groups, table.counts.numpy()

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
