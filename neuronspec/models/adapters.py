"""Site adapters: the one place that knows where a model family keeps its neurons.

A *site* (METHODS.md §1) is a per-layer tensor ``(batch, pos, width)`` read or patched
by a forward hook:

=========  ==========================================  ==================================================
site       GPT-2 (``GPT2LMHeadModel``)                 Mamba (``MambaForCausalLM``)
=========  ==========================================  ==================================================
mlp        output of ``transformer.h[l].mlp.act``      input of ``backbone.layers[l].mixer.out_proj``:
           (post-GELU, width 4·d)                      (y + D·x) ⊙ SiLU(z), width d_inner
mlp_pre    output of ``transformer.h[l].mlp.c_fc``     gate z: second half of ``mixer.in_proj`` output
dt         —                                           Δ = softplus(W_dt · dt_low + b_dt), rebuilt from
                                                       the ``mixer.x_proj`` output; patchable on the
                                                       fast scan path only (models.delta.patch_delta)
resid      output of block ``transformer.h[l]``        output of block ``backbone.layers[l]``
=========  ==========================================  ==================================================

In transformers 5.x Mamba, ``conv1d``, ``act`` and ``dt_proj`` are not called as
modules, so only ``in_proj``, ``x_proj`` and ``out_proj`` (and the blocks) are hooked.
Hooks are removed when the context exits, also on error.

Patching ``dt``: Δ is not the output of any module, so a patch is not a hook. It is a
function kept on the mixer (:data:`~neuronspec.models.delta.DT_PATCHES`) that
:func:`~neuronspec.models.delta.mamba_delta` applies after the
softplus; neuronspec's fast scan (:mod:`neuronspec.models.scan`) takes Δ from
:func:`mamba_delta` whenever a patch is active, and a read of ``dt`` inside the patch sees
the patched Δ. transformers' reference scan computes Δ inside its own loop, so patching
``dt`` there raises :class:`~neuronspec.errors.NeuronSpecError` (use the fast scan).

Window sums of ``dt`` (:meth:`SiteAdapter.read_window_sums`, what the statistics pass needs
for the window-mean moments) come from the fast scan itself, which computes Δ anyway
(:data:`~neuronspec.models.delta.DT_SUM_READERS`); on the reference scan they are the sums of the ``dt`` read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from neuronspec.errors import LayerOutOfRangeError, NeuronSpecError, UnknownSiteError
from neuronspec.models.delta import DT_SUM_READERS, is_fast_mixer, mamba_delta, patch_delta

SITES: tuple[str, ...] = ("mlp", "mlp_pre", "dt", "resid")

# callback(site, layer, tensor (batch, pos, width)) for reads
ReadCallback = Callable[[str, int, torch.Tensor], None]
# fn(tensor (batch, pos, width)) -> replacement of the same shape, for patches
PatchFn = Callable[[torch.Tensor], torch.Tensor]
# callback(site, layer, sums (batch, width) float64, positions) for window-sum reads
WindowSumCallback = Callable[[str, int, torch.Tensor, int], None]


@dataclass(frozen=True)
class _Hook:
    """How one site is reached: a module, whether its input or output, and a slice of it."""

    module: nn.Module
    on_input: bool
    read: Callable[[torch.Tensor], torch.Tensor]
    write: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _replace_first(value, new):
    return (new, *value[1:]) if isinstance(value, tuple) else new


class SiteAdapter:
    """Read and patch the sites of one model. Subclasses map sites to hooks."""

    family: str = ""
    sites: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model

    # -- structure -------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        raise NotImplementedError

    def width(self, site: str) -> int:
        raise NotImplementedError

    def check(self, site: str, layer: int) -> None:
        """Raise a clear error for an unknown site or a layer out of range."""
        if site not in self.sites:
            raise UnknownSiteError(
                f"site {site!r} does not exist for {self.family} models; "
                f"available: {', '.join(self.sites)}"
            )
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise LayerOutOfRangeError(
                f"layer {layer!r} is out of range: this {self.family} model has "
                f"{self.n_layers} layers (0..{self.n_layers - 1})"
            )

    def _hook(self, site: str, layer: int) -> _Hook:
        raise NotImplementedError

    def block(self, layer: int) -> nn.Module:
        """The residual block of ``layer`` (its input is the stream before the layer)."""
        raise NotImplementedError

    def write_weights(self, site: str, layer: int) -> torch.Tensor | None:
        """``(W, d)``: what one unit of each neuron of ``site`` adds to the residual stream at
        the block's output (the ``mlp`` site feeds a linear map whose output the block adds
        to the stream); None for the other sites."""
        self.check(site, layer)
        return self._mlp_write_weights(layer).detach() if site == "mlp" else None

    def _mlp_write_weights(self, layer: int) -> torch.Tensor:
        raise NotImplementedError

    # -- reading and patching ---------------------------------------------------------------
    @contextmanager
    def read(self, targets: Iterable[tuple[str, int]], callback: ReadCallback) -> Iterator[None]:
        """Call ``callback(site, layer, tensor)`` for each target on every forward in the block."""
        handles = []
        try:
            for site, layer in targets:
                self.check(site, layer)
                hook = self._hook(site, layer)

                def on_forward(module, args, output, site=site, layer=layer, hook=hook):
                    value = _first(args) if hook.on_input else _first(output)
                    callback(site, layer, hook.read(value))

                def on_pre(module, args, site=site, layer=layer, hook=hook):
                    callback(site, layer, hook.read(_first(args)))

                if hook.on_input:
                    handles.append(hook.module.register_forward_pre_hook(on_pre))
                else:
                    handles.append(hook.module.register_forward_hook(on_forward))
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def read_window_sums(
        self, targets: Iterable[tuple[str, int]], callback: WindowSumCallback
    ) -> Iterator[None]:
        """Call ``callback(site, layer, sums, T)`` on every forward in the block: ``sums``
        ``(batch, width)`` float64 is each row's sum over its ``T`` positions (float32 sums
        of the values read by :meth:`read`; an adapter may produce them more cheaply)."""

        def on_value(site: str, layer: int, value: torch.Tensor) -> None:
            callback(site, layer, value.float().sum(1).double(), value.shape[1])

        with self.read(targets, on_value):
            yield

    @contextmanager
    def patch(self, site: str, layer: int, fn: PatchFn) -> Iterator[None]:
        """Replace the site's value by ``fn(value)`` on every forward inside the block."""
        self.check(site, layer)
        hook = self._hook(site, layer)
        if hook.write is None:
            raise NeuronSpecError(
                f"site {site!r} of {self.family} models can be read but not patched"
            )

        def apply(value: torch.Tensor) -> torch.Tensor:
            new = fn(hook.read(value))
            if new.shape != hook.read(value).shape:
                raise NeuronSpecError(
                    f"patch of site {site!r} returned shape {tuple(new.shape)}, "
                    f"expected {tuple(hook.read(value).shape)}"
                )
            return hook.write(value, new)

        if hook.on_input:
            handle = hook.module.register_forward_pre_hook(
                lambda module, args: (apply(args[0]), *args[1:])
            )
        else:
            handle = hook.module.register_forward_hook(
                lambda module, args, output: _replace_first(output, apply(_first(output)))
            )
        try:
            yield
        finally:
            handle.remove()

    @contextmanager
    def patch_neurons(
        self, site: str, layer: int, neurons: torch.Tensor | list[int], values: torch.Tensor | float
    ) -> Iterator[None]:
        """Set the chosen neurons of a site to ``values`` (a scalar or ``(len(neurons),)``)."""
        index = torch.as_tensor(neurons, dtype=torch.long)
        width = self.width(site)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= width):
            raise NeuronSpecError(f"neuron index out of range for site {site!r} of width {width}")

        def set_values(value: torch.Tensor) -> torch.Tensor:
            value = value.clone()
            value[..., index.to(value.device)] = torch.as_tensor(
                values, dtype=value.dtype, device=value.device
            )
            return value

        with self.patch(site, layer, set_values):
            yield

    def capture(self, input_ids: torch.Tensor, targets: Iterable[tuple[str, int]]) -> dict:
        """Run one forward and return ``{(site, layer): tensor}`` (tests and small inputs only)."""
        captured: dict[tuple[str, int], torch.Tensor] = {}

        def keep(site, layer, value):
            captured[(site, layer)] = value.detach().clone()

        with self.read(list(targets), keep):
            self.model(input_ids=input_ids, use_cache=False)
        return captured


class GPT2Adapter(SiteAdapter):
    family = "gpt2"
    sites = ("mlp", "mlp_pre", "resid")

    @property
    def n_layers(self) -> int:
        return len(self.model.transformer.h)

    def width(self, site: str) -> int:
        config = self.model.config
        if site in ("mlp", "mlp_pre"):
            return config.n_inner or 4 * config.n_embd
        if site == "resid":
            return config.n_embd
        self.check(site, 0)
        raise AssertionError("unreachable")

    @contextmanager
    def eager_attention(self) -> Iterator[None]:
        """Run GPT-2's attention in eager mode inside the block (SDPA returns no attention
        probabilities); the model's implementation is restored afterwards."""
        previous = self.model.config._attn_implementation
        self.model.set_attn_implementation("eager")
        try:
            yield
        finally:
            self.model.set_attn_implementation(previous)

    def block(self, layer: int) -> nn.Module:
        self.check("mlp", layer)
        return self.model.transformer.h[layer]

    def _mlp_write_weights(self, layer: int) -> torch.Tensor:
        return self.block(layer).mlp.c_proj.weight  # Conv1D: (W, d)

    def _hook(self, site: str, layer: int) -> _Hook:
        block = self.model.transformer.h[layer]
        identity = lambda value: value  # noqa: E731
        replace = lambda old, new: new  # noqa: E731
        if site == "mlp":
            return _Hook(block.mlp.act, False, identity, replace)
        if site == "mlp_pre":
            return _Hook(block.mlp.c_fc, False, identity, replace)
        return _Hook(block, False, identity, replace)


class MambaAdapter(SiteAdapter):
    family = "mamba"
    sites = ("mlp", "mlp_pre", "dt", "resid")

    @property
    def n_layers(self) -> int:
        return len(self.model.backbone.layers)

    def width(self, site: str) -> int:
        config = self.model.config
        if site in ("mlp", "mlp_pre", "dt"):
            return config.intermediate_size
        if site == "resid":
            return config.hidden_size
        self.check(site, 0)
        raise AssertionError("unreachable")

    def mixer(self, layer: int) -> nn.Module:
        """The ``MambaMixer`` of ``layer`` (its ``in_proj``, ``x_proj``, ``out_proj``, …)."""
        self.check("mlp", layer)
        return self.model.backbone.layers[layer].mixer

    @contextmanager
    def patch(self, site: str, layer: int, fn: PatchFn) -> Iterator[None]:
        """As :meth:`SiteAdapter.patch`; ``dt`` is patched in the fast scan (:func:`patch_delta`)."""
        if site != "dt":
            with super().patch(site, layer, fn):
                yield
            return
        self.check(site, layer)
        with patch_delta(self.model.backbone.layers[layer].mixer, fn):
            yield

    @contextmanager
    def read_window_sums(
        self, targets: Iterable[tuple[str, int]], callback: WindowSumCallback
    ) -> Iterator[None]:
        """As :meth:`SiteAdapter.read_window_sums`; on the fast scan, the sums of ``dt`` come
        from the scan itself (float64, :data:`DT_SUM_READERS`): Δ is not computed twice."""
        targets = list(targets)
        for site, layer in targets:
            self.check(site, layer)
        mixers = {
            layer: self.model.backbone.layers[layer].mixer for s, layer in targets if s == "dt"
        }
        from_scan = {layer: mixer for layer, mixer in mixers.items() if is_fast_mixer(mixer)}
        hooked = [(s, layer) for s, layer in targets if not (s == "dt" and layer in from_scan)]
        readers = []
        try:
            for layer, mixer in from_scan.items():

                def reader(sums: torch.Tensor, positions: int, layer: int = layer) -> None:
                    callback("dt", layer, sums, positions)

                mixer.__dict__.setdefault(DT_SUM_READERS, []).append(reader)
                readers.append((mixer, reader))
            with super().read_window_sums(hooked, callback):
                yield
        finally:
            for mixer, reader in readers:
                getattr(mixer, DT_SUM_READERS).remove(reader)

    def block(self, layer: int) -> nn.Module:
        self.check("mlp", layer)
        return self.model.backbone.layers[layer]

    def _mlp_write_weights(self, layer: int) -> torch.Tensor:
        return self.block(layer).mixer.out_proj.weight.T  # (W, d)

    def _hook(self, site: str, layer: int) -> _Hook:
        block = self.model.backbone.layers[layer]
        mixer = block.mixer
        d_inner = mixer.intermediate_size
        identity = lambda value: value  # noqa: E731
        replace = lambda old, new: new  # noqa: E731
        if site == "mlp":
            return _Hook(mixer.out_proj, True, identity, replace)
        if site == "mlp_pre":
            return _Hook(
                mixer.in_proj,
                False,
                lambda xz: xz[..., d_inner:],  # (B, L, d_inner): the gate z
                lambda xz, z: torch.cat([xz[..., :d_inner], z], dim=-1),
            )
        if site == "dt":
            return _Hook(mixer.x_proj, False, lambda out: mamba_delta(mixer, out), None)
        return _Hook(block, False, identity, replace)


def adapter_for(model: nn.Module) -> SiteAdapter:
    """The site adapter for a loaded HF causal LM; a clear error for unsupported families."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type == "gpt2":
        return GPT2Adapter(model)
    if model_type == "mamba":
        return MambaAdapter(model)
    raise NeuronSpecError(
        f"no site adapter for model type {model_type!r}; supported: gpt2, mamba. "
        "Write a SiteAdapter subclass in neuronspec/models/adapters.py to add one"
    )
