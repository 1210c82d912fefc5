"""Cost of the streamed statistics pass against a plain forward over the same tokens.

Random models with GPT-2-small's shape (12 layers, d 768, 3072 neurons, vocab 50257) and
mamba-130m's shape (24 layers, d 768, d_inner 1536, vocab 50280; fast scan), 4×256 tokens of
a Zipf-distributed token stream (so the token statistics look like text, not uniform noise).
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, MambaConfig, MambaForCausalLM

from neuronspec.bench import time_side_by_side
from neuronspec.capture.runner import collect_stats
from neuronspec.capture.stats import StatsConfig
from neuronspec.models.adapters import adapter_for
from neuronspec.models.registry import LoadedModel
from neuronspec.models.scan import use_fast_scan


def _zipf_tokens(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    weights = 1.0 / ranks  # Zipf's law, exponent 1
    ids = torch.multinomial(weights, batch * length, replacement=True, generator=generator)
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
    repeats = 2 if quick else 3
    rows = []
    for name, model in _models(quick).items():
        loaded = LoadedModel(name, model, None, adapter_for(model), name, "bench")
        ids = _zipf_tokens(batch, length, model.config.vocab_size)

        def forward(model=model, ids=ids):
            with torch.inference_mode():
                model(input_ids=ids, use_cache=False)

        def stats_pass(loaded=loaded, ids=ids):
            collect_stats(loaded, ids, bos_id=None, config=StatsConfig(), batch_size=batch)

        times = time_side_by_side({"forward": forward, "stats": stats_pass}, repeats)
        rows.append(
            {
                "name": f"{name}: plain forward",
                "seconds": times["forward"],
                "ratio_vs": None,
                "ratio": None,
            }
        )
        rows.append(
            {
                "name": f"{name}: streamed statistics pass",
                "seconds": times["stats"],
                "ratio_vs": f"{name}: plain forward",
                "ratio": times["stats"] / times["forward"],
            }
        )
    return rows
