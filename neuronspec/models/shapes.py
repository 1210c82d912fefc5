"""Real model shapes offline: the shipped ``config.json`` of every registry id.

``neuronspec/models/configs/<org>--<name>.json`` holds the published config of each hub
checkpoint the registry knows (a few KB each; no weights). Source: the ``config.json``
files of the Hugging Face repos ``openai-community/gpt2``, ``gpt2-medium``, ``gpt2-large``,
``gpt2-xl`` and ``state-spaces/mamba-{130m,370m,790m,1.4b,2.8b}-hf``, written from the
published values (shape fields: layers, widths, heads, state size, Δ rank, vocabulary;
initialisation and dropout fields as published). With them, shapes, neuron counts,
parameters, FLOPs and memory are known without downloading anything, and
:func:`random_model` builds a random-weight model of a real shape (the scale benchmark).

FLOPs per token of a forward, counted in one place (:func:`forward_flops`, 2 per
multiply-add, at window length T; d = width, di = d_inner, R = Δ rank, N = state size,
K = conv kernel, V = vocabulary):
- ``weights``: the layers' weight matrix products, what ``torch.utils.flop_counter.
  FlopCounterMode`` counts as mm/addmm. GPT-2 24·d² per layer (QKV 6d², output 2d², MLP 16d²);
  Mamba 2·(2·d·di + di·(R + 2N) + R·di + di·d) per layer (in_proj, x_proj, dt_proj, out_proj).
- ``mixing``: what mixes positions. GPT-2 4·T·d per layer: QKᵀ and the weighted sum of values
  over all T keys, as HF eager attention computes the full T×T product before masking
  (FlopCounterMode's bmm count, exactly). Mamba 2·K·di (depthwise conv) + 7·di·N (selective
  scan per channel and state: Δ·A, exp, (Δx)·B, Ā·h, + , C·h, +; exp counted as one FLOP;
  Gu & Dao 2023), an analytic count the fast C scan runs and no counter sees.
- ``lm_head``: 2·d·V, apart: the statistics pass computes no logits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from neuronspec.errors import UnknownModelError
from neuronspec.models.registry import HUB_MODELS

CONFIG_DIR = Path(__file__).parent / "configs"
SCAN_FLOPS_PER_STATE = 7  # per (channel, state) and token: see the module docstring


@dataclass(frozen=True)
class ForwardFlops:
    """Analytic forward FLOPs per token of all layers and the LM head (module docstring)."""

    weights: int
    mixing: int
    lm_head: int

    @property
    def layers(self) -> int:
        return self.weights + self.mixing


def forward_flops(config, window: int) -> ForwardFlops:
    """:class:`ForwardFlops` of a GPT-2 or Mamba config (a HF config or its ``config.json``
    dict) at window length ``window``."""
    field = config.get if isinstance(config, dict) else lambda name: getattr(config, name, None)
    model_type, vocab = field("model_type"), int(field("vocab_size"))
    if model_type == "gpt2":
        d, layers = int(field("n_embd")), int(field("n_layer"))
        inner = int(field("n_inner") or 4 * d)
        weights = layers * (2 * d * 3 * d + 2 * d * d + 2 * 2 * d * inner)
        mixing = layers * 4 * window * d
    elif model_type == "mamba":
        d, layers = int(field("hidden_size")), int(field("num_hidden_layers"))
        di, n = int(field("intermediate_size")), int(field("state_size"))
        rank, kernel = int(field("time_step_rank")), int(field("conv_kernel"))
        weights = layers * 2 * (2 * d * di + di * (rank + 2 * n) + rank * di + di * d)
        mixing = layers * (2 * kernel * di + SCAN_FLOPS_PER_STATE * di * n)
    else:
        raise UnknownModelError(
            f"no analytic FLOPs for model_type {model_type!r}; known: gpt2, mamba"
        )
    return ForwardFlops(weights=weights, mixing=mixing, lm_head=2 * d * vocab)


def config_path(model_id: str) -> Path:
    """The shipped config.json of a registry id (short id or hub repo name)."""
    repo = HUB_MODELS.get(model_id, model_id)
    if repo not in HUB_MODELS.values():
        raise UnknownModelError(
            f"no shipped config for {model_id!r}; known: {', '.join(HUB_MODELS)}"
        )
    return CONFIG_DIR / f"{repo.replace('/', '--')}.json"


def shipped_config(model_id: str) -> dict:
    return json.loads(config_path(model_id).read_text())


@dataclass(frozen=True)
class ModelShape:
    """Sizes of one architecture, from its config alone."""

    model_id: str
    family: str  # "gpt2" or "mamba"
    n_layers: int
    d_model: int
    neurons: int  # width of the ``mlp`` site per layer (4·d for GPT-2, d_inner for Mamba)
    vocab_size: int
    parameters: int
    layer_flops_per_token: float  # all layers, at context ``context``
    lm_head_flops_per_token: float
    context: int

    @property
    def total_neurons(self) -> int:
        return self.n_layers * self.neurons

    def weight_bytes(self, dtype: torch.dtype = torch.float32) -> int:
        return self.parameters * dtype.itemsize


def model_shape(model_id: str, *, context: int = 64) -> ModelShape:
    """The :class:`ModelShape` of a registry id; ``context``: the window length T."""
    config = shipped_config(model_id)
    vocab = int(config["vocab_size"])
    if config["model_type"] == "gpt2":
        d, layers = int(config["n_embd"]), int(config["n_layer"])
        neurons = int(config.get("n_inner") or 4 * d)
        params = layers * (12 * d * d + 13 * d) + vocab * d + int(config["n_positions"]) * d
        params += 2 * d  # final layer norm
    elif config["model_type"] == "mamba":
        d, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
        di, n = int(config["intermediate_size"]), int(config["state_size"])
        rank, kernel = int(config["time_step_rank"]), int(config["conv_kernel"])
        macs = 2 * d * di + di * (rank + 2 * n) + rank * di + di * d + kernel * di
        neurons = di
        layer_params = macs + di * n + 2 * di + di + d  # + A_log, D, conv bias, dt bias, norm
        params = layers * layer_params + vocab * d + d  # tied LM head, final norm
    else:
        raise UnknownModelError(f"unknown model_type {config['model_type']!r} for {model_id}")
    flops = forward_flops(config, context)
    return ModelShape(
        model_id=model_id,
        family=config["model_type"],
        n_layers=layers,
        d_model=d,
        neurons=neurons,
        vocab_size=vocab,
        parameters=params,
        layer_flops_per_token=float(flops.layers),
        lm_head_flops_per_token=float(flops.lm_head),
        context=context,
    )


def random_model(
    model_id: str, *, n_layers: int | None = None, seed: int = 0, fast_scan: bool = True
) -> torch.nn.Module:
    """A random-weight model of ``model_id``'s shipped shape, in eval mode (``n_layers``:
    keep only that many layers, for quick runs)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = shipped_config(model_id)
    model_type = config.pop("model_type")
    if n_layers is not None:
        key = "n_layer" if model_type == "gpt2" else "num_hidden_layers"
        config[key] = n_layers
        config.pop("n_layer", None) if model_type == "mamba" else None
    hf_config = AutoConfig.for_model(model_type, **config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config).eval()
    if model_type == "mamba" and fast_scan:
        from neuronspec.models.scan import use_fast_scan

        use_fast_scan(model)
    return model
