"""Poisson-bootstrap replicate weights of the streamed pass (intervals on corpus statistics).

Each window gets R independent Poisson(1) weights (Hanley & MacGibbon 2006; the "online
bootstrap" of Oza 2005): accumulating a count once per replicate, each window's
contribution multiplied by its weight, gives R bootstrap replicates of the count over
windows in the same pass. The window is the resampled unit, so the correlation of tokens
within a window is kept. The weights are a pure function of the window's token ids and the
replicate index (a splitmix64 hash mapped through the Poisson(1) CDF), so they are the same
whatever the batch, shard or rank that streams a window: replicates merge across xdist
workers and torchrun ranks by addition, exactly.
"""

from __future__ import annotations

import math

import torch

_MASK_53 = (1 << 53) - 1
# P(K <= k) for K ~ Poisson(1), k = 0..16; beyond 16 the mass is below 1e-14
POISSON_1_CDF = torch.tensor(
    [sum(math.exp(-1.0) / math.factorial(j) for j in range(k + 1)) for k in range(17)],
    dtype=torch.float64,
)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 (wrapping arithmetic), elementwise."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * -4658895280553007687  # 0xbf58476d1ce4e5b9 as a signed int64
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * -7723592293110705685  # 0x94d049bb133111eb
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def window_hash(input_ids: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` token ids → ``(B,)`` int64, a hash of each window's ids in order."""
    h = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    for column in input_ids.long().unbind(1):  # T steps over (B,) vectors
        h = _mix(h + column + 0x632BE59BD9B4E019)
    return h


def poisson_weights(input_ids: torch.Tensor, replicates: int) -> torch.Tensor:
    """``(R, B)`` float64 Poisson(1) weights of each window ``(B, T)`` in each replicate."""
    hashes = window_hash(input_ids.cpu())  # (B,)
    index = torch.arange(1, replicates + 1, dtype=torch.long)[:, None]  # (R, 1)
    bits = _mix(hashes[None, :] + index * -7046029254386353131)  # 0x9e3779b97f4a7c15; (R, B)
    uniform = ((bits >> 11) & _MASK_53).double() / float(1 << 53)  # [0, 1)
    return torch.searchsorted(POISSON_1_CDF, uniform, right=True).double()
