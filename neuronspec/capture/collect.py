"""The statistics pass of ``python -m neuronspec collect`` (:mod:`neuronspec.cli.collect`),
on one process or many.

Each model's entry is written under the key :func:`~neuronspec.capture.runner.stats_cache_key`
gives for the run's options, the key ``pytest specs/`` looks up: a later ``pytest specs/``
with the same options runs warm.

Data-parallel on torch.distributed::

    torchrun --standalone --nproc-per-node N -m neuronspec collect --models gpt2 ...

Rank r streams the r-th of N contiguous shards of the analysis windows through its own
copy of the model (:func:`~neuronspec.capture.runner.collect_stats`). The shards'
accumulators are then merged by the rules of :func:`~neuronspec.capture.format.merge_rules`
(the rules of :meth:`NeuronStats.merge`): dense fields (counts, sums, histograms, maxima)
by one all-reduce each, the packed (neuron, token) rows of the corpus's shared layout by
an all-reduce field by field, sparse ``(key, count)`` tables (trigrams, tokens outside the
layout) gathered on rank 0 and merged there by key. Rank 0 writes the entry, atomically
(:meth:`TensorCache.save`). gloo on CPU, NCCL when ``--device`` is CUDA (rank r on
``cuda:LOCAL_RANK``). Without torchrun the same code runs as a group of one process.

The entry holds each layer's (neuron, token) counts as packed rows in the layout of the
whole corpus (:func:`~neuronspec.capture.packed_rows.packed_layout`), which loads into the same
:class:`~neuronspec.capture.stats.NeuronStats` as the form a pytest run writes. Integer counts equal a single process's exactly; float sums differ by rounding
(summation order).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from neuronspec.capture.cache import TensorCache
from neuronspec.capture.format import merge_rules, narrow_group_counts, summable
from neuronspec.capture.packed_rows import packed_layout, packed_regions
from neuronspec.capture.runner import collect_stats, computation_path, stats_cache_key
from neuronspec.capture.sparse_counts import merge_sparse
from neuronspec.capture.stats import NeuronStats
from neuronspec.capture.top_contexts import merge_top
from neuronspec.errors import CacheCorruptError
from neuronspec.models.registry import pick_dtype
from neuronspec.session import SpecSession


@dataclasses.dataclass(frozen=True)
class Group:
    """This process's place in the process group and where collectives run."""

    rank: int
    world_size: int
    comm_device: torch.device  # tensors go here for a collective (CUDA for NCCL)


def init_group(device: str) -> tuple[Group, bool]:
    """Join torchrun's process group (env://), or make a group of one without torchrun.

    Returns the group and whether this call created it (and should destroy it)."""
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if cuda else "gloo"
    created = not dist.is_initialized()
    if created:
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend)
        else:  # no torchrun: the same code path, a group of one
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    comm_device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        comm_device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(comm_device)
    return Group(dist.get_rank(), dist.get_world_size(), comm_device), created


def shard_of(windows: torch.Tensor, group: Group) -> tuple[torch.Tensor, int]:
    """Rank r's windows, the r-th of ``world_size`` contiguous, near-equal parts, and the
    corpus index of its first window."""
    parts = torch.tensor_split(windows, group.world_size)
    return parts[group.rank], sum(len(part) for part in parts[: group.rank])


def merge_across_ranks(stats: NeuronStats, group: Group) -> dict[str, torch.Tensor] | None:
    """The union of every rank's statistics as tensors on rank 0, None elsewhere. Generic
    over the fields: each merges by its :func:`merge_rules` rule. The (neuron, token) counts
    travel as packed rows in the one layout of the whole corpus (:func:`packed_layout` of
    the all-reduced token counts), added field by field, so no rank holds more than the
    merged rows; only tokens outside that layout go as sparse tables."""
    token_count = _all_reduce(stats.token_count, dist.ReduceOp.SUM, group)  # (V,)
    layout = packed_layout(token_count, sum(layer.width for layer in stats.layers))
    tensors = stats.to_tensors(layout=layout)
    rules = merge_rules(list(tensors))
    merged: dict[str, torch.Tensor] = {}
    for name, rule in rules.items():
        if rule in ("sum", "max"):
            op = dist.ReduceOp.SUM if rule == "sum" else dist.ReduceOp.MAX
            merged[name] = _all_reduce(summable(tensors[name]), op, group)
        elif rule == "layout":  # the same on every rank
            merged[name] = tensors[name]
        elif rule == "packed":
            merged[name] = _all_reduce_packed(
                tensors[name], tensors[name + "_offset"], tensors[name + "_bits"], group
            )
        elif rule == "top":  # the first k of every rank's candidates
            index = name[: -len("top_value")] + "top_index"
            k, width = tensors[name].shape
            values = _gather(tensors[name].flatten(), group)
            indices = _gather(tensors[index].flatten(), group)
            if group.rank == 0:
                parts = [
                    (v.view(k, width), i.view(k, width))
                    for v, i in zip(values, indices, strict=True)
                ]
                merged[name], merged[index] = merge_top(parts, k)
        elif rule == "counts":
            key = name[: -len("_count")] + "_key"
            keys = _gather(tensors[key], group)
            counts = _gather(tensors[name], group)
            if group.rank == 0:
                merged[key], merged[name] = _merge_tables(keys, counts)
    return narrow_group_counts(merged) if group.rank == 0 else None


def _all_reduce_packed(
    arena: torch.Tensor, offsets: torch.Tensor, bits: torch.Tensor, group: Group
) -> torch.Tensor:
    """Packed rows ``arena (bytes,)`` uint8 summed over ranks field by field: by byte
    where fields are at most 8 bits wide, in int32 for the wider ones (gloo has no uint16;
    every count is below 2^31)."""
    out = arena.clone()
    for start, end, dtype in packed_regions(offsets, bits, len(arena)):
        part = out.numpy()[start:end].view(dtype)  # a view into out
        if dtype is np.uint16:  # gloo has no uint16: sum in int32, then back
            total = _all_reduce(torch.from_numpy(part.astype(np.int32)), dist.ReduceOp.SUM, group)
            part[:] = total.numpy()
        else:  # bytes as they are; uint32 counts (< 2^31) as int32
            wire = torch.from_numpy(part.view(np.int32) if dtype is np.uint32 else part)
            part[:] = _all_reduce(wire, dist.ReduceOp.SUM, group).numpy().view(dtype)
    return out


def _all_reduce(tensor: torch.Tensor, op, group: Group) -> torch.Tensor:
    work = tensor.to(group.comm_device, copy=True)
    dist.all_reduce(work, op=op)
    return work.cpu()


def _gather(tensor: torch.Tensor, group: Group) -> list[torch.Tensor] | None:
    """Every rank's 1-d ``tensor`` (lengths may differ) on rank 0, in rank order."""
    length = torch.tensor([tensor.numel()], dtype=torch.long, device=group.comm_device)
    lengths = [torch.zeros_like(length) for _ in range(group.world_size)]
    dist.all_gather(lengths, length)
    longest = max(int(n) for n in lengths)
    padded = torch.zeros(longest, dtype=tensor.dtype, device=group.comm_device)
    padded[: tensor.numel()] = tensor
    parts = None
    if group.rank == 0:
        parts = [torch.empty_like(padded) for _ in range(group.world_size)]
    dist.gather(padded, parts, dst=0)
    if parts is None:
        return None
    return [part[: int(n)].cpu() for part, n in zip(parts, lengths, strict=True)]


def _merge_tables(
    keys: list[torch.Tensor], counts: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks' sorted ``(key, count)`` tables merged by :meth:`NeuronStats.merge`'s rule (key
    union, counts summed), keeping the input dtypes."""

    merged_keys, merged_counts = merge_sparse(torch.cat(keys), torch.cat(counts))
    return merged_keys.to(keys[0].dtype), merged_counts.to(counts[0].dtype)


def entry_key(session: SpecSession, model_id: str) -> str:
    """The statistics cache key the spec run's ``cached_stats`` looks up for ``model_id``."""
    run, files = session.config, session.files(model_id)
    dtype = pick_dtype(run.dtype)
    path = computation_path(
        device=run.device, dtype=dtype, fast_scan=run.fast_scan, model_type=files.model_type
    )
    return stats_cache_key(files.fingerprint, dtype, session.corpus(model_id), run.stats, path)


def collect_model(session: SpecSession, model_id: str, group: Group) -> dict:
    """Fill the cache entry of ``model_id`` (all ranks call this together); a summary."""
    run = session.config
    corpus = session.corpus(model_id)
    key = entry_key(session, model_id)
    cache = TensorCache(run.cache_dir)
    present = torch.zeros(1, dtype=torch.long)
    if group.rank == 0:
        try:
            present[0] = int(cache.load(key) is not None)
        except CacheCorruptError as error:
            print(f"{model_id}: recomputing a corrupt entry ({error})", file=sys.stderr)
    present = _all_reduce(present, dist.ReduceOp.SUM, group)
    summary = {"model": model_id, "key": key, "entry": str(cache.path_for(key))}
    if int(present[0]):
        return {**summary, "computed": False}
    start = time.perf_counter()
    loaded = session.model(model_id)
    shard, offset = shard_of(corpus.analysis, group)  # (n / N, T)
    stats = collect_stats(
        loaded,
        shard,
        bos_id=corpus.bos_id,
        config=run.stats,
        batch_size=run.batch_size,
        window_offset=offset,
    )
    merged = merge_across_ranks(stats, group)
    if group.rank == 0:
        cache.save(key, merged, stats.meta())
    dist.barrier()
    tokens = int(merged["tokens_by_pos"].sum()) if merged is not None else None
    return {
        **summary,
        "computed": True,
        "seconds": time.perf_counter() - start,
        "n_tokens": tokens,
    }
