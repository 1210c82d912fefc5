"""The fast selective scan equals transformers' reference Mamba path.

Tolerances are relative to the scale of each tensor: ``max|fast - ref| <= tol *
max|ref|``. float32: 1e-5 against the unmodified HF path. float64: HF's reference scan
rounds ``B`` and ``x`` to float32 inside ``Δ·B·x`` (``.float()``), the fast scan does
not; so float64 is compared at 1e-10 against the HF path whose scan is swapped for an
exact float64 loop (:func:`_exact_reference_scan`, the HF loop without ``.float()``),
and at 1e-6 against the unmodified HF path. Gradients of ``A_log``, ``D`` and
``dt_proj.bias`` pass through float32 casts in ``MambaMixer.forward`` on both paths and
are compared at 1e-6 in float64.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from transformers import MambaConfig, MambaForCausalLM
from transformers.models.mamba import modeling_mamba

from neuronspec.errors import NeuronSpecError
from neuronspec.models.scan import (
    UnsupportedScanInputError,
    is_fast_scan_enabled,
    selective_scan,
    use_fast_scan,
)

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
CHUNK = 16  # DEFAULT_CHUNK; lengths below straddle it
LENGTHS = [1, 7, 16, 37]


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, what
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= tol * max(scale, 1e-30), f"{what}: max abs err {err:.3g}, scale {scale:.3g}"


def _exact_reference_scan(
    hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, **kwargs
):
    """HF's sequential loop in the inputs' own dtype (no float32 rounding of B and x)."""
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    h = torch.zeros(*hidden_states.shape[:2], A.shape[1], dtype=hidden_states.dtype)
    ys = []
    for t in range(hidden_states.shape[-1]):
        h = torch.exp(A * dt[:, :, t, None]) * h + (
            dt[:, :, t, None] * B[:, None, :, t] * hidden_states[:, :, t, None]
        )
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + hidden_states * D[None, :, None]
    if z is not None:
        y = y * F.silu(z)
    return (y, h) if kwargs.get("return_last_state") else y


def _model(dtype: torch.dtype, hidden: int = 32, seed: int = 0) -> MambaForCausalLM:
    torch.manual_seed(seed)
    config = MambaConfig(
        vocab_size=97, hidden_size=hidden, num_hidden_layers=2, state_size=8, expand=2
    )
    model = MambaForCausalLM(config).to(dtype)
    with torch.no_grad():  # trained-looking spread of decays and step sizes
        for layer in model.backbone.layers:
            layer.mixer.A_log.add_(torch.randn_like(layer.mixer.A_log) * 0.5)
            layer.mixer.dt_proj.bias.add_(torch.randn_like(layer.mixer.dt_proj.bias))
            layer.mixer.D.normal_()
    return model


SITES = ("in_proj.out", "x_proj.in", "x_proj.out", "out_proj.in", "block.out")


def _run(model, ids, fast: bool, backward: bool = False):
    """Logits, every site per layer, and parameter gradients on one path."""
    use_fast_scan(model, fast)
    got: dict[str, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(model.backbone.layers):
        mixer = layer.mixer

        def save(key):
            return lambda m, inp, out: got.__setitem__(key, (inp[0], out))

        handles += [
            mixer.in_proj.register_forward_hook(save(f"{i}.in_proj")),
            mixer.x_proj.register_forward_hook(save(f"{i}.x_proj")),
            mixer.out_proj.register_forward_pre_hook(
                lambda m, inp, i=i: got.__setitem__(f"{i}.out_proj.pre", (inp[0], None))
            ),
            layer.register_forward_hook(save(f"{i}.block")),
        ]
    model.zero_grad(set_to_none=True)
    try:
        with torch.set_grad_enabled(backward):
            logits = model(ids, use_cache=False).logits
            if backward:
                (logits.square().mean() + logits[:, -1].sum()).backward()
    finally:
        for h in handles:
            h.remove()
    out = {"logits": logits.detach()}
    for i in range(len(model.backbone.layers)):
        out[f"{i}.in_proj.out"] = got[f"{i}.in_proj"][1]
        out[f"{i}.x_proj.in"], out[f"{i}.x_proj.out"] = got[f"{i}.x_proj"]
        out[f"{i}.out_proj.in"] = got[f"{i}.out_proj.pre"][0]
        out[f"{i}.block.out"] = got[f"{i}.block"][1]
    if backward:
        out.update({f"grad {n}": p.grad.clone() for n, p in model.named_parameters()})
    return {k: v.detach() for k, v in out.items()}


# MambaMixer.forward casts these to float32 (A_log.float(), D.float(),
# dt_proj.bias.float()) on both paths, so in a float64 model their gradients are
# rounded to float32: compared at float32 precision.
FLOAT32_CAST_PARAMS = ("mixer.A_log", "mixer.D", "mixer.dt_proj.bias")


def _compare(model, ids, tol, backward):
    ref = _run(model, ids, fast=False, backward=backward)
    fast = _run(model, ids, fast=True, backward=backward)
    assert fast.keys() == ref.keys()
    assert len(fast) == 1 + 5 * 2 + (len(list(model.parameters())) if backward else 0)
    for key in ref:
        cast = key.startswith("grad") and key.endswith(FLOAT32_CAST_PARAMS)
        _close(fast[key], ref[key], max(tol, 1e-6) if cast else tol, key)


# backward=True runs the chunked torch scan (gradients); backward=False the C kernels
# (conv + SiLU and scan with softplus fused), as analysis forwards do.
@pytest.mark.parametrize("backward", [True, False], ids=["chunked+grad", "kernels"])
@pytest.mark.parametrize("length", LENGTHS)
def test_float32_matches_hf_reference(length, backward):
    model = _model(torch.float32)
    ids = torch.randint(0, 97, (2, length), generator=torch.Generator().manual_seed(length))
    _compare(model, ids, TOL[torch.float32], backward=backward)


@pytest.mark.parametrize("backward", [True, False], ids=["chunked+grad", "kernels"])
@pytest.mark.parametrize("length", [1, 37])
def test_float64_matches_exact_reference(length, backward, monkeypatch):
    monkeypatch.setattr(modeling_mamba, "mamba_selective_scan", _exact_reference_scan)
    model = _model(torch.float64, hidden=48)
    ids = torch.randint(0, 97, (2, length), generator=torch.Generator().manual_seed(length))
    _compare(model, ids, TOL[torch.float64], backward=backward)


def test_float64_matches_unmodified_hf_reference_up_to_its_float32_rounding():
    model = _model(torch.float64)
    ids = torch.randint(0, 97, (2, 37), generator=torch.Generator().manual_seed(1))
    _compare(model, ids, 1e-6, backward=False)


def test_disable_restores_reference_bit_for_bit():
    model = _model(torch.float32)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(2))
    assert not is_fast_scan_enabled(model)
    with torch.no_grad():
        before = model(ids).logits
        assert use_fast_scan(model) is model and is_fast_scan_enabled(model)
        use_fast_scan(model)  # idempotent
        fast = model(ids).logits
        use_fast_scan(model, False)
        assert not is_fast_scan_enabled(model)
        assert all("forward" not in layer.mixer.__dict__ for layer in model.backbone.layers)
        after = model(ids).logits
    assert torch.equal(before, after)
    assert not torch.equal(before, fast)  # the fast path really ran
    _close(fast, before, TOL[torch.float32], "logits")


def test_hooks_fire_on_fast_path_once_per_call():
    model = use_fast_scan(_model(torch.float32))
    calls = []
    mixer = model.backbone.layers[1].mixer
    for name in ("in_proj", "x_proj", "out_proj"):
        module = getattr(mixer, name)
        module.register_forward_pre_hook(lambda m, inp, n=name: calls.append(f"pre {n}"))
        module.register_forward_hook(lambda m, inp, out, n=name: calls.append(n))
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 9)))
    assert calls == [
        "pre in_proj",
        "in_proj",
        "pre x_proj",
        "x_proj",
        "pre out_proj",
        "out_proj",
    ]


def test_cached_prefill_and_generation_match_reference():
    """Eval forwards make a cache (prefill: fast path); single-token steps use HF's."""
    model = _model(torch.float64)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(3))
    outs = {}
    for fast in (False, True):
        use_fast_scan(model, fast)
        with torch.no_grad():
            out = model(ids, use_cache=True)
            step = model(
                ids[:, -1:], cache_params=out.cache_params, use_cache=True
            ).logits  # one decoding step from the cached states
            gen = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        outs[fast] = (out.logits, step, gen)
    _close(outs[True][0], outs[False][0], 1e-6, "prefill logits")
    _close(outs[True][1], outs[False][1], 1e-6, "decode-step logits")
    assert torch.equal(outs[True][2], outs[False][2])


def test_selective_scan_function_level():
    g = torch.Generator().manual_seed(4)
    b, d, L, N = 2, 5, 23, 3
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, dt, z = r(b, d, L), r(b, d, L), r(b, d, L)
    A = -torch.exp(r(d, N))
    B, C, D, bias = r(b, N, L), r(b, N, L), r(d), r(d)
    args = (x, dt, A, B, C, D, z, bias)
    for cs in (1, 4, 64):
        out, last = selective_scan(*args, return_last_state=True, chunk_size=cs)
        ref, ref_last = _exact_reference_scan(*args, delta_softplus=True, return_last_state=True)
        _close(out, ref, 1e-12, f"out chunk {cs}")
        _close(last, ref_last, 1e-12, f"last state chunk {cs}")
    short = (x[..., :9], dt[..., :9], A, B[..., :9], C[..., :9])
    leaves = [t.clone().requires_grad_() for t in short]
    assert torch.autograd.gradcheck(
        lambda *t: selective_scan(*t, return_last_state=True, chunk_size=4), leaves
    )


def test_rejects_unsupported_inputs():
    x = torch.randn(1, 4, 5)
    A = -torch.ones(4, 2)
    B = torch.randn(1, 2, 5)
    with pytest.raises(UnsupportedScanInputError, match="float32 and float64"):
        selective_scan(x.int(), x.int(), A, B, B)
    with pytest.raises(UnsupportedScanInputError, match="B must have shape"):
        selective_scan(x, x, A, B[:, :1], B)
    with pytest.raises(UnsupportedScanInputError, match="empty sequence"):
        selective_scan(x[..., :0], x[..., :0], A, B[..., :0], B[..., :0])
    with pytest.raises(NeuronSpecError, match="no transformers MambaMixer"):
        use_fast_scan(torch.nn.Linear(2, 2))
    assert not is_fast_scan_enabled(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_scan_in_float32(dtype):
    """A bfloat16 / float16 Mamba runs the fast scan in float32: its logits are no further
    from the float32 model's than the reference path's own half-precision logits are."""
    ids = torch.randint(0, 97, (2, 37), generator=torch.Generator().manual_seed(3))
    exact = _run(_model(torch.float32), ids, fast=False, backward=False)["logits"]
    half = _model(torch.float32).to(dtype)
    fast_run = _run(half, ids, fast=True, backward=False)
    assert fast_run["1.out_proj.in"].dtype == dtype  # the mixer hands on half precision
    fast = fast_run["logits"]
    reference = _run(half, ids, fast=False, backward=False)["logits"]
    fast_error = (fast.float() - exact).abs().max()
    reference_error = (reference.float() - exact).abs().max()
    assert 0 < fast_error <= 1.5 * reference_error, (fast_error, reference_error)


def test_padding_mask_matches_reference():
    model = _model(torch.float32)
    ids = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # left padding on one row
    logits = {}
    for fast in (False, True):
        use_fast_scan(model, fast)
        with torch.no_grad():
            logits[fast] = model(ids, attention_mask=mask).logits
    _close(logits[True], logits[False], TOL[torch.float32], "masked logits")


def test_fast_scan_counts_are_exact_up_to_float32_rounding():
    """On 25,600 toy-world tokens the fast and the reference scan give tiny-mamba's firing
    counts equal up to float32 rounding: a gate whose pre-activation lies within rounding of 0
    may flip, so a count moves by at most 1, for at most 1% of the (layer, neuron) counts
    (measured: 2 of 1,024 counts), and no dead set changes."""
    from neuronspec.analyses.dead import dead_neurons
    from neuronspec.capture.runner import collect_stats
    from neuronspec.data.corpus import CorpusConfig
    from neuronspec.data.windows import build_windows
    from neuronspec.models.registry import load_model

    loaded = load_model("tiny-mamba")
    windows = build_windows(loaded.tokenizer, CorpusConfig(max_tokens=25_600))
    fast = collect_stats(loaded, windows.analysis, bos_id=windows.bos_id)
    use_fast_scan(loaded.model, False)
    reference = collect_stats(loaded, windows.analysis, bos_id=windows.bos_id)
    changed = total = 0
    for layer in range(fast.n_layers):
        delta = fast.layer(layer).fire_count.long() - reference.layer(layer).fire_count.long()
        assert int(delta.abs().max()) <= 1, layer
        changed += int((delta != 0).sum())
        total += delta.numel()
        assert dead_neurons(fast, layer).dead_neurons == dead_neurons(reference, layer).dead_neurons
    assert changed <= 0.01 * total, (changed, total)
