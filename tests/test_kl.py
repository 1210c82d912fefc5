"""KL from float32 logits (neuronspec/interventions/kl.py) against float64 log-softmaxes."""

from __future__ import annotations

import pytest
import torch

from neuronspec.interventions.kl import kl_divergence


def _reference(base, modified):
    log_p = torch.log_softmax(base.double(), -1)
    log_q = torch.log_softmax(modified.double(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@pytest.mark.parametrize("scale", [1e-5, 1e-3, 0.05, 0.5, 3.0, 30.0])
def test_kl_matches_float64_log_softmaxes_across_effect_sizes(scale):
    """Logits differing by ``scale`` (KL from ~1e-11 to ~10 nats): equal to the float64 form
    to 1e-5 of the KL itself, the same float32 logits fed to both."""
    generator = torch.Generator().manual_seed(0)
    base = 4 * torch.randn(3, 5, 1000, generator=generator)  # (P, T, V)
    modified = base + scale * torch.randn(2, 3, 5, 1000, generator=generator)  # (G, P, T, V)
    kl = kl_divergence(base, modified)
    assert kl.shape == (2, 3, 5) and kl.dtype == torch.float64
    expected = torch.stack([_reference(base, m) for m in modified])
    torch.testing.assert_close(kl, expected, rtol=1e-5, atol=1e-13)


def test_kl_of_equal_logits_is_zero_and_a_shift_changes_nothing():
    base = torch.randn(4, 50)
    assert torch.equal(kl_divergence(base, base[None]), torch.zeros(1, 4, dtype=torch.float64))
    shifted = kl_divergence(base, (base + 7.0)[None])  # softmax is shift-invariant
    assert float(shifted.abs().max()) < 1e-12


def test_a_large_logit_jump_takes_the_float64_path():
    """A token whose logit rises by 100 (e^r past float32) is computed in float64."""
    base = torch.zeros(2, 20)
    modified = base.clone()[None]
    modified[0, 1, 3] = 100.0
    kl = kl_divergence(base, modified)
    assert torch.isfinite(kl).all()
    torch.testing.assert_close(kl[0], _reference(base, modified[0]), rtol=1e-9, atol=1e-12)
