"""The four sites of METHODS §1 read the right tensors and patch them, for GPT-2 and Mamba."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from builders import VOCAB, make_gpt2, make_mamba

from neuronspec.errors import LayerOutOfRangeError, NeuronSpecError, UnknownSiteError
from neuronspec.models.adapters import adapter_for


def _ids(batch=2, length=12, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _reference_mixer(mixer, hidden):
    """Mamba mixer computed directly from its parameters, float64, naive loop over positions.

    Returns (x, z, delta, y_gated) with shapes (B, L, d_inner)."""
    d = mixer.intermediate_size
    length = hidden.shape[1]
    xz = hidden @ mixer.in_proj.weight.t()  # (B, L, 2d)
    x, z = xz[..., :d], xz[..., d:]
    conv = F.conv1d(
        x.transpose(1, 2),
        mixer.conv1d.weight,
        mixer.conv1d.bias,
        padding=mixer.conv_kernel_size - 1,
        groups=d,
    )[..., :length]  # (B, d, L)
    x = F.silu(conv).transpose(1, 2)  # (B, L, d)
    proj = x @ mixer.x_proj.weight.t()  # (B, L, R + 2N)
    rank, n = mixer.time_step_rank, mixer.ssm_state_size
    dt_low, b_mat, c_mat = proj[..., :rank], proj[..., rank : rank + n], proj[..., rank + n :]
    delta = F.softplus(dt_low @ mixer.dt_proj.weight.t() + mixer.dt_proj.bias)  # (B, L, d)
    a = -torch.exp(mixer.A_log)  # (d, N)
    state = torch.zeros(hidden.shape[0], d, n, dtype=hidden.dtype)  # (B, d, N)
    ys = []
    for t in range(length):
        state = torch.exp(delta[:, t, :, None] * a) * state + (
            delta[:, t, :, None] * b_mat[:, t, None, :] * x[:, t, :, None]
        )
        ys.append((state * c_mat[:, t, None, :]).sum(-1))  # (B, d)
    y = torch.stack(ys, 1)  # (B, L, d)
    return x, z, delta, (y + mixer.D * x) * F.silu(z)


def test_mamba_sites_match_reference_from_parameters():
    model = make_mamba(dtype=torch.float64)
    adapter = adapter_for(model)
    ids = _ids()
    layer = 1
    mixer = model.backbone.layers[layer].mixer
    mixer_inputs = {}
    handle = mixer.register_forward_hook(
        lambda m, args, out: mixer_inputs.update(hidden=args[0], out=out)
    )
    sites = adapter.capture(ids, [(s, layer) for s in ("mlp", "mlp_pre", "dt", "resid")])
    handle.remove()
    x, z, delta, gated = _reference_mixer(mixer, mixer_inputs["hidden"])
    torch.testing.assert_close(sites[("mlp_pre", layer)], z, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sites[("dt", layer)], delta, rtol=1e-10, atol=1e-12)
    # HF's reference scan casts Δ·B and x to float32 (``.float()``) even for a float64
    # model, so the scan output agrees to float32 rounding only.
    torch.testing.assert_close(sites[("mlp", layer)], gated, rtol=1e-6, atol=1e-9)
    # out_proj(site mlp) is the mixer output
    torch.testing.assert_close(mixer.out_proj(sites[("mlp", layer)]), mixer_inputs["out"])


def test_resid_site_is_block_output(family):
    model = make_gpt2(n_layer=3) if family == "gpt2" else make_mamba(n_layer=3)
    adapter = adapter_for(model)
    ids = _ids()
    sites = adapter.capture(ids, [("resid", layer) for layer in range(3)])
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    # GPT-2 lists the embeddings first; Mamba lists block outputs only. Both append the
    # final-norm output last, so the last block is compared on the layers before it.
    offset = 1 if family == "gpt2" else 0
    for layer in range(2):
        torch.testing.assert_close(sites[("resid", layer)], hidden[layer + offset])


def test_gpt2_mlp_is_gelu_of_mlp_pre_and_feeds_c_proj():
    """mlp_pre = c_fc(ln_2(h)) by the weights, mlp = GELU (tanh form, written out here) of
    it, and c_proj(mlp) is the MLP block's output: the sites are where their names say."""
    model = make_gpt2()
    assert model.config.activation_function == "gelu_new"
    adapter = adapter_for(model)
    block = model.transformer.h[1]
    seen = {}
    hooks = [
        block.ln_2.register_forward_hook(lambda m, i, o: seen.__setitem__("ln_2", o)),
        block.mlp.register_forward_hook(lambda m, i, o: seen.__setitem__("block", o)),
    ]
    try:
        sites = adapter.capture(_ids(), [("mlp", 1), ("mlp_pre", 1)])
    finally:
        for hook in hooks:
            hook.remove()
    pre, act = sites[("mlp_pre", 1)], sites[("mlp", 1)]  # (B, T, 64) each
    c_fc, c_proj = block.mlp.c_fc, block.mlp.c_proj  # Conv1D: x @ weight + bias
    torch.testing.assert_close(pre, seen["ln_2"] @ c_fc.weight + c_fc.bias)
    gelu = 0.5 * pre * (1 + torch.tanh(math.sqrt(2 / math.pi) * (pre + 0.044715 * pre**3)))
    torch.testing.assert_close(act, gelu)
    torch.testing.assert_close(act @ c_proj.weight + c_proj.bias, seen["block"])
    assert act.shape[-1] == adapter.width("mlp") == 64


@pytest.mark.parametrize("site", ["mlp", "mlp_pre"])
def test_patch_zeroes_only_chosen_neurons(family, site):
    model = make_gpt2() if family == "gpt2" else make_mamba()
    adapter = adapter_for(model)
    ids = _ids()
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with adapter.patch(site, 0, lambda value: value):
            identity = model(input_ids=ids).logits
        with adapter.patch_neurons(site, 0, [3, 5], 0.0):
            patched = model(input_ids=ids).logits
    torch.testing.assert_close(identity, base, rtol=0, atol=0)
    assert not torch.allclose(patched, base)
    # a read entered after the patch sees the patched value: zeros exactly at 3 and 5
    seen = {}
    with (
        adapter.patch_neurons(site, 0, [3, 5], 0.0),
        adapter.read([(site, 0)], lambda s, layer, v: seen.update(v=v.clone())),
    ):
        model(input_ids=ids)
    assert torch.all(seen["v"][..., [3, 5]] == 0)
    assert torch.all(seen["v"][..., [0, 1, 2, 4]] != 0)


def test_hooks_are_removed_after_errors(random_model):
    adapter = random_model.adapter
    module_hooks = lambda: sum(  # noqa: E731
        len(m._forward_hooks) + len(m._forward_pre_hooks) for m in random_model.model.modules()
    )
    before = module_hooks()
    with pytest.raises(RuntimeError, match="boom"):
        with adapter.read([("mlp", 0)], lambda *a: (_ for _ in ()).throw(RuntimeError("boom"))):
            random_model.model(input_ids=_ids())
    assert module_hooks() == before


def test_bad_site_and_layer_errors(random_model):
    adapter = random_model.adapter
    with pytest.raises(LayerOutOfRangeError, match=r"has 2 layers \(0\.\.1\)"):
        adapter.check("mlp", 2)
    with pytest.raises(LayerOutOfRangeError):
        adapter.check("mlp", -1)
    with pytest.raises(UnknownSiteError, match="available"):
        adapter.check("attn", 0)
    if random_model.family == "gpt2":
        with pytest.raises(UnknownSiteError, match="'dt' does not exist for gpt2"):
            adapter.check("dt", 0)
    else:
        with pytest.raises(NeuronSpecError, match="read but not patched"):
            with adapter.patch("dt", 0, lambda v: v):
                pass
