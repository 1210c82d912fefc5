"""KL(p_base ‖ p_mod) of next-token distributions from float32 logits, without float64 copies.

With d = z_mod − z_base (the logits' difference, per vocabulary entry) and p = softmax(z_base),
ln p_mod = ln p + d − ln Σ_v p_v e^{d_v}, so

    KL = ln Σ_v p_v e^{d_v} − Σ_v p_v d_v = ln(1 + Σ_v p_v φ(r_v)),   r = d − Σ_v p_v d_v,

with φ(r) = e^r − 1 − r ≥ 0 (Σ_v p_v r_v = 0 makes the two equal). Every term is computed in
float32 to relative precision (φ by its Taylor series r²·(½ + r/6 + r²/24 + r³/120 +
r⁴/720) for |r| < 0.1, where expm1(r) − r would cancel, else by expm1), and only the sums
are float64: the KL keeps about 1e-6 of its own size, where subtracting two float64
log-softmaxes keeps absolute precision at no memory saving. A position whose r exceeds 80
(e^r near float32's range) is computed in float64. Measured on a GPT-2-shaped batch of 16
groups × 8 × 64 positions × 50,257 tokens, the float64 form took 15.2 s of a 33 s forward.

Shapes: ``base`` ``(..., V)``, ``modified`` ``(G, ..., V)``; returns ``(G, ...)`` float64 per
position.
"""

from __future__ import annotations

import torch

SERIES_BELOW = 0.1  # |r| below which φ is its Taylor series (truncation < 4e-9 relative)
FLOAT64_ABOVE = 80.0  # r above which a position is computed in float64


def _phi(r: torch.Tensor) -> torch.Tensor:
    """e^r − 1 − r, elementwise, to relative precision (module docstring): the series in
    place (Horner), expm1 where |r| ≥ 0.1 (indexed when those are under 5% of r)."""
    phi = r / 720
    for coefficient in (1 / 120, 1 / 24, 1 / 6, 0.5):
        phi.add_(coefficient).mul_(r)
    phi.mul_(r)
    far = r.abs() >= SERIES_BELOW
    count = int(far.sum())
    if count > r.numel() // 20:  # many: one pass over all of r
        return torch.where(far, torch.expm1(r) - r, phi)
    if count:  # few (a small effect): only those
        index = torch.nonzero(far, as_tuple=True)
        phi[index] = torch.expm1(r[index]) - r[index]
    return phi


def _kl_float64(base: torch.Tensor, modified: torch.Tensor) -> torch.Tensor:
    log_p = torch.log_softmax(base.double(), -1)
    log_q = torch.log_softmax(modified.double(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def kl_divergence(base: torch.Tensor, modified: torch.Tensor) -> torch.Tensor:
    """KL(softmax(base) ‖ softmax(modified[g])) per position, ``(G, ...)`` float64."""
    p = torch.softmax(base.float(), -1)  # (..., V)
    out = []
    for group in modified:  # (..., V): one group at a time bounds the memory
        r = group.float() - base.float()  # d
        r -= (p * r).sum(-1, keepdim=True, dtype=torch.float64).float()  # r = d − E_p[d]
        kl = torch.log1p((p * _phi(r)).sum(-1, dtype=torch.float64))  # (...,)
        wide = r.amax(-1) > FLOAT64_ABOVE
        if bool(wide.any()):
            kl[wide] = _kl_float64(base[wide], group[wide])
        out.append(kl)
    return torch.stack(out)
