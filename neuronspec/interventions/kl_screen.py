"""A second-order screen of every neuron's KL impact, from a few backward passes (METHODS §6).

For the intervention on neuron n of one layer, δ_t = v − a_t at every position t of P
prompts (v = 0 for ``zero``, the corpus mean μ_n for ``mean``), the KL of the next-token
distribution at position p, KL(p_base ‖ p_mod), is 0 with zero gradient at δ = 0, and its
Hessian there is the Fisher information of p_base. So, to second order,

    KL_p ≈ ½ E_{y ~ p_base(·|x_≤p)} [(Σ_{t≤p} g_{p,t} δ_t)²],   g_{p,t} = ∂ ln p(y | x_≤p) / ∂a_t.

One backward of Σ_p ln p(y_p), with a target y_p drawn from p_base at *every* position at
once, gives G_t = Σ_p g_{p,t} for every neuron of every layer; the cross terms p ≠ p' of
(Σ_t G_t δ_t)² have expectation 0 (E_y g_p = 0, the y_p independent), so

    κ̂_n = 1/(2·P·T·S) · Σ_{s=1..S} Σ_b (Σ_t G^{(s)}_{b,t,n} δ_{b,t,n})²

is an unbiased Monte-Carlo estimate, over S target draws, of the second-order KL averaged
over the P·T positions (the quantity the exact sweep measures).

Second order only, and blind where the model saturates: a neuron with a massive
activation can carry most of the residual stream's norm at some position, where the next
layer's norm makes the stream's direction, not its size, matter: the gradient along the
intervention vanishes though removing the neuron changes everything. So the screen also
reports each neuron's **residual share**, ρ_n = max_{b,t} δ²_{b,t,n}·‖w_n‖² / ‖h_{b,t}‖²
(w_n: what a unit of the neuron writes into the stream, ``SiteAdapter.write_weights``;
h: the stream at the block's output), the largest fraction of the stream's energy the
intervention moves at any position; the causal sweep measures the top of both rankings
exactly (:mod:`neuronspec.analyses.causal`). Measured on the embedded models' last layer
(tests/test_kl_screen.py): the top 10 by κ̂ holds 3 of tiny-mamba's exact top 10 (its
strongest neurons reach |a| ≈ 1,600 and move 50–97% of the stream's energy) and 8 or more
of tiny-gpt2's; κ̂'s and ρ's top 10 together hold 8 and 9.

Shapes: ``prompts`` ``(P, T)``; each result ``{layer: (W,)}`` float64. The S·P rows (every
prompt once per draw) run in passes of at most ``max_rows`` rows, forward and backward;
the targets are drawn from the unpatched model's softmax with ``torch.Generator(seed)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from neuronspec.models.registry import LoadedModel

SCREEN_SAMPLES = 8  # target draws S per prompt
SCREEN_MAX_ROWS = 16  # rows per forward/backward (memory: rows × T × the model's activations)


@dataclass(frozen=True)
class KLScreen:
    """Per layer ``(W,)`` float64: κ̂ (nats, mean per position) and the residual share ρ
    (None for a site that writes no vector into the stream)."""

    kl: dict[int, torch.Tensor]
    residual_share: dict[int, torch.Tensor] | None


def draw_targets(
    loaded: LoadedModel, prompts: torch.Tensor, *, samples: int, seed: int
) -> torch.Tensor:
    """``(S, P, T)`` int64: S draws of a next token at every position of ``prompts`` ``(P, T)``
    from the unpatched model's softmax, with ``torch.Generator(seed)``."""
    if samples < 1:
        raise ValueError(f"the KL screen needs at least 1 target draw, got {samples}")
    with torch.inference_mode():
        logits = loaded.model(input_ids=prompts.to(loaded.device), use_cache=False).logits
        probs = torch.softmax(logits.double(), -1).reshape(-1, logits.shape[-1]).cpu()
    generator = torch.Generator().manual_seed(seed)
    draws = torch.multinomial(probs, samples, replacement=True, generator=generator)  # (P·T, S)
    return draws.T.reshape(samples, *prompts.shape)


def kl_screen(
    loaded: LoadedModel,
    prompts: torch.Tensor,
    layers: Sequence[int],
    *,
    site: str = "mlp",
    method: str = "zero",
    means: Mapping[tuple[str, int], torch.Tensor] | None = None,
    samples: int = SCREEN_SAMPLES,
    seed: int = 0,
    max_rows: int = SCREEN_MAX_ROWS,
    targets: torch.Tensor | None = None,
) -> KLScreen:
    """κ̂ and ρ of every neuron of ``site`` at each of ``layers`` (module docstring).
    ``targets`` ``(S, P, T)``: the draws to use (default :func:`draw_targets` with
    ``samples`` and ``seed``)."""
    if method not in ("zero", "mean"):
        raise ValueError(f"the KL screen intervenes by 'zero' or 'mean', got {method!r}")
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    model, adapter = loaded.model, loaded.adapter
    for layer in layers:
        adapter.check(site, layer)
        if method == "mean" and (means is None or (site, layer) not in means):
            raise ValueError(f"the mean intervention of {site!r} layer {layer} needs its means")
    if targets is None:
        targets = draw_targets(loaded, prompts, samples=samples, seed=seed)
    if targets.shape[1:] != prompts.shape:
        raise ValueError(
            f"targets {tuple(targets.shape)} do not match prompts {tuple(prompts.shape)}"
        )
    device = loaded.device
    prompts = prompts.to(device)
    n_draws, (n_prompts, length) = targets.shape[0], prompts.shape
    writes = {layer: adapter.write_weights(site, layer) for layer in layers}
    shares = all(w is not None for w in writes.values())
    width = adapter.width(site)
    score = {layer: torch.zeros(width, dtype=torch.float64) for layer in layers}
    share = {layer: torch.zeros(width, dtype=torch.float64) for layer in layers}
    rows = [(s, b) for s in range(n_draws) for b in range(n_prompts)]
    for first in range(0, len(rows), max_rows):
        part = rows[first : first + max_rows]
        ids = prompts[[b for _, b in part]]  # (R, T)
        y = torch.stack([targets[s, b] for s, b in part]).to(device)  # (R, T)
        leaves: dict[int, torch.Tensor] = {}
        deltas: dict[int, torch.Tensor] = {}
        streams: dict[int, torch.Tensor] = {}
        with ExitStack() as stack:
            for layer in layers:

                def add_leaf(
                    value: torch.Tensor, layer: int = layer, leaves=leaves, deltas=deltas
                ) -> torch.Tensor:
                    # value (R, T, W): the site's activation a; δ = v − a, the leaf reads ∂/∂a
                    base = value.detach()
                    v = means[(site, layer)].to(base) if method == "mean" else 0.0
                    deltas[layer] = (v - base).double()
                    leaves[layer] = torch.zeros_like(base, requires_grad=True)
                    return value + leaves[layer]

                stack.enter_context(adapter.patch(site, layer, add_leaf))
            if shares:

                def keep_stream(_site: str, layer: int, value: torch.Tensor, streams=streams):
                    streams[layer] = value.detach()  # (R, T, d)

                stack.enter_context(adapter.read([("resid", t) for t in layers], keep_stream))
            logits = model(input_ids=ids, use_cache=False).logits  # (R, T, V)
            log_p = torch.log_softmax(logits, -1).gather(-1, y[..., None]).sum()
        grads = torch.autograd.grad(log_p, [leaves[layer] for layer in layers])
        for layer, grad in zip(layers, grads, strict=True):
            per_row = (grad.double() * deltas[layer]).sum(1)  # (R, W): Σ_t G_t δ_t
            score[layer] += per_row.square().sum(0).cpu()
            if shares:
                norm = writes[layer].double().square().sum(1).to(device)  # (W,) ‖w_n‖²
                energy = streams[layer].double().square().sum(-1, keepdim=True)  # (R, T, 1)
                moved = deltas[layer].square() * norm / energy.clamp_min(1e-300)  # (R, T, W)
                share[layer] = torch.maximum(share[layer], moved.amax((0, 1)).cpu())
    scale = 1.0 / (2.0 * n_prompts * length * n_draws)
    return KLScreen(
        kl={layer: score[layer] * scale for layer in layers},
        residual_share=share if shares else None,
    )


class ScreenCache:
    """The screens of one model on the same prompts and draws, each (site, layer) computed
    once: the causal sweep and the sweep of given sets at the same site (GPT-2's
    high-variance neurons at ``mlp``) share them. A layer's κ̂ and ρ do not depend on
    which other layers are screened with it (tested)."""

    def __init__(
        self,
        loaded: LoadedModel,
        prompts: torch.Tensor,
        *,
        method: str = "zero",
        means: Mapping[tuple[str, int], torch.Tensor] | None = None,
        samples: int = SCREEN_SAMPLES,
        seed: int = 0,
    ):
        self.loaded, self.prompts, self.method = loaded, prompts, method
        self._options = {"method": method, "means": means, "samples": samples, "seed": seed}
        self._kl: dict[tuple[str, int], torch.Tensor] = {}
        self._share: dict[tuple[str, int], torch.Tensor | None] = {}

    def screen(self, site: str, layers: Sequence[int]) -> KLScreen:
        """:func:`kl_screen` of ``site`` at ``layers``, computing only the layers not seen."""
        missing = [layer for layer in layers if (site, layer) not in self._kl]
        if missing:
            new = kl_screen(self.loaded, self.prompts, missing, site=site, **self._options)
            for layer in missing:
                self._kl[(site, layer)] = new.kl[layer]
                shares = new.residual_share
                self._share[(site, layer)] = None if shares is None else shares[layer]
        shares = [self._share[(site, layer)] for layer in layers]
        return KLScreen(
            kl={layer: self._kl[(site, layer)] for layer in layers},
            residual_share=None
            if any(s is None for s in shares)
            else dict(zip(layers, shares, strict=True)),
        )
