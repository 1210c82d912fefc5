"""The second-order KL screen of every neuron (neuronspec/interventions/kl_screen.py):
an exact identity against finite differences, its expectation against the Fisher quadratic
form computed from the full softmax, and on the embedded models the recovery of the exact
top-10 found by sweeping all neurons of a layer."""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch
from builders import VOCAB, make_gpt2, make_mamba, wrap

from neuronspec.analyses.causal import _screened_candidates, single_neuron_sweep
from neuronspec.data.corpus import CorpusConfig
from neuronspec.data.windows import build_windows
from neuronspec.interventions.ablation import AblationEngine
from neuronspec.interventions.kl_screen import draw_targets, kl_screen
from neuronspec.models.registry import load_model


def _model(family: str):
    if family == "gpt2":
        return wrap(make_gpt2(n_layer=2, dtype=torch.float64), "random-gpt2-2")
    # transformers' own float64 scan: the fast scan computes in float32, too coarse for
    # the finite differences
    return wrap(make_mamba(n_layer=2, dtype=torch.float64), "random-mamba-2")


def _prompts(n: int = 2, length: int = 6, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, length), generator=generator)


def _logits_moved(loaded, prompts, layer, neuron, epsilon):
    """Logits ``(P, T, V)`` float64 with neuron ``(layer, neuron)``'s mlp activation a moved
    to a + ε·(0 − a) at every position."""

    def move(value: torch.Tensor) -> torch.Tensor:
        moved = value.clone()
        moved[..., neuron] = value[..., neuron] * (1.0 - epsilon)
        return moved

    kept = []  # the LM head's own float64 output: HF Mamba casts its logits to float32
    head = loaded.model.get_output_embeddings()
    with ExitStack() as stack, torch.no_grad():
        stack.enter_context(loaded.adapter.patch("mlp", layer, move))
        handle = head.register_forward_hook(lambda module, args, out: kept.append(out))
        try:
            loaded.model(input_ids=prompts, use_cache=False)
        finally:
            handle.remove()
    return kept[0].double()


@pytest.mark.parametrize(
    ("family", "epsilon", "tolerance"),
    # HF Mamba's RMSNorm computes in float32, so its step is larger and the match looser
    [("gpt2", 1e-4, 1e-7), ("mamba", 1e-2, 1e-3)],
)
def test_screen_equals_its_formula_by_finite_differences(family, epsilon, tolerance):
    """For given targets y, κ̂_n = Σ_s Σ_b (d/dε Σ_t ln p_ε(y_t))² / (2·P·T·S): the
    derivative along the intervention taken by five-point finite differences, one neuron
    at a time, with no gradient of the screen's own."""
    loaded, prompts = _model(family), _prompts()
    targets = draw_targets(loaded, prompts, samples=3, seed=5)  # (S, P, T)
    screen = kl_screen(loaded, prompts, [1], targets=targets, max_rows=4).kl[1]  # (W,)
    n_prompts, length = prompts.shape
    stencil = ((-2, 1 / 12), (-1, -8 / 12), (1, 8 / 12), (2, -1 / 12))
    for neuron in range(0, loaded.adapter.width("mlp"), 7):
        moved = [
            (w, torch.log_softmax(_logits_moved(loaded, prompts, 1, neuron, k * epsilon), -1))
            for k, w in stencil
        ]
        total = 0.0
        for s in range(targets.shape[0]):
            index = targets[s][..., None]  # (P, T, 1)
            slope = sum(w * lp.gather(-1, index).sum((1, 2)) for w, lp in moved) / epsilon
            total += float((slope**2).sum())  # Σ_b over the prompts
        expected = total / (2 * n_prompts * length * targets.shape[0])
        assert float(screen[neuron]) == pytest.approx(expected, rel=tolerance, abs=1e-14), neuron


def test_screen_converges_to_the_fisher_quadratic_form():
    """E_y κ̂ = ½·mean_p Δz_pᵀ (diag p − p pᵀ) Δz_p, Δz the logits' derivative along the
    intervention (full softmax, no sampling): over 2,000 target draws the screen is within
    8% of it for the neurons that carry most of the layer's total."""
    loaded, prompts = _model("gpt2"), _prompts()
    screen = kl_screen(loaded, prompts, [0], samples=2000, max_rows=1000).kl[0]
    epsilon = 1e-5
    exact = torch.zeros_like(screen)
    with torch.no_grad():
        base = torch.softmax(loaded.model(input_ids=prompts).logits.double(), -1)  # (P, T, V)
    for neuron in range(len(screen)):
        up = _logits_moved(loaded, prompts, 0, neuron, epsilon)
        down = _logits_moved(loaded, prompts, 0, neuron, -epsilon)
        dz = (up - down) / (2 * epsilon)  # (P, T, V)
        mean_dz = (base * dz).sum(-1, keepdim=True)
        exact[neuron] = 0.5 * (base * (dz - mean_dz) ** 2).sum(-1).mean()
    large = exact >= exact.quantile(0.5)
    assert large.sum() >= 8
    ratio = screen[large] / exact[large]
    assert float((ratio - 1).abs().max()) < 0.08, ratio
    assert float(screen.sum() / exact.sum()) == pytest.approx(1.0, rel=0.03)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "by_kl_alone"), [("tiny-gpt2", 8), ("tiny-mamba", 3)])
def test_screen_recovers_the_exact_top10_of_a_full_sweep(name, by_kl_alone):
    """Issue 32's acceptance: every mlp neuron of the last layer of an embedded model
    measured exactly (KL, 8 held-out windows). The causal sweep's candidates (κ̂'s top 10
    and ρ's top 10), ranked by their exact KL, hold at least 8 of the exact top 10. κ̂ alone
    holds at least ``by_kl_alone`` (measured: tiny-mamba's strongest neurons saturate the
    next norm, where the second order is blind)."""
    loaded = load_model(name)
    corpus = build_windows(loaded.tokenizer, CorpusConfig(max_tokens=40_000))
    prompts = corpus.heldout[:8]
    layer = loaded.adapter.n_layers - 1
    screened = kl_screen(loaded, prompts, [layer])
    width = loaded.adapter.width("mlp")
    engine = AblationEngine(loaded, method="zero")
    kls, _ = single_neuron_sweep(engine, prompts, [(layer, n) for n in range(width)])
    kls = torch.tensor(kls)
    exact_top = set(torch.argsort(-kls, stable=True)[:10].tolist())
    by_kl = set(torch.argsort(-screened.kl[layer], stable=True)[:10].tolist())
    assert len(exact_top & by_kl) >= by_kl_alone, (sorted(exact_top), sorted(by_kl))
    candidates = _screened_candidates(screened, layer, 10)
    assert len(candidates) <= 20
    found = sorted(candidates, key=lambda n: -float(kls[n]))[:10]  # ranked by exact KL
    assert len(exact_top & set(found)) >= 8, (sorted(exact_top), sorted(found))


@pytest.mark.parametrize("family", ["gpt2", "mamba"])
def test_a_session_screens_each_layer_once_and_as_alone(family, monkeypatch):
    """ScreenCache: a layer's κ̂ and ρ equal the screen of that layer alone; a second sweep
    at the same site (GPT-2's high-variance set) computes nothing again."""
    import neuronspec.interventions.kl_screen as module

    loaded, prompts = _model(family), _prompts()
    alone = {layer: kl_screen(loaded, prompts, [layer], seed=3) for layer in (0, 1)}
    calls = []
    real = module.kl_screen
    monkeypatch.setattr(module, "kl_screen", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    screens = module.ScreenCache(loaded, prompts, seed=3)
    both = screens.screen("mlp", [0, 1])
    again = screens.screen("mlp", [1])
    assert calls == [[0, 1]]
    for layer in (0, 1):
        torch.testing.assert_close(both.kl[layer], alone[layer].kl[layer], rtol=1e-12, atol=0)
        torch.testing.assert_close(
            both.residual_share[layer], alone[layer].residual_share[layer], rtol=1e-12, atol=0
        )
    assert again.kl[1] is both.kl[1]
