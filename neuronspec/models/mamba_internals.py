"""The tensors of a Mamba layer's selective scan, captured from one forward.

transformers 5.x does not call ``conv1d`` or ``dt_proj`` as modules (METHODS §1), so the
scan's inputs are rebuilt from the modules that are called: the scan input ``x`` is the
*input* of ``mixer.x_proj``, whose output splits into ``[dt_low, B, C]``; Δ comes from
:func:`neuronspec.models.delta.mamba_delta`; the gate ``z`` is the second half of the
``mixer.in_proj`` output; ``A = −exp(A_log)`` (``A`` and ``D`` rounded through float32, as
``MambaMixer.forward`` does). Used by the hidden-attention analysis
(:mod:`neuronspec.analyses.hidden_attention`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from neuronspec.errors import NeuronSpecError
from neuronspec.models.delta import mamba_delta


@dataclass(frozen=True)
class ScanInputs:
    """One layer's scan, batch-major: ``y = (Σ_j α̃[i, j] x_j + D ⊙ x_i) ⊙ SiLU(z_i)``."""

    x: torch.Tensor  # (B, L, d_inner) post-conv, post-SiLU scan input
    delta: torch.Tensor  # (B, L, d_inner) Δ after softplus
    B: torch.Tensor  # (B, L, N)
    C: torch.Tensor  # (B, L, N)
    z: torch.Tensor  # (B, L, d_inner) gate
    A: torch.Tensor  # (d_inner, N), negative
    D: torch.Tensor  # (d_inner,)
    out: torch.Tensor  # (B, L, d_model) the mixer's output, as the forward computed it

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(batch, length, d_inner, state_size)``."""
        b, length, d = self.x.shape
        return b, length, d, self.A.shape[1]


def capture_scan_inputs(
    model: torch.nn.Module, input_ids: torch.Tensor, layers: Iterable[int]
) -> dict[int, ScanInputs]:
    """Run ``model`` once on ``input_ids`` ``(B, L)`` and return each layer's scan inputs.

    No gradient is taken; tensors keep the model's dtype (float64 models give float64).
    """
    layers = list(layers)
    mixers = model.backbone.layers
    for layer in layers:
        if not 0 <= layer < len(mixers):
            raise NeuronSpecError(f"layer {layer} is out of range (0..{len(mixers) - 1})")
    seen: dict[int, dict[str, torch.Tensor]] = {layer: {} for layer in layers}
    handles = []
    try:
        for layer in layers:
            mixer = mixers[layer].mixer
            d = mixer.intermediate_size

            def on_in_proj(module, args, out, layer=layer, d=d):
                seen[layer]["z"] = out[..., d:].detach()  # (B, L, d)

            def on_x_proj(module, args, out, layer=layer, mixer=mixer):
                rank, n = mixer.time_step_rank, mixer.ssm_state_size
                seen[layer]["x"] = args[0].detach()  # (B, L, d)
                seen[layer]["delta"] = mamba_delta(mixer, out).detach()  # (B, L, d)
                seen[layer]["B"] = out[..., rank : rank + n].detach()  # (B, L, N)
                seen[layer]["C"] = out[..., rank + n :].detach()  # (B, L, N)

            def on_mixer(module, args, out, layer=layer):
                seen[layer]["out"] = out.detach()  # (B, L, D)

            handles.append(mixer.register_forward_hook(on_mixer))
            handles.append(mixer.in_proj.register_forward_hook(on_in_proj))
            handles.append(mixer.x_proj.register_forward_hook(on_x_proj))
        with torch.no_grad():
            model.base_model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    result = {}
    for layer in layers:
        mixer = mixers[layer].mixer
        dtype = seen[layer]["x"].dtype
        result[layer] = ScanInputs(
            **{
                name: seen[layer][name].contiguous()
                for name in ("x", "delta", "B", "C", "z", "out")
            },
            # as MambaMixer.forward: A and D pass through float32 on every path
            A=-torch.exp(mixer.A_log.detach().float()).to(dtype),
            D=mixer.D.detach().float().to(dtype),
        )
    return result
