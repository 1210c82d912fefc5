"""Attention neurons (METHODS §7): each method against a dense recomputation, GPT-2's
attention rollout, fact-prompt subject masks, options and figures."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from builders import VOCAB, make_gpt2, make_mamba, wrap

from neuronspec.analyses.attention_neurons import (
    analyse_attention,
    diversity,
    fact_prompt_tokens,
    mlp_gradients,
)
from neuronspec.analyses.hidden_attention import gpt2_attention, hidden_attention, rollout
from neuronspec.errors import NeuronSpecError
from neuronspec.models.mamba_internals import capture_scan_inputs
from neuronspec.models.scan import use_fast_scan
from neuronspec.options import ATTENTION_METHODS as METHODS
from neuronspec.options import parse_methods

pytestmark = pytest.mark.attention
pytest_plugins = ["pytester"]


def _ids(batch=3, length=9, seed=4):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_diversity_by_hand():
    assert diversity(np.array([1.0, 1.0, 1.0, 1.0])) == pytest.approx(math.log(4))
    assert diversity(np.array([0.0, 3.0, 0.0])) == 0.0
    p = np.array([0.5, 0.25, 0.25])
    assert diversity(2 * p) == pytest.approx(-(p * np.log(p)).sum())
    assert math.isnan(diversity(np.zeros(3)))


def test_parse_methods():
    assert parse_methods("rollout, gradient_guided,rollout") == ("rollout", "gradient_guided")
    with pytest.raises(NeuronSpecError, match="choose from attention_weighted"):
        parse_methods("attention_weighted,bogus")
    with pytest.raises(NeuronSpecError, match="none given"):
        parse_methods(" , ")


def test_mamba_methods_equal_dense_recomputation():
    loaded = wrap(use_fast_scan(make_mamba(dtype=torch.float64)), "random-mamba")
    ids = _ids()
    run = analyse_attention(loaded, ids, model="m", layers=[1], methods=METHODS, top_k=5)
    s = capture_scan_inputs(loaded.model, ids, [0, 1])
    alpha = {layer: hidden_attention(s[layer]) for layer in (0, 1)}  # (B, d, L, L)
    clamped = [alpha[layer].mean(1).clamp_min(0) for layer in (0, 1)]  # (B, L, L) each
    unit = [a / a.sum(-1, keepdim=True).where(a.sum(-1, keepdim=True) > 0, 1.0) for a in clamped]
    eye = torch.eye(ids.shape[1], dtype=torch.float64)
    relevance = (
        ((eye + unit[1]) / (1 + unit[1].sum(-1, keepdim=True)))
        @ ((eye + unit[0]) / (1 + unit[0].sum(-1, keepdim=True)))
    )[:, -1]  # (B, L)
    np.testing.assert_allclose(run.relevance["rollout"], relevance.numpy(), rtol=1e-10)
    np.testing.assert_allclose(
        run.relevance["rollout"], rollout(clamped)[:, -1].numpy(), rtol=1e-10
    )
    np.testing.assert_allclose(run.relevance["rollout"], relevance.numpy(), rtol=1e-10)
    x = s[1].x.transpose(1, 2)  # (B, d, L)
    weighted = (alpha[1] * x[:, :, None, :]).abs().sum(-1).mean(-1)  # (B, d)
    np.testing.assert_allclose(run.scores["attention_weighted", 1].importance, weighted.numpy())
    marked = relevance > 1 / ids.shape[1]  # (B, L)
    mass = alpha[1].abs()[:, :, -1]  # (B, d, L): the last query row
    share = (mass * marked[:, None, :]).sum(-1) / mass.sum(-1)
    np.testing.assert_allclose(run.scores["rollout", 1].importance, share.numpy(), rtol=1e-10)
    assert [f.normalisation for f in run.rollout_findings] == [
        "rows to unit mass",
        "min-max per prompt, then rows to unit mass",
    ]
    g, y, _ = mlp_gradients(loaded, ids, [1])
    np.testing.assert_allclose(
        run.scores["gradient_guided", 1].importance, (g[1] * y[1]).abs().mean(1).numpy()
    )
    assert all(p.grad is None for p in loaded.model.parameters())
    finding = next(f for f in run.neuron_findings if f.method == "rollout")
    importance = share.mean(0).numpy()
    assert list(finding.top_neurons) == [int(c) for c in np.argsort(-importance)[:5]]
    assert finding.n_neurons == 64 and finding.max_diversity == pytest.approx(math.log(64))
    assert [f.layer for f in run.layer_findings] == [1]
    assert run.layer_findings[0].identity_rel_error < 1e-12
    assert run.layer_findings[0].above_diagonal_max == 0.0


def test_signed_mean_rollout_option():
    """``aggregate="mean"`` rolls out the signed channel mean of α̃ (METHODS §7); a layer
    matrix with a row of I + A summing to <= 0 is refused with the way out."""
    loaded = wrap(use_fast_scan(make_mamba(dtype=torch.float64)), "random-mamba")
    ids = _ids()
    s = capture_scan_inputs(loaded.model, ids, [0, 1])
    signed = [hidden_attention(s[layer]).mean(1) for layer in (0, 1)]  # (B, L, L) each
    absolute = [hidden_attention(s[layer]).abs().mean(1) for layer in (0, 1)]
    for a in signed:  # this random model's α̃ is small: every row of I + mean α̃ is > 0.99
        assert float((torch.eye(ids.shape[1], dtype=a.dtype) + a).sum(-1).min()) > 0.99
    run = analyse_attention(loaded, ids, model="m", layers=[1], aggregate="mean")
    np.testing.assert_allclose(
        run.relevance["rollout"], rollout(signed, unit=False)[:, -1].numpy(), rtol=1e-10
    )
    assert not np.allclose(run.relevance["rollout"], rollout(absolute)[:, -1].numpy())
    assert run.rollout_findings[0].aggregate == "mean"
    assert run.rollout_findings[0].normalisation.startswith("none")
    with pytest.raises(NeuronSpecError, match="sums to -2.+attention-aggregate clamped or abs"):
        rollout([torch.tensor([[[-3.0, 0.0], [0.5, 0.5]]], dtype=torch.float64)], unit=False)
    with pytest.raises(NeuronSpecError, match="unknown attention aggregate"):
        analyse_attention(loaded, ids, model="m", layers=[1], aggregate="median")


def test_gpt2_rollout_of_real_attention():
    model = make_gpt2()
    before = model.config._attn_implementation
    attentions = gpt2_attention(model, _ids())
    assert model.config._attn_implementation == before
    assert len(attentions) == 2
    for attention in attentions:  # mean over heads of probability rows: causal, rows sum to 1
        torch.testing.assert_close(attention.sum(-1), torch.ones(3, 9))
        assert float(attention.triu(1).abs().max()) == 0.0
    run = analyse_attention(wrap(model, "g"), _ids(), model="g", layers=[0, 1])
    torch.testing.assert_close(
        torch.from_numpy(run.relevance["rollout"]), rollout(attentions)[:, -1]
    )
    assert {f.method for f in run.neuron_findings} == {"gradient_guided"}
    assert not run.layer_findings


def test_fact_prompt_subject_mask():
    from transformers import AutoTokenizer

    from neuronspec.data.toyworld import load_facts
    from neuronspec.zoo import __file__ as zoo_file

    directory = os.path.join(os.path.dirname(zoo_file), "weights", "tiny-mamba")
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    fact = load_facts()[0]
    prompt = fact.train_prompts[0]
    ids, mask = fact_prompt_tokens(tokenizer, prompt, fact.subject)
    assert ids[0] == tokenizer.bos_token_id and not mask[0]
    subject_ids = [i for i, m in zip(ids, mask, strict=True) if m]
    assert tokenizer.decode(subject_ids).strip() == fact.subject
    assert tokenizer.decode(ids[1:]) == prompt


def test_every_english_fact_prompt_marks_its_subject():
    """The subject is found in its prompt ignoring case ("The fall of the Berlin Wall …" for
    "the fall of the Berlin Wall"): every fact of the English set gets a non-empty mask."""
    from transformers import AutoTokenizer

    from neuronspec.data.facts import run_facts
    from neuronspec.zoo import __file__ as zoo_file

    directory = os.path.join(os.path.dirname(zoo_file), "weights", "tiny-gpt2")
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    for fact in run_facts(None, embedded=False):
        _, mask = fact_prompt_tokens(tokenizer, fact.prompts[0], fact.subject)
        assert any(mask), fact
    with pytest.raises(NeuronSpecError, match="does not contain its subject"):
        fact_prompt_tokens(tokenizer, "Paris is in", "Berlin")


def test_bad_attention_option_is_a_usage_error(pytester, monkeypatch):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    )
    pytester.makeini("[pytest]\nneuronspec = true\n")  # a neuronspec project (plugin opt-in)
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess("--attention-methods=bogus")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--attention-methods*unknown*bogus*"])


def test_figures_are_written(tmp_path):
    from neuronspec.plots.attention import (
        plot_attention_neurons,
        plot_delta_ranking,
        plot_hidden_attention,
        plot_rollout_relevance,
    )

    loaded = wrap(use_fast_scan(make_mamba()), "random-mamba")
    run = analyse_attention(loaded, _ids(length=6), model="m", layers=[0], top_k=4)
    tokens = [f"t{i}" for i in range(6)]
    paths = [
        plot_hidden_attention(run.mean_attention[0], tokens, tmp_path / "a.png", title="a"),
        plot_rollout_relevance(
            {m: r[0] for m, r in run.relevance.items()}, tokens, tmp_path / "r.png", title="r"
        ),
        plot_delta_ranking(
            {0: np.linspace(0, 1, 64)}, {0: np.linspace(1, 0, 64)}, tmp_path / "d.png", title="d"
        ),
    ]
    for finding in run.neuron_findings:
        scores = run.scores[finding.method, finding.layer]
        paths.append(plot_attention_neurons(scores, finding, tmp_path / f"{finding.method}.png"))
    assert len(paths) == 6 and all(path.stat().st_size > 0 for path in paths)
