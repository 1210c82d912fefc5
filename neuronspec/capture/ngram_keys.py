"""Which positions n-gram counts use, and the keys of trigrams (METHODS §3)."""

from __future__ import annotations

import torch


def counted_positions(input_ids: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    """(B, T) bool: positions n-gram counts use: not the window start, not a BOS token."""
    counted = torch.ones_like(input_ids, dtype=torch.bool)
    counted[:, 0] = False
    if bos_id is not None:
        counted &= input_ids != bos_id
    return counted


def trigram_keys(
    input_ids: torch.Tensor, counted: torch.Tensor, vocab: int, bos_id: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Trigram key ``(t[k-2]·V + t[k-1])·V + t[k]`` per position ``(B, T)``, and where it is valid.

    Valid (METHODS §3): k is a counted position (not the window start, not BOS) and all three
    tokens lie in the window with no BOS among them (a trigram across a document boundary
    is not text). The window start may be the trigram's first token: the trigram ending at
    position 2 counts; only BOS is excluded, not the window start as a token.
    """
    ids = input_ids.long()
    keys = torch.zeros_like(ids)
    keys[:, 2:] = (ids[:, :-2] * vocab + ids[:, 1:-1]) * vocab + ids[:, 2:]
    not_bos = torch.ones_like(counted) if bos_id is None else input_ids != bos_id  # (B, T)
    valid = torch.zeros_like(counted)
    valid[:, 2:] = not_bos[:, :-2] & not_bos[:, 1:-1] & counted[:, 2:]
    return keys, valid
