"""The format of the statistics (the cache entry of one model on one corpus): the names and
meaning of its tensors, its version, and how shards merge (:func:`merge_rules`).

Per layer ``i``, tensors ``layer{i}.<name>``, from the ``mlp_pre`` site (firing =
pre-activation > threshold, METHODS §1) and the ``mlp`` site (activation values):

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
*_groups           (G, ...)               fire_by_pos, abs_sketch and token_sparsity of
                                           each window group: fire_by_pos_groups (G, T, W)
                                           uint8 while every group holds at most 255
                                           windows, else int32 (merged sums widen to
                                           int32), abs_sketch_groups (G, n_sketch + 2),
                                           token_sparsity_groups (G, 4)
                                           (:mod:`neuronspec.capture.window_groups`)
pair_dense_token    (D,) int64             unigram firings at counted positions (not window
pair_dense_offset   (D,) int64             start, not BOS), for the corpus's tokens: row r
pair_dense_bits     (D,) uint8             counts token pair_dense_token[r] (distinct, any
pair_dense          (bytes,) uint8         order), W fields of pair_dense_bits[r] bits at
                                           byte pair_dense_offset[r]
                                           (:mod:`neuronspec.capture.packed_rows`)
pair_key/count      (P,) int32             ... and for the other tokens: sparse, sorted, key =
                                           n·V + token; int64 where W·V >= 2^31
tri_key/count       (Q,) int64             sparse trigram firings: key = n·V³ + trigram
group_pair_key/     (P',) int64            with ``detector_intervals``: unigram firings per
  count                                    window group, key = (n·V + token)·G + group
top_value           (k, W) float32         the k largest ``mlp`` activations per neuron
top_index           (k, W) int64           their corpus token index window·T + position
                                           (:mod:`neuronspec.capture.top_contexts`)
{site}_wmean_sum    (W,) float64           Σ over windows of the window-mean of ``site``
{site}_wmean_sumsq  (W,) float64           Σ of its square (METHODS §5; sites ``mlp``, ``dt``)
{site}_wmean_group_ (G, W) float64         both sums per window group (``..._group_sum``,
  sum/sumsq                                ``..._group_sumsq``)
==================  =====================  ==================================================

Shared by all layers: ``tokens_by_pos (T,)`` (its entry 0 is the number of windows),
``token_count (V,)`` (occurrences at counted positions), ``group_windows (G,)`` (windows
in each window group), ``token_count_groups (G, V)`` (``token_count`` of each group with
``detector_intervals``, else ``(0, V)``), ``tri_occ_key/count`` (trigram occurrences).

Every field merges by addition (``act_absmax`` by maximum, sparse tables by key union), so
shards of a corpus give the same statistics as the whole.
"""

from __future__ import annotations

import torch

from neuronspec.capture.packed_rows import packed_regions
from neuronspec.capture.sparse_counts import merge_sparse
from neuronspec.capture.top_contexts import merge_top
from neuronspec.errors import NeuronSpecError

# Part of the cache key: bump when an accumulator changes. v5: trigrams ending at window
# position 2 count; v6: window-mean moments, sparsity sketch; v7: packed (neuron, token)
# rows, no abs_hist (abs_sketch bins the same |a| finer); v8: Mamba dt window sums from
# the scan, in float64; v9: Poisson-bootstrap firing replicates; v10: top-activating contexts; v11: window groups
# (bootstrap over groups) in place of the Poisson replicates; v12: fire_by_pos_groups in
# uint8 while every group has at most 255 windows, else int32; v13: (neuron, token) firings
# and token counts per window group (detector_intervals).
STATS_FORMAT = "neuronspec-stats-v13"

LAYER_FIELDS = (
    "fire_by_pos",
    "act_sum",
    "act_sumsq",
    "act_absmax",
    "pearson_abs_sum",
    "abs_sketch",
    "token_sparsity",
    "fire_by_pos_groups",
    "abs_sketch_groups",
    "token_sparsity_groups",
    "top_value",
    "top_index",
)
"""The per-layer accumulators of fixed shape (:class:`~neuronspec.capture.stats.LayerStats`)."""

PACKED_FIELDS = ("pair_dense_token", "pair_dense_offset", "pair_dense_bits", "pair_dense")
"""The packed rows of the unigram counts (empty in the table-only form)."""


def check_format(meta: dict) -> None:
    """Refuse statistics written in another format."""
    if meta.get("format") != STATS_FORMAT:
        raise NeuronSpecError(f"statistics format {meta.get('format')!r} != {STATS_FORMAT}")


def merge_rules(names: list[str]) -> dict[str, str]:
    """How each tensor of :meth:`NeuronStats.to_tensors` (``table_only=True``, or in one
    ``layout``) merges across shards: ``"sum"`` (counts, sums, histograms: the default for
    any new field), ``"max"`` (``act_absmax``), ``"keys"`` / ``"counts"`` (a sparse table
    ``X_key`` / ``X_count``: union of keys, counts summed), ``"packed"`` (the packed rows
    ``pair_dense``: added field by field, see :func:`packed_regions`), ``"layout"`` (their
    tokens, offsets and widths: equal in every shard) or ``"top"`` / ``"top_index"`` (the
    top-activating contexts: the first k of both shards' candidates, see
    :func:`~neuronspec.capture.top_contexts.merge_top`). In the table-only form the last two
    are empty. The one place merge semantics live: :func:`NeuronStats.merge` and the
    distributed merge (:mod:`neuronspec.capture.collect`) both follow it."""
    present = set(names)
    rules: dict[str, str] = {}
    for name in names:
        if name.endswith("top_value"):
            rules[name] = "top"
        elif name.endswith("top_index"):
            rules[name] = "top_index"
        elif name.endswith("pair_dense"):
            rules[name] = "packed"
        elif name.endswith(PACKED_FIELDS):
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


def summable(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in a dtype whose sums across shards cannot overflow: uint8 counts (the
    window groups' firing counts) widen to int32."""
    return tensor.to(torch.int32) if tensor.dtype == torch.uint8 else tensor


def narrow_group_counts(merged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``merged`` with each ``fire_by_pos_groups`` in its stored dtype: uint8 while every
    group holds at most 255 windows, as a single pass stores it, else int32."""
    windows = merged["group_windows"]  # (G,)
    if windows.numel() == 0 or int(windows.max()) <= 255:
        for name in merged:
            if name.endswith("fire_by_pos_groups"):
                merged[name] = merged[name].to(torch.uint8)
    return merged


def merge_tensor_dicts(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    merged: dict[str, torch.Tensor] = {}
    for name, rule in merge_rules(list(a)).items():
        if rule in ("keys", "top_index"):
            continue  # merged with its counts / its values
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
            keys, counts = merge_sparse(torch.cat([a[key], b[key]]), torch.cat([a[name], b[name]]))
            # same dtypes as the inputs: keys keep their range; counts fit (< 2^31 tokens)
            merged[key], merged[name] = keys.to(a[key].dtype), counts.to(a[name].dtype)
        elif rule == "max":
            merged[name] = torch.maximum(a[name], b[name])
        elif rule == "top":
            index = name[: -len("top_value")] + "top_index"
            parts = [(a[name], a[index]), (b[name], b[index])]
            merged[name], merged[index] = merge_top(parts, a[name].shape[0])
        else:
            merged[name] = summable(a[name]) + summable(b[name])
    return narrow_group_counts(merged)
