"""The toy world: deterministic, big enough, held-out templates really held out."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from neuronspec.data import toyworld as tw
from neuronspec.errors import CorpusError


@pytest.fixture(scope="module")
def train_text() -> str:
    return "\n".join(tw.toyworld_documents("train"))


def test_same_seed_same_world_and_documents():
    assert tw.generate_facts(0) == tw.generate_facts(0) == list(tw.FACTS)
    assert tw.generate_facts(1) != tw.generate_facts(0)
    a = tw.toyworld_dataset("train", seed=3, n_docs=50)["text"]
    assert a == tw.toyworld_dataset("train", seed=3, n_docs=50)["text"]
    assert a != tw.toyworld_dataset("train", seed=4, n_docs=50)["text"]


def test_world_size():
    facts = tw.load_facts()
    relations = Counter(f.relation for f in facts)
    assert len(relations) >= 6
    assert len({f.subject for f in facts}) >= 40
    assert len({(f.subject, f.relation) for f in facts}) == len(facts)  # one object per query
    for f in facts:
        assert len(f.train_prompts) + len(f.heldout_prompts) >= 3
        assert len(f.heldout_prompts) >= 1 and len(f.train_prompts) >= 1
        assert f.subject in " ".join(f.train_prompts + f.heldout_prompts)
        assert not set(f.train_prompts) & set(f.heldout_prompts)


def test_fact_sentences_in_training_text(train_text):
    for f in tw.FACTS:
        assert any(tw.fact_sentence(f, p) in train_text for p in f.train_prompts), f


def test_heldout_templates_never_in_training_text(train_text):
    for f in tw.FACTS:
        for p in f.heldout_prompts:
            assert p not in train_text, p


def test_train_and_heldout_documents_disjoint():
    train = set(tw.toyworld_documents("train", seed=0, n_docs=5000))
    heldout = tw.toyworld_documents("heldout", seed=0)
    assert len(heldout) == tw.DEFAULT_N_DOCS["heldout"]
    assert not train & set(heldout)


def test_documents_vary_in_length_and_mix_filler():
    docs = tw.toyworld_documents("train", n_docs=500)
    lengths = {d.count(".") for d in docs}
    assert min(lengths) == 1 and max(lengths) >= 10
    text = " ".join(docs).lower()
    assert all(text.count(p) > 10 for p in tw.PHRASES)


def test_json_asset_matches_generator():
    shipped = json.loads(tw.FACTS_JSON.read_text(encoding="utf-8"))
    assert shipped == tw.facts_json()


def test_bad_split_says_what_is_known():
    with pytest.raises(CorpusError, match="known: train, heldout"):
        tw.toyworld_dataset("validation")
