"""The ablation study and pruning on random tiny models: controls, planted effects, priority."""

from __future__ import annotations

import math
import statistics
from types import SimpleNamespace

import pytest
import torch
from builders import VOCAB

from neuronspec.analyses.ablation import (
    ablation_study,
    intervention_size,
    pruning_plan,
    pruning_study,
    standard_conditions,
)
from neuronspec.capture.runner import collect_stats
from neuronspec.errors import NeuronSpecError
from neuronspec.interventions.ablation import (
    AblationEngine,
    AblationError,
    Condition,
    baseline_condition,
    corpus_means,
    random_condition,
)
from neuronspec.interventions.perplexity import condition_perplexities


def _windows(n: int, length: int = 16, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, length), generator=generator)


def _sampled(loaded, n: int, length: int, seed: int = 0) -> torch.Tensor:
    """``(n, length)`` windows sampled from the model (temperature 1)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, 1), generator=generator)
    with torch.no_grad():
        for _ in range(length - 1):
            logits = loaded.model(input_ids=ids, use_cache=False).logits[:, -1]  # (n, V)
            probs = torch.softmax(logits.double(), dim=-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return ids


@pytest.fixture
def stats(random_model):
    return collect_stats(random_model, _windows(12, seed=7), bos_id=None, batch_size=6)


def _findings(dead: dict, positional: dict, n_layers: int = 2):
    """Stand-ins for the dead and positional findings: only the fields the study reads."""
    layers = range(n_layers)
    return (
        [SimpleNamespace(layer=i, dead_neurons=tuple(dead.get(i, ()))) for i in layers],
        [SimpleNamespace(layer=i, positional_neurons=list(positional.get(i, ()))) for i in layers],
    )


def test_corpus_means_equal_mean_of_captured_activations(random_model, stats):
    windows = _windows(12, seed=7)
    captured = random_model.adapter.capture(windows, [("mlp", 1)])[("mlp", 1)]  # (n, T, W)
    expected = captured.double().mean((0, 1))
    torch.testing.assert_close(corpus_means(stats)[("mlp", 1)], expected, rtol=1e-5, atol=1e-6)
    if "dt" in random_model.adapter.sites:  # Mamba: the Δ channels' means, from the pass too
        delta = random_model.adapter.capture(windows, [("dt", 1)])[("dt", 1)]
        torch.testing.assert_close(
            corpus_means(stats)[("dt", 1)], delta.double().mean((0, 1)), rtol=1e-5, atol=1e-6
        )
    manual = (captured.double() ** 2).mean((0, 1)) - expected**2
    torch.testing.assert_close(intervention_size(stats, 1, "mean"), manual, rtol=1e-4, atol=1e-6)


def test_standard_conditions_and_union():
    dead, positional = _findings({0: (1, 2)}, {0: (2, 3), 1: (5,)})
    sensitive = Condition("delta_sensitive", "dt", {1: (4,)})
    names = [c.name for c in standard_conditions(dead, positional, sensitive=sensitive)]
    assert names == ["dead", "positional", "delta_sensitive", "dead+positional"]
    union = standard_conditions(dead, positional)[-1]
    assert union.neurons == {0: (1, 2, 3), 1: (5,)}


def test_study_reports_controls_that_a_separate_run_reproduces(random_model, stats):
    windows = _windows(6, seed=3)
    condition = Condition("x", "mlp", {0: (1, 2, 3), 1: (4, 5)})
    empty = Condition("none", "mlp", {})
    means = corpus_means(stats)
    study = ablation_study(
        random_model, windows, [condition, empty], means=means, n_windows=6, n_seeds=5
    )
    engine = AblationEngine(random_model, method="mean", means=means)
    width = random_model.adapter.width("mlp")
    base, alone, *controls = condition_perplexities(
        engine,
        windows,
        [
            baseline_condition(),
            condition,
            *(random_condition(condition, width, s) for s in range(5)),
        ],
    )
    found = study.condition("x")
    assert study.baseline_ppl == pytest.approx(base.ppl, rel=1e-9)
    assert found.ppl == pytest.approx(alone.ppl, rel=1e-9)
    assert found.change == pytest.approx(alone.ppl / base.ppl - 1, rel=1e-9)
    assert found.control.ppl == pytest.approx([c.ppl for c in controls], rel=1e-9)
    assert found.control.ppl_std == pytest.approx(statistics.stdev(c.ppl for c in controls))
    changes = [c.ppl / base.ppl - 1 for c in controls]
    assert found.control.changes == pytest.approx(changes, rel=1e-9)
    assert found.p_value == (1 + sum(c >= found.change for c in changes)) / 6
    log_ratios = [math.log(c.ppl / base.ppl) for c in controls]
    difference = math.log(alone.ppl / base.ppl) - statistics.fmean(log_ratios)
    assert found.nll_difference == pytest.approx(difference, rel=1e-9)
    assert found.change in found.interval(0.95) and found.log_ratio_se > 0
    with pytest.raises(NeuronSpecError, match="needs at least 99 random-control seeds"):
        found.exceeds(alpha=0.01)
    none = study.condition("none")
    assert none.n_neurons == 0 and none.control is None and none.change == 0.0


def test_planted_important_neurons_exceed_control_and_silenced_ones_do_not(random_model):
    """On text sampled from the model itself (so any change of the model raises the expected
    NLL by KL(p ‖ q) ≥ 0), neurons whose output weights are scaled up 30x raise PPL more than
    random ones (the final norm is scaled up so that the random model's predictions are
    peaked, not near uniform); neurons whose output weights are zero change nothing when zero-ablated."""
    model = random_model.model
    loud, silent = (3, 7, 11), (20, 21)
    with torch.no_grad():
        final_norm = (
            model.transformer.ln_f if random_model.family == "gpt2" else model.backbone.norm_f
        )
        final_norm.weight *= 50.0  # peaked next-token distributions: PPL depends on the model
        for layer in range(2):
            if random_model.family == "gpt2":
                weight = model.transformer.h[layer].mlp.c_proj.weight  # (4d, d)
                weight[list(loud)] *= 30.0
                weight[list(silent)] = 0.0
            else:
                weight = model.backbone.layers[layer].mixer.out_proj.weight  # (d, d_inner)
                weight[:, list(loud)] *= 30.0
                weight[:, list(silent)] = 0.0
    conditions = [
        Condition("loud", "mlp", {0: loud, 1: loud}),
        Condition("silent", "mlp", {0: silent, 1: silent}),
    ]
    windows = _sampled(random_model, n=16, length=16)
    study = ablation_study(
        random_model, windows, conditions, method="zero", n_windows=16, n_seeds=20
    )
    loud, silent = study.condition("loud"), study.condition("silent")
    assert loud.p_value == 1 / 21 and loud.exceeds(alpha=0.05)
    assert loud.difference_interval(0.95).low > 0
    assert silent.change == 0.0 and silent.log_ratio_se == 0.0
    assert not silent.exceeds(alpha=0.05)
    # sequential draws: "silent" stopped at its 10th exceedance, "loud" took all 20 seeds
    assert len(loud.control.seeds) == 20
    assert len(silent.control.seeds) < 20 and silent.p_value == 10 / len(silent.control.seeds)


def test_pruning_plan_priority_and_protection(stats):
    dead, positional = _findings({0: (4, 9)}, {0: (9, 13, 30), 1: (2,)})
    width = stats.layer(0).width
    budget = round(0.15 * width)
    plan, by_class = pruning_plan(stats, dead, positional, ratio=0.15, protected={0: (13,)})
    assert plan.counts == {0: budget, 1: budget}
    first = plan.neurons[0]
    assert {4, 9, 30} <= set(first) and 13 not in first
    # 9 is dead and positional (counted dead), 13 is protected: positional 30 and 2
    assert by_class == {"dead": 2, "positional": 2, "other": 2 * budget - 4}
    size = intervention_size(stats, 1, "mean")
    others = [n for n in range(width) if n != 2]
    smallest = sorted(others, key=lambda n: (float(size[n]), n))[: budget - 1]
    assert set(plan.neurons[1]) == {2, *smallest}
    with pytest.raises(AblationError, match="ratio"):
        pruning_plan(stats, dead, positional, ratio=1.5)


def test_pruning_study_control_avoids_protected(random_model, stats):
    dead, positional = _findings({}, {})
    protected = {0: tuple(range(0, 40)), 1: tuple(range(10))}
    finding = pruning_study(
        random_model,
        _windows(4, seed=2),
        stats,
        dead,
        positional,
        protected=protected,
        n_windows=4,
        n_seeds=5,
    )
    assert finding.n_protected == 50
    assert all(n >= 40 for n in finding.pruned_neurons[0])
    assert len(finding.control.ppl) == 5
    assert finding.p_value == (1 + sum(c <= finding.change for c in finding.control.changes)) / 6
    assert finding.change == pytest.approx(finding.ppl / finding.baseline_ppl - 1)
