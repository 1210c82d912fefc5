"""Model ids, local directories and the errors for models that are not here."""

from __future__ import annotations

import pytest

from neuronspec.errors import CheckpointError, ModelNotAvailableError, UnknownModelError
from neuronspec.models.registry import HUB_MODELS, is_available, load_model, resolve
from neuronspec.zoo import weights_dir


def test_short_ids_map_to_hub_repos_and_embedded_dirs():
    assert resolve("mamba130m").repo == "state-spaces/mamba-130m-hf"
    assert resolve("gpt2").repo == "openai-community/gpt2"
    assert resolve("tiny-mamba").local_dir == weights_dir("tiny-mamba")
    assert set(HUB_MODELS) >= {
        "gpt2",
        "gpt2-medium",
        "mamba130m",
        "mamba370m",
        "mamba790m",
        "mamba1.4b",
        "mamba2.8b",
    }


def test_unknown_id_lists_the_known_ones():
    with pytest.raises(UnknownModelError, match="unknown model 'mamba13m'; did you mean"):
        resolve("mamba13m")


def test_hub_model_not_in_cache_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty HF cache
    assert not is_available("mamba130m")
    with pytest.raises(ModelNotAvailableError, match="not available offline.*hf download"):
        load_model("mamba130m")


def test_directory_without_weights_is_reported(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="is not a checkpoint directory: it has no weights"):
        load_model(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="it has no config.json"):
        load_model(str(empty))


def test_embedded_models_load_offline_with_their_adapters():
    gpt2, mamba = load_model("tiny-gpt2"), load_model("tiny-mamba")
    assert (gpt2.family, gpt2.n_layers, gpt2.adapter.width("mlp")) == ("gpt2", 4, 512)
    assert (mamba.family, mamba.n_layers, mamba.adapter.width("mlp")) == ("mamba", 4, 256)
    assert gpt2.fingerprint != mamba.fingerprint
