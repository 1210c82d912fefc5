"""The ablation engine and perplexity: weight-edit identities, HF's own loss, batching."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from builders import VOCAB, make_mamba, wrap
from torch import nn

from neuronspec.errors import NeuronSpecError
from neuronspec.interventions.ablation import (
    AblationEngine,
    AblationError,
    Condition,
    baseline_condition,
    derangement,
    random_condition,
)
from neuronspec.interventions.perplexity import condition_perplexities, next_token_nll


def _windows(n: int = 6, length: int = 16, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, length), generator=generator)


def _means(loaded, seed: int = 3) -> dict:
    generator = torch.Generator().manual_seed(seed)
    width = loaded.adapter.width("mlp")
    return {
        ("mlp", layer): torch.randn(width, generator=generator, dtype=torch.float64)
        for layer in range(loaded.adapter.n_layers)
    }


NEURONS = {0: (1, 5, 17), 1: (0, 2, 40, 63)}


def _weight_edited(loaded, neurons: dict, means: dict | None):
    """A copy of the model with the neurons deleted from the output projection, their mean
    contribution (if any) moved into its bias."""
    model = copy.deepcopy(loaded.model)
    for layer, ids in neurons.items():
        index = torch.tensor(ids)
        mu = None if means is None else means[("mlp", layer)][index].float()  # (k,)
        with torch.no_grad():
            if loaded.family == "gpt2":
                c_proj = model.transformer.h[layer].mlp.c_proj  # Conv1D: y = x @ W + b
                if mu is not None:
                    c_proj.bias += mu @ c_proj.weight[index]  # (d,)
                c_proj.weight[index] = 0.0  # rows of W (in = 4d, out = d)
            else:
                out_proj = model.backbone.layers[layer].mixer.out_proj  # y = x @ W.T (+ b)
                if mu is not None:
                    shift = out_proj.weight[:, index] @ mu  # (d,)
                    if out_proj.bias is None:
                        out_proj.bias = nn.Parameter(torch.zeros(out_proj.out_features))
                    out_proj.bias += shift
                out_proj.weight[:, index] = 0.0  # columns of W (out = d, in = d_inner)
    return model


@pytest.mark.parametrize("method", ["zero", "mean"])
def test_ablation_equals_weight_edit(random_model, method):
    """Zero: the neurons' rows of c_proj (GPT-2) / columns of out_proj (Mamba) zeroed; mean:
    the same plus μ·w_out in the bias. Same logits to float tolerance."""
    means = _means(random_model) if method == "mean" else None
    engine = AblationEngine(random_model, method=method, means=means)
    windows = _windows()
    condition = Condition("planted", "mlp", NEURONS)
    logits = engine.forward(windows, [condition])[0]  # (n, T, V)
    edited = _weight_edited(random_model, NEURONS, means)
    with torch.no_grad():
        expected = edited(input_ids=windows, use_cache=False).logits
        clean = random_model.model(input_ids=windows, use_cache=False).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert (logits - clean).abs().max() > 1e-3  # the ablation did something


def test_perplexity_is_exp_of_hf_labels_loss(random_model):
    windows = _windows(n=5, length=12)
    engine = AblationEngine(random_model)
    (result,) = condition_perplexities(engine, windows, [baseline_condition()])
    with torch.no_grad():
        loss = random_model.model(input_ids=windows, labels=windows, use_cache=False).loss
    assert result.n_targets == 5 * 11
    assert result.ppl == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_perplexity_forwards_keep_the_logits_within_their_budget(random_model, monkeypatch):
    """With room for the logits of 3 windows, the conditions run 3 rows per forward and
    give the perplexities of one forward of all rows."""
    import neuronspec.interventions.ablation as ablation_module

    windows = _windows(n=7, length=12)
    conditions = [baseline_condition(), Condition("a", "mlp", {0: (1, 5), 1: (2,)})]
    engine = AblationEngine(random_model)
    whole = condition_perplexities(engine, windows, conditions)
    monkeypatch.setattr(ablation_module, "LOGITS_BYTES", 3 * 12 * VOCAB * 4)
    assert engine.rows_for(12) == 3
    rows = []
    real_forward = engine.forward
    monkeypatch.setattr(
        engine, "forward", lambda w, c, **k: rows.append(len(w) * len(c)) or real_forward(w, c, **k)
    )
    bounded = condition_perplexities(engine, windows, conditions)
    assert max(rows) <= 3
    for a, b in zip(whole, bounded, strict=True):
        assert a.window_nll == pytest.approx(b.window_nll, rel=1e-6)


def test_conditions_that_ablate_the_same_neurons_are_measured_once(random_model, monkeypatch):
    windows = _windows(n=4, length=12)
    a = Condition("a", "mlp", {0: (1, 5)})
    conditions = [baseline_condition(), a, Condition("b", "mlp", {0: (5, 1)}),
                  Condition("clean", "mlp", {}), Condition("c", "mlp", {1: (2,)})]  # fmt: skip
    engine = AblationEngine(random_model)
    alone = condition_perplexities(engine, windows, [baseline_condition(), a, conditions[-1]])
    seen = []
    real_forward = engine.forward
    monkeypatch.setattr(
        engine,
        "forward",
        lambda w, c, **k: seen.extend(x.name for x in c) or real_forward(w, c, **k),
    )
    result = condition_perplexities(engine, windows, conditions)
    assert sorted(set(seen)) == ["a", "baseline", "c"]
    assert [r.window_nll for r in result] == [alone[i].window_nll for i in (0, 1, 1, 0, 2)]


def test_next_token_nll_by_hand():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = math.log(3.0)  # p(2) = 3/6 at position 0
    windows = torch.tensor([[1, 2, 0]])  # targets: 2 (p = 1/2), then 0 (p = 1/4)
    assert float(next_token_nll(logits, windows)[0]) == pytest.approx(math.log(2) + math.log(4))


def test_next_token_nll_equals_float64_log_softmaxes_on_a_gpt2_sized_vocabulary():
    """The float32 logsumexp form within 1e-6 nats per target of float64 log-softmaxes
    (measured: 1.7e-7), over 50,257 logits of scale 3 and 30 (one peaked position);
    float16 logits widen."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 2, 16, 50257, generator=generator) * 3  # (C, n, T, V)
    logits[0, 0, 5] *= 10
    windows = torch.randint(0, 50257, (2, 16), generator=generator)
    log_probs = torch.log_softmax(logits[..., :-1, :].double(), dim=-1)
    targets = windows[:, 1:].expand(4, 2, 15)
    expected = -log_probs.gather(-1, targets[..., None]).squeeze(-1).sum(-1)  # (C, n)
    torch.testing.assert_close(next_token_nll(logits, windows), expected, rtol=0, atol=15e-6)
    half = logits.half()
    wide = next_token_nll(half.float(), windows)
    assert torch.equal(next_token_nll(half, windows), wide)


@pytest.mark.parametrize("method", ["zero", "mean", "resample"])
def test_batched_conditions_equal_one_forward_each(random_model, method):
    means = _means(random_model)
    conditions = [
        baseline_condition(),
        Condition("a", "mlp", NEURONS),
        Condition("b", "mlp", {1: (3, 4, 5)}),
        Condition("pre", "mlp_pre", {0: (7,)}),
    ]
    means.update({("mlp_pre", 0): torch.full((random_model.adapter.width("mlp_pre"),), 0.5)})
    windows = _windows(n=7)
    batched = AblationEngine(random_model, method=method, means=means, max_rows=64)
    alone = AblationEngine(random_model, method=method, means=means, max_rows=7)
    together = condition_perplexities(batched, windows, conditions, seed=4)
    each = [condition_perplexities(alone, windows, [c], seed=4)[0] for c in conditions]
    for a, b in zip(together, each, strict=True):
        assert a.ppl == pytest.approx(b.ppl, rel=1e-6)
    assert len({round(p.ppl, 6) for p in together}) == len(conditions)  # all differ


def test_groups_do_not_leak_into_each_other(random_model):
    """Rows of the baseline group are bit-identical to an unablated forward."""
    windows = _windows(n=3)
    engine = AblationEngine(random_model, method="zero")
    logits = engine.forward(windows, [Condition("a", "mlp", NEURONS), baseline_condition()])
    with torch.no_grad():
        clean = random_model.model(input_ids=windows, use_cache=False).logits
    assert torch.equal(logits[1], clean)
    assert not torch.equal(logits[0], clean)


def test_resample_takes_donor_values_at_same_position(random_model):
    """Resample: the ablated neurons hold the clean values of the donor window, position by
    position; the other neurons keep their own."""
    windows = _windows(n=4)
    engine = AblationEngine(random_model, method="resample")
    condition = Condition("r", "mlp", {1: (2, 9)})
    donor_of = derangement(4, seed=0)
    donors = engine.clean_sites(windows[donor_of], [("mlp", 1)])
    clean = engine.clean_sites(windows, [("mlp", 1)])[("mlp", 1)]
    seen = {}
    engine.forward(
        windows,
        [condition],
        donors=donors,
        read=[("mlp", 1)],
        on_read=lambda site, layer, value: seen.setdefault(layer, value.clone()),
    )
    patched = seen[1]  # (n, T, W)
    torch.testing.assert_close(patched[..., [2, 9]], clean[donor_of][..., [2, 9]], rtol=0, atol=0)
    others = [n for n in range(patched.shape[-1]) if n not in (2, 9)]
    torch.testing.assert_close(patched[..., others], clean[..., others], rtol=0, atol=0)


def test_derangement_has_no_fixed_point_and_is_seeded():
    for seed in range(20):
        perm = derangement(5, seed)
        assert sorted(perm.tolist()) == list(range(5))
        assert all(int(perm[i]) != i for i in range(5))
    assert torch.equal(derangement(9, 1), derangement(9, 1))
    with pytest.raises(AblationError):
        derangement(1, 0)


def test_random_condition_keeps_counts_and_exclusions():
    like = Condition("x", "mlp", {0: (1, 2, 3), 2: (4,)})
    drawn = random_condition(like, 10, seed=0, exclude={0: range(5)})
    assert drawn.counts == like.counts
    assert all(n >= 5 for n in drawn.neurons[0])
    assert random_condition(like, 10, seed=0) == random_condition(like, 10, seed=0)
    assert random_condition(like, 10, seed=0) != random_condition(like, 10, seed=1)


def test_clear_errors(random_model):
    engine = AblationEngine(random_model, method="mean", means={})
    with pytest.raises(AblationError, match="needs its per-neuron means"):
        engine.check([Condition("a", "mlp", {0: (1,)})])
    with pytest.raises(AblationError, match="must lie in"):
        AblationEngine(random_model).check([Condition("a", "mlp", {0: (10_000,)})])
    with pytest.raises(AblationError, match="unknown ablation method"):
        AblationEngine(random_model, method="scramble")


def _dt_patchable(adapter) -> bool:
    try:
        with adapter.patch("dt", 0, lambda value: value):
            return True
    except NeuronSpecError:
        return False


def test_dt_site_batched_equals_one_forward_each():
    """The engine on Mamba's Δ site (delta-sensitive channels): runs once the site adapter
    can patch ``dt``; until then the adapter refuses with a clear error."""
    loaded = wrap(make_mamba(), "random-mamba")
    if not _dt_patchable(loaded.adapter):
        with pytest.raises(NeuronSpecError, match="can be read but not patched"):
            AblationEngine(loaded).forward(_windows(n=2), [Condition("d", "dt", {0: (1,)})])
        pytest.skip("the dt site is not patchable in this adapter yet")
    width = loaded.adapter.width("dt")
    means = {("dt", layer): torch.full((width,), 0.1) for layer in range(2)}
    conditions = [baseline_condition(), Condition("d", "dt", {0: (1, 4), 1: (7,)})]
    windows = _windows(n=4)
    for method in ("zero", "mean", "resample"):
        batched = AblationEngine(loaded, method=method, means=means, max_rows=64)
        alone = AblationEngine(loaded, method=method, means=means, max_rows=4)
        together = condition_perplexities(batched, windows, conditions, seed=2)
        each = [condition_perplexities(alone, windows, [c], seed=2)[0] for c in conditions]
        assert [p.ppl for p in together] == pytest.approx([p.ppl for p in each], rel=1e-6)
        assert together[0].ppl != together[1].ppl


@pytest.mark.parametrize("method", ["zero", "mean"])
def test_weight_edit_identity_on_the_fast_mamba_scan(method):
    """The embedded models run Mamba with neuronspec's fast scan: the identity holds there too."""
    from neuronspec.models.scan import is_fast_scan_enabled, use_fast_scan

    loaded = wrap(use_fast_scan(make_mamba()), "random-mamba-fast")
    means = _means(loaded) if method == "mean" else None
    windows = _windows()
    logits = AblationEngine(loaded, method=method, means=means).forward(
        windows, [Condition("planted", "mlp", NEURONS)]
    )[0]
    edited = _weight_edited(loaded, NEURONS, means)
    assert is_fast_scan_enabled(loaded.model) and is_fast_scan_enabled(edited)
    with torch.no_grad():
        expected = edited(input_ids=windows, use_cache=False).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
