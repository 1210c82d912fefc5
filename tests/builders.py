"""Small randomly initialised models built by the library's own tests (imported by test
modules as ``from builders import ...``; the fixtures in ``conftest.py`` use them too)."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, MambaConfig, MambaForCausalLM

from neuronspec.models.adapters import adapter_for
from neuronspec.models.registry import LoadedModel

VOCAB = 97


def make_gpt2(seed: int = 0, n_layer: int = 2, dtype=torch.float32) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=n_layer,
        n_head=4,
        n_inner=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).to(dtype).eval()


def make_mamba(seed: int = 0, n_layer: int = 2, dtype=torch.float32) -> MambaForCausalLM:
    torch.manual_seed(seed)
    config = MambaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        state_size=8,
        num_hidden_layers=n_layer,
        expand=2,
        conv_kernel=4,
        time_step_rank=4,
    )
    return MambaForCausalLM(config).to(dtype).eval()


def wrap(model, model_id: str) -> LoadedModel:
    """A LoadedModel around a model built in a test (no tokenizer: ids are drawn directly)."""
    return LoadedModel(
        model_id=model_id,
        model=model,
        tokenizer=None,
        adapter=adapter_for(model),
        fingerprint=f"test-{model_id}",
        source="test",
    )
