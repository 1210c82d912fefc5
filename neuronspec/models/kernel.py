"""The C selective scan and causal conv (``neuronspec/native/scan.c``) as torch functions,
no autograd.

One pass over the positions per block of 32 (float32) or 8 (float64) channels, the state
kept in registers, ``exp`` inline, the skip ``D·x`` and the gate ``SiLU(z)`` fused; the
channel blocks are shared among torch's OpenMP threads. Built by :mod:`neuronspec.native`.
"""

from __future__ import annotations

import torch

from neuronspec.native import KernelUnavailableError, load_library

__all__ = ["kernel_conv_silu", "kernel_scan"]

_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def _strided(t: torch.Tensor) -> list:
    return [t.data_ptr(), t.stride(0), t.stride(1)]


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit stride along its last dimension (copied only if needed)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def kernel_scan(
    dt: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    delta_sum: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, h_L)`` of the selective scan, no autograd; see ``neuronspec/native/scan.c``.

    Shapes: dt (raw; Δ = softplus(dt + delta_bias) when ``delta_softplus``), x, z
    ``(B, L, d)``; A ``(d, N)``; B, C ``(B, L, N)``; D, delta_bias ``(d,)``; all of one
    dtype (float32 or float64) on the CPU. Returns ``y`` ``(B, L, d)`` =
    ``(C·h + D·x) · SiLU(z)`` and ``h_L`` ``(B, d, N)``. ``delta_sum``, if given, a
    contiguous ``(B, d)`` float64 tensor, receives Σ_t Δ_t (summed in float64).
    """
    fn = getattr(load_library(), f"neuronspec_scan_{_SUFFIX[x.dtype]}")
    b, L, d = x.shape
    N = A.shape[1]
    dt, x, B, C = _rows(dt), _rows(x), _rows(B), _rows(C)
    z = None if z is None else _rows(z)
    At = A.t().contiguous()  # (N, d)
    D = None if D is None else D.contiguous()
    delta_bias = None if delta_bias is None else delta_bias.contiguous()
    y = x.new_empty(b, L, d)
    h_last = x.new_empty(b, d, N)
    if delta_sum is not None and (
        delta_sum.shape != (b, d)
        or delta_sum.dtype != torch.float64
        or not delta_sum.is_contiguous()
    ):
        raise ValueError(f"kernel_scan: delta_sum must be a contiguous ({b}, {d}) float64 tensor")
    status = fn(
        torch.get_num_threads(), b, L, d, N,
        *_strided(dt), _pointer(delta_bias), int(delta_softplus),
        *_strided(x), At.data_ptr(), *_strided(B), *_strided(C), _pointer(D),
        *([None, 0, 0] if z is None else _strided(z)), *_strided(y), h_last.data_ptr(),
        _pointer(delta_sum),
    )  # fmt: skip
    if status != 0:
        raise KernelUnavailableError(f"scan kernel rejected its arguments (status {status})")
    return y, h_last


def kernel_conv_silu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """SiLU of the causal depthwise convolution of ``x`` ``(B, L, d)`` (zero history), as
    the Mamba mixer's ``conv1d`` + ``act`` without a cache; ``weight`` ``(d, 1, K)``,
    ``bias`` ``(d,)``, all one dtype on the CPU. Returns ``(B, L, d)`` contiguous."""
    fn = getattr(load_library(), f"neuronspec_conv_silu_{_SUFFIX[x.dtype]}")
    b, L, d = x.shape
    x = _rows(x)
    wt = weight[:, 0, :].t().contiguous()  # (K, d)
    bias = None if bias is None else bias.contiguous()
    out = x.new_empty(b, L, d)
    status = fn(
        torch.get_num_threads(), b, L, d, wt.shape[0], *_strided(x), wt.data_ptr(),
        _pointer(bias), out.data_ptr(),
    )  # fmt: skip
    if status != 0:
        raise KernelUnavailableError(f"conv kernel rejected its arguments (status {status})")
    return out
