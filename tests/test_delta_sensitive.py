"""Δ (site ``dt``) patching, the streamed window-mean moments, and planted delta-sensitive
channels (METHODS §5)."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch
from builders import VOCAB, make_gpt2, make_mamba, wrap

from neuronspec.analyses.delta_sensitive import (
    delta_sensitive_layer,
    delta_sensitive_sets,
    perturbation_scores,
    substitution_positions,
    top_channels,
    variance_scores,
)
from neuronspec.capture.runner import collect_stats
from neuronspec.errors import NeuronSpecError
from neuronspec.models.adapters import adapter_for
from neuronspec.models.delta import DT_SUM_READERS
from neuronspec.models.scan import use_fast_scan

pytestmark = pytest.mark.delta


def _ids(batch=2, length=12, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _fast_mamba(**kw):
    return use_fast_scan(make_mamba(**kw))


def test_identity_dt_patch_leaves_logits_unchanged():
    model = _fast_mamba()
    adapter = adapter_for(model)
    ids = _ids()
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with adapter.patch("dt", 1, lambda delta: delta):
            same = model(input_ids=ids).logits
        with adapter.patch_neurons("dt", 1, [2, 9], 0.0):
            changed = model(input_ids=ids).logits
    torch.testing.assert_close(same, base, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(changed, base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dt_zero_patch_equals_weight_edit(dtype):
    """Δ_c = 0 by patch equals dt_proj.weight[c] = 0, dt_proj.bias[c] = −1e4 (softplus → 0)."""
    model = _fast_mamba(dtype=dtype)
    edited = copy.deepcopy(model)
    channels = [0, 5, 33]
    layer = 0
    with torch.no_grad():
        dt_proj = edited.backbone.layers[layer].mixer.dt_proj
        dt_proj.weight[channels] = 0.0
        dt_proj.bias[channels] = -1e4
    ids = _ids()
    with torch.no_grad(), adapter_for(model).patch_neurons("dt", layer, channels, 0.0):
        patched = model(input_ids=ids).logits
    with torch.no_grad():
        reference = edited(input_ids=ids).logits
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(patched, reference, rtol=tol, atol=tol)


def test_dt_patch_is_read_back_and_differentiable():
    model = _fast_mamba()
    adapter = adapter_for(model)
    seen = {}
    with (
        adapter.patch_neurons("dt", 0, [4], 0.5),
        adapter.read([("dt", 0)], lambda s, layer, v: seen.update(v=v.detach().clone())),
    ):
        loss = model(input_ids=_ids()).logits.sum()
    assert torch.all(seen["v"][..., 4] == 0.5)
    loss.backward()  # through the chunked scan with the patched Δ
    assert model.backbone.layers[0].mixer.in_proj.weight.grad is not None


def test_dt_patch_on_reference_scan_is_a_clear_error():
    model = make_mamba()  # HF reference scan: Δ lives inside its loop
    adapter = adapter_for(model)
    with pytest.raises(NeuronSpecError, match="fast scan"):
        with adapter.patch("dt", 0, lambda v: v):
            pass
    fast = _fast_mamba()
    with pytest.raises(NeuronSpecError, match="fast scan"):
        with adapter_for(fast).patch("dt", 0, lambda v: v):
            use_fast_scan(fast, False)
            fast(input_ids=_ids())
    assert not any(
        getattr(block.mixer, "_neuronspec_dt_patches", []) for block in fast.backbone.layers
    )


@pytest.mark.parametrize("path", ["kernel", "chunked", "reference"])
def test_dt_window_sums_equal_the_sums_of_the_read_delta(path, monkeypatch):
    """The fast scan's Σ_t Δ_t (kernel or chunked torch scan), or the hook's sums on the
    reference scan, equal the sums of the Δ that ``read`` sees, also under a Δ patch."""
    import neuronspec.models.scan as scan

    if path == "chunked":
        monkeypatch.setattr(scan, "kernels_available", lambda: False)
    model = make_mamba() if path == "reference" else _fast_mamba()
    adapter = adapter_for(model)
    patches = [None] if path == "reference" else [None, lambda delta: delta * 2.0 + 0.25]
    sums, values = {}, {}
    for patch in patches:
        sums.clear()
        values.clear()
        with (
            torch.no_grad(),
            adapter.patch("dt", 1, patch) if patch else contextlib.nullcontext(),
            adapter.read([("dt", 0), ("dt", 1)], lambda s, layer, v: values.update({layer: v})),
            adapter.read_window_sums(
                [("dt", 0), ("dt", 1)], lambda s, layer, w, t: sums.update({layer: (w, t)})
            ),
        ):
            model(input_ids=_ids(batch=3, length=11), use_cache=False)
        assert sorted(sums) == [0, 1]
        for layer, (window_sums, positions) in sums.items():
            assert positions == 11 and window_sums.dtype == torch.float64
            expected = values[layer].double().sum(1)  # (B, d_inner)
            torch.testing.assert_close(window_sums, expected, rtol=1e-6, atol=1e-6)
    assert not any(getattr(b.mixer, DT_SUM_READERS, []) for b in model.backbone.layers)


def test_dt_window_sums_refuse_a_generation_step():
    model = _fast_mamba()
    with adapter_for(model).read_window_sums([("dt", 0)], lambda *a: None):
        with pytest.raises(NeuronSpecError, match="single-token"):
            model.generate(_ids(batch=1, length=4), max_new_tokens=2, do_sample=False)


def _windows(n=8, length=16, seed=2):
    return torch.randint(1, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["mamba", "mamba-reference-scan", "gpt2"])
def test_window_mean_moments_exact_and_mergeable(family):
    """Σ m_w and Σ m_w² equal a dense recomputation; two halves merged equal the whole."""
    builders = {"mamba": _fast_mamba, "mamba-reference-scan": make_mamba, "gpt2": make_gpt2}
    model = builders[family]()
    loaded = wrap(model, f"random-{family}")
    windows = _windows()
    stats = collect_stats(loaded, windows, bos_id=None, batch_size=3)
    sites = ["mlp", "dt"] if family.startswith("mamba") else ["mlp"]
    assert sorted({s for s, _ in stats.window_means}) == sorted(sites)
    captured = loaded.adapter.capture(windows, [(s, 1) for s in sites])
    for site in sites:
        means = captured[(site, 1)].double().mean(1)  # (n, W)
        # float32 activations of batches of 3 vs 8 differ by rounding (~1e-7 relative)
        torch.testing.assert_close(
            stats.window_mean_variance(site, 1), means.var(0, unbiased=False), rtol=1e-5, atol=1e-9
        )
        torch.testing.assert_close(stats.site_mean(site, 1), means.mean(0), rtol=1e-5, atol=1e-9)
    halves = collect_stats(loaded, windows[:3], bos_id=None, batch_size=3).merge(
        collect_stats(loaded, windows[3:], bos_id=None, batch_size=3)
    )
    for key, moments in stats.window_means.items():
        # same batches, float64 sums added in another order
        torch.testing.assert_close(halves.window_means[key].sum, moments.sum, rtol=1e-14, atol=0)
        torch.testing.assert_close(
            halves.window_means[key].sumsq, moments.sumsq, rtol=1e-14, atol=0
        )
    restored = type(stats).from_tensors(stats.to_tensors(), stats.meta())
    assert set(restored.window_means) == set(stats.window_means)


def test_planted_delta_channels_rank_first_on_both_scores():
    """Only the chosen channels' dt_proj rows are non-zero: they rank first on both scores,
    every other channel scores exactly 0."""
    model = _fast_mamba(n_layer=2)
    planted = [3, 17, 40, 62]
    with torch.no_grad():
        for block in model.backbone.layers:
            weight = block.mixer.dt_proj.weight
            keep = weight[planted].clone() * 5.0
            weight.zero_()
            weight[planted] = keep
    loaded = wrap(model, "planted")
    windows = _windows(n=10)
    stats = collect_stats(loaded, windows, bos_id=None)
    perturbation = perturbation_scores(
        loaded, windows[:4], site="dt", layers=[0, 1], bos_id=None, seed=1
    )
    others = np.setdiff1d(np.arange(64), planted)
    for layer in (0, 1):
        variance = variance_scores(stats, layer)
        assert sorted(top_channels(variance, 4)) == planted
        assert sorted(top_channels(perturbation[layer], 4)) == planted
        assert np.all(variance[others] == 0) and np.all(variance[planted] > 0)
        assert np.all(perturbation[layer][others] == 0)
        assert np.all(perturbation[layer][planted] > 0)
        finding = delta_sensitive_layer(
            stats, perturbation[layer], layer, model="planted", top_k=4, n_prompts=4,
            substitutions=8, seed=1,
        )  # fmt: skip
        assert sorted(finding.top_by_variance) == planted and finding.top_overlap == 4
        assert finding.n_zero_variance == 60 and finding.kind == "delta_sensitive"
    sets = delta_sensitive_sets(stats, top_k=4)
    assert sets.site == "dt" and sets.kind == "delta_sensitive"
    assert {layer: sorted(ids) for layer, ids in sets.by_layer.items()} == {0: planted, 1: planted}


def test_perturbation_score_by_hand_on_gpt2_mlp():
    """The batched score equals one substitution at a time, computed directly."""
    model = make_gpt2()
    loaded = wrap(model, "random-gpt2")
    windows = _windows(n=2, length=10)
    scores = perturbation_scores(
        loaded, windows, site="mlp", layers=[1], substitutions=3, bos_id=None, seed=7
    )
    generator = torch.Generator().manual_seed(7)
    total = torch.zeros(64, dtype=torch.float64)
    for p in range(2):
        where = 1 + torch.randint(0, 9, (3,), generator=generator)  # never the window start
        shift = torch.randint(1, VOCAB, (3,), generator=generator)
        base = loaded.adapter.capture(windows[p : p + 1], [("mlp", 1)])[("mlp", 1)][0]
        for k, s in zip(where.tolist(), shift.tolist(), strict=True):
            changed = windows[p].clone()
            changed[k] = (changed[k] + s) % VOCAB
            assert changed[k] != windows[p][k]
            other = loaded.adapter.capture(changed[None], [("mlp", 1)])[("mlp", 1)][0]
            total += (other - base)[k:].abs().double().mean(0)
    np.testing.assert_allclose(scores[1], (total / 6).numpy(), rtol=1e-5, atol=1e-7)
    stats = collect_stats(loaded, windows, bos_id=None)
    assert delta_sensitive_sets(stats, top_k=3).kind == "high_variance"


def test_substitutions_never_replace_the_window_start_or_bos():
    """All 64 default substitutions land on positions 1..T-1 that hold no BOS token; every
    such position can be chosen."""
    bos = 0
    window = torch.tensor([bos, 5, 6, bos, 7, 8, 9, bos, 4, 3])
    generator = torch.Generator().manual_seed(0)
    chosen = torch.cat([substitution_positions(window, 64, generator, bos) for _ in range(8)])
    assert set(chosen.tolist()) == {1, 2, 4, 5, 6, 8, 9}
    with pytest.raises(NeuronSpecError, match="no position to substitute"):
        substitution_positions(torch.tensor([bos, bos]), 4, generator, bos)
