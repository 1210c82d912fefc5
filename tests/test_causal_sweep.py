"""Causal neurons: KL and inter-layer impact against a weight-edited peer, batching, and the
cross-layer matrix's causality (exactly zero upstream, with a planted leak caught)."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from builders import VOCAB, make_gpt2, make_mamba, wrap

from neuronspec.analyses.causal import causal_neurons, single_neuron_sweep, upstream_leaks
from neuronspec.analyses.delta_sensitive import NeuronSets
from neuronspec.capture.runner import collect_stats
from neuronspec.interventions.ablation import AblationEngine, AblationError, corpus_means
from neuronspec.interventions.kl_screen import kl_screen
from neuronspec.models.adapters import adapter_for
from neuronspec.models.scan import use_fast_scan
from neuronspec.report.diff import OUT, WITHIN, diff_results


def _windows(n: int, length: int = 16, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, length), generator=generator)


@pytest.fixture
def three_layers(family):
    model = make_gpt2(n_layer=3) if family == "gpt2" else make_mamba(n_layer=3)
    return wrap(model, f"random-{family}-3")


def _zero_out_weight(loaded, layer: int, neuron: int):
    model = copy.deepcopy(loaded.model)
    with torch.no_grad():
        if loaded.family == "gpt2":
            model.transformer.h[layer].mlp.c_proj.weight[neuron] = 0.0
        else:
            model.backbone.layers[layer].mixer.out_proj.weight[:, neuron] = 0.0
    return model


def test_kl_and_inter_layer_change_match_a_weight_edited_peer(three_layers):
    prompts = _windows(3)
    engine = AblationEngine(three_layers, method="zero", max_rows=64)
    plan = [(0, 5), (1, 17), (2, 3)]
    kls, changes = single_neuron_sweep(engine, prompts, plan)
    targets = [("mlp", t) for t in range(3)]
    clean = three_layers.adapter.capture(prompts, targets)
    with torch.no_grad():
        base_logp = torch.log_softmax(three_layers.model(input_ids=prompts).logits.double(), -1)
    for (layer, neuron), kl, change in zip(plan, kls, changes, strict=True):
        edited = _zero_out_weight(three_layers, layer, neuron)
        with torch.no_grad():
            logp = torch.log_softmax(edited(input_ids=prompts).logits.double(), -1)
        expected_kl = F.kl_div(logp, base_logp, log_target=True, reduction="none").sum(-1).mean()
        assert kl == pytest.approx(float(expected_kl), rel=1e-4, abs=1e-9)
        after = adapter_for(edited).capture(prompts, targets)
        for t in range(layer + 1, 3):  # downstream: the edit and the patch agree
            a, b = clean[("mlp", t)].double(), after[("mlp", t)].double()
            assert change[t] == pytest.approx(float((b - a).norm() / a.norm()), rel=1e-4)
        a = clean[("mlp", layer)].double()  # the source layer: the intervention itself
        assert change[layer] == pytest.approx(float(a[..., neuron].norm() / a.norm()), rel=1e-6)
        assert all(change[t] == 0.0 for t in range(layer))


def test_sweep_batched_equals_one_intervention_per_forward(three_layers):
    prompts = _windows(2)
    plan = [(0, 1), (0, 2), (1, 3), (2, 4), (2, 9)]
    batched = single_neuron_sweep(AblationEngine(three_layers, max_rows=64), prompts, plan)
    alone = single_neuron_sweep(AblationEngine(three_layers, max_rows=4), prompts, plan)
    assert batched[0] == pytest.approx(alone[0], rel=1e-5, abs=1e-10)
    for a, b in zip(batched[1], alone[1], strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-10)


@pytest.fixture
def finding(three_layers):
    stats = collect_stats(three_layers, _windows(8, seed=9), bos_id=None, batch_size=8)
    return causal_neurons(three_layers, _windows(3), stats, top_k=3, max_rows=32)


def test_cross_layer_matrix_is_exactly_zero_upstream(finding, three_layers):
    assert finding.source_layers == [0, 1, 2]
    assert upstream_leaks(finding) == []
    for source, row in zip(finding.source_layers, finding.cross_layer, strict=True):
        assert all(row[t] == 0.0 for t in range(source))
        assert all(row[t] > 0.0 for t in range(source, 3))  # the check is not vacuous
    layer0 = finding.layers[0]
    assert [c.kl for c in layer0.candidates] == sorted(
        (c.kl for c in layer0.candidates), reverse=True
    )
    assert set(layer0.control_neurons).isdisjoint(c.neuron for c in layer0.candidates)
    width = three_layers.adapter.width("mlp")
    screened = kl_screen(three_layers, _windows(3), [0, 1, 2])  # the same draws (seed 0)
    for layer in finding.layers:
        estimate = screened.kl[layer.layer]  # (W,)
        # the candidates are the top 3 by κ̂ and by residual share, each with its κ̂
        by_kl = torch.argsort(-estimate, stable=True)[:3].tolist()
        by_share = torch.argsort(-screened.residual_share[layer.layer], stable=True)[:3]
        assert {c.neuron for c in layer.candidates} == set(by_kl) | set(by_share.tolist())
        assert all(c.screen_kl == float(estimate[c.neuron]) for c in layer.candidates)
        n_candidates = len(layer.candidates)
        assert 3 <= n_candidates <= 6
        # every other neuron is a control (width < 99), measured exactly
        assert len(layer.control_neurons) == min(99, width - n_candidates)
        for candidate in layer.candidates:
            beaten = sum(kl >= candidate.kl for kl in layer.control_kl)
            assert candidate.p_value == (1 + beaten) / (1 + len(layer.control_kl))
        assert layer.causal_neurons == [c.neuron for c in layer.candidates if c.p_value <= 0.01]
        assert -1.0 <= layer.screen_rank_correlation <= 1.0
        n_measured = n_candidates + len(layer.control_neurons)
        assert layer.screen_rank_correlation_se == pytest.approx(
            (1 - layer.screen_rank_correlation**2) * (1.06 / (n_measured - 3)) ** 0.5, rel=1e-12
        )


def test_diff_judges_the_screen_rank_correlation_against_its_se(finding):
    """The results JSON carries ρ's SE, so ``diff`` judges a drift of ρ in SEs: a move of
    1e-3 (a float-rounding reordering of near-zero controls) is within tolerance, a move of
    many SEs is not."""
    old = {
        "config": {},
        "models": {"m": {"info": {}, "analyses": {"causal": {"all": finding.to_json()}}}},
    }
    new = copy.deepcopy(old)
    layer = new["models"]["m"]["analyses"]["causal"]["all"]["layers"][0]
    layer["screen_rank_correlation"] += 1e-3
    assert [f.status for f in diff_results(old, new).findings] == [WITHIN]
    layer["screen_rank_correlation"] -= 1e-3 + 20 * layer["screen_rank_correlation_se"]
    assert [f.status for f in diff_results(old, new).findings] == [OUT]


def test_a_leak_upstream_is_caught(three_layers, monkeypatch):
    """Plant a leak: the adapter patches one layer too early. Sweeping every layer in every
    group, the matrix has non-zero entries upstream of the source and upstream_leaks
    reports them; with the upstream layers shared (the sweep's default) the early patch
    meets the unrepeated rows and raises."""
    adapter = three_layers.adapter
    patch = adapter.patch

    @contextmanager
    def early(site, layer, fn):
        with patch(site, max(layer - 1, 0), fn):
            yield

    monkeypatch.setattr(adapter, "patch", early)
    engine = AblationEngine(three_layers, max_rows=32)
    plan = [(layer, n) for layer in (1, 2) for n in (3, 5)]
    _, changes = single_neuron_sweep(engine, _windows(3), plan, share_upstream=False)
    for (layer, _), change in zip(plan, changes, strict=True):
        assert change[layer - 1] > 0.0  # the layer before the source moved: a leak
    with pytest.raises(AblationError, match="upstream of the layers intervened on"):
        single_neuron_sweep(engine, _windows(3), plan)


@pytest.mark.parametrize("site", ["mlp", "resid"])
def test_shared_upstream_layers_change_nothing(three_layers, site):
    """The layers below a forward's lowest intervened layer run once: KL and every change
    equal the sweep that runs all layers in every group (the layers below read 0 either way)."""
    engine = AblationEngine(three_layers, max_rows=32)
    plan = [(1, 2), (1, 7), (2, 0), (2, 4), (2, 9)]
    shared = single_neuron_sweep(engine, _windows(3), plan, site=site)
    full = single_neuron_sweep(engine, _windows(3), plan, site=site, share_upstream=False)
    for a, b in zip(shared[0], full[0], strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-12)
    for a, b in zip(shared[1], full[1], strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-9)


def test_delta_channel_sets_match_a_weight_edited_peer():
    """Given delta-sensitive sets, the candidates are those Δ channels, zeroed at the ``dt``
    site (fast scan): their KL and inter-layer change equal a peer whose dt_proj row is 0 and
    bias −1e4 (softplus → Δ = 0), and the controls are other Δ channels of the same layer."""
    loaded = wrap(use_fast_scan(make_mamba(n_layer=3, dtype=torch.float64)), "random-mamba-3")
    prompts = _windows(3)
    stats = collect_stats(loaded, _windows(8, seed=9), bos_id=None, batch_size=8)
    sets = NeuronSets(kind="delta_sensitive", site="dt", by_layer={0: [4, 9], 2: [7]})
    finding = causal_neurons(loaded, prompts, stats, top_k=2, max_rows=32, neuron_sets=sets)
    assert (finding.site, finding.candidates_by, finding.source_layers) == (
        "dt",
        "delta_sensitive",
        [0, 2],
    )
    assert upstream_leaks(finding) == []
    targets = [("dt", t) for t in range(3)]
    clean = loaded.adapter.capture(prompts, targets)
    with torch.no_grad():
        # HF Mamba returns float32 logits: log-softmax in float64, as the sweep does
        base_logp = torch.log_softmax(loaded.model(input_ids=prompts).logits.double(), -1)
    for layer_finding in finding.layers:
        layer = layer_finding.layer
        assert sorted(c.neuron for c in layer_finding.candidates) == sorted(sets.by_layer[layer])
        assert not set(layer_finding.control_neurons) & set(sets.by_layer[layer])
        for candidate in layer_finding.candidates:
            assert candidate.intervention_size is None
            edited = copy.deepcopy(loaded.model)
            with torch.no_grad():
                dt_proj = edited.backbone.layers[layer].mixer.dt_proj
                dt_proj.weight[candidate.neuron] = 0.0
                dt_proj.bias[candidate.neuron] = -1e4
                logp = torch.log_softmax(edited(input_ids=prompts).logits.double(), -1)
            expected = F.kl_div(logp, base_logp, log_target=True, reduction="none").sum(-1).mean()
            assert candidate.kl == pytest.approx(float(expected), rel=1e-4, abs=1e-13)
            after = adapter_for(edited).capture(prompts, targets)
            for t in range(layer + 1, 3):
                a, b = clean[("dt", t)], after[("dt", t)]
                expected_change = float((b - a).norm() / a.norm())
                assert candidate.downstream[t] == pytest.approx(expected_change, rel=1e-8)
    with pytest.raises(AblationError, match="no neurons for layers"):
        causal_neurons(loaded, prompts, stats, layers=[1], neuron_sets=sets)


def test_two_sweeps_sharing_a_cache_measure_each_neuron_once(three_layers, monkeypatch):
    """The sweep of given sets at the ``mlp`` site after the screened sweep, sharing one
    CausalCache: it measures only the neurons the first did not (most of its controls come
    from the same permutation), and its finding equals the same sweep run alone."""
    import neuronspec.analyses.causal as causal

    stats = collect_stats(three_layers, _windows(8, seed=9), bos_id=None, batch_size=8)
    prompts = _windows(3)
    sets = NeuronSets(kind="high_variance", site="mlp", by_layer={0: [1, 2], 1: [3], 2: [4]})
    options = {"top_k": 2, "n_controls": 6, "max_rows": 32}
    alone = causal_neurons(three_layers, prompts, stats, neuron_sets=sets, **options)
    swept: list[list[tuple[int, int]]] = []
    real = causal.single_neuron_sweep
    monkeypatch.setattr(
        causal,
        "single_neuron_sweep",
        lambda e, p, plan, **k: swept.append(plan) or real(e, p, plan, **k),
    )
    cache = causal.CausalCache(three_layers, prompts, prompts)
    first = causal_neurons(three_layers, prompts, stats, cache=cache, **options)
    second = causal_neurons(three_layers, prompts, stats, neuron_sets=sets, cache=cache, **options)

    def plan(finding):
        return [
            (layer.layer, n)
            for layer in finding.layers
            for n in [c.neuron for c in layer.candidates] + layer.control_neurons
        ]

    assert sorted(swept[0]) == sorted(plan(first))
    assert sorted(swept[1]) == sorted(set(plan(second)) - set(plan(first)))
    assert len(swept[1]) < len(plan(second)) / 2  # the controls were shared
    for shared, own in zip(second.layers, alone.layers, strict=True):
        assert shared.control_neurons == own.control_neurons
        assert [c.neuron for c in shared.candidates] == [c.neuron for c in own.candidates]
        assert [c.kl for c in shared.candidates] == pytest.approx(
            [c.kl for c in own.candidates], rel=1e-5, abs=1e-10
        )
        assert shared.control_kl == pytest.approx(own.control_kl, rel=1e-5, abs=1e-10)
    with pytest.raises(AblationError, match="'zero' intervention"):
        means = corpus_means(stats)
        causal_neurons(
            three_layers, prompts, stats, method="mean", means=means, cache=cache, **options
        )
    mean_cache = causal.CausalCache(three_layers, prompts, prompts, method="mean", means=means)
    with pytest.raises(AblationError, match="other means"):
        causal_neurons(
            three_layers, prompts, stats, method="mean", means=dict(means), cache=mean_cache
        )
    with pytest.raises(AblationError, match="other prompts"):
        causal_neurons(three_layers, _windows(3, seed=5), stats, cache=cache, **options)


def test_controls_are_a_uniform_draw_of_the_other_neurons():
    """The first k of a permutation outside the excluded neurons: each other neuron is drawn
    with probability k / (width − excluded), the excluded never."""
    from neuronspec.analyses.causal import _control_neurons

    counts = torch.zeros(6)
    draws = 3000
    for seed in range(draws):
        drawn = _control_neurons(6, [0], 2, seed)
        assert len(set(drawn)) == 2 and 0 not in drawn
        counts[drawn] += 1
    frequency = counts[1:] / draws  # binomial SE sqrt(0.4 · 0.6 / 3000) ≈ 0.009
    assert torch.all((frequency - 0.4).abs() < 0.04), frequency
