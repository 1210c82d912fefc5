"""Mamba's hidden attention α̃ and its rollout (METHODS.md §7).

Ali, Zimerman, Wolf (2024), "The Hidden Attention of Mamba Models", eq. 9-12. Per layer
and channel c, with ``S = cumsum`` over positions of Δ_c::

    α̃_c[i, j] = Σ_n C_i[n] · exp(A[c, n]·(S_i − S_j)) · Δ_j[c] · B_j[n]   for j ≤ i,  0 for j > i

so that the scan output before the D skip and the gate is ``y_i[c] = Σ_j α̃_c[i, j] x_j[c]``
and the mixer's output is ``out_proj(((α̃x) + D ⊙ x) ⊙ SiLU(z))`` (both exact; the tests check
them in float64 to 1e-10). Shapes: per layer α̃ is ``(B, d_inner, L, L)``.

**Computation** (:func:`iter_hidden_attention`), by blocks of Q = :data:`POSITION_BLOCK`
query positions, as chunked SSM scans do (Dao & Gu 2024, "Transformers are SSMs", §6). With
``S = cumsum(Δ_c)`` in float64 and s the block's first position, for i in the block:

- *earlier columns* j < s: ``exp(A(S_i − S_j)) = exp(A(S_i − S_s)) · exp(A(S_s − S_j))``,
  so the block's rows are one product ``L @ R`` of ``L[i, n] = C_i[n]·exp(A[c, n](S_i − S_s))``
  ``(Q, N)`` and ``R[n, j] = exp(A[c, n](S_s − S_j))·Δ_j B_j[n]`` ``(N, s)``. Both exponents
  are ≤ 0 (Δ ≥ 0, A < 0), so no factor overflows, however long the window. ``R`` is carried
  from block to block: multiplied by ``exp(A(S_s − S_{s'}))`` (s' the previous block's start)
  and extended by the previous block's columns.
- *the block itself* j ∈ [s, i]: for the channels whose span max_n|A[c, n]|·(S_{e−1} − S_s)
  ≤ ½·ln(max of the dtype) (44 in float32), also one product, of ``L`` and
  ``exp(A(S_s − S_j))·Δ_j B_j`` (factors ≤ e^span), masked to j ≤ i; for the others from
  the pairwise differences, ``(Q, Q, N)`` per channel, every exponent ≤ 0 (the tests take
  both paths). On a random mamba-130m, 80% of (block, channel) pairs have a span ≤ 44.

The channel mean (:func:`channel_mean_attention`) contracts channels and states together:
one ``(Q, k·N) @ (k·N, s)`` product per block. Channels are processed in chunks of k so that
one chunk's rows ``(B, k, L, L)``, ``R`` and the block terms stay within ``memory_bytes``
(:func:`channel_chunk`; default :data:`DEFAULT_MEMORY_BYTES`); the naive ``[B, d, L, L, N]``
temporary is never formed. The exact row recurrence over i (``M_i = Ā_i ⊙ M_{i−1}``, every
factor Ā_t = exp(Δ_t A) ≤ 1) is the tests' reference; the official code's row shortcut misses
one Ā factor (not copied).

**Rollout** (Abnar & Zuidema 2020): ``Â_l = row-normalise(I + U(A_l))``, ``R = Â_{L-1} ⋯ Â_0``;
the last row of R is the relevance of each input token for the last position. ``U`` scales
each row of the layer matrix to unit mass (Σ_j |A[i, j]| = 1; an all-zero row stays zero),
so that I and the attention weigh equally in every row, as in GPT-2 whose attention rows sum
to 1 (there U changes nothing): Mamba's raw rows of mean |α̃| reach 5.9 on tiny-mamba, where
I would carry a different share in every row. The layer matrix A_l is the channel aggregate
of α̃ (:func:`channel_aggregate`, ``--attention-aggregate``): by default **clamped**, the
positive part of the channel mean (mean_c α̃)⁺ as the official code clamps, so inhibition
(negative α̃) is not counted as relevance; ``abs`` takes mean_c |α̃| (it does count it);
``mean`` the signed mean of METHODS §7, rolled out as METHODS writes it, without U (scaling a
signed row by its mass would make a row of all-negative α̃ cancel I), which raises where a
row of I + A sums to ≤ 0: on tiny-mamba a row of layer 2 sums to −3.27. GPT-2's counterpart uses its real attention probabilities,
mean over heads (:func:`gpt2_attention`).

**Gradient-guided rollout** (Mamba-Attr flavour, METHODS §7): with ŷ the gated output (the
``mlp`` site) and g = ∂logit_target/∂ŷ, the gradient of the logit with respect to α̃ is
exactly ``∇_c[i, j] = g_i[c] · SiLU(z_i[c]) · x_j[c]`` (ŷ is linear in α̃), so
``E_c[∇] = (g ⊙ SiLU(z)) xᵀ / d`` is one matmul per layer. As Mamba-Attr's code does, both
factors are min-max normalised over the causal entries (j ≤ i) of each prompt before they are
combined: ``A_l = mm(E_c[∇]) ⊙ mm(E_c[α̃])`` (≥ 0), then rolled out as above. Without it
(``I + (E_c[∇] ⊙ E_c[α̃])⁺`` with the raw products) the non-identity part of a row was
1e-7–1e-3 against 1 for I, and the last token kept 99.8–99.99% of the relevance: the rollout
was the identity. The target is the model's top-1 prediction at the last position.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from neuronspec.errors import NeuronSpecError
from neuronspec.findings import Finding
from neuronspec.models.adapters import adapter_for
from neuronspec.models.mamba_internals import ScanInputs
from neuronspec.options import AGGREGATES

DEFAULT_MEMORY_BYTES = 256 * 2**20
"""Bound on one channel chunk's working set (rows α̃, the factors and block terms): 256 MiB."""
POSITION_BLOCK = 16
"""Query positions per block of the chunked computation (module docstring)."""


def channel_chunk(
    batch: int, length: int, n_state: int, itemsize: int, memory_bytes: int = DEFAULT_MEMORY_BYTES
) -> int:
    """Channels per chunk: one channel costs ``B·(L·(L + 3N) + 2·Q²·N)`` numbers (rows α̃;
    ``R``, ``Δ·B`` and exponents, each ``(B, L, N)``; the block's pairwise terms)."""
    block = min(POSITION_BLOCK, length)
    per_channel = batch * (length * (length + 3 * n_state) + 2 * block * block * n_state)
    return max(1, memory_bytes // (per_channel * itemsize))


def iter_hidden_attention(
    inputs: ScanInputs,
    *,
    channels: Sequence[int] | torch.Tensor | None = None,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(channel ids (k,), α̃ (B, k, L, L))`` chunk by chunk over ``channels`` (all)."""
    for chunk in _channel_chunks(inputs, channels, memory_bytes):
        yield chunk, _alpha_chunk(inputs, chunk.to(inputs.x.device))


def _channel_chunks(
    inputs: ScanInputs, channels: Sequence[int] | torch.Tensor | None, memory_bytes: int
) -> list[torch.Tensor]:
    b, length, d, n = inputs.shape
    index = torch.arange(d) if channels is None else torch.as_tensor(channels, dtype=torch.long)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= d):
        raise NeuronSpecError(f"channel index out of range for d_inner = {d}")
    k = channel_chunk(b, length, n, inputs.x.element_size(), memory_bytes)
    return [index[start : start + k] for start in range(0, index.numel(), k)]


def block_product_limit(dtype: torch.dtype) -> float:
    """Largest span |A|·(S_{e−1} − S_s) of a block computed as a product: ½·ln(max of
    ``dtype``), so a factor e^span leaves √max for the others (44 in float32)."""
    return 0.5 * math.log(torch.finfo(dtype).max)


def _gap(later: torch.Tensor, earlier: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``later − earlier`` of the float64 cumulative sums S, then in the inputs' ``dtype``:
    the difference is exact to S's rounding, and the exponentials of A·(difference) that
    follow run in ``dtype`` (float32: each factor within 3e-6 of float64's at the largest
    exponent a block allows, 44; float64 inputs stay float64 throughout)."""
    return (later - earlier).to(dtype)


def _blocks(
    inputs: ScanInputs, chunk: torch.Tensor
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per block of query positions [s, e): ``(s, e, L (B, k, Q, N), R (B, k, N, s),
    block terms (B, k, Q, Q))`` of the channels ``chunk`` (module docstring)."""
    b, length, _, n = inputs.shape
    dtype = inputs.x.dtype
    delta = inputs.delta[:, :, chunk].transpose(1, 2)  # (B, k, L)
    cumulative = delta.double().cumsum(-1)  # (B, k, L): S
    A = inputs.A[chunk].to(dtype)[None, :, None, :]  # (1, k, 1, N)
    u = delta[..., None] * inputs.B[:, None, :, :]  # (B, k, L, N): Δ_j B_j
    C = inputs.C[:, None, :, :]  # (B, 1, L, N)
    rate = -inputs.A[chunk].double().amin(1)[None, :]  # (1, k): max_n |A[c, n]|
    limit = block_product_limit(dtype)
    right = u.new_zeros(b, chunk.numel(), n, length)  # (B, k, N, L): R, columns < s filled
    previous = 0
    for start in range(0, length, POSITION_BLOCK):
        stop = min(start + POSITION_BLOCK, length)
        here = cumulative[:, :, start, None, None]  # (B, k, 1, 1): S_s
        if start:
            carry = (_gap(here, cumulative[:, :, previous, None, None], dtype) * A).exp()
            right[..., :previous] *= carry.transpose(-1, -2)  # (B, k, N, 1)
            gap = _gap(here, cumulative[:, :, previous:start, None], dtype) * A  # (B, k, s-s', N)
            right[..., previous:start] = (gap.exp() * u[:, :, previous:start]).transpose(-1, -2)
        rows = cumulative[:, :, start:stop, None]  # (B, k, Q, 1)
        left = (_gap(rows, here, dtype) * A).exp() * C[:, :, start:stop]  # (B, k, Q, N)
        causal = torch.ones(stop - start, stop - start, dtype=torch.bool, device=left.device)
        causal = causal.tril()  # (Q, Q): j <= i
        span = (cumulative[:, :, stop - 1] - cumulative[:, :, start]) * rate  # (B, k)
        # the block as one product: exp(A(S_s − S_j)) ≤ e^span stays finite where span ≤
        # limit (clamped elsewhere, and those channels redone from pairwise differences)
        growth = (_gap(here, rows, dtype) * A).clamp_max(limit).exp()  # (B, k, Q, N)
        block = (left @ (growth * u[:, :, start:stop]).transpose(-1, -2)) * causal  # (B, k, Q, Q)
        wide = torch.nonzero((span > limit).any(0), as_tuple=True)[0]  # (k',) channels
        if len(wide):  # pairwise differences: every exponent ≤ 0
            cum = cumulative[:, wide]  # (B, k', L)
            pairwise = _gap(
                cum[:, :, start:stop, None, None], cum[:, :, None, start:stop, None], dtype
            )
            pairwise = pairwise * A[:, wide, None]  # (B, k', Q, Q, N)
            decay = pairwise.clamp_max(0.0).exp() * causal[..., None]
            block[:, wide] = torch.einsum(
                "bin,bkijn,bkjn->bkij", C[:, 0, start:stop], decay, u[:, wide, start:stop]
            )
        yield start, stop, left, right[..., :start], block
        previous = start


def _alpha_chunk(inputs: ScanInputs, chunk: torch.Tensor) -> torch.Tensor:
    """α̃ of the channels ``chunk`` (k,): ``(B, k, L, L)``, by blocks of query positions."""
    b, length, _, _ = inputs.shape
    alpha = inputs.x.new_zeros(b, chunk.numel(), length, length)  # (B, k, L, L)
    for start, stop, left, right, block in _blocks(inputs, chunk):
        alpha[:, :, start:stop, :start] = left @ right
        alpha[:, :, start:stop, start:stop] = block
    return alpha


def hidden_attention(
    inputs: ScanInputs, channels: Sequence[int] | torch.Tensor | None = None
) -> torch.Tensor:
    """α̃ of the chosen channels (default all), ``(B, k, L, L)``: small inputs and tests only."""
    return torch.cat([alpha for _, alpha in iter_hidden_attention(inputs, channels=channels)], 1)


def channel_mean_attention(
    inputs: ScanInputs, *, absolute: bool = False, memory_bytes: int = DEFAULT_MEMORY_BYTES
) -> torch.Tensor:
    """Mean over channels of α̃ (or of |α̃|), ``(B, L, L)``, chunked within ``memory_bytes``.
    The signed mean contracts channels and states in one product per block (no per-channel
    rows); |α̃| needs each channel's rows."""
    b, length, d, n = inputs.shape
    total = inputs.x.new_zeros(b, length, length)  # (B, L, L)
    if absolute:
        for _, alpha in iter_hidden_attention(inputs, memory_bytes=memory_bytes):
            total += alpha.abs_().sum(1)
        return total / d
    for chunk in _channel_chunks(inputs, None, memory_bytes):
        for start, stop, left, right, block in _blocks(inputs, chunk.to(inputs.x.device)):
            k = chunk.numel()
            rows = left.permute(0, 2, 1, 3).reshape(b, stop - start, k * n)  # (B, Q, k·N)
            total[:, start:stop, :start] += rows @ right.reshape(b, k * n, start)
            total[:, start:stop, start:stop] += block.sum(1)
    return total / d


@dataclass(frozen=True)
class LayerAttention:
    """Channel aggregates of one layer's α̃, from one sweep over the channel chunks."""

    mean: torch.Tensor  # (B, L, L) channel mean of α̃
    abs_mean: torch.Tensor  # (B, L, L) channel mean of |α̃|
    y: torch.Tensor  # (B, L, d) Σ_j α̃_c[i, j] x_j[c]: the scan output before skip and gate
    weighted: torch.Tensor  # (B, d) mean_i Σ_j |α̃_c[i, j] x_j[c]| (attention_weighted)
    last_row_mass: torch.Tensor  # (B, d, L) |α̃_c[L-1, j]|: the last query's mass on token j
    above_diagonal_max: float  # max |α̃_c[i, j]| over j > i (0 for a causal α̃)


def layer_attention(
    inputs: ScanInputs, *, memory_bytes: int = DEFAULT_MEMORY_BYTES
) -> LayerAttention:
    """All channel aggregates of one layer in one chunked sweep (module docstring)."""
    b, length, d, _ = inputs.shape
    x = inputs.x  # (B, L, d)
    total = x.new_zeros(b, length, length)  # (B, L, L)
    total_abs = x.new_zeros(b, length, length)  # (B, L, L)
    y = torch.empty_like(x)  # (B, L, d)
    weighted = x.new_empty(b, d)  # (B, d)
    last_row_mass = x.new_empty(b, d, length)  # (B, d, L)
    above = 0.0
    upper = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)  # (L, L)
    # alpha, |alpha| and alpha·x are alive at once: a third of the budget each
    for chunk, alpha in iter_hidden_attention(inputs, memory_bytes=memory_bytes // 3):
        xc = x[:, :, chunk].transpose(1, 2)  # (B, k, L)
        total += alpha.sum(1)
        magnitude = alpha.abs()  # (B, k, L, L)
        total_abs += magnitude.sum(1)
        contribution = alpha * xc[:, :, None, :]  # (B, k, L, L): α̃_c[i, j] x_j[c]
        y[:, :, chunk] = contribution.sum(-1).transpose(1, 2)  # (B, L, k)
        weighted[:, chunk] = contribution.abs_().sum(-1).mean(-1)  # (B, k)
        last_row_mass[:, chunk] = magnitude[:, :, -1]  # (B, k, L)
        above = max(above, float(magnitude[..., upper].max()) if length > 1 else 0.0)
    return LayerAttention(
        mean=total / d,
        abs_mean=total_abs / d,
        y=y,
        weighted=weighted,
        last_row_mass=last_row_mass,
        above_diagonal_max=above,
    )


# -- rollout -------------------------------------------------------------------------------------


def channel_aggregate(attention: LayerAttention, aggregate: str) -> torch.Tensor:
    """The layer matrix a rollout takes, ``(B, L, L)``: (mean_c α̃)⁺ (``clamped``),
    mean_c |α̃| (``abs``) or mean_c α̃ (``mean``)."""
    if aggregate not in AGGREGATES:
        raise NeuronSpecError(
            f"unknown attention aggregate {aggregate!r}; known: {', '.join(AGGREGATES)}"
        )
    if aggregate == "clamped":
        return attention.mean.clamp_min(0)
    return attention.abs_mean if aggregate == "abs" else attention.mean


def unit_rows(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` ``(B, L, L)`` with each row scaled to Σ_j |·| = 1 (all-zero rows stay 0)."""
    mass = matrix.abs().sum(-1, keepdim=True)  # (B, L, 1)
    return torch.where(mass > 0, matrix / mass.clamp_min(torch.finfo(matrix.dtype).tiny), 0.0)


def rollout(attentions: Sequence[torch.Tensor], *, unit: bool = True) -> torch.Tensor:
    """R = Â_{L-1} ⋯ Â_0 with Â_l = row-normalise(I + U(A_l)) (:func:`unit_rows`; without U
    when ``unit`` is false: the signed aggregate); ``attentions`` are ``(B, L, L)`` in layer
    order. Returns ``(B, L, L)``; ``R[:, -1]`` is the last token's relevance."""
    if not attentions:
        raise NeuronSpecError("rollout needs at least one layer's attention")
    b, length, _ = attentions[0].shape
    eye = torch.eye(length, dtype=attentions[0].dtype, device=attentions[0].device)  # (L, L)
    result = eye.expand(b, length, length)
    for layer, attention in enumerate(attentions):
        mixed = eye + (unit_rows(attention) if unit else attention)  # (B, L, L)
        rows = mixed.sum(-1, keepdim=True)  # (B, L, 1)
        if not bool((rows > 0).all()):
            raise NeuronSpecError(
                f"rollout: a row of I + A at layer {layer} sums to {float(rows.min()):.3g} <= 0; "
                "roll out a non-negative aggregate (--attention-aggregate clamped or abs)"
            )
        result = torch.matmul(mixed / rows, result)  # (B, L, L)
    return result


def gradient_attention(inputs: ScanInputs, grad_out: torch.Tensor) -> torch.Tensor:
    """E_c[∇] ``(B, L, L)``: channel mean of ∂logit/∂α̃_c[i, j] = g_i[c] SiLU(z_i[c]) x_j[c],
    with ``grad_out`` = g = ∂logit/∂ŷ ``(B, L, d)`` (the ``mlp`` site's gradient), causal."""
    d = inputs.x.shape[-1]
    weighted = grad_out.to(inputs.x.dtype) * torch.nn.functional.silu(inputs.z)  # (B, L, d)
    mean = torch.matmul(weighted, inputs.x.transpose(1, 2)) / d  # (B, L, L)
    return mean.tril()


def alpha_gradient(
    inputs: ScanInputs, grad_out: torch.Tensor, channels: Sequence[int]
) -> torch.Tensor:
    """∂logit/∂α̃_c[i, j] per chosen channel, ``(B, k, L, L)`` (for tests and figures)."""
    index = torch.as_tensor(channels, dtype=torch.long)
    weighted = grad_out.to(inputs.x.dtype) * torch.nn.functional.silu(inputs.z)  # (B, L, d)
    g = weighted[:, :, index].transpose(1, 2)  # (B, k, L)
    x = inputs.x[:, :, index].transpose(1, 2)  # (B, k, L)
    return (g[..., :, None] * x[..., None, :]).tril()  # (B, k, L, L)


def min_max_causal(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` ``(B, L, L)`` mapped to [0, 1] per prompt over its causal entries (j ≤ i),
    0 above the diagonal; a constant prompt maps to 0."""
    length = matrix.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=matrix.device).tril()
    low = matrix.masked_fill(~causal, float("inf")).amin((-2, -1), keepdim=True)
    high = matrix.masked_fill(~causal, float("-inf")).amax((-2, -1), keepdim=True)
    span = high - low
    scaled = torch.where(
        span > 0, (matrix - low) / span.clamp_min(torch.finfo(matrix.dtype).tiny), 0.0
    )
    return scaled.masked_fill(~causal, 0.0)


def gradient_rollout_layer(mean_alpha: torch.Tensor, grad_attention: torch.Tensor) -> torch.Tensor:
    """The gradient-guided layer matrix before ``I +`` and normalising:
    mm(E_c[∇]) ⊙ mm(E_c[α̃]) with mm = :func:`min_max_causal` (module docstring)."""
    return min_max_causal(grad_attention) * min_max_causal(mean_alpha)


# -- findings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HiddenAttentionLayerFinding(Finding):
    """One layer's α̃ on the run's prompts (``hidden_attention``, per layer)."""

    model: str
    layer: int
    n_prompts: int
    length: int
    n_channels: int
    above_diagonal_max: float  # max |α̃| above the diagonal: 0 for a causal α̃
    identity_rel_error: float  # max |Σ_j α̃ x − scan| / max |scan| (scan before skip and gate)
    mixer_rel_error: float  # max |out_proj(((α̃x) + D⊙x) ⊙ SiLU(z)) − mixer| / max |mixer|
    diagonal_share: float  # share of the channel-mean |α̃| mass on the diagonal (i = j)
    mean_distance: float  # mean |i − j| under the row-normalised channel-mean |α̃|


@dataclass(frozen=True)
class RolloutFinding(Finding):
    """Last-token rollout relevance over prompts (``hidden_attention``, layer ``rollout``)."""

    model: str
    method: str  # "rollout" or "gradient_rollout"
    aggregate: str  # layer matrix: "clamped", "abs" or "mean" of α̃ over channels (gradient
    # rollout: min-max gradient ⊙ mean); GPT-2: "heads". Rows are scaled to unit mass before I.
    n_prompts: int
    length: int
    normalisation: str  # how each layer matrix is scaled before I is added
    relevance_first_prompt: tuple[float, ...]  # (L,) last token's relevance, first prompt
    last_token_share: float  # mean relevance the last token keeps for itself
    first_token_share: float  # mean relevance of the first token


def attention_distance(abs_mean: torch.Tensor) -> tuple[float, float]:
    """(share of mass on the diagonal, mean |i − j|) of a channel-mean |α̃| ``(B, L, L)``."""
    length = abs_mean.shape[-1]
    rows = abs_mean / abs_mean.sum(-1, keepdim=True).clamp_min(torch.finfo(abs_mean.dtype).tiny)
    position = torch.arange(length, dtype=abs_mean.dtype, device=abs_mean.device)
    distance = (position[:, None] - position[None, :]).abs()  # (L, L)
    diagonal = rows.diagonal(dim1=-2, dim2=-1).mean()
    return float(diagonal), float((rows * distance).sum(-1).mean())


# -- GPT-2 ---------------------------------------------------------------------------------------


def gpt2_attention(model: torch.nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """GPT-2's attention probabilities per layer, mean over heads: ``[(B, L, L)]``.

    Runs one eager-attention forward (sdpa returns no probabilities); the model's attention
    implementation is restored afterwards.
    """
    with adapter_for(model).eager_attention(), torch.no_grad():
        out = model(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            output_attentions=True,
            use_cache=False,
        )
    return [a.mean(1) for a in out.attentions]  # L × (B, L, L)
