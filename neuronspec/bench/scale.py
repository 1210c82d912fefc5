"""Cost of the statistics pass on real model shapes, and how it grows with the corpus.

Random-weight models of the shipped configs (:mod:`neuronspec.models.shapes`: GPT-2 small
and medium, mamba-130m and mamba-370m; 50 257 / 50 280-token vocabularies) stream a
Zipf-distributed token stream (exponent 1 over the vocabulary, windows of 64 tokens, the
plugin's default) through :func:`~neuronspec.capture.runner.collect_stats`, at 1× and 4×
a base token count. Each (model, size) runs in a fresh process, so its peak RSS
(``ru_maxrss``) is its own; the RSS after building the model and the tokens is reported
too, and the growth of the peak above it is what the statistics take. Reported per run:
tokens/s of the pass (model build excluded), peak RSS, the cache entry the pass would write
(``to_tensors()``, safetensors bytes, as the pytest plugin stores it), and the number of
distinct (neuron, token) pairs (the only accumulator whose size grows with the corpus).

Random models fire on about half of all (neuron, token) pairs, more than trained ones:
a worst case for the sparse counts. ``quick``: 2 layers of GPT-2 small and mamba-130m,
256 and 1024 tokens.

Run: ``python -m neuronspec.bench --only scale [--quick]``; one run:
``python -m neuronspec.bench.scale MODEL TOKENS [LAYERS]`` prints its JSON.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from neuronspec.fixture_costs import rss_bytes

WINDOW = 64
BATCH = 16  # windows per forward (the plugin's default --batch-size)
FULL = {"gpt2": 4096, "gpt2-medium": 1024, "mamba130m": 4096, "mamba370m": 1024}  # base tokens
QUICK = {"gpt2": 256, "mamba130m": 256}
GROWTH = 4


def measure(model_id: str, tokens: int, layers: int | None = None) -> dict:
    """One pass of ``tokens`` Zipf tokens through a random ``model_id``-shaped model."""
    import torch

    from neuronspec.bench.capture import _zipf_tokens
    from neuronspec.capture.cache import TensorCache, cache_key
    from neuronspec.capture.config import StatsConfig
    from neuronspec.capture.runner import collect_stats
    from neuronspec.models.adapters import adapter_for
    from neuronspec.models.registry import LoadedModel
    from neuronspec.models.shapes import model_shape, random_model

    model = random_model(model_id, n_layers=layers)
    loaded = LoadedModel(model_id, model, None, adapter_for(model), model_id, "bench")
    vocab = model.config.vocab_size
    ids = _zipf_tokens(tokens // WINDOW, WINDOW, vocab, seed=1)  # (n, T)
    baseline = rss_bytes()
    start = time.perf_counter()
    stats = collect_stats(loaded, ids, bos_id=None, config=StatsConfig(), batch_size=BATCH)
    tensors, meta = stats.to_tensors(), stats.meta()
    seconds = time.perf_counter() - start
    pairs = sum(len(stats.unigram_table(layer)[0]) for layer in range(stats.n_layers))
    with tempfile.TemporaryDirectory() as directory:
        key = cache_key({"bench": "scale", "model": model_id, "tokens": tokens})
        cache = TensorCache(Path(directory))
        cache.save(key, tensors, meta)
        entry_bytes = cache.path_for(key).stat().st_size
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    shape = model_shape(model_id, context=WINDOW)
    return {
        "model": model_id,
        "layers": stats.n_layers,
        "neurons": stats.n_layers * shape.neurons,
        "tokens": int(ids.numel()),
        "distinct_tokens": int((torch.bincount(ids.flatten(), minlength=vocab) > 0).sum()),
        "seconds": seconds,
        "tokens_per_s": ids.numel() / seconds,
        "rss_before_pass": baseline,
        "peak_rss": peak,
        "entry_bytes": entry_bytes,
        "pairs": pairs,
        "threads": torch.get_num_threads(),
    }


def _measure_in_child(model_id: str, tokens: int, layers: int | None) -> dict:
    command = [sys.executable, "-m", "neuronspec.bench.scale", model_id, str(tokens)]
    command += [str(layers)] if layers is not None else []
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"scale run {model_id} {tokens} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def run(quick: bool = False) -> list[dict]:
    """One row per (model, size), plus the 4×/1× ratio of seconds per model."""
    from neuronspec.bench import Timing
    from neuronspec.bench import row as _row

    base, layers = (QUICK, 2) if quick else (FULL, None)
    rows, details = [], []
    for model_id, tokens in base.items():
        small = _measure_in_child(model_id, tokens, layers)
        large = _measure_in_child(model_id, GROWTH * tokens, layers)
        names = []
        for result in (small, large):
            details.append(result)
            name = (
                f"{model_id}-shape ({result['layers']} layers), {result['tokens']} tokens: "
                f"{result['tokens_per_s']:.0f} tok/s, peak RSS {_gb(result['peak_rss'])} "
                f"(+{_gb(result['peak_rss'] - result['rss_before_pass'])} over the model), "
                f"entry {result['entry_bytes'] / 1e6:.1f} MB, {result['pairs']} pairs"
            )
            names.append(name)
            rows.append(_row(name, Timing((result["seconds"],))))
        rows.append(
            _row(f"{model_id}-shape: {GROWTH}x tokens", Timing((large["seconds"],)), names[0],
                 Timing((small["seconds"],)))
        )  # fmt: skip
    print(json.dumps(details))
    return rows


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: python -m neuronspec.bench.scale MODEL TOKENS [LAYERS]")
    layer_count = int(sys.argv[3]) if len(sys.argv) == 4 else None
    print(json.dumps(measure(sys.argv[1], int(sys.argv[2]), layer_count)))
