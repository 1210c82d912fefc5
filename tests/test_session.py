"""A warm run reads its statistics from the cache without building a model or a corpus."""

from __future__ import annotations

import pytest
import torch

import neuronspec.session as session_module
from neuronspec.data import toyworld
from neuronspec.data.corpus import CorpusConfig, load_corpus_texts
from neuronspec.session import RunConfig, SpecSession

CORPUS = CorpusConfig(text_limit=60, window=64)


def _session(cache_dir) -> SpecSession:
    return SpecSession(RunConfig(models=("tiny-gpt2",), corpus=CORPUS, cache_dir=cache_dir))


def test_warm_session_instantiates_no_model_and_generates_no_texts(tmp_path, monkeypatch):
    cold = _session(tmp_path).stats("tiny-gpt2")

    def forbidden(*args, **kwargs):
        raise AssertionError("a warm run must not get here")

    monkeypatch.setattr(session_module, "load_model", forbidden)
    monkeypatch.setattr(toyworld, "toyworld_documents", forbidden)
    warm_session = _session(tmp_path)
    warm = warm_session.stats("tiny-gpt2")
    for a, b in zip(cold.layers, warm.layers, strict=True):
        assert torch.equal(a.fire_by_pos, b.fire_by_pos)
        assert torch.equal(a.act_sum, b.act_sum)
    assert warm_session.model_info["tiny-gpt2"]["model_type"] == "gpt2"
    assert warm_session.model_info["tiny-gpt2"]["n_layers"] == len(cold.layers)
    with pytest.raises(AssertionError, match="warm run"):  # the model is still reachable
        warm_session.model("tiny-gpt2")


def test_toyworld_texts_are_named_by_generator_and_limit_and_loaded_on_demand():
    small, larger = load_corpus_texts(CORPUS), load_corpus_texts(CorpusConfig(text_limit=61))
    assert small.digest == load_corpus_texts(CORPUS).digest
    assert small.digest != larger.digest
    assert len(small.analysis) == 60 and len(larger.analysis) == 61
    assert small.analysis == tuple(toyworld.toyworld_documents("train", n_docs=60))
