"""Cost of the causal sweep on real model shapes, against the statistics pass of the same run.

Random-weight models of the shipped gpt2 and mamba-130m configs
(:func:`neuronspec.models.shapes.random_model`), a Zipf token stream
(:func:`neuronspec.bench.capture._zipf_tokens`) in windows of 64. Timed, each once:
the statistics pass over ``TOKENS`` tokens (batches of 16 windows, the plugin's default);
the KL screen of every neuron of every layer on 8 windows (8 target draws: 64 rows,
forward and backward); one forward of the exact sweep (the baseline group and
``DEFAULT_MAX_ROWS // 8 − 1`` single-neuron interventions of 8 windows each) at the first
and at the last layer (the layers below the intervened one run once, so a forward costs less
with depth). The full exact sweep is projected from those two, linear in the layer: per layer up to 2·top_k candidates (κ̂'s and
ρ's top 10) and 99 random controls (the defaults), or the 10 candidates alone. ``quick``:
2 layers, 4,096 tokens, forwards of 3 interventions.
"""

from __future__ import annotations

import functools
import math
import time

from neuronspec.analyses.causal import DEFAULT_N_PROMPTS, single_neuron_sweep
from neuronspec.bench import Timing, row
from neuronspec.bench.capture import _zipf_tokens
from neuronspec.capture.config import StatsConfig
from neuronspec.capture.runner import collect_stats
from neuronspec.interventions.ablation import DEFAULT_MAX_ROWS, AblationEngine
from neuronspec.interventions.kl_screen import kl_screen
from neuronspec.models.adapters import adapter_for
from neuronspec.models.registry import LoadedModel
from neuronspec.models.shapes import random_model

TOKENS, QUICK_TOKENS = 32768, 4096
WINDOW, BATCH = 64, 16
TOP_K, CONTROLS = 10, 99


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(quick: bool = False) -> list[dict]:
    tokens, layers = (QUICK_TOKENS, 2) if quick else (TOKENS, None)
    rows = []
    for model_id in ("gpt2", "mamba130m"):
        model = random_model(model_id, n_layers=layers)
        loaded = LoadedModel(model_id, model, None, adapter_for(model), model_id, "bench")
        vocab = model.config.vocab_size
        ids = _zipf_tokens(tokens // WINDOW, WINDOW, vocab, seed=1)  # (n, T)
        prompts = _zipf_tokens(2 * DEFAULT_N_PROMPTS, WINDOW, vocab, seed=2)
        n_layers = loaded.adapter.n_layers
        stats = _seconds(
            functools.partial(
                collect_stats, loaded, ids, bos_id=None, config=StatsConfig(), batch_size=BATCH
            )
        )
        layers_all = list(range(n_layers))
        screen = _seconds(
            functools.partial(kl_screen, loaded, prompts[DEFAULT_N_PROMPTS:], layers_all)
        )
        max_rows = 4 * DEFAULT_N_PROMPTS if quick else DEFAULT_MAX_ROWS
        per_forward = max_rows // DEFAULT_N_PROMPTS - 1
        engine = AblationEngine(loaded, method="zero", max_rows=max_rows)
        measured = {}  # the layers below the intervened one run once: cost falls with depth
        for layer in (0, n_layers - 1):
            plan = [(layer, n) for n in range(per_forward)]
            measured[layer] = _seconds(
                functools.partial(single_neuron_sweep, engine, prompts[:DEFAULT_N_PROMPTS], plan)
            )
        first, last = measured[0], measured[n_layers - 1]
        name = f"{model_id}-shape ({n_layers} layers)"
        stats_row = f"{name}: statistics pass, {tokens} tokens"
        s = Timing((stats,))
        rows += [
            row(stats_row, s),
            row(f"{name}: KL screen, all neurons of all layers", Timing((screen,)), stats_row, s),
            row(f"{name}: one exact forward at layer 0 ({per_forward} interventions)",
                Timing((first,)), stats_row, s),
            row(f"{name}: one exact forward at layer {n_layers - 1}", Timing((last,)),
                stats_row, s),
        ]  # fmt: skip
        # a forward at layer l costs about first + (last - first)·l/(L - 1) (linear in the
        # layers run for every group)
        per_layer_cost = [
            first + (last - first) * layer / max(n_layers - 1, 1) for layer in range(n_layers)
        ]
        for label, per_layer in (
            (f"up to {2 * TOP_K} candidates + {CONTROLS} controls", 2 * TOP_K + CONTROLS),
            (f"{TOP_K} candidates alone", TOP_K),
        ):
            forwards = per_layer / per_forward  # per layer, as the sweep packs them
            projected = Timing((screen + sum(forwards * cost for cost in per_layer_cost),))
            rows.append(row(f"{name}: screen + exact sweep of {label} per layer (projected: "
                            f"{math.ceil(forwards * n_layers)} forwards)", projected, stats_row,
                            s))  # fmt: skip
    return rows
