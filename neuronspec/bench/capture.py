"""Cost of the streamed statistics pass against a plain forward over the same tokens.

Random models with GPT-2-small's shape (12 layers, d 768, 3072 neurons, vocab 50257) and
mamba-130m's shape (24 layers, d 768, d_inner 1536, vocab 50280; fast scan), four batches of
4×256 tokens of a Zipf-distributed token stream (so the token statistics look like text, not
uniform noise). The tokens whose (neuron, token) counts are kept densely are picked from the
Zipf population, as a pass over a large corpus picks them: about a quarter of the
occurrences then fall to the sparse tail, as in real text (picked from these 4,096 tokens
alone, every token would be dense and the tail's cost would not be measured).

The statistics pass runs the layers without the LM head (it needs no logits), so its
capture overhead is the ratio to a plain forward of the layers; the ratio to the plain LM
forward is what a user sees end to end. The final sorted (neuron, token) tables are built
once per pass, at its end (counting the sparse keys still pending, merging dense rows and
tail); their time is measured inside each pass and reported apart from the streaming part,
since over a real corpus (thousands of batches) they are a small share that four batches
overstate. ``quick``: 4 layers, one batch of 2×128 tokens, 2 repeats.
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, MambaConfig, MambaForCausalLM

from neuronspec.bench import row as _row
from neuronspec.bench import time_side_by_side
from neuronspec.capture.runner import collect_stats
from neuronspec.capture.stats import StatsConfig
from neuronspec.models.adapters import adapter_for
from neuronspec.models.registry import LoadedModel
from neuronspec.models.scan import use_fast_scan


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


def run(quick: bool = False) -> list[dict]:
    batch, length = (2, 128) if quick else (4, 256)
    n_batches = 1 if quick else 4  # a pass streams several batches; fixed costs amortise
    repeats = 2 if quick else 5
    rows = []
    for name, model in _models(quick).items():
        loaded = LoadedModel(name, model, None, adapter_for(model), name, "bench")
        ids = _zipf_tokens(batch * n_batches, length, model.config.vocab_size)

        def lm_forward(model=model, ids=ids):
            with torch.inference_mode():
                for chunk in ids.split(batch):
                    model(input_ids=chunk, use_cache=False)

        def layers_forward(model=model, ids=ids):
            with torch.inference_mode():
                for chunk in ids.split(batch):
                    model.base_model(input_ids=chunk, use_cache=False)

        population = _zipf_weights(model.config.vocab_size)  # (V,)

        table_seconds: list[float] = []  # per call, warm-up first

        def stats_pass(loaded=loaded, ids=ids, population=population, out=table_seconds):
            stats = collect_stats(
                loaded,
                ids,
                bos_id=None,
                config=StatsConfig(),
                batch_size=batch,
                token_frequency=population,
            )
            start = time.perf_counter()
            stats.to_tensors()  # the final sorted tables, as saved to the cache (once per pass)
            out.append(time.perf_counter() - start)

        times = time_side_by_side(
            {"lm": lm_forward, "layers": layers_forward, "stats": stats_pass}, repeats
        )
        tables = statistics.median(table_seconds[1:])
        lm_row = f"{name}: plain LM forward (with logits)"
        layers_row = f"{name}: plain forward of the layers (no LM head)"
        whole = f"{name}: statistics pass, whole"
        rows += [
            _row(lm_row, times["lm"]),
            _row(layers_row, times["layers"]),
            _row(f"{name}: statistics pass, streaming", times["stats"] - tables, layers_row,
                 times["layers"]),
            _row(f"{name}: statistics pass, final tables (once)", tables, layers_row,
                 times["layers"]),
            _row(whole, times["stats"], layers_row, times["layers"]),
            _row(whole, times["stats"], lm_row, times["lm"]),
        ]  # fmt: skip
    return rows
