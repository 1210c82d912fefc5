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
    α = 0.01 (window-group bootstrap). Measured on the toy world: at most 1.6% (tiny-gpt2 layer
    1: 8 of 512), tiny-mamba none."""
    finding = dead[layer]
    record_property("dead_fraction", finding.dead_fraction)  # shown in the report
    assert finding.estimate("dead_fraction").below(0.05, alpha=0.01), finding


def test_alive_neurons_fire_less_in_the_last_layer_than_in_the_first(model_id, dead):
    """Hypothesis (Voita et al. Fig. 1b: firing frequency falls with depth in their OPT
    models): the alive neurons' mean firing frequency of the last layer is below the first
    layer's, the difference's one-sided 99% bound below 0 (window-group bootstrap SEs, combined
    as independent: conservative). Measured: tiny-gpt2 0.2545 → 0.1320 (SE 1.3e-4 and
    3.9e-5), tiny-mamba 0.4321 → 0.4256 (SE 3.3e-5 and 9.5e-5, 64 SE apart)."""
    first, last = dead[0], dead[len(dead) - 1]
    difference = last.estimate("mean_alive_frequency").minus(first.estimate("mean_alive_frequency"))
    assert difference.below(0.0, alpha=0.01), (difference, difference.interval(0.99))
