"""One streamed pass: model × corpus → :class:`NeuronStats`, cached on disk.

The pass reads the ``mlp_pre`` and ``mlp`` sites of every layer through the site adapter,
folds each layer into the accumulators as soon as both of its sites have arrived, and
drops the activations: peak memory is one batch of one layer's sites. It runs the model's
layers without the LM head (``model.base_model``): no logits are computed, since none are
used (for a 50k vocabulary the head is about 40% of a GPT-2-small forward).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from neuronspec.capture.cache import TensorCache, cache_key
from neuronspec.capture.config import StatsConfig
from neuronspec.capture.format import STATS_FORMAT
from neuronspec.capture.moments import WINDOW_MEAN_SITES
from neuronspec.capture.stats import NeuronStats
from neuronspec.data.windows import TokenWindows
from neuronspec.models.registry import LoadedModel
from neuronspec.progress import progress


def model_vocab_size(loaded: LoadedModel) -> int:
    """Token ids range over the larger of the embedding matrix and the tokenizer."""
    tokenizer_size = len(loaded.tokenizer) if loaded.tokenizer is not None else 0
    return max(int(loaded.model.config.vocab_size), tokenizer_size)


def collect_stats(
    loaded: LoadedModel,
    windows: torch.Tensor,
    *,
    bos_id: int | None,
    config: StatsConfig = StatsConfig(),
    batch_size: int = 16,
    backend: str = "auto",
    token_frequency: torch.Tensor | None = None,
    window_offset: int = 0,
) -> NeuronStats:
    """Stream ``windows`` ``(n, T)`` through the model once and return the statistics.

    ``backend``: how each layer is accumulated (:data:`~neuronspec.capture.config.STATS_BACKENDS`).
    ``token_frequency`` ``(V,)``: frequencies that pick the tokens counted densely (e.g.
    corpus-wide ones for a shard); default, counted from ``windows``. Never changes results.
    ``window_offset``: the corpus index of ``windows[0]`` (a shard's), for the token indices
    of the top-activating contexts.
    """
    adapter = loaded.adapter
    widths = [adapter.width("mlp")] * adapter.n_layers
    vocab_size = model_vocab_size(loaded)
    if token_frequency is None:
        token_frequency = torch.bincount(windows.flatten(), minlength=vocab_size)  # (V,)
    # window-mean moments (delta-sensitive / high-variance neurons): mlp, and dt for Mamba
    moment_sites = tuple(site for site in WINDOW_MEAN_SITES if site in adapter.sites)
    stats = NeuronStats.empty(
        widths,
        windows.shape[1],
        vocab_size,
        config,
        token_frequency,
        backend=backend,
        window_mean_sites=moment_sites,
        window_offset=window_offset,
    )
    targets = [(site, layer) for layer in range(adapter.n_layers) for site in ("mlp_pre", "mlp")]
    # the mlp window sums come with add_layer; the other moment sites' sums are read apart
    sum_targets = [
        (s, layer) for s in moment_sites if s != "mlp" for layer in range(adapter.n_layers)
    ]
    pending: dict[int, torch.Tensor] = {}
    summed: set[tuple[str, int]] = set()  # window sums read in this batch
    expected_sums = set(sum_targets)
    batch_state: dict[str, torch.Tensor] = {}

    def on_window_sums(site: str, layer: int, sums: torch.Tensor, positions: int) -> None:
        stats.add_window_sums(site, layer, sums, positions)
        summed.add((site, layer))

    def on_site(site: str, layer: int, value: torch.Tensor) -> None:
        if site == "mlp_pre":
            pending[layer] = value
            return
        pre = pending.pop(layer)
        stats.add_layer(layer, pre, value, batch_state["ids"], batch_state["counted"])

    device = loaded.device
    starts = range(0, len(windows), batch_size)
    bar = progress(starts, total=len(starts), desc=f"statistics {loaded.model_id}", unit="batch")
    with (
        torch.inference_mode(),
        adapter.read(targets, on_site),
        adapter.read_window_sums(sum_targets, on_window_sums),
        bar,
    ):
        for start in bar:
            ids = windows[start : start + batch_size]
            batch_state["counted"] = stats.add_tokens(ids, bos_id)
            batch_state["ids"] = ids
            ids = ids.to(device)
            # The layers only: the sites are inside them, the LM head's logits are not needed.
            # No attention mask: windows have no padding, and an all-ones mask makes HF Mamba
            # multiply two (B, T, ·) tensors by it in every layer (about 3% of the forward).
            loaded.model.base_model(input_ids=ids, use_cache=False)
            if pending:
                raise RuntimeError(f"site mlp of layers {sorted(pending)} never fired")
            if summed != expected_sums:
                missing = sorted(expected_sums - summed)
                raise RuntimeError(f"the window sums of {missing} were never read")
            summed.clear()
    return stats


def computation_path(
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    fast_scan: bool = True,
    model_type: str | None = None,
) -> dict[str, str | None]:
    """How the statistics pass computes, wherever that can change a number (part of the key).

    - ``device``: ``cpu`` or ``cuda`` (``auto`` resolved): other kernels, other rounding;
    - ``stats``: ``native`` (``stats.c``, float32 on the CPU, when it builds) or ``torch``:
      float sums differ in rounding and a value at a histogram edge may change bin;
    - ``scan`` (Mamba only): ``hf`` (``--no-fast-scan``), ``kernel`` (the C scan) or
      ``chunked`` (torch): a gate value within rounding of the threshold can flip a firing
      (one firing of tiny-mamba layer 3 over 256 windows differs between ``hf`` and fast).

    It asks whether the native kernels load (building them once per machine), as the pass
    itself does, so the key names the path the pass takes.
    """
    from neuronspec.models.registry import pick_device
    from neuronspec.native import kernels_available

    kind = pick_device(device).type
    native = kind == "cpu" and kernels_available()
    scan = None
    if model_type == "mamba":
        scan = "hf" if not fast_scan else ("kernel" if native else "chunked")
    return {
        "device": kind,
        "stats": "native" if native and dtype == torch.float32 else "torch",
        "scan": scan,
    }


def stats_cache_key(
    fingerprint: str,
    dtype: torch.dtype,
    corpus: TokenWindows,
    config: StatsConfig,
    path: dict[str, str | None] | None = None,
) -> str:
    """Cache key of a model's statistics: weights hash, dtype, corpus, configuration, and
    the :func:`computation_path` (device, stats backend, Mamba scan)."""
    return cache_key(
        {
            "stats_format": STATS_FORMAT,
            "model": fingerprint,
            "dtype": str(dtype),
            "corpus": corpus.fingerprint,
            "config": config.to_json(),
            "path": path if path is not None else computation_path(dtype=dtype),
        }
    )


def cached_stats(
    load: Callable[[], LoadedModel],
    corpus: TokenWindows,
    *,
    fingerprint: str,
    dtype: torch.dtype,
    config: StatsConfig = StatsConfig(),
    cache_dir: Path | None,
    batch_size: int = 16,
    device: str = "cpu",
    fast_scan: bool = True,
    model_type: str | None = None,
) -> NeuronStats:
    """Statistics of a model on the analysis windows of ``corpus``, from the cache if there.

    The key needs only the weights' ``fingerprint``, ``dtype`` and how the pass computes
    (``device``, ``fast_scan`` and the checkpoint's ``model_type``: :func:`computation_path`);
    ``load()`` (the model, loaded with those settings) is called only when the entry must be
    computed, so a warm run instantiates no model. Workers that ask for the same entry at
    once compute it once (file lock in the cache).
    """

    def compute():
        loaded = load()
        if loaded.fingerprint != fingerprint or next(loaded.model.parameters()).dtype != dtype:
            raise RuntimeError("cached_stats: the loaded model does not match the cache key")
        stats = collect_stats(
            loaded, corpus.analysis, bos_id=corpus.bos_id, config=config, batch_size=batch_size
        )
        return stats.to_tensors(), stats.meta()

    if cache_dir is None:
        tensors, meta = compute()
    else:
        path = computation_path(
            device=device, dtype=dtype, fast_scan=fast_scan, model_type=model_type
        )
        key = stats_cache_key(fingerprint, dtype, corpus, config, path)
        tensors, meta = TensorCache(Path(cache_dir)).get_or_compute(key, compute)
    return NeuronStats.from_tensors(tensors, meta)
