"""The embedded models: shipped weights load offline and still recall what eval.json says."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from neuronspec.data.toyworld import load_facts
from neuronspec.errors import UnknownModelError
from neuronspec.models.registry import load_model
from neuronspec.zoo import EMBEDDED_MODELS, weights_dir
from neuronspec.zoo.evaluate import fact_recall
from neuronspec.zoo.train import TrainConfig, train

TINY_ARCH = {
    "tiny-gpt2": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_inner": 64},
    "tiny-mamba": {
        "num_hidden_layers": 1,
        "hidden_size": 32,
        "intermediate_size": 64,
        "state_size": 4,
    },
}


@pytest.mark.parametrize("name", EMBEDDED_MODELS)
def test_shipped_model_recalls_what_eval_json_says(name):
    """Loaded offline through the registry (Mamba with the fast scan), as specs load it."""
    directory = weights_dir(name)
    shipped = json.loads((directory / "eval.json").read_text())["recall_train_templates"]
    loaded = load_model(name)
    assert loaded.source == str(directory)
    measured = fact_recall(loaded.model, loaded.tokenizer, load_facts(), heldout=False)
    # every fact, every training template: deterministic, so the very same numbers
    assert measured["n_prompts"] == shipped["n_prompts"] == 546
    assert measured["recall"] == shipped["recall"]
    assert measured["per_relation"] == shipped["per_relation"]
    assert measured["recall"] >= 0.9


@pytest.mark.parametrize("name", EMBEDDED_MODELS)
def test_recipe_runs_saves_and_reloads(name, tmp_path):
    cfg = TrainConfig(steps=3, batch_size=4, n_docs=200, warmup=1, log_every=1)
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    log = train(name, tmp_path, cfg, **TINY_ARCH[name])
    assert [row["step"] for row in log["losses"]] == [0, 1, 2]
    assert all(math.isfinite(row["loss"]) for row in log["losses"])
    assert torch.are_deterministic_algorithms_enabled() == deterministic_before
    model = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    ids = tokenizer("The capital of", return_tensors="pt")["input_ids"]  # (1, T)
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))
    assert tokenizer.bos_token == tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"


def test_unknown_model_names_the_known_ones():
    with pytest.raises(UnknownModelError, match="known: tiny-gpt2, tiny-mamba"):
        weights_dir("tiny-bert")
