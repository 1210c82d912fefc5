"""Integrated gradients (METHODS.md §8): Captum as a peer, completeness, batching identities."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, MambaConfig, MambaForCausalLM

from neuronspec.interventions.integrated_gradients import (
    IntegratedGradientsError,
    gold_probability,
    integrated_gradients,
    integrated_gradients_per_layer,
)
from neuronspec.models.adapters import adapter_for
from neuronspec.models.scan import is_fast_scan_enabled, use_fast_scan

VOCAB = 64


def tiny_gpt2(seed: int = 0, init: float = 0.2) -> GPT2LMHeadModel:
    """3 layers, d 32, float64; a wide init so P moves visibly when a layer is scaled."""
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=3, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32,
        initializer_range=init, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config).double().eval()


def tiny_mamba(seed: int = 0) -> MambaForCausalLM:
    torch.manual_seed(seed)
    config = MambaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return use_fast_scan(MambaForCausalLM(config).double().eval())


PROMPT = torch.tensor([[3, 17, 42, 8, 25, 11]])
TARGET = 7


def captum_attributions(model, layer: int, steps: int) -> torch.Tensor:
    """Captum's IntegratedGradients with the layer's last-position vector as the input,
    baseline 0, the right Riemann rule: the peer of our batched implementation."""
    from captum.attr import IntegratedGradients

    adapter = adapter_for(model)
    clean = adapter.capture(PROMPT, [("mlp", layer)])[("mlp", layer)][0, -1]  # (W,)

    def forward(vectors: torch.Tensor) -> torch.Tensor:  # (n, W) -> (n,)
        def put(value):
            value = value.clone()
            value[:, -1, :] = vectors.to(value.dtype)
            return value

        with adapter.patch("mlp", layer, put):
            logits = model(input_ids=PROMPT.expand(len(vectors), -1), use_cache=False).logits
        return gold_probability(logits[:, -1, :], TARGET)

    ig = IntegratedGradients(forward)
    attr = ig.attribute(
        clean[None, :], baselines=torch.zeros_like(clean)[None, :], n_steps=steps,
        method="riemann_right",
    )  # fmt: skip
    return attr[0].double()


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_mamba], ids=["gpt2", "mamba"])
def test_attributions_equal_captum(make):
    pytest.importorskip("captum", reason="captum is the dev extra's peer for this test")
    model = make()
    ours = integrated_gradients(model, adapter_for(model), PROMPT, TARGET, steps=20)
    for j, layer in enumerate(ours.layers):
        peer = captum_attributions(model, layer, 20)
        scale = peer.abs().max()
        assert scale > 0
        assert (ours.attributions[j] - peer).abs().max() <= 1e-5 * scale, layer


def test_mamba_gradients_run_through_the_fast_scan_path():
    """Full-sequence rows: the gradient goes through the chunked torch scan; the HF
    reference scan gives the same attributions."""
    model = tiny_mamba()
    assert is_fast_scan_enabled(model)
    kwargs = dict(steps=4, share_prefix=False)
    result = integrated_gradients(model, adapter_for(model), PROMPT, TARGET, **kwargs)
    use_fast_scan(model, False)
    reference = integrated_gradients(model, adapter_for(model), PROMPT, TARGET, **kwargs)
    torch.testing.assert_close(result.attributions, reference.attributions, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("length", [1, 2, 6])
def test_shared_prefix_equals_full_sequence_rows(length):
    model = tiny_gpt2()
    adapter = adapter_for(model)
    prompt = PROMPT[:, :length]
    shared = integrated_gradients(model, adapter, prompt, TARGET, steps=5, with_zero=True)
    full = integrated_gradients(
        model, adapter, prompt, TARGET, steps=5, with_zero=True, share_prefix=False
    )
    torch.testing.assert_close(shared.attributions, full.attributions, rtol=1e-7, atol=1e-12)
    assert shared.prob_at_zero == pytest.approx(full.prob_at_zero, rel=1e-9)


def _completeness(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """|Σ Attr − (P(w̄) − P(0))| per layer and |P(w̄) − P(0)| per layer, tiny GPT-2."""
    model = tiny_gpt2()
    result = integrated_gradients(
        model, adapter_for(model), PROMPT, TARGET, steps=steps, with_zero=True
    )
    gap = (result.prob - torch.tensor(result.prob_at_zero, dtype=torch.float64)).abs()
    assert bool((gap > 0.01 * result.prob).all()), gap  # meaningful only when P moves
    return result.completeness_error(), gap


def test_completeness_error_shrinks_as_one_over_m():
    """The right Riemann rule is first order: the error at m = 200 is below the error at
    m = 20, by a factor of about 10 (measured 0.100, 0.101, 0.101 on the three layers)."""
    coarse, _ = _completeness(20)
    fine, _ = _completeness(200)
    assert bool((fine < coarse).all())
    ratio = fine / coarse
    assert bool(((ratio > 0.08) & (ratio < 0.12)).all()), ratio


@pytest.mark.xfail(
    strict=True,
    reason="measured: at m = 200 the completeness error is 0.65%, 1.25%, 0.65% of |P(w̄) − P(0)| "
    "on layers 0, 1, 2 (6.5%, 12.4%, 6.4% at m = 20; 0.07%, 0.13%, 0.06% at m = 2000): the "
    "right Riemann rule's first-order error, ≈ (g(1) − g(0)) / 2m, exceeds 1% on layer 1",
)
def test_completeness_error_below_one_percent_at_200_steps():
    fine, gap = _completeness(200)
    assert bool((fine < 0.01 * gap).all()), fine / gap


def test_batched_equals_per_layer_loop_and_row_bound_does_not_change_results():
    model = tiny_gpt2()
    adapter = adapter_for(model)
    batched = integrated_gradients(model, adapter, PROMPT, TARGET, steps=10)
    loop = integrated_gradients_per_layer(model, adapter, PROMPT, TARGET, steps=10)  # full rows
    bounded = integrated_gradients(model, adapter, PROMPT, TARGET, steps=10, max_rows=7)
    torch.testing.assert_close(batched.attributions, loop.attributions, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(batched.attributions, bounded.attributions, rtol=1e-9, atol=1e-14)


def test_one_step_is_gradient_times_activation():
    """m = 1: Attr = w̄ ⊙ ∂P/∂w (w̄), computed here by hand with a plain hook."""
    model = tiny_gpt2()
    adapter = adapter_for(model)
    layer = 1
    clean = adapter.capture(PROMPT, [("mlp", layer)])[("mlp", layer)][0, -1]
    leaf = clean.clone().requires_grad_(True)

    def put(value):
        return value.index_put((torch.tensor([0]), torch.tensor([value.shape[1] - 1])), leaf[None])

    with adapter.patch("mlp", layer, put):
        prob = gold_probability(model(input_ids=PROMPT).logits[:, -1, :], TARGET)[0]
    (grad,) = torch.autograd.grad(prob, leaf)
    ours = integrated_gradients(model, adapter, PROMPT, TARGET, steps=1, layers=[layer])
    torch.testing.assert_close(ours.attributions[0], (clean * grad).double())


def test_clear_errors():
    model = tiny_gpt2()
    adapter = adapter_for(model)
    with pytest.raises(IntegratedGradientsError, match="steps"):
        integrated_gradients(model, adapter, PROMPT, TARGET, steps=0)
    with pytest.raises(IntegratedGradientsError, match=r"\(1, T\)"):
        integrated_gradients(model, adapter, PROMPT.expand(2, -1), TARGET)
    with pytest.raises(IntegratedGradientsError, match="vocabulary"):
        integrated_gradients(model, adapter, PROMPT, VOCAB)
    with pytest.raises(IntegratedGradientsError, match="key/value cache"):
        mamba = tiny_mamba()
        integrated_gradients(mamba, adapter_for(mamba), PROMPT, TARGET, share_prefix=True)
    with pytest.raises(IntegratedGradientsError, match="with_zero"):
        integrated_gradients(model, adapter, PROMPT, TARGET, steps=2).completeness_error()
