"""Integrated gradients for knowledge neurons: all layers batched against a per-layer loop.

A randomly initialised GPT-2-small-shaped ``GPT2LMHeadModel`` (12 layers, d 768, vocab
50257), one prompt of 12 tokens, m = 20 steps, the gold token's probability, attributions of
the ``mlp`` site of every layer (:mod:`neuronspec.interventions.integrated_gradients`).
Candidates, all computing the same attributions:

- *per-layer loop*: one pass of m full-prompt rows per layer (the straightforward method);
- *all layers batched, full-prompt rows*: the 12·m rows in one pass (isolates batching);
- *all layers batched, shared prefix* (the library's default for GPT-2): the first 11
  tokens once into the key/value cache, the 12·m rows run the last token only.

Ratios are per-round ratios against the per-layer loop (``time_side_by_side``). Peak memory:
each candidate runs once in a fresh process; a thread samples its resident set size every
2 ms and the row reports the peak above the size just before the call (MiB). ``quick``: a
4-layer model of the same width. One timed round after the warm-up round (the
per-layer loop of 12 layers takes minutes on 2 shared cores).

Measured (``python -m neuronspec.bench --only ig``, 2 shared CPU cores at load ~12, torch
2.13 CPU, one round): per-layer loop 172.8 s, peak +387 MiB; all layers batched with
full-prompt rows 61.8 s (ratio 0.358, 2.8x faster), peak +3198 MiB; all layers batched with
the shared prefix 20.7 s (ratio 0.120, 8.3x faster), peak +728 MiB.
"""

from __future__ import annotations

import multiprocessing
import threading
import time

import torch

from neuronspec.bench import row, time_side_by_side
from neuronspec.fixture_costs import rss_bytes

PROMPT_LENGTH = 12
STEPS = 20
TARGET = 262


def _model(n_layer: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=768, n_head=12)).eval()


def _candidates(model) -> dict:
    from neuronspec.interventions.integrated_gradients import (
        integrated_gradients,
        integrated_gradients_per_layer,
    )
    from neuronspec.models.adapters import adapter_for

    adapter = adapter_for(model)
    ids = torch.randint(0, 50257, (1, PROMPT_LENGTH), generator=torch.Generator().manual_seed(1))
    return {
        "loop": lambda: integrated_gradients_per_layer(model, adapter, ids, TARGET, steps=STEPS),
        "batched_full": lambda: integrated_gradients(
            model, adapter, ids, TARGET, steps=STEPS, share_prefix=False
        ),
        "batched_shared": lambda: integrated_gradients(
            model, adapter, ids, TARGET, steps=STEPS, share_prefix=True
        ),
    }


def _peak_in_child(name: str, n_layer: int, queue) -> None:
    call = _candidates(_model(n_layer))[name]
    torch.set_grad_enabled(True)
    before = rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    call()
    done.set()
    sampler.join()
    queue.put(max(peak[0], rss_bytes()) - before)


def peak_memory_mib(name: str, n_layer: int) -> float:
    """Peak resident memory above the pre-call size of one call of candidate ``name``."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_peak_in_child, args=(name, n_layer, queue))
    process.start()
    value = queue.get()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"memory measurement of {name!r} failed (exit {process.exitcode})")
    return value / 2**20


def run(quick: bool = False) -> list[dict]:
    n_layer, repeats = (4, 1) if quick else (12, 1)
    names = {
        "loop": f"IG {n_layer} layers, per-layer loop, full-prompt rows",
        "batched_full": f"IG {n_layer} layers, all layers batched, full-prompt rows",
        "batched_shared": f"IG {n_layer} layers, all layers batched, shared prefix",
    }
    memory = {key: peak_memory_mib(key, n_layer) for key in names}
    timings = time_side_by_side(_candidates(_model(n_layer)), repeats)
    rows = []
    for key, name in names.items():
        label = f"{name} (peak +{memory[key]:.0f} MiB)"
        vs = None if key == "loop" else rows[0]["name"]
        result = row(label, timings[key], vs, None if key == "loop" else timings["loop"])
        rows.append({**result, "peak_mib": memory[key]})
    return rows
