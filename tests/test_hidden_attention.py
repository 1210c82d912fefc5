"""Mamba hidden attention α̃ (METHODS §7): exact identities in float64, a brute-force Ā
product, the memory bound, rollout and the gradient against finite differences."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from builders import VOCAB, wrap
from transformers import MambaConfig, MambaForCausalLM

from neuronspec.analyses import hidden_attention as hidden_attention_module
from neuronspec.analyses.attention_neurons import mlp_gradients
from neuronspec.analyses.hidden_attention import (
    POSITION_BLOCK,
    alpha_gradient,
    channel_chunk,
    channel_mean_attention,
    gradient_attention,
    gradient_rollout_layer,
    hidden_attention,
    iter_hidden_attention,
    layer_attention,
    rollout,
    unit_rows,
)
from neuronspec.errors import NeuronSpecError
from neuronspec.models.adapters import adapter_for
from neuronspec.models.mamba_internals import capture_scan_inputs
from neuronspec.models.scan import selective_scan, use_fast_scan

pytestmark = pytest.mark.attention

# several random tiny configs: (hidden, state, rank, conv, layers)
CONFIGS = [(16, 4, 2, 4, 2), (24, 8, 3, 3, 3), (32, 16, 4, 4, 2)]


def _mamba(hidden, state, rank, conv, layers, seed=0) -> MambaForCausalLM:
    torch.manual_seed(seed)
    config = MambaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        state_size=state,
        num_hidden_layers=layers,
        expand=2,
        conv_kernel=conv,
        time_step_rank=rank,
        residual_in_fp32=False,  # keep the residual stream in float64 (finite differences)
    )
    model = MambaForCausalLM(config).double().eval()
    with torch.no_grad():  # larger Δ and varied A make decays matter over a short prompt
        for block in model.backbone.layers:
            block.mixer.dt_proj.bias.add_(1.0)
            block.mixer.A_log.normal_(0.0, 0.7)
    return use_fast_scan(model)


def _ids(batch=2, length=11, seed=3):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _mixer_outputs(model, ids):
    outputs = {}
    handles = [
        block.mixer.register_forward_hook(lambda m, a, out, i=i: outputs.update({i: out}))
        for i, block in enumerate(model.backbone.layers)
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def _check_identities(model, ids, atol):
    layers = range(len(model.backbone.layers))
    inputs = capture_scan_inputs(model, ids, layers)
    mixer_out = _mixer_outputs(model, ids)
    for layer in layers:
        s = inputs[layer]
        att = layer_attention(s)
        scan = selective_scan(
            s.x.transpose(1, 2), s.delta.transpose(1, 2), s.A,
            s.B.transpose(1, 2), s.C.transpose(1, 2), delta_softplus=False,
        ).transpose(1, 2)  # fmt: skip
        torch.testing.assert_close(att.y, scan, rtol=0, atol=atol)
        mixer = model.backbone.layers[layer].mixer
        rebuilt = mixer.out_proj((att.y + s.D * s.x) * F.silu(s.z))
        torch.testing.assert_close(rebuilt, mixer_out[layer], rtol=0, atol=atol)
        assert att.above_diagonal_max == 0.0


@pytest.mark.parametrize("shape", CONFIGS, ids=lambda c: "h{}-N{}-R{}-K{}-L{}".format(*c))
def test_identities_float64_random_configs(shape):
    """Σ_j α̃ x = scan before skip and gate; out_proj(((α̃x) + D⊙x) ⊙ SiLU(z)) = mixer."""
    _check_identities(_mamba(*shape), _ids(), atol=1e-10)


def test_identities_float64_tiny_mamba():
    from neuronspec.models.registry import load_model

    loaded = load_model("tiny-mamba", dtype="float64")
    ids = torch.randint(1, 200, (1, 24), generator=torch.Generator().manual_seed(0))
    _check_identities(loaded.model, ids, atol=1e-10)


def _brute_force(s, b, c):
    """α̃_c[i, j] = C_i · (Π_{t=j+1..i} Ā_t) Δ_j B_j with explicit Ā matrices (diagonal N×N)."""
    length = s.x.shape[1]
    out = torch.zeros(length, length, dtype=s.x.dtype)
    for i in range(length):
        for j in range(i + 1):
            product = torch.eye(s.A.shape[1], dtype=s.x.dtype)
            for t in range(j + 1, i + 1):
                product = torch.diag(torch.exp(s.delta[b, t, c] * s.A[c])) @ product
            out[i, j] = s.C[b, i] @ product @ (s.delta[b, j, c] * s.B[b, j])
    return out


def test_brute_force_abar_product():
    model = _mamba(*CONFIGS[1])
    s = capture_scan_inputs(model, _ids(length=7), [1])[1]
    channels = [0, 5, 17, 47]
    fast = hidden_attention(s, channels)  # (B, 4, L, L)
    for b in range(2):
        for k, c in enumerate(channels):
            torch.testing.assert_close(fast[b, k], _brute_force(s, b, c), rtol=0, atol=1e-12)


def _row_recurrence(s, channels):
    """The reference: α̃ by the exact recurrence over query positions i on the state
    M_i[c, j, n] = Π_{t=j+1..i} Ā_t[c, n] · Δ_j[c] B_j[n] (every factor Ā_t ≤ 1),
    α̃_c[i, j] = Σ_n C_i[n] M_i[c, j, n]: ``(B, k, L, L)``."""
    b, length, _, n = s.shape
    delta = s.delta[:, :, channels].transpose(1, 2)  # (B, k, L)
    decay = (delta[..., None] * s.A[channels][None, :, None, :]).exp()  # (B, k, L, N)
    u = delta[..., None] * s.B[:, None, :, :]  # (B, k, L, N)
    state = torch.zeros_like(u)
    alpha = u.new_zeros(b, len(channels), length, length)
    for i in range(length):
        if i:
            state[:, :, :i] *= decay[:, :, i, None, :]
        state[:, :, i] = u[:, :, i]
        alpha[:, :, i, : i + 1] = (state[:, :, : i + 1] @ s.C[:, None, i, :, None]).squeeze(-1)
    return alpha


@pytest.mark.parametrize("path", ["product", "pairwise"])
@pytest.mark.parametrize("length", [1, 7, 16, 37, 70, 150])  # 70, 150: re-anchored
@pytest.mark.parametrize("shape", CONFIGS, ids=lambda c: "h{}-N{}-R{}-K{}-L{}".format(*c))
def test_blocks_equal_the_row_recurrence(shape, length, path, monkeypatch):
    """α̃ by blocks of query positions (factors relative to the block start) equals the
    exact row recurrence to 1e-10 in float64, for windows shorter than, equal to and not a
    multiple of the block, with each block's own columns as a product and from pairwise
    differences; so does the channel mean by one contraction per block."""
    limit = math.inf if path == "product" else -math.inf
    monkeypatch.setattr(hidden_attention_module, "block_product_limit", lambda dtype: limit)
    s = capture_scan_inputs(_mamba(*shape), _ids(length=length), [0])[0]
    channels = torch.arange(s.shape[2])
    reference = _row_recurrence(s, channels)
    torch.testing.assert_close(hidden_attention(s), reference, rtol=0, atol=1e-10)
    torch.testing.assert_close(channel_mean_attention(s), reference.mean(1), rtol=0, atol=1e-10)


def test_blocks_do_not_overflow_where_the_decay_spans_thousands_of_nats():
    """With Δ scaled up 200×, exp(−A·(S_j − S_s)) would overflow float64 within a block;
    every factor here has a non-positive exponent, so α̃ stays finite and exact."""
    import dataclasses

    s = capture_scan_inputs(_mamba(*CONFIGS[2]), _ids(length=80), [1])[1]
    s = dataclasses.replace(s, delta=s.delta * 200)
    assert float((s.delta.sum(1)[:, :, None] * -s.A[None]).max()) > 2000  # nats spanned
    channels = torch.arange(s.shape[2])
    alpha = hidden_attention(s)
    assert torch.isfinite(alpha).all()
    reference = _row_recurrence(s, channels)
    torch.testing.assert_close(alpha, reference, rtol=0, atol=1e-10)
    torch.testing.assert_close(channel_mean_attention(s), reference.mean(1), rtol=0, atol=1e-10)
    # the span guard is what keeps it so: forced, the product form overflows here
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hidden_attention_module, "block_product_limit", lambda dtype: math.inf)
        assert not torch.isfinite(hidden_attention(s)).all()


@pytest.mark.parametrize("scale", [1, 20])
def test_float32_inputs_compute_in_float32_close_to_float64(scale):
    """A float32 model's α̃ (the exponentials in float32, the cumulative sums S in float64)
    is within 1e-5 of the largest |α̃| of the same inputs in float64, at Δ as trained and
    20× larger (wide spans: pairwise block terms)."""
    import dataclasses

    s = capture_scan_inputs(_mamba(*CONFIGS[2]), _ids(length=70), [0])[0]
    s = dataclasses.replace(s, delta=s.delta * scale)
    single = dataclasses.replace(
        s, **{f.name: getattr(s, f.name).float() for f in dataclasses.fields(s)
              if isinstance(getattr(s, f.name), torch.Tensor)}
    )  # fmt: skip
    reference = hidden_attention(s)
    alpha = hidden_attention(single)
    assert alpha.dtype == torch.float32
    scale_of = float(reference.abs().max())
    torch.testing.assert_close(alpha.double(), reference, rtol=0, atol=1e-5 * scale_of)


def test_chunking_changes_nothing_and_respects_the_bound():
    model = _mamba(*CONFIGS[0])
    s = capture_scan_inputs(model, _ids(), [0])[0]
    b, length, d, n = s.shape
    one = channel_chunk(b, length, n, 8, memory_bytes=1)
    assert one == 1
    block = min(POSITION_BLOCK, length)
    budget = 3 * b * (length * (length + 3 * n) + 2 * block * block * n) * 8
    assert channel_chunk(b, length, n, 8, budget) == 3
    chunks = list(iter_hidden_attention(s, memory_bytes=budget))
    assert [c.numel() for c, _ in chunks] == [3] * (d // 3) + ([d % 3] if d % 3 else [])
    whole = torch.cat([a for _, a in chunks], 1)
    torch.testing.assert_close(whole, hidden_attention(s), rtol=0, atol=0)
    att = layer_attention(s, memory_bytes=budget)
    torch.testing.assert_close(att.mean, whole.mean(1), rtol=0, atol=1e-15)
    torch.testing.assert_close(att.abs_mean, whole.abs().mean(1), rtol=0, atol=1e-15)
    torch.testing.assert_close(channel_mean_attention(s, memory_bytes=budget), att.mean)
    torch.testing.assert_close(channel_mean_attention(s, absolute=True), att.abs_mean)
    weighted = (whole * s.x.transpose(1, 2)[:, :, None, :]).abs().sum(-1).mean(-1)  # (B, d)
    torch.testing.assert_close(att.weighted, weighted)
    torch.testing.assert_close(att.last_row_mass, whole.abs()[:, :, -1])


def test_rollout_by_hand():
    a0 = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])
    a1 = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])
    r = rollout([a0, a1])
    # rows scaled to unit mass first: a0 row 1 -> (1/2, 1/2), a1 -> I; row 0 of a0 stays 0
    n0 = torch.tensor([[1.0, 0.0], [1 / 4, 3 / 4]])
    n1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(r[0], n1 @ n0)
    torch.testing.assert_close(r.sum(-1), torch.ones(1, 2))
    with pytest.raises(NeuronSpecError, match="clamped or abs"):
        rollout([torch.tensor([[[-2.0, 0.0], [0.0, 0.0]]])])


def test_gradient_guided_agrees_with_finite_differences():
    """∂logit/∂ŷ from one backward and ∂logit/∂α̃_c[i, j] = g_i SiLU(z_i) x_j, checked by
    central differences of the logit with the mlp site patched."""
    model = _mamba(*CONFIGS[0])
    adapter = adapter_for(model)
    ids = _ids(batch=1, length=6)
    layer = 0
    s = capture_scan_inputs(model, ids, [layer])[layer]
    kept = {}

    def keep(site, lay, value):
        value.retain_grad()
        kept["y"] = value

    with adapter.read([("mlp", layer)], keep):
        logits = model(input_ids=ids, use_cache=False).logits
    target = int(logits[0, -1].argmax())
    logits[0, -1, target].backward()
    grad = kept["y"].grad  # (1, L, d)
    # HF's MambaRMSNorm computes in float32 even in a float64 model, so the logit carries
    # float32 rounding (~1e-7): a step of 1e-3 keeps that noise below 1e-4 of the gradient.
    eps = 1e-3

    def logit_with(fn):
        with torch.no_grad(), adapter.patch("mlp", layer, fn):
            return float(model(input_ids=ids, use_cache=False).logits[0, -1, target])

    for i, c in [(5, 3), (2, 11), (0, 0)]:

        def bump(value, sign, i=i, c=c):
            value = value.clone()
            value[0, i, c] += sign * eps
            return value

        numeric = (logit_with(lambda v: bump(v, 1)) - logit_with(lambda v: bump(v, -1))) / (2 * eps)
        assert numeric == pytest.approx(float(grad[0, i, c]), rel=1e-3, abs=1e-4)
    alpha_grad = alpha_gradient(s, grad, [7])[0, 0]  # (L, L)
    silu = F.silu(s.z)
    for i, j in [(5, 1), (3, 3), (4, 0)]:
        c = 7

        def bump_alpha(value, sign, i=i, j=j, c=c):
            value = value.clone()  # α̃_c[i, j] += ε changes ŷ_i[c] by ε x_j[c] SiLU(z_i[c])
            value[0, i, c] += sign * eps * s.x[0, j, c] * silu[0, i, c]
            return value

        numeric = (
            logit_with(lambda v: bump_alpha(v, 1)) - logit_with(lambda v: bump_alpha(v, -1))
        ) / (2 * eps)
        assert numeric == pytest.approx(float(alpha_grad[i, j]), rel=1e-3, abs=1e-4)
    full = alpha_gradient(s, grad, range(s.x.shape[-1])).mean(1)  # (1, L, L)
    torch.testing.assert_close(gradient_attention(s, grad), full, rtol=0, atol=1e-12)


def test_rollout_of_row_stochastic_attention_is_abnar_zuidema():
    """GPT-2's attention rows sum to 1: scaling rows to unit mass changes nothing, and the
    rollout is row-normalise(I + A) multiplied over layers."""
    generator = torch.Generator().manual_seed(0)
    layers = [torch.rand(2, 5, 5, generator=generator).tril() for _ in range(3)]
    layers = [a / a.sum(-1, keepdim=True) for a in layers]
    expected = torch.eye(5).expand(2, 5, 5)
    for a in layers:
        expected = ((torch.eye(5) + a) / 2) @ expected
    torch.testing.assert_close(rollout(layers), expected)


def test_rollout_relevance_lands_on_the_planted_token():
    """Layer matrices whose every query row attends only to token 2 (and itself at 2): the
    last token's relevance puts the most mass after itself on token 2, under raw scales of
    0.01 and 50 alike (rows are scaled to unit mass)."""
    for scale in (0.01, 50.0):
        a = torch.zeros(1, 6, 6)
        a[0, 2:, 2] = scale
        a[0, :2, 0] = scale
        relevance = rollout([a, a, a])[0, -1]  # (L,)
        assert int(relevance[:-1].argmax()) == 2
        assert float(relevance[2]) > 0.5


@pytest.mark.parametrize("config", CONFIGS)
def test_gradient_guided_rollout_is_not_the_identity(config):
    """After min-max normalisation each layer matrix row with mass carries exactly half of
    its row of Â (the other half is I), and the last token keeps less than 90% of the
    relevance (without it: 99.8-99.99%, the identity)."""
    model = _mamba(*config)
    ids = _ids()
    layers = list(range(model.config.num_hidden_layers))
    inputs = capture_scan_inputs(model, ids, layers)
    loaded = wrap(model, "random-mamba")
    grads, _, _ = mlp_gradients(loaded, ids, layers)
    matrices = []
    for layer in layers:
        att = layer_attention(inputs[layer])
        guided = gradient_rollout_layer(att.mean, gradient_attention(inputs[layer], grads[layer]))
        assert bool((guided >= 0).all()) and float(guided.max()) <= 1.0
        unit = unit_rows(guided)
        mass = unit.sum(-1)  # (B, L)
        assert bool(((mass - 1).abs() < 1e-9).logical_or(mass == 0).all())
        assert float((mass == 1).double().mean()) > 0.5
        matrices.append(guided)
    relevance = rollout(matrices)[:, -1]  # (B, L)
    assert float(relevance[:, -1].mean()) < 0.9
