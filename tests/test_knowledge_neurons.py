"""Knowledge neurons (METHODS.md §8): planted truth, the set rules by hand, overlap, fact sets."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from neuronspec.analyses.knowledge import (
    KnowledgeFactFinding,
    coarse_set,
    jaccard,
    knowledge_neurons,
    knowledge_overlap,
    refined_set,
)
from neuronspec.data.facts import (
    FactsError,
    KnowledgeFact,
    english_facts,
    load_fact_file,
    select_per_relation,
    toyworld_knowledge_facts,
)
from neuronspec.models.adapters import adapter_for

# -- planted truth --------------------------------------------------------------------------

VOCAB, D, BOS, TRIGGER, ANSWER, OTHER_ANSWER = 40, 16, 0, 5, 9, 12
LAYER, NEURON = 1, 13  # the planted neuron: last layer, mlp site


class WordTokenizer:
    """Words ``t<id>`` → ids; enough of the HF tokenizer interface for the analysis."""

    bos_token_id = BOS

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [int(word[1:]) for word in text.split()]}

    def decode(self, ids: list[int]) -> str:
        return " ".join(f"t{i}" for i in ids)


def planted_gpt2() -> GPT2LMHeadModel:
    """2-layer GPT-2 whose neuron 13 of layer 1 fires only on token 5 and writes token 9.

    Embedding dims 0 and 1 are reserved: the trigger has +1 in dim 0, every other token -1,
    so after LayerNorm the neuron's pre-activation 10·x₀ − 20 is ≈ +19 on the trigger and
    ≈ −58 elsewhere (GELU ≈ 0: silent). The neuron adds its output to residual dim 1; the
    answer's (tied) embedding is 5·e₁, so P(answer) ≈ 1 with the neuron and ≈ 1/V without.
    """
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=D, n_head=2, vocab_size=VOCAB, n_positions=16)
    model = GPT2LMHeadModel(config).double().eval()
    with torch.no_grad():
        wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
        wte[:, :2] = 0.0
        wte[:, 0] = -1.0
        wte[TRIGGER] = 0.0
        wte[TRIGGER, 0] = 1.0
        wte[ANSWER, 1] = 5.0
        wpe[:, :2] = 0.0
        mlp = model.transformer.h[LAYER].mlp
        mlp.c_fc.weight[:, NEURON] = 0.0  # Conv1D weight: (d, 4d)
        mlp.c_fc.weight[0, NEURON] = 10.0
        mlp.c_fc.bias[NEURON] = -20.0
        mlp.c_proj.weight[NEURON, :] = 0.0  # (4d, d)
        mlp.c_proj.weight[NEURON, 1] = 1.0
    return model


def _planted_facts() -> list[KnowledgeFact]:
    return [
        KnowledgeFact("s", "planted", "t9", ("t3 t7 t5", "t21 t5", "t30 t2 t8 t5")),
        KnowledgeFact("u", "other", "t12", ("t3 t7 t6", "t22 t6", "t31 t2 t8 t6")),
        KnowledgeFact("v", "other", "t14", ("t4 t7 t6", "t23 t6")),
    ]


def test_planted_neuron_is_silent_off_the_trigger_and_writes_the_answer():
    model = planted_gpt2()
    adapter = adapter_for(model)
    ids = torch.tensor([[BOS, 3, 7, TRIGGER]])
    acts = adapter.capture(ids, [("mlp", LAYER)])[("mlp", LAYER)][0, :, NEURON]  # (T,)
    assert acts[-1] > 15 and bool((acts[:-1].abs() < 1e-6).all()), acts
    probs = torch.softmax(model(ids).logits[0, -1], dim=-1)
    assert probs[ANSWER] > 0.99


def test_planted_neuron_is_refined_first_by_attribution_and_suppressing_it_removes_the_answer():
    model = planted_gpt2()
    summary, overlaps = knowledge_neurons(
        model, adapter_for(model), WordTokenizer(), _planted_facts(), n_controls=2, top_k=3
    )
    fact = summary.facts[0]
    assert fact.answer_token == ANSWER and fact.answer_n_tokens == 1
    assert NEURON in fact.refined[LAYER]
    best_layer = max(fact.layers, key=lambda j: fact.top_attributions[j][0])
    assert (best_layer, fact.top_neurons[best_layer][0]) == (LAYER, NEURON)
    assert fact.gold_prob > 0.99
    # suppressing the refined set leaves the answer about the 1/V of an untrained model
    assert fact.suppress_change < -0.95, fact.suppress_change
    assert abs(fact.control_suppress_change) < 0.05, fact.control_suppress_change
    assert fact.control_facts == ("other(u)", "other(v)")
    assert overlaps[-1].layer is None


# -- the rules by hand ----------------------------------------------------------------------


def test_coarse_set_is_a_share_of_the_maximum_over_all_layers():
    attr = torch.tensor([[1.0, 0.19, -2.0], [0.2, 0.5, 0.0]])
    assert coarse_set(attr, 0.2).tolist() == [[True, False, False], [True, True, False]]
    assert not coarse_set(-attr.abs(), 0.2).any()  # no positive attribution: empty


def test_refined_set_needs_share_p_of_prompts_and_two_prompts():
    a = torch.tensor([[True, True, False]])
    b = torch.tensor([[True, False, False]])
    c = torch.tensor([[True, True, True]])
    assert refined_set([a, b, c], 0.7).tolist() == [[True, False, False]]  # 2/3 < 0.7
    assert refined_set([a, b, c], 0.6).tolist() == [[True, True, False]]  # 2/3 ≥ 0.6
    assert refined_set([a, c], 0.7).tolist() == [[True, True, False]]
    with pytest.raises(FactsError, match="at least 2"):
        refined_set([a], 0.7)


def _finding(relation: str, refined: tuple[tuple[int, ...], ...]) -> KnowledgeFactFinding:
    n = len(refined)
    return KnowledgeFactFinding(
        subject="s", relation=relation, object="o", answer_token=0, answer_token_text=" o",
        answer_n_tokens=1, n_prompts=3, gold_prob=0.5, layers=tuple(range(n)), refined=refined,
        n_refined=sum(map(len, refined)), top_neurons=((),) * n, top_attributions=((),) * n,
        suppress_change=0.0, enhance_change=0.0, control_suppress_change=0.0,
        control_enhance_change=0.0, control_facts=(), max_completeness_error=0.0, steps=20,
        threshold=0.2, min_share=0.7,
    )  # fmt: skip


def test_overlap_by_hand():
    facts = [
        _finding("r", ((1, 2), (5,))),
        _finding("r", ((2, 3), ())),
        _finding("q", ((9,), ())),
    ]
    layer0, layer1, overall = knowledge_overlap(facts)
    assert layer0.intra_jaccard == pytest.approx(1 / 3)  # {1,2} vs {2,3}
    assert layer0.inter_jaccard == 0.0 and layer0.n_inter_pairs == 2
    assert layer1.n_intra_pairs == 1 and layer1.intra_jaccard == 0.0  # {5} vs {}
    assert layer1.n_inter_pairs == 1  # ({}, {}) has no Jaccard: left out
    assert overall.layer is None
    assert overall.intra_jaccard == pytest.approx(1 / 4)  # {(0,1),(0,2),(1,5)} vs {(0,2),(0,3)}
    assert jaccard(set(), set()) is None and math.isclose(jaccard({1}, {1, 2}), 0.5)


# -- fact sets ------------------------------------------------------------------------------


def test_english_fact_set_shape_and_classic_facts():
    facts = english_facts()
    by_relation: dict[str, list[KnowledgeFact]] = {}
    for fact in facts:
        by_relation.setdefault(fact.relation, []).append(fact)
        assert len(fact.prompts) == 3 and all(not p.endswith(" ") for p in fact.prompts)
    assert len(by_relation) >= 6 and all(len(v) >= 10 for v in by_relation.values())
    known = {(f.subject, f.object) for f in facts}
    for pair in [
        ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Eiffel Tower", "Paris"),
        ("Nile", "Egypt"), ("Amazon", "Brazil"), ("Yangtze", "China"),
        ("the end of World War II", "1945"), ("water", "H2O"),
        ("Romeo and Juliet", "William Shakespeare"), ("Hamlet", "William Shakespeare"),
        ("Macbeth", "William Shakespeare"),
    ]:  # fmt: skip
        assert pair in known, pair
    assert facts[0].answer == " Paris"


def test_toyworld_facts_and_selection():
    train = toyworld_knowledge_facts("train")
    assert len(train) == 182 and all(len(f.prompts) == 3 for f in train)
    assert all(len(f.prompts) == 5 for f in toyworld_knowledge_facts("all"))
    chosen = select_per_relation(train, 2)
    assert len(chosen) == 14 and len({f.relation for f in chosen}) == 7
    with pytest.raises(FactsError, match="templates"):
        toyworld_knowledge_facts("test")


def test_fact_files_json_and_jsonl(tmp_path):
    row = {"subject": "a", "relation": "r", "object": "b", "prompts": ["p one", "p two"]}
    (tmp_path / "f.json").write_text(json.dumps({"facts": [row]}))
    (tmp_path / "f.jsonl").write_text(json.dumps(row) + "\n\n" + json.dumps(row) + "\n")
    assert load_fact_file(tmp_path / "f.json") == [KnowledgeFact("a", "r", "b", ("p one", "p two"))]
    assert len(load_fact_file(tmp_path / "f.jsonl")) == 2
    (tmp_path / "bad.json").write_text(json.dumps([{"subject": "a"}]))
    with pytest.raises(FactsError, match="lacks relation, object, prompts"):
        load_fact_file(tmp_path / "bad.json")
    with pytest.raises(FactsError, match="does not exist"):
        load_fact_file(tmp_path / "missing.json")
