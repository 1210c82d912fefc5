"""Shipped configs of every registry id: shapes, parameter counts and FLOPs known offline."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from neuronspec.errors import UnknownModelError
from neuronspec.models.adapters import adapter_for
from neuronspec.models.registry import HUB_MODELS
from neuronspec.models.shapes import model_shape, random_model, shipped_config

PUBLISHED = {  # (layers, d_model, parameters) as published for the checkpoints
    "gpt2": (12, 768, 124_439_808),
    "gpt2-medium": (24, 1024, 354_823_168),
    "mamba130m": (24, 768, None),
    "mamba2.8b": (64, 2560, None),
}


@pytest.mark.parametrize("registry_id", list(HUB_MODELS))
def test_shape_matches_the_model_the_config_builds(registry_id):
    config = shipped_config(registry_id)
    model_type = config.pop("model_type")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config))
    shape = model_shape(registry_id)
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    assert shape.neurons == adapter_for(model).width("mlp")
    assert shape.n_layers == adapter_for(model).n_layers
    layers, width, params = PUBLISHED.get(registry_id, (shape.n_layers, shape.d_model, None))
    assert (shape.n_layers, shape.d_model) == (layers, width)
    assert params is None or shape.parameters == params


def test_flops_by_hand_for_gpt2_small():
    shape = model_shape("gpt2", context=64)
    assert shape.layer_flops_per_token == 12 * (24 * 768**2 + 4 * 64 * 768)
    assert shape.lm_head_flops_per_token == 2 * 768 * 50257


def test_random_model_of_a_real_shape_and_unknown_ids():
    model = random_model("mamba130m", n_layers=1)
    assert adapter_for(model).width("mlp") == 1536 and model.config.vocab_size == 50280
    with pytest.raises(UnknownModelError, match="no shipped config"):
        shipped_config("tiny-gpt2")
