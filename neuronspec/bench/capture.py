"""Cost of the streamed statistics pass against a plain forward over the same tokens.

Random models with GPT-2-small's shape (12 layers, d 768, 3072 neurons, vocab 50257) and
mamba-130m's shape (24 layers, d 768, d_inner 1536, vocab 50280; fast scan), batches of
4×256 tokens of a Zipf-distributed token stream (so the token statistics look like text, not
uniform noise). Every token of the pass gets a packed (neuron, token) count row sized by its
count in the pass, as in a user's run. Random models fire on about half of all (token, neuron)
pairs: a worst case for the exact counts.

The statistics pass runs the layers without the LM head (it needs no logits), so its
capture overhead is the ratio to a plain forward of the layers; the ratio to the plain LM
forward is what a user sees end to end. A pass ends by counting the sparse keys still
pending (``to_tensors``, what the cache stores); that part is timed inside each pass and
reported apart from the streaming. It grows with the number of distinct (neuron, token)
pairs, so every pass is timed over ``SHORT`` and over ``LONG`` batches, and the marginal
ratio (the extra batches of the long pass, statistics against forward) is the cost per
batch once the pass is long. The one sorted (neuron, token) table per layer that analyses
read is built on read, not in the pass; its cost for all layers after the short pass is
reported too. The pass with its 20 window groups (the default: bootstrap SEs) is timed
beside the pass without them, and so is the pass with its 16 top-activating contexts per
neuron (the default) beside the pass without. 5 rounds; ratios are medians of per-round ratios (each round runs the compared
passes back to back). ``quick``: 4 layers, 1 and 2 batches of 2×128 tokens, 2 rounds.
"""

from __future__ import annotations

import functools
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, MambaConfig, MambaForCausalLM

from neuronspec.bench import Timing, time_side_by_side
from neuronspec.bench import row as _row
from neuronspec.capture.config import StatsConfig
from neuronspec.capture.runner import collect_stats
from neuronspec.capture.stats import NeuronStats
from neuronspec.models.adapters import adapter_for
from neuronspec.models.registry import LoadedModel
from neuronspec.models.scan import use_fast_scan
from neuronspec.options import REPORT_TOP_CONTEXTS


def _zipf_weights(vocab: int) -> torch.Tensor:
    """``(V,)`` Zipf's law with exponent 1: token id i has rank i + 1."""
    return 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)


def _zipf_tokens(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.multinomial(_zipf_weights(vocab), batch * length, True, generator=generator)
    return ids.view(batch, length)  # (B, T)


def _models(quick: bool) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    layers = 4 if quick else None
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=layers or 12, n_positions=1024))
    mamba = MambaForCausalLM(
        MambaConfig(
            vocab_size=50280,
            hidden_size=768,
            num_hidden_layers=layers or 24,
            state_size=16,
            expand=2,
            conv_kernel=4,
        )
    )
    use_fast_scan(mamba)
    return {"gpt2-small-shape": gpt2.eval(), "mamba-130m-shape": mamba.eval()}


SHORT, LONG = 4, 16  # batches per pass


def run(quick: bool = False) -> list[dict]:
    batch, length = (2, 128) if quick else (4, 256)
    short, long = (1, 2) if quick else (SHORT, LONG)
    repeats = 2 if quick else 5
    rows = []
    for name, model in _models(quick).items():
        loaded = LoadedModel(name, model, None, adapter_for(model), name, "bench")
        ids = _zipf_tokens(batch * long, length, model.config.vocab_size)
        final_seconds: dict[int, list[float]] = {short: [], long: []}  # per call, warm-up first
        stored: dict = {}  # what the cache would store after the short pass

        def lm_forward(model=model, ids=ids[: batch * short]):
            with torch.inference_mode():
                for chunk in ids.split(batch):
                    model(input_ids=chunk, use_cache=False)

        def layers_forward(n, model=model, ids=ids):
            with torch.inference_mode():
                for chunk in ids[: batch * n].split(batch):
                    model.base_model(input_ids=chunk, use_cache=False)

        def stats_pass(n, loaded=loaded, ids=ids, out=final_seconds, stored=stored):
            stats = collect_stats(
                loaded,
                ids[: batch * n],
                bos_id=None,
                config=StatsConfig(),
                batch_size=batch,
            )
            start = time.perf_counter()
            tensors = stats.to_tensors()  # pending sparse keys counted (once per pass)
            out[n].append(time.perf_counter() - start)
            if n == short:
                stored.update(tensors=tensors, meta=stats.meta())

        def stats_pass_with(config, n, loaded=loaded, ids=ids):
            stats = collect_stats(
                loaded, ids[: batch * n], bos_id=None, config=config, batch_size=batch
            )
            stats.to_tensors()

        def read_tables(stored=stored):
            stats = NeuronStats.from_tensors(stored["tensors"], stored["meta"])
            for layer in range(stats.n_layers):
                stats.unigram_table(layer)

        t = time_side_by_side(
            {  # compared rows are neighbours: they run back to back in every round
                "lm": lm_forward,
                "stats": functools.partial(stats_pass, short),
                "stats, no groups": functools.partial(
                    stats_pass_with, StatsConfig(window_groups=0), short
                ),
                "stats, top contexts": functools.partial(
                    stats_pass_with, StatsConfig(top_contexts=REPORT_TOP_CONTEXTS), short
                ),
                "layers": functools.partial(layers_forward, short),
                "tables": read_tables,
                "layers long": functools.partial(layers_forward, long),
                "stats long": functools.partial(stats_pass, long),
            },
            repeats,
        )
        final = Timing(tuple(final_seconds[short][1:]))  # the warm-up call is not a round
        tokens = f"{short}x{batch}x{length}"
        lm_row = f"{name}: plain LM forward (with logits), {tokens}"
        layers_row = f"{name}: plain forward of the layers (no LM head), {tokens}"
        whole = f"{name}: statistics pass, whole, {tokens}"
        long_layers = f"{name}: plain forward of the layers, {long}x{batch}x{length}"
        extra = f"{long - short} more batches"
        marginal = f"{name}: forward of the layers, marginal ({extra})"
        marginal_layers = t["layers long"] - t["layers"]
        rows += [
            _row(lm_row, t["lm"]),
            _row(layers_row, t["layers"]),
            _row(f"{name}: statistics pass, streaming, {tokens}", t["stats"] - final, layers_row,
                 t["layers"]),
            _row(f"{name}: statistics pass, pending keys counted, {tokens}", final,
                 layers_row, t["layers"]),
            _row(whole, t["stats"], layers_row, t["layers"]),
            _row(f"{name}: statistics pass without window groups, whole, {tokens}",
                 t["stats, no groups"], layers_row, t["layers"]),
            _row(f"{name}: statistics pass with the 20 window groups, whole, {tokens}", t["stats"],
                 f"{name}: statistics pass without window groups, whole, {tokens}",
                 t["stats, no groups"]),
            _row(f"{name}: statistics pass with {REPORT_TOP_CONTEXTS} top contexts (a report run),"
                 f" whole, {tokens}", t["stats, top contexts"], layers_row, t["layers"]),
            _row(f"{name}: statistics pass with {REPORT_TOP_CONTEXTS} top contexts, whole, {tokens}",
                 t["stats, top contexts"], whole, t["stats"]),
            _row(whole, t["stats"], lm_row, t["lm"]),
            _row(f"{name}: on read, sorted (neuron, token) tables of all layers, {tokens}",
                 t["tables"], layers_row, t["layers"]),
            _row(long_layers, t["layers long"]),
            _row(f"{name}: statistics pass, whole, {long}x{batch}x{length}", t["stats long"],
                 long_layers, t["layers long"]),
            _row(marginal, marginal_layers),
            _row(f"{name}: statistics pass, marginal ({extra})", t["stats long"] - t["stats"],
                 marginal, marginal_layers),
        ]  # fmt: skip
    return rows
