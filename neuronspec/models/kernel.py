"""The C selective scan (``neuronspec/native/scan.c``) as a torch function, no autograd.

One pass over the positions per block of 16 (float32) or 8 (float64) channels, the state
kept in registers, ``exp`` inline, the skip ``D·x`` and the gate ``SiLU(z)`` fused; the
channel blocks are shared among torch's OpenMP threads. Built by :mod:`neuronspec.native`.
"""

from __future__ import annotations

import torch

from neuronspec.native import KernelUnavailableError, load_library

__all__ = ["kernel_scan"]

ENTRY = {torch.float32: "neuronspec_scan_f32", torch.float64: "neuronspec_scan_f64"}


def _strided(t: torch.Tensor) -> list:
    return [t.data_ptr(), t.stride(0), t.stride(1)]


def kernel_scan(
    delta: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, h_L)`` of the selective scan, no autograd; see ``neuronspec/native/scan.c``.

    Shapes: delta (Δ after softplus), x, z ``(B, L, d)``; A ``(d, N)``; B, C ``(B, L, N)``;
    D ``(d,)``; all of one dtype (float32 or float64) on the CPU. Returns ``y``
    ``(B, L, d)`` = ``(C·h + D·x) · SiLU(z)`` and ``h_L`` ``(B, d, N)``.
    """
    fn = getattr(load_library(), ENTRY[x.dtype])
    b, L, d = x.shape
    N = A.shape[1]

    def rows(t: torch.Tensor) -> torch.Tensor:  # unit stride along the last dim
        return t if t.stride(-1) == 1 else t.contiguous()

    delta, x, B, C = rows(delta), rows(x), rows(B), rows(C)
    z = None if z is None else rows(z)
    At = A.t().contiguous()  # (N, d)
    D = None if D is None else D.contiguous()
    y = x.new_empty(b, L, d)
    h_last = x.new_empty(b, d, N)
    no_gate = [None, 0, 0]

    status = fn(
        torch.get_num_threads(), b, L, d, N,
        *_strided(delta), *_strided(x), At.data_ptr(), *_strided(B), *_strided(C),
        None if D is None else D.data_ptr(),
        *(no_gate if z is None else _strided(z)), *_strided(y), h_last.data_ptr(),
    )  # fmt: skip
    if status != 0:
        raise KernelUnavailableError(f"scan kernel rejected its arguments (status {status})")
    return y, h_last
