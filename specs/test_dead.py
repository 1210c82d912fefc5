"""Dead neurons (Voita et al. 2023, §3; METHODS.md §2) on every model of the run."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.dead


def test_dead_neurons_per_layer_snapshot(model_id, dead, findings_snapshot):
    """The per-layer dead / rarely-firing fractions are a finding that must not drift."""
    assert dead.snapshot_view() == findings_snapshot


def test_few_neurons_are_dead(model_id, layer, dead, record_property):
    """Hypothesis: with SiLU/GELU gates (firing = gate pre-activation > 0), fewer than 5% of a
    layer's neurons are dead (the README's example spec), unlike the ReLU OPT models of Voita
    et al., where early layers lose most of theirs: the dead fraction is below 0.05 at
    α = 0.01 (window bootstrap). Measured on the toy world: at most 1.6% (tiny-gpt2 layer
    1: 8 of 512), tiny-mamba none."""
    finding = dead[layer]
    record_property("dead_fraction", finding.dead_fraction)  # shown in the report
    assert finding.estimate("dead_fraction").below(0.05, alpha=0.01), finding
