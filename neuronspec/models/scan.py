"""A fast, exact selective scan for Hugging Face ``MambaForCausalLM`` on CPU.

Without the ``mamba_ssm`` kernels, transformers' ``MambaMixer`` runs its selective scan
as a Python loop over positions that reads strided slices of ``[b, d, L, N]`` tensors.
This module replaces that loop with a chunked scan on contiguous, channels-last
buffers, wrapped in a custom autograd function whose backward is a reverse scan, and
wires it into a model per ``MambaMixer`` instance (:func:`use_fast_scan`).

The recurrence (Gu & Dao 2023, *Mamba*, eq. 2a/2b, zero-order-hold discretisation as
in transformers' ``mamba_selective_scan``), per batch row, channel ``c`` and state
``n``, with ``h_0 = 0``::

    Δ_t       = softplus(dt_t + delta_bias)            (when delta_softplus)
    h_t[c, n] = exp(Δ_t[c] A[c, n]) h_{t-1}[c, n] + Δ_t[c] B_t[n] x_t[c]    (2a)
    y_t[c]    = Σ_n C_t[n] h_t[c, n]                                        (2b)
    out_t[c]  = (y_t[c] + D[c] x_t[c]) · SiLU(z_t[c])

Chunked algebra. The positions are cut into chunks of ``T`` (default
:data:`DEFAULT_CHUNK`). For a chunk, the decays ``Ā_t = exp(Δ_t A)`` and the inputs
``u_t = Δ_t x_t B_t`` are built with a few large vectorised operations over the whole
chunk, ``[b, T, N, d]`` with channels last (batch-major, the layout the mixer's
projections already use, so no transposes of ``[b, L, d]`` tensors are needed). The
recurrence inside the chunk is then one in-place fused multiply-add per position on a
``[b, N, d]`` slab (``H_t += Ā_t ⊙ H_{t-1}``), the chunk's outputs are a single batched
matrix product ``y_t = C_t · H_t`` (``[b·T, 1, N] @ [b·T, N, d]``), and only the last
state is carried into the next chunk. Every factor is formed as ``exp`` of a non-positive number (no
``exp(-S)`` rescaling), so nothing can overflow, and the additions happen in the same
order as the reference loop: the result matches it to rounding. ``exp(ΔA)`` is
computed as ``exp2(Δ · A·log2 e)``, which torch evaluates about 3x faster than ``exp``
on CPU at the same accuracy. Nothing of size ``[b, d, L, L, N]`` (nor ``[b, d, L, N]``)
is allocated: the working set is a few ``[b, T, N, d]`` buffers, plus, when a
backward pass will follow, one ``[b, N, d]`` state per chunk boundary, from which the
backward recomputes each chunk. A straight loop over positions with the same layout
costs about the same arithmetic but ~5 small ops per position instead of 1, and the
``exp(S_i - S_j)`` "segment-sum" form (Mamba-2 style) needs ``T``x more ``exp``: with a
decay per (channel, state) pair it does not reduce to matmuls as it does for Mamba-2.

Backward (reverse scan). With ``G_t = ∂loss/∂h_t`` accumulated from the future::

    G_t      = C_t ⊗ ∂y_t + Ā_{t+1} ⊙ G_{t+1}
    ∂u_t     = G_t
    ∂(ΔA)_t  = G_t ⊙ h_{t-1} ⊙ Ā_t                          (W_t below)
    ∂Δ_t[c]  = Σ_n W_t[c, n] A[c, n] + x_t[c] Σ_n B_t[n] G_t[c, n]
    ∂x_t[c]  = Δ_t[c] Σ_n B_t[n] G_t[c, n]
    ∂B_t[n]  = Σ_c G_t[c, n] Δ_t[c] x_t[c]
    ∂C_t[n]  = Σ_c ∂y_t[c] h_t[c, n]
    ∂A[c, n] = Σ_{b, t} W_t[c, n] Δ_t[c]

Precision. Computation happens in the promoted dtype of the inputs (float32 or
float64); bfloat16 and float16 inputs are scanned in float32 (as mamba_ssm's kernels do)
and the mixer casts the result back to the model's dtype. transformers' reference scan casts ``B`` and ``x`` to float32 inside
``Δ·B·x`` (``.float()``) even for a float64 model; this scan does not, so in float64 it
agrees with the reference only to ~1e-7 relative, and with an exact float64 scan to
rounding. ``A``, ``D`` and ``delta_bias`` reach the scan as float32 in both paths
because ``MambaMixer.forward`` casts them before calling it (kept as is).

Hooking into ``MambaMixer``: :func:`use_fast_scan` gives each mixer *instance* a
``forward`` attribute bound to :func:`_fast_mixer_forward` (``types.MethodType``),
which shadows the class method; ``use_fast_scan(model, False)`` deletes it, so the class
method, untouched, runs again. Chosen over monkeypatching ``modeling_mamba`` because
it is scoped to one model (other models in the process keep the reference path), it
does not fight the hub-kernel decorators (``mamba_selective_scan`` is a module global
wrapped by ``use_kernel_func_from_hub_with_fallback`` and looked up by the class's
``forward`` at call time; ``use_kernelized_func`` is a no-op without the ``kernels``
package), and over a subclass swap because ``type(mixer)`` and ``isinstance`` stay what
transformers made. The fast forward mirrors transformers 5.x's full-sequence branches
step by step and still calls ``in_proj``, ``x_proj`` and ``out_proj`` as modules, so
hooks on them fire with the same tensors. Those branches run whenever ``seq_len > 1``,
including with a cache: ``MambaModel`` creates a ``DynamicCache`` on every eval forward
unless ``use_cache=False``, so the prompt (prefill) goes through the fast scan and the
cache receives the same conv and recurrent states as on the reference path. Single-token
steps with a cache (generation) call the class's own ``forward`` (no loop to speed up).
With ``mamba_ssm`` installed the reference path would use its fused kernels; the fast
path does not look for them.
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.accelerate import force_accelerate_hooks
from transformers.models.mamba import modeling_mamba
from transformers.models.mamba.modeling_mamba import MambaMixer

from neuronspec.errors import NeuronSpecError
from neuronspec.models.delta import (
    DT_PATCHES,
    DT_SUM_READERS,
    FAST_SCAN_FORWARD,
    is_fast_mixer,
    mamba_delta,
)
from neuronspec.models.kernel import kernel_conv_silu, kernel_scan
from neuronspec.native import kernels_available, load_library

__all__ = [
    "BACKENDS",
    "DEFAULT_CHUNK",
    "UnsupportedScanInputError",
    "is_fast_scan_enabled",
    "selective_scan",
    "use_fast_scan",
]

DEFAULT_CHUNK = 16
"""Positions per chunk. Measured on 2 CPU cores, mamba-130m shape, 4×256 tokens, whole
forward: T=4 2.26 s, 8 2.16 s, 16 2.14 s, 32 2.16 s, 64 2.42 s; larger chunks fall out of
cache, smaller ones pay more per-op overhead."""

BACKENDS = ("auto", "kernel", "chunked")
"""``kernel``: the C kernel (:mod:`neuronspec.models.kernel`), forward only, CPU;
``chunked``: the differentiable chunked torch scan below; ``auto``: the kernel when no
gradient is needed on the CPU and it builds, else chunked."""

_SUPPORTED_DTYPES = (torch.float32, torch.float64)  # the kernels' and the scan's arithmetic
_HALF_DTYPES = (torch.bfloat16, torch.float16)  # accepted as inputs, scanned in float32
_LOG2_E = 1.0 / math.log(2.0)


class UnsupportedScanInputError(NeuronSpecError, ValueError):
    """Inputs of :func:`selective_scan` with shapes or dtypes it does not handle."""


def _check_inputs(x, dt, A, B, C, D, z, delta_bias) -> torch.dtype:
    named = {"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise UnsupportedScanInputError(f"selective_scan: {name} must be a tensor, got {t!r}")
        if t.dtype not in _SUPPORTED_DTYPES + _HALF_DTYPES:
            raise UnsupportedScanInputError(
                f"selective_scan: {name} has dtype {t.dtype}; float32 and float64 are "
                "supported, bfloat16 and float16 are scanned in float32 (convert the model, "
                "or call use_fast_scan(model, False) for the reference path)"
            )
        if t.device != x.device:
            raise UnsupportedScanInputError(
                f"selective_scan: {name} is on {t.device} but x is on {x.device}"
            )
    if x.dim() != 3:
        raise UnsupportedScanInputError(
            f"selective_scan: x must be (B, d, L), got {tuple(x.shape)}"
        )
    b, d, L = x.shape
    if L == 0:
        raise UnsupportedScanInputError("selective_scan: empty sequence (L = 0)")
    if A.dim() != 2 or A.shape[0] != d:
        raise UnsupportedScanInputError(
            f"selective_scan: A must be (d={d}, N), got {tuple(A.shape)}"
        )
    N = A.shape[1]
    expected = {
        "dt": (dt, (b, d, L)),
        "B": (B, (b, N, L)),
        "C": (C, (b, N, L)),
        "D": (D, (d,)),
        "z": (z, (b, d, L)),
        "delta_bias": (delta_bias, (d,)),
    }
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise UnsupportedScanInputError(
                f"selective_scan: {name} must have shape {shape}, got {tuple(t.shape)}"
            )
    dtype = x.dtype
    for t in (dt, A, B, C):
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.float32 if dtype in _HALF_DTYPES else dtype


def selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    return_last_state: bool = False,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan with the semantics of transformers' ``mamba_selective_scan``.

    Shapes: x, dt, z ``(B, d, L)``; A ``(d, N)``; B, C ``(B, N, L)``; D, delta_bias ``(d,)``.
    Returns ``(B, d, L)`` in the promoted dtype of x, dt, A, B, C (float32 or float64;
    float32 for bfloat16 or float16 inputs),
    i.e. ``(y + D·x) · SiLU(z)`` with ``y`` from eq. 2a/2b (module docstring), the skip
    and the gate only when D and z are given. With ``return_last_state`` also returns
    ``h_L``, ``(B, d, N)``, as the reference does. Differentiable w.r.t. every tensor
    input, through both outputs (first order only). ``backend`` is one of
    :data:`BACKENDS`; ``chunk_size`` applies to the chunked scan.
    """
    dtype = _check_inputs(x, dt, A, B, C, D, z, delta_bias)
    y, h_last = _scan_bl(
        x.transpose(1, 2),  # (B, L, d)
        dt.transpose(1, 2),  # (B, L, d)
        A,
        B.transpose(1, 2),  # (B, L, N)
        C.transpose(1, 2),  # (B, L, N)
        D,
        None if z is None else z.transpose(1, 2),  # (B, L, d)
        delta_bias,
        delta_softplus,
        chunk_size,
        dtype,
        backend,
    )  # (B, L, d), (B, d, N)
    y = y.transpose(1, 2).contiguous()  # (B, d, L)
    return (y, h_last) if return_last_state else y


def _scan_bl(
    x, dt, A, B, C, D, z, delta_bias, delta_softplus, chunk_size, dtype, backend, delta_sum=None
):
    """:func:`selective_scan` on batch-major ``(B, L, ·)`` inputs (already checked).

    Returns ``y`` ``(B, L, d)`` (skip and gate applied) and ``h_L`` ``(B, d, N)``; fills
    ``delta_sum`` ``(B, d)`` float64, if given, with Σ_t Δ_t (no gradient).
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise UnsupportedScanInputError(
            f"selective_scan: chunk_size must be an int >= 1, got {chunk_size!r}"
        )
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dt, A, B, C, D, z, delta_bias)
    )
    if _use_kernel(backend, needs_grad, x.device):
        cast = [None if t is None else t.to(dtype) for t in (dt, x, A, B, C, D, z, delta_bias)]
        return kernel_scan(*cast, delta_softplus, delta_sum)  # (B, L, d), (B, d, N)
    delta = dt.to(dtype)  # (B, L, d)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)  # (B, L, d)
    if delta_softplus:
        delta = F.softplus(delta)  # (B, L, d)
    if delta_sum is not None:
        delta_sum.copy_(delta.detach().sum(1, dtype=torch.float64))  # (B, d)
    inputs = (
        delta.contiguous(),  # (B, L, d)
        x.to(dtype).contiguous(),  # (B, L, d)
        A.to(dtype),  # (d, N)
        B.to(dtype).contiguous(),  # (B, L, N)
        C.to(dtype).contiguous(),  # (B, L, N)
    )
    y, h_last = _ChunkedScan.apply(*inputs, chunk_size, needs_grad)  # (B, L, d), (B, N, d)
    if D is not None:
        y = torch.addcmul(y, x, D)  # (B, L, d)
    if z is not None:
        y = y * F.silu(z)  # (B, L, d)
    return y, h_last.transpose(1, 2)  # (B, L, d), (B, d, N)


def _use_kernel(backend: str, needs_grad: bool, device: torch.device) -> bool:
    """Whether the C kernel runs: ``auto`` picks it when no gradient is needed, on CPU."""
    if backend not in BACKENDS:
        raise UnsupportedScanInputError(
            f"selective_scan: backend must be one of {BACKENDS}, got {backend!r}"
        )
    if backend == "chunked":
        return False
    if backend == "kernel":
        if needs_grad:
            raise UnsupportedScanInputError(
                "selective_scan: the C kernel has no backward; use backend='chunked' or 'auto'"
            )
        if device.type != "cpu":
            raise UnsupportedScanInputError("selective_scan: the C kernel runs on the CPU only")
        load_library()  # raises KernelUnavailableError with the compiler's message
        return True
    if needs_grad or device.type != "cpu":
        return False
    return kernels_available()  # else the chunked torch scan (one warning per process)


class _Buffers:
    """Reusable contiguous ``(B, n, N, d)`` work buffers: one set per (chunk length, slot)."""

    def __init__(self, like: torch.Tensor, b: int, N: int, d: int, count: int):
        self.like, self.shape, self.count = like, (b, N, d), count
        self.sets: dict[tuple[int, int], list[torch.Tensor]] = {}

    def get(self, n: int, slot: int = 0) -> list[torch.Tensor]:
        if (n, slot) not in self.sets:
            b, N, d = self.shape
            self.sets[n, slot] = [self.like.new_empty(b, n, N, d) for _ in range(self.count)]
        return self.sets[n, slot]


def _decays(delta: torch.Tensor, A2t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Ā = exp(Δ·A) as exp2(Δ · A·log2 e) into ``out`` (B, n, N, d); A2t = (A·log2 e)ᵀ (N, d)."""
    torch.mul(delta[:, :, None, :], A2t, out=out)  # (B, n, N, d)
    return out.exp2_()  # (B, n, N, d)


def _inputs(dx: torch.Tensor, B: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """u = Δx ⊗ B into ``out`` (B, n, N, d) from Δx (B, n, d) and B (B, n, N)."""
    return torch.mul(dx[:, :, None, :], B[:, :, :, None], out=out)  # (B, n, N, d)


def _states(dA: torch.Tensor, H: torch.Tensor, h0: torch.Tensor) -> None:
    """In place: H_t ← Ā_t ⊙ H_{t-1} + H_t with H_{-1} = h0; H enters holding u_t."""
    Hs, dAs = H.unbind(1), dA.unbind(1)  # n × (B, N, d) views
    Hs[0].addcmul_(dAs[0], h0)
    for t in range(1, len(Hs)):
        Hs[t].addcmul_(dAs[t], Hs[t - 1])


def _chunks(L: int, T: int) -> list[tuple[int, int, int]]:
    return [(s, min(s + T, L), min(s + T, L) - s) for s in range(0, L, T)]


class _ChunkedScan(torch.autograd.Function):
    """(y, h_L) = scan(Δ, x, A, B, C), batch-major; the backward is a reverse scan."""

    @staticmethod
    def forward(ctx, delta, x, A, B, C, chunk_size, for_backward):
        # delta, x: (B, L, d); A: (d, N); B, C: (B, L, N)
        b, L, d = x.shape
        N = A.shape[1]
        chunks = _chunks(L, min(chunk_size, L))
        A2t = (A * _LOG2_E).t().contiguous()  # (N, d)
        dx = delta * x  # (B, L, d)
        y = x.new_empty(b, L, d)  # (B, L, d)
        # state entering each chunk, kept only when a backward pass will need it
        h0s = x.new_empty(len(chunks) if for_backward else 0, b, N, d)  # (chunks, B, N, d)
        h = x.new_zeros(b, N, d)  # (B, N, d)
        bufs = _Buffers(x, b, N, d, count=2)
        for k, (s, e, n) in enumerate(chunks):
            if for_backward:
                h0s[k] = h
            # alternate buffer slots: h is a view into the previous chunk's H
            dA, H = bufs.get(n, k % 2)  # (B, n, N, d) each
            _decays(delta[:, s:e], A2t, dA)
            _inputs(dx[:, s:e], B[:, s:e], H)
            _states(dA, H, h)
            y[:, s:e] = torch.bmm(
                C[:, s:e].reshape(b * n, 1, N),  # (B·n, 1, N)
                H.view(b * n, N, d),  # (B·n, N, d)
            ).view(b, n, d)  # (B, n, d)
            h = H[:, n - 1]  # (B, N, d)
        ctx.save_for_backward(delta, x, A, B, C, h0s)
        ctx.chunks = chunks
        return y, h.clone()  # (B, L, d), (B, N, d)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, g_last):
        delta, x, A, B, C, h0s = ctx.saved_tensors
        if h0s.shape[0] != len(ctx.chunks):
            raise RuntimeError("selective_scan: backward through a forward run without grad")
        b, L, d = x.shape
        N = A.shape[1]
        gy = gy.contiguous()  # (B, L, d)
        A2t = (A * _LOG2_E).t().contiguous()  # (N, d)
        At = A.t().contiguous()  # (N, d)
        dx = delta * x  # (B, L, d)
        g_delta = torch.empty_like(delta)  # (B, L, d)
        g_x = torch.empty_like(x)  # (B, L, d)
        g_B = torch.empty_like(B)  # (B, L, N)
        g_C = torch.empty_like(C)  # (B, L, N)
        g_At = torch.zeros_like(At)  # (N, d)
        bufs = _Buffers(x, b, N, d, count=3)
        # (B, N, d): what G of a chunk's last position gets from later positions,
        # Ā_{t+1} ⊙ G_{t+1}; for the sequence's last position it is ∂loss/∂h_L.
        carry = g_last.clone()
        for k in reversed(range(len(ctx.chunks))):
            s, e, n = ctx.chunks[k]
            h0 = h0s[k]  # (B, N, d)
            dA, H, G = bufs.get(n)  # (B, n, N, d) each
            _decays(delta[:, s:e], A2t, dA)
            _inputs(dx[:, s:e], B[:, s:e], H)
            _states(dA, H, h0)
            torch.mul(C[:, s:e, :, None], gy[:, s:e, None, :], out=G)  # (B, n, N, d)
            G[:, n - 1].add_(carry)  # (B, N, d)
            for t in range(n - 2, -1, -1):
                G[:, t].addcmul_(dA[:, t + 1], G[:, t + 1])  # (B, N, d)
            carry = dA[:, 0] * G[:, 0]  # (B, N, d)
            Gf = G.view(b * n, N, d)  # (B·n, N, d)
            g_C[:, s:e] = torch.bmm(H.view(b * n, N, d), gy[:, s:e].reshape(b * n, d, 1)).view(
                b, n, N
            )  # Σ_c ∂y h
            g_B[:, s:e] = torch.bmm(Gf, dx[:, s:e].reshape(b * n, d, 1)).view(b, n, N)
            P = torch.bmm(B[:, s:e].reshape(b * n, 1, N), Gf).view(b, n, d)  # Σ_n B G
            torch.mul(delta[:, s:e], P, out=g_x[:, s:e])  # (B, n, d)
            # W_t = G_t ⊙ h_{t-1} ⊙ Ā_t, built in the decay buffer
            W = dA.mul_(G)  # (B, n, N, d)
            W[:, 0].mul_(h0)  # (B, N, d)
            if n > 1:
                W[:, 1:].mul_(H[:, : n - 1])  # (B, n-1, N, d)
            g_At += torch.einsum("btnd,btd->nd", W, delta[:, s:e])  # (N, d)
            g_delta[:, s:e] = W.mul_(At).sum(2) + x[:, s:e] * P  # (B, n, d)
        return g_delta, g_x, g_At.t(), g_B, g_C, None, None


# ---------------------------------------------------------------------------------------
# MambaMixer wiring
# ---------------------------------------------------------------------------------------


def _mixers(model: nn.Module) -> list[MambaMixer]:
    return [m for m in model.modules() if isinstance(m, MambaMixer)]


def _fast_mixer_forward(
    self: MambaMixer,
    hidden_states: torch.Tensor,
    cache_params=None,
    attention_mask: torch.LongTensor | None = None,
    **kwargs,
):
    """``MambaMixer.forward`` with the fast scan on the full-sequence path.

    transformers takes the full-sequence branches whenever ``seq_len > 1``, with or
    without a cache (``MambaModel`` makes a cache on every eval forward by default);
    single-token steps (generation) run the class's own ``forward``.
    """
    if cache_params is not None and hidden_states.shape[1] == 1:
        if getattr(self, DT_PATCHES, None) or getattr(self, DT_SUM_READERS, None):
            raise NeuronSpecError(
                "a patch or window-sum read of site 'dt' is active but this is a single-token "
                "generation step, which runs transformers' own forward; patch Δ or read its "
                "window sums on full-sequence forwards only"
            )
        return type(self).forward(
            self, hidden_states, cache_params=cache_params, attention_mask=attention_mask, **kwargs
        )
    return _fast_full_sequence(self, hidden_states, cache_params, attention_mask, **kwargs)


@force_accelerate_hooks(["conv1d", "dt_proj"])
def _fast_full_sequence(self: MambaMixer, hidden_states, cache_params, attention_mask, **kwargs):
    # Mirrors the seq_len > 1 branches of transformers 5.x MambaMixer.forward (tests pin it).
    mm = modeling_mamba  # module globals looked up at call time, as the class does
    seq_len = hidden_states.shape[1]
    dtype = hidden_states.dtype
    hidden_states = mm.apply_mask_to_padding_states(hidden_states, attention_mask)  # (B, L, D)
    projected = self.in_proj(hidden_states)  # (B, L, 2d)
    projected_states = projected.transpose(1, 2)  # (B, 2d, L)
    A = -torch.exp(self.A_log.float())  # (d, N)
    x, gate = projected_states.chunk(2, dim=1)  # (B, d, L) each
    if _use_conv_kernel(self, cache_params, projected):
        # conv1d + SiLU in one pass, read straight from the (B, L, 2d) projection
        x = kernel_conv_silu(
            projected[..., : self.intermediate_size], self.conv1d.weight, self.conv1d.bias
        )  # (B, L, d)
    else:
        if cache_params is not None:
            x = cache_params.update_conv_state(
                x, self.layer_idx, conv_kernel_size=self.conv_kernel_size
            )  # (B, d, K-1+L) or (B, d, L)
        x = mm.causal_conv1d_fn(
            x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation=self.activation, **kwargs
        )
        if cache_params is not None:
            x = x[:, :, -seq_len:]  # (B, d, L)
        x = x.transpose(1, 2)  # (B, L, d)
    x = mm.apply_mask_to_padding_states(x, attention_mask)  # (B, L, d)
    x = x.contiguous()  # (B, L, d); the reference hands x_proj a transposed view, same values
    projected_x = self.x_proj(x)  # (B, L, R + 2N)
    time_step, B, C = torch.split(
        projected_x, [self.time_step_rank, self.ssm_state_size, self.ssm_state_size], dim=-1
    )  # (B, L, R), (B, L, N), (B, L, N)
    # The reference computes dt_proj.weight @ time_stepᵀ, (B, d, L); the same products
    # batch-major, so nothing needs transposing back.
    time_step = time_step @ self.dt_proj.weight.t()  # (B, L, d)
    time_proj_bias = self.dt_proj.bias.float() if self.dt_proj.bias is not None else None
    delta_softplus = True
    if getattr(self, DT_PATCHES, None):
        # a patch of site dt is active: the scan takes the patched Δ itself (adapters.py)
        time_step = mamba_delta(self, projected_x)  # (B, L, d), softplus and patches applied
        time_proj_bias, delta_softplus = None, False
    readers = getattr(self, DT_SUM_READERS, None)
    delta_sum = x.new_empty(x.shape[0], x.shape[2], dtype=torch.float64) if readers else None
    D = self.D.float()  # (d,)
    z = gate.transpose(1, 2)  # (B, L, d)
    dtype_scan = _check_inputs(
        x.transpose(1, 2), time_step.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2),
        D, gate, time_proj_bias,
    )  # fmt: skip
    scan_output, final_state = _scan_bl(
        x, time_step, A, B, C, D, z, time_proj_bias, delta_softplus, DEFAULT_CHUNK, dtype_scan,
        "auto", delta_sum,
    )  # fmt: skip  # (B, L, d), (B, d, N)
    for reader in readers or ():
        reader(delta_sum, seq_len)  # Σ_t Δ_t (B, d), patches applied
    if cache_params is not None:
        cache_params.update_recurrent_state(final_state.contiguous(), self.layer_idx)
    return self.out_proj(scan_output.to(dtype))  # (B, L, D)


def _use_conv_kernel(mixer: MambaMixer, cache_params, projected: torch.Tensor) -> bool:
    """The C conv + SiLU replaces ``conv1d`` + ``act`` when there is no cache to update,
    no gradient to take, the activation is SiLU and the scan kernel runs too."""
    needs_grad = torch.is_grad_enabled() and (
        projected.requires_grad or mixer.conv1d.weight.requires_grad
    )
    return (
        cache_params is None
        and mixer.activation == "silu"
        and mixer.conv1d.weight.dtype == projected.dtype
        and projected.dtype in _SUPPORTED_DTYPES
        and _use_kernel("auto", needs_grad, projected.device)
    )


setattr(_fast_mixer_forward, FAST_SCAN_FORWARD, True)  # what is_fast_mixer looks for


def use_fast_scan(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Make every ``MambaMixer`` in ``model`` use the fast scan (or, ``enabled=False``, not).

    Per instance: each mixer gets a ``forward`` attribute bound to the fast forward;
    disabling deletes it, restoring the class's reference ``forward`` exactly. Returns
    ``model`` (modified in place). Raises if ``model`` has no ``MambaMixer`` or if a
    mixer's ``forward`` was already replaced by someone else (e.g. accelerate hooks).
    """
    mixers = _mixers(model)
    if not mixers:
        raise NeuronSpecError(
            f"use_fast_scan: {type(model).__name__} has no transformers MambaMixer modules"
        )
    for mixer in mixers:
        if "forward" in mixer.__dict__ and not is_fast_mixer(mixer):
            raise NeuronSpecError(
                f"use_fast_scan: mixer of layer {mixer.layer_idx} already has an instance "
                f"forward ({mixer.__dict__['forward']!r}); refusing to replace or remove it"
            )
        if enabled and not is_fast_mixer(mixer):
            mixer.forward = types.MethodType(_fast_mixer_forward, mixer)
        elif not enabled and is_fast_mixer(mixer):
            del mixer.forward
    return model


def is_fast_scan_enabled(model: nn.Module) -> bool:
    """True when ``model`` has MambaMixers and every one of them uses the fast scan."""
    mixers = _mixers(model)
    return bool(mixers) and all(is_fast_mixer(m) for m in mixers)
