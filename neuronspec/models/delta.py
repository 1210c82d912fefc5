"""Δ of a Mamba mixer (the ``dt`` site): computed from the ``x_proj`` output
(:func:`mamba_delta`), patched through :data:`DT_PATCHES` and read as window sums through
:data:`DT_SUM_READERS`. Shared by the site adapter (:mod:`neuronspec.models.adapters`) and
the fast scan (:mod:`neuronspec.models.scan`), which consumes patched Δ
(:func:`patch_delta`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from neuronspec.errors import NeuronSpecError

FAST_SCAN_FORWARD = "_neuronspec_fast_scan_forward"
"""Attribute set on the function that is neuronspec's fast ``MambaMixer.forward``
(:func:`neuronspec.models.scan.use_fast_scan` binds it per mixer)."""
DT_PATCHES = "_neuronspec_dt_patches"
"""Attribute of a ``MambaMixer``: the list of active Δ patches, applied in order."""
DT_SUM_READERS = "_neuronspec_dt_sum_readers"
"""Attribute of a ``MambaMixer``: functions ``(sums (B, d_inner) float64, L)`` that the fast
scan calls with Σ_t Δ_t (patches applied) after each full-sequence forward."""


def mamba_delta(mixer: nn.Module, x_proj_out: torch.Tensor) -> torch.Tensor:
    """Δ = softplus(W_dt · dt_low + b_dt) from the ``x_proj`` output ``(B, L, R + 2N)``.

    Returns ``(B, L, d_inner)``, in the same arithmetic as HF's scan (bias added in fp32),
    with the mixer's active Δ patches (:func:`patch_delta`) applied.
    """
    dt_low = x_proj_out[..., : mixer.time_step_rank]  # (B, L, R)
    dt = dt_low @ mixer.dt_proj.weight.t()  # (B, L, d_inner)
    delta = F.softplus(dt + mixer.dt_proj.bias.float())  # (B, L, d_inner)
    for fn in getattr(mixer, DT_PATCHES, ()):
        new = fn(delta)
        if new.shape != delta.shape:
            raise NeuronSpecError(
                f"patch of site 'dt' returned shape {tuple(new.shape)}, expected {tuple(delta.shape)}"
            )
        delta = new
    return delta


def is_fast_mixer(mixer: nn.Module) -> bool:
    """True when this ``MambaMixer`` runs neuronspec's fast scan
    (:func:`neuronspec.models.scan.use_fast_scan`), which consumes patched Δ."""
    forward = getattr(mixer.__dict__.get("forward"), "__func__", None)
    return getattr(forward, FAST_SCAN_FORWARD, False)


@contextmanager
def patch_delta(mixer: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace Δ ``(B, L, d_inner)`` of one mixer by ``fn(Δ)`` in every forward in the block.

    Needs neuronspec's fast scan on the mixer (it consumes the patched Δ); on transformers'
    reference scan the patch would be silently ignored, so it raises instead, also when the
    fast scan is switched off inside the block.
    """

    def refuse() -> NeuronSpecError:
        return NeuronSpecError(
            "site 'dt' can be read but not patched on transformers' reference Mamba scan "
            "(Δ is computed inside its loop); patching Δ needs neuronspec's fast scan: call "
            "neuronspec.models.scan.use_fast_scan(model) or run without --no-fast-scan"
        )

    if not is_fast_mixer(mixer):
        raise refuse()

    def guard(module, args):
        if not is_fast_mixer(mixer):
            raise refuse()

    patches = mixer.__dict__.setdefault(DT_PATCHES, [])
    patches.append(fn)
    handle = mixer.register_forward_pre_hook(guard)
    try:
        yield
    finally:
        handle.remove()
        patches.remove(fn)
