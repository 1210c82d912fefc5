"""Snapshots and ``diff`` judge a value with a standard error against measured noise.

The rule (:mod:`neuronspec.snapshot`): ``x`` beside ``x_se`` is out of tolerance when it
moved more than ``k·sqrt(se_a² + se_b²)`` and more than the fixed tolerance, ``k`` the
Bonferroni-corrected normal quantile of the run's false-alarm rate. Checked here on exact
cases, then on the embedded models: two disjoint halves of the toy world (false alarms)
and a planted change of a layer's firing (detection).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from neuronspec.analyses.dead import dead_neurons_all_layers
from neuronspec.capture.config import StatsConfig
from neuronspec.capture.runner import collect_stats
from neuronspec.data.corpus import CorpusConfig
from neuronspec.data.windows import build_windows
from neuronspec.findings import to_plain
from neuronspec.models.registry import load_model
from neuronspec.report.diff import OUT, diff_results
from neuronspec.snapshot import FindingsSnapshotExtension, count_noise_judged, noise_k

K1 = noise_k(0.01, 1)  # one value in a run: 2.576


def _differences(received, stored, **kwargs):
    return list(FindingsSnapshotExtension().differences(received, stored, **kwargs))


def test_k_is_the_bonferroni_normal_quantile():
    assert K1 == pytest.approx(2.5758, abs=1e-4)
    assert noise_k(0.01, 10) == pytest.approx(3.2905, abs=1e-4)  # Φ⁻¹(1 − 0.0005)
    assert (
        count_noise_judged(
            {"a": 1.0, "a_se": 0.1, "b": [{"c": 2.0, "c_se": 0.1}], "d": 3.0},
            {"a": 1.0, "a_se": 0.1, "b": [{"c": 2.0, "c_se": 0.2}], "d": 3.0},
        )
        == 2
    )


@pytest.mark.parametrize(("moved_in_se", "flagged"), [(2.0, False), (2.5, False), (3.0, True)])
def test_a_value_with_an_se_is_judged_in_standard_errors(moved_in_se, flagged):
    se = 0.01
    spread = math.hypot(se, se)
    stored = {"x": 0.5, "x_se": se}
    received = {"x": 0.5 + moved_in_se * spread, "x_se": se}
    found = _differences(received, stored)
    assert bool(found) == flagged
    if flagged:
        assert "3.0 SE of the difference, > k = 2.58" in found[0].note


def test_the_fixed_tolerance_stays_the_floor_and_an_se_is_not_compared():
    # SE 0: the fixed tolerance judges (an identical rerun, or a degenerate bootstrap)
    assert _differences({"x": 0.5 + 1e-7, "x_se": 0.0}, {"x": 0.5, "x_se": 0.0}) == []
    assert _differences({"x": 0.6, "x_se": 0.0}, {"x": 0.5, "x_se": 0.0})
    # the SE itself moves freely; a value without an SE keeps the fixed tolerance
    assert _differences({"x": 0.5, "x_se": 0.3}, {"x": 0.5, "x_se": 0.01}) == []
    assert _differences({"y": 0.5 + 1e-3, "z_se": 1.0}, {"y": 0.5, "z_se": 1.0})


def test_more_snapshots_in_the_run_widen_k(monkeypatch):
    stored = {"x": 0.5, "x_se": 0.01}
    received = {"x": 0.5 + 3.0 * math.hypot(0.01, 0.01), "x_se": 0.01}
    assert _differences(received, stored)  # 3.0 SE > 2.58
    monkeypatch.setattr(FindingsSnapshotExtension, "snapshots_in_run", 30)
    assert _differences(received, stored) == []  # k = Φ⁻¹(1 − 0.01/60) = 3.59


def test_a_rewrite_keeps_a_value_and_its_se_that_are_within_noise():
    extension = FindingsSnapshotExtension()
    stored = {"x": 0.5, "x_se": 0.01, "y": 1.0, "y_se": 0.01}
    received = {"x": 0.51, "x_se": 0.012, "y": 1.2, "y_se": 0.011}
    kept = extension._keep_close(received, stored)
    assert kept == {"x": 0.5, "x_se": 0.01, "y": 1.2, "y_se": 0.011}


def _results(findings_by_model: dict) -> dict:
    return {
        "models": {
            model: {"analyses": {"dead": {str(f["layer"]): f for f in findings}}}
            for model, findings in findings_by_model.items()
        }
    }


def _dead(loaded, windows, bos_id):
    stats = collect_stats(loaded, windows, bos_id=bos_id, config=StatsConfig(unigrams=False))
    return [to_plain(finding.to_json()) for finding in dead_neurons_all_layers(stats)]


@pytest.fixture(scope="module")
def halves():
    """Dead findings of both embedded models on two disjoint halves of 2 × 1,600 toy-world
    windows (204,800 tokens each)."""
    out = {}
    for model_id in ("tiny-gpt2", "tiny-mamba"):
        loaded = load_model(model_id)
        corpus = build_windows(loaded.tokenizer, CorpusConfig(max_tokens=2 * 1600 * 64))
        first, second = corpus.analysis[:1600], corpus.analysis[1600:3200]
        out[model_id] = (loaded, corpus, _dead(loaded, first, corpus.bos_id))
        out[model_id] += (_dead(loaded, second, corpus.bos_id),)
    return out


def test_disjoint_halves_raise_no_false_alarm_where_the_fixed_tolerance_does(halves):
    """The two halves sample the same model and corpus: under the noise rule (alpha 0.01
    per diff) no value is out of tolerance; the fixed tolerance flags every firing rate."""
    old = _results({m: h[2] for m, h in halves.items()})
    new = _results({m: h[3] for m, h in halves.items()})
    noise = diff_results(old, new)
    judged = [c for f in noise.findings for c in f.changes if c.se_change is not None]
    flagged = [c for c in judged if not c.within_tolerance]
    fixed = [
        c
        for f in noise.findings
        for c in f.changes
        if c.se_change is not None and abs(c.new - c.old) > max(1e-4 * abs(c.old), 1e-6)
    ]
    summary = {
        "noise_judged": noise.n_noise_judged,
        "k": round(noise.k, 3),
        "flagged_by_noise_rule": len(flagged),
        "flagged_by_fixed_tolerance": len(fixed),
        "largest_se_change": max(c.se_change for c in judged),
    }
    print(json.dumps(summary))
    assert noise.n_noise_judged == 2 * 4 * 3  # 2 models × 4 layers × 3 fractions
    assert len(flagged) <= 0.05 * noise.n_noise_judged
    assert len(fixed) > len(flagged)


def test_a_planted_change_of_firing_is_flagged_and_fails_the_snapshot(halves):
    """Raise layer 1's gate bias of tiny-gpt2 so its mean firing frequency moves by a few
    standard errors: ``diff`` flags it, and the snapshot comparison fails naming it."""
    loaded, corpus, before, _ = halves["tiny-gpt2"]
    windows = corpus.analysis[:1600]
    layer = 1
    fc = loaded.model.transformer.h[layer].mlp.c_fc
    se = before[layer]["mean_alive_frequency_se"]
    original = fc.bias.detach().clone()
    try:
        with torch.no_grad():
            fc.bias += 0.015  # moves the mean alive frequency by about 5 SE (0.002: 0.68 SE)
        after = _dead(loaded, windows, corpus.bos_id)
    finally:
        with torch.no_grad():
            fc.bias.copy_(original)
    moved = abs(after[layer]["mean_alive_frequency"] - before[layer]["mean_alive_frequency"])
    in_se = moved / math.hypot(se, after[layer]["mean_alive_frequency_se"])
    print(json.dumps({"planted_change_in_se": in_se}))
    assert 3 < in_se < 20, in_se  # a change of a few SE, not of the whole layer
    result = diff_results(_results({"tiny-gpt2": before}), _results({"tiny-gpt2": after}))
    out = [f for f in result.findings if f.status == OUT]
    assert [f.layer for f in out] == [str(layer)]
    assert any(c.path == "mean_alive_frequency" and not c.within_tolerance for c in out[0].changes)
    differences = _differences(after[layer], before[layer])
    assert [d.path for d in differences] == ["mean_alive_frequency"]
