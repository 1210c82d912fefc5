"""Integrated gradients of a gold token's probability w.r.t. a site at the last prompt position.

Dai et al. (2022), *Knowledge Neurons in Pretrained Transformers*, §3.1; METHODS.md §8.
With w̄ ``(width,)`` the site's activation of layer l at the last prompt position and
P(·) the softmax probability of the gold token's first id at that position when the layer's
vector there is replaced by its argument (every other layer computes as usual)::

    Attr_i = (w̄_i / m) · Σ_{k=1..m} ∂P/∂w_i (k/m · w̄)        (right Riemann rule, baseline 0)

The whole layer vector at that position is scaled together; nothing else is patched, and
the earlier positions are untouched. Completeness: Σ_i Attr_i → P(w̄) − P(0) as m grows.

Batching. All (layer, step) pairs of a prompt are rows of one batch: row r = (l, k)
runs the prompt with layer l's last-position vector replaced by a leaf tensor
``k/m · w̄_l``, patched through the site adapter. Rows do not interact, so one backward
of Σ_r P_r gives every row's gradient at once. ``max_rows`` bounds the rows per
forward/backward (memory grows with it: about rows × positions × the model's activations);
rows beyond it go into further passes. Rows with k = 0 (P with the layer zeroed) are
added when ``with_zero`` is set, for the completeness check and the per-layer P(0).

Shared prefix (``share_prefix``; default: on for models whose forward takes
``past_key_values``, i.e. GPT-2). A patch at the last position cannot change any earlier
position (the models are causal), so the prompt's first T − 1 tokens are run once, without
gradients, into the model's key/value cache, which is copied to every row; the rows then run
only the last token, through all layers, forward and backward. This is exact (the tests
compare it with full-sequence rows) and costs about 1/T of the full-sequence work per row.
Mamba rows run the whole prompt, and the gradient flows through neuronspec's chunked torch
scan (the fast-scan path switches to it whenever a gradient is needed;
:mod:`neuronspec.models.scan`): transformers' one-token Mamba step updates its cached SSM
state in place after saving it for backward, which autograd rejects in float32, so a
shared prefix is not offered there.

Shapes: ``input_ids`` ``(1, T)``; attributions ``(n_layers_asked, width)`` float64.
"""

from __future__ import annotations

import copy
import inspect
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn

from neuronspec.errors import NeuronSpecError
from neuronspec.models.adapters import SiteAdapter
from neuronspec.options import default

DEFAULT_MAX_ROWS = 256  # (layer, step) rows per forward/backward; bounds memory on large models


class IntegratedGradientsError(NeuronSpecError, ValueError):
    """Inputs integrated gradients cannot run on (shapes, step counts, targets)."""


@dataclass(frozen=True)
class LayerAttributions:
    """Integrated gradients of one prompt for the layers asked for.

    ``attributions[j]`` belongs to ``layers[j]``: float64 ``(n_layers_asked, width)``.
    ``activations``: w̄ per layer, ``(n_layers_asked, width)``. ``prob``: P(w̄), the clean
    gold probability. ``prob_at_zero[j]``: P with layer ``layers[j]``'s vector zeroed at
    the last position (``None`` unless ``with_zero``).
    """

    layers: tuple[int, ...]
    attributions: torch.Tensor
    activations: torch.Tensor
    prob: float
    prob_at_zero: tuple[float, ...] | None
    steps: int

    def completeness_error(self) -> torch.Tensor:
        """|Σ_i Attr_i − (P(w̄) − P(0))| per layer, float64 ``(n_layers_asked,)``."""
        if self.prob_at_zero is None:
            raise IntegratedGradientsError(
                "completeness needs P(0): compute the attributions with with_zero=True"
            )
        gap = self.prob - torch.tensor(self.prob_at_zero, dtype=torch.float64)
        return (self.attributions.sum(dim=1) - gap).abs()


def gold_probability(logits: torch.Tensor, target: int) -> torch.Tensor:
    """Softmax probability of ``target`` from last-position logits ``(R, V)`` → ``(R,)``."""
    return torch.softmax(logits.float(), dim=-1)[:, target]


def _last_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits at the last position, ``(R, V)``; only that position is projected."""
    return model(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits[:, -1, :]


def _takes_key_value_cache(model: nn.Module) -> bool:
    return "past_key_values" in inspect.signature(model.forward).parameters


@torch.no_grad()
def _prefix_cache(model: nn.Module, input_ids: torch.Tensor):
    """The model's cache after the first T − 1 tokens of ``input_ids`` ``(1, T)``."""
    out = model(input_ids=input_ids[:, :-1], use_cache=True, logits_to_keep=1)
    cache = getattr(out, "past_key_values", None)
    if cache is None:
        raise IntegratedGradientsError(
            f"{type(model).__name__} returned no cache; pass share_prefix=False"
        )
    return cache


def _rows_logits(model: nn.Module, input_ids: torch.Tensor, n_rows: int, cache) -> torch.Tensor:
    """Last-position logits ``(R, V)`` of ``n_rows`` copies of the prompt: the whole prompt,
    or only its last token after a copy of the shared prefix's cache."""
    if cache is None:
        return _last_logits(model, input_ids.expand(n_rows, -1))
    rows_cache = copy.deepcopy(cache)  # the step appends to / updates the cache in place
    rows_cache.reorder_cache(torch.zeros(n_rows, dtype=torch.long, device=input_ids.device))
    out = model(
        input_ids=input_ids[:, -1:].expand(n_rows, 1),
        use_cache=True,
        logits_to_keep=1,
        past_key_values=rows_cache,
    )
    return out.logits[:, -1, :]


def _check(input_ids: torch.Tensor, steps: int, max_rows: int, target: int, vocab: int) -> None:
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise IntegratedGradientsError(
            f"input_ids must be one prompt of shape (1, T) with T >= 1, got {tuple(input_ids.shape)}"
        )
    if steps < 1:
        raise IntegratedGradientsError(f"the number of IG steps must be >= 1, got {steps}")
    if max_rows < 1:
        raise IntegratedGradientsError(f"max_rows must be >= 1, got {max_rows}")
    if not 0 <= target < vocab:
        raise IntegratedGradientsError(
            f"target token id {target} outside the vocabulary 0..{vocab - 1}"
        )


def integrated_gradients(
    model: nn.Module,
    adapter: SiteAdapter,
    input_ids: torch.Tensor,
    target: int,
    *,
    layers: list[int] | tuple[int, ...] | None = None,
    steps: int = default("ig_steps"),
    site: str = "mlp",
    max_rows: int = DEFAULT_MAX_ROWS,
    with_zero: bool = False,
    share_prefix: bool | None = None,
) -> LayerAttributions:
    """IG of P(``target``) w.r.t. ``site`` at the last position of ``input_ids`` ``(1, T)``,
    for every layer in ``layers`` (default all), all (layer, step) rows batched together in
    passes of at most ``max_rows`` rows; ``share_prefix``: run the first T − 1 tokens once
    (None: where the model takes a key/value cache). Definition in the module docstring."""
    layers = tuple(range(adapter.n_layers)) if layers is None else tuple(layers)
    if not layers:
        raise IntegratedGradientsError("no layers to attribute: pass at least one layer")
    for layer in layers:
        adapter.check(site, layer)
    vocab = model.get_output_embeddings().weight.shape[0]
    _check(input_ids, steps, max_rows, target, vocab)
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)

    # clean pass: w̄ of every layer at the last position, and P(w̄)
    with torch.no_grad():
        captured = adapter.capture(input_ids, [(site, layer) for layer in layers])
        prob = float(gold_probability(_last_logits(model, input_ids), target)[0])
    w_bar = torch.stack([captured[(site, layer)][0, -1] for layer in layers])  # (nL, W)
    if share_prefix is None:
        share_prefix = _takes_key_value_cache(model)
    elif share_prefix and not _takes_key_value_cache(model):
        raise IntegratedGradientsError(
            f"share_prefix needs a key/value cache, which {type(model).__name__} does not take "
            "(Mamba rows run the whole prompt); pass share_prefix=False or leave it None"
        )
    cache = _prefix_cache(model, input_ids) if share_prefix and input_ids.shape[1] > 1 else None

    first_step = 0 if with_zero else 1
    rows = [(j, k) for j in range(len(layers)) for k in range(first_step, steps + 1)]
    grad_sum = torch.zeros(w_bar.shape, dtype=torch.float64, device=device)  # (nL, W)
    zero_probs: dict[int, float] = {}
    for start in range(0, len(rows), max_rows):
        chunk = rows[start : start + max_rows]
        grads, probs = _batch_gradients(
            model, adapter, input_ids, target, site, layers, w_bar, chunk, steps, cache
        )  # (R, W), (R,)
        for (j, k), grad, p in zip(chunk, grads, probs.tolist(), strict=True):
            if k == 0:
                zero_probs[j] = p
            else:
                grad_sum[j] += grad.double()
    attributions = w_bar.double() * grad_sum / steps  # (nL, W)
    return LayerAttributions(
        layers=layers,
        attributions=attributions.cpu(),
        activations=w_bar.detach().double().cpu(),
        prob=prob,
        prob_at_zero=tuple(zero_probs[j] for j in range(len(layers))) if with_zero else None,
        steps=steps,
    )


def _batch_gradients(
    model: nn.Module,
    adapter: SiteAdapter,
    input_ids: torch.Tensor,
    target: int,
    site: str,
    layers: tuple[int, ...],
    w_bar: torch.Tensor,
    rows: list[tuple[int, int]],
    steps: int,
    cache,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward/backward over ``rows`` = [(layer index j, step k)]: ∂P_r/∂x_r per row
    ``(R, W)`` and P_r ``(R,)``, where x_r = k/m · w̄ is row r's patched vector."""
    n_rows = len(rows)
    row_layer = torch.tensor([j for j, _ in rows])  # (R,)
    alpha = torch.tensor([k / steps for _, k in rows], dtype=w_bar.dtype, device=w_bar.device)
    leaves: list[torch.Tensor] = []
    with ExitStack() as stack:
        for j in sorted(set(row_layer.tolist())):
            mine = torch.nonzero(row_layer == j).flatten().to(w_bar.device)  # (r,)
            leaf = (alpha[mine, None] * w_bar[j][None, :]).detach().requires_grad_(True)  # (r, W)
            leaves.append(leaf)

            def put(value: torch.Tensor, mine=mine, leaf=leaf) -> torch.Tensor:
                # value (R, T, W), T = 1 after a shared prefix: this layer's rows get the leaf
                # at the last position
                last = torch.full_like(mine, value.shape[1] - 1)
                return value.index_put((mine, last), leaf.to(value.dtype))

            stack.enter_context(adapter.patch(site, layers[j], put))
        probs = gold_probability(_rows_logits(model, input_ids, n_rows, cache), target)  # (R,)
    grads = torch.autograd.grad(probs.sum(), leaves)
    by_row = torch.empty((n_rows, w_bar.shape[1]), dtype=w_bar.dtype, device=w_bar.device)
    for j, grad in zip(sorted(set(row_layer.tolist())), grads, strict=True):
        by_row[torch.nonzero(row_layer == j).flatten().to(w_bar.device)] = grad
    return by_row, probs.detach()


def integrated_gradients_per_layer(
    model: nn.Module,
    adapter: SiteAdapter,
    input_ids: torch.Tensor,
    target: int,
    *,
    layers: list[int] | tuple[int, ...] | None = None,
    steps: int = default("ig_steps"),
    site: str = "mlp",
    share_prefix: bool = False,
) -> LayerAttributions:
    """The same attributions by a loop over layers, one pass of ``steps`` rows per layer,
    each row the whole prompt unless ``share_prefix`` (the straightforward method; the
    reference the batched form is checked and benchmarked against)."""
    layers = tuple(range(adapter.n_layers)) if layers is None else tuple(layers)
    parts = [
        integrated_gradients(
            model, adapter, input_ids, target, layers=[layer], steps=steps, site=site,
            max_rows=steps,
            share_prefix=share_prefix,
        )
        for layer in layers
    ]  # fmt: skip
    return LayerAttributions(
        layers=layers,
        attributions=torch.cat([p.attributions for p in parts]),
        activations=torch.cat([p.activations for p in parts]),
        prob=parts[0].prob,
        prob_at_zero=None,
        steps=steps,
    )
