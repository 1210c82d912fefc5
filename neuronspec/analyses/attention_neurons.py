"""Attention neurons and rollout relevance, for Mamba (hidden attention) and GPT-2 (METHODS §7).

Ali, Zimerman, Wolf (2024) for α̃; Abnar & Zuidema (2020) for the rollout. The channel
importances, per layer, over P prompts ``(P, L)`` (ŷ = the ``mlp`` site, the gated output;
g = ∂logit_target/∂ŷ, target = the model's top-1 token at the last position)::

    attention_weighted  I_c = mean_i Σ_j |α̃_c[i, j] · x_j[c]|
    gradient_guided     I_c = mean_i |g_i[c] · ŷ_i[c]|
    rollout             I_c = Σ_{j ∈ T*} |α̃_c[L−1, j]| / Σ_j |α̃_c[L−1, j]|

each averaged over the prompts. Where METHODS is silent: ``rollout``'s "tokens the rollout
marks most relevant" T* are the tokens whose last-token rollout relevance exceeds the uniform
1/L, and the "attention mass" is the share of the channel's |α̃| mass on them (in [0, 1]) in
the last query row, the row whose relevance a causal LM's output has (summing over all query
rows i would favour early tokens: token j collects mass from L − j rows). Per
(method, layer) a finding reports the neurons analysed, the mean activation (mean of ŷ over
prompts, positions and channels), the top-k neurons with their importances and the neuron
diversity: the entropy (nats) of the normalised importances I_c / Σ I, next to its maximum
ln W. GPT-2 has no per-channel attention: its counterparts are the rollout of its real
attention (mean over heads) and ``gradient_guided`` on its ``mlp`` site.

Relevance on fact prompts (:func:`fact_relevance`; the run's facts, as for knowledge neurons:
the toy world for the embedded models): the last-token rollout relevance averaged over the
subject's tokens against the average over the template's other tokens, the BOS and the last
(query) token excluded: the last token keeps the identity's share for
itself, so counting it would favour whatever word ends the template.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from neuronspec.analyses.delta_sensitive import top_channels
from neuronspec.analyses.hidden_attention import (
    DEFAULT_MEMORY_BYTES,
    HiddenAttentionLayerFinding,
    RolloutFinding,
    attention_distance,
    channel_aggregate,
    gpt2_attention,
    gradient_attention,
    gradient_rollout_layer,
    layer_attention,
    rollout,
)
from neuronspec.errors import NeuronSpecError
from neuronspec.findings import Finding
from neuronspec.models.mamba_internals import capture_scan_inputs
from neuronspec.models.registry import LoadedModel
from neuronspec.models.scan import selective_scan
from neuronspec.options import ATTENTION_METHODS, default

GPT2_METHODS = ("gradient_guided",)  # the methods that exist without per-channel attention


@dataclass(frozen=True)
class AttentionNeuronFinding(Finding):
    """One (method, layer) of the attention-neuron analysis (``attention_neurons``)."""

    model: str
    method: str
    layer: int
    n_neurons: int
    n_prompts: int
    mean_activation: float
    mean_importance: float
    top_neurons: tuple[int, ...]
    top_importances: tuple[float, ...]
    top_activations: tuple[float, ...]  # mean ŷ of the top neurons
    diversity: float  # entropy (nats) of the normalised importances
    max_diversity: float  # ln(n_neurons)


@dataclass
class LayerScores:
    """Per-prompt importances and mean activations of one (method, layer): the figure's data."""

    method: str
    layer: int
    importance: np.ndarray  # (P, W)
    activation: np.ndarray  # (W,) mean ŷ over prompts and positions


@dataclass
class AttentionRun:
    """Everything the attention analyses computed for one model on its prompts."""

    model: str
    family: str
    prompts: torch.Tensor  # (P, L) token ids
    layer_findings: list[HiddenAttentionLayerFinding] = field(default_factory=list)
    rollout_findings: list[RolloutFinding] = field(default_factory=list)
    neuron_findings: list[AttentionNeuronFinding] = field(default_factory=list)
    scores: dict[tuple[str, int], LayerScores] = field(default_factory=dict)
    mean_attention: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> (L, L), prompt 0

    def snapshot_view(self) -> list[dict]:
        """Per (method, layer): neurons analysed, the top 5 neurons and importances,
        diversity and mean activation."""
        return [
            {
                "method": f.method,
                "layer": f.layer,
                "n_neurons": f.n_neurons,
                "top_neurons": list(f.top_neurons[:5]),
                "top_importances": list(f.top_importances[:5]),
                "diversity": f.diversity,
                "mean_activation": f.mean_activation,
            }
            for f in self.neuron_findings
        ]

    relevance: dict[str, np.ndarray] = field(default_factory=dict)  # method -> (P, L)
    fact_relevance: list[FactRelevanceFinding] = field(default_factory=list)  # filled by callers


def diversity(importance: np.ndarray) -> float:
    """Entropy (nats) of ``importance / Σ importance``; 0·ln 0 = 0; NaN if all are 0."""
    total = float(np.sum(importance))
    if total <= 0:
        return float("nan")
    p = np.asarray(importance, dtype=np.float64) / total
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def mlp_gradients(
    loaded: LoadedModel, prompts: torch.Tensor, layers: Sequence[int]
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], torch.Tensor]:
    """``(g, ŷ, target)``: per layer the ``mlp`` site ŷ ``(P, L, W)`` and g = ∂logit_target/∂ŷ,
    target ``(P,)`` = top-1 token at the last position. Parameters' ``.grad`` are untouched."""
    kept: dict[int, torch.Tensor] = {}

    def keep(site: str, layer: int, value: torch.Tensor) -> None:
        kept[layer] = value

    with torch.enable_grad(), loaded.adapter.read([("mlp", layer) for layer in layers], keep):
        logits = loaded.model(input_ids=prompts.to(loaded.device), use_cache=False).logits
        target = logits[:, -1].argmax(-1)  # (P,)
        chosen = logits[torch.arange(len(prompts)), -1, target].sum()
        if not chosen.requires_grad:
            raise NeuronSpecError("gradient-guided analysis: the model's parameters need grads")
        grads = torch.autograd.grad(chosen, [kept[layer] for layer in layers])
    g = {layer: grad.detach() for layer, grad in zip(layers, grads, strict=True)}
    y = {layer: kept[layer].detach() for layer in layers}
    return g, y, target.detach()


def _neuron_finding(model, method, layer, importance, activation, top_k) -> AttentionNeuronFinding:
    mean_importance = importance.mean(0)  # (W,)
    mean_activation = activation  # (W,)
    top = top_channels(mean_importance, top_k)
    return AttentionNeuronFinding(
        model=model,
        method=method,
        layer=layer,
        n_neurons=int(importance.shape[1]),
        n_prompts=int(importance.shape[0]),
        mean_activation=float(mean_activation.mean()),
        mean_importance=float(mean_importance.mean()),
        top_neurons=tuple(top),
        top_importances=tuple(float(mean_importance[c]) for c in top),
        top_activations=tuple(float(mean_activation[c]) for c in top),
        diversity=diversity(mean_importance),
        max_diversity=math.log(importance.shape[1]),
    )


ROW_NORMALISATION = {
    "rollout": "rows to unit mass",
    "gradient_rollout": "min-max per prompt, then rows to unit mass",
}
SIGNED_NORMALISATION = "none (signed mean, as METHODS §7 writes it)"


def _rollout_finding(model, method, aggregate, relevance: torch.Tensor) -> RolloutFinding:
    rel = relevance.double()  # (P, L)
    signed = method == "rollout" and aggregate == "mean"
    return RolloutFinding(
        model=model,
        method=method,
        aggregate=aggregate,
        normalisation=SIGNED_NORMALISATION if signed else ROW_NORMALISATION[method],
        n_prompts=rel.shape[0],
        length=rel.shape[1],
        relevance_first_prompt=tuple(float(v) for v in rel[0]),
        last_token_share=float(rel[:, -1].mean()),
        first_token_share=float(rel[:, 0].mean()),
    )


def mamba_relevance(
    loaded: LoadedModel,
    prompts: torch.Tensor,
    *,
    aggregate: str = default("attention_aggregate"),
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Last-token relevance ``(P, L)`` of the rollout (of the ``aggregate`` channel mean,
    :func:`channel_aggregate`) and of the gradient-guided rollout, and the per-layer pieces
    ``{"inputs", "attention", "grads", "acts"}`` they were built from."""
    layers = list(range(loaded.n_layers))
    inputs = capture_scan_inputs(loaded.model, prompts.to(loaded.device), layers)
    grads, acts, _ = mlp_gradients(loaded, prompts, layers)
    attention = {
        layer: layer_attention(inputs[layer], memory_bytes=memory_bytes) for layer in layers
    }
    plain = rollout(
        [channel_aggregate(attention[layer], aggregate) for layer in layers],
        unit=aggregate != "mean",
    )
    guided = rollout(
        [
            gradient_rollout_layer(
                attention[layer].mean, gradient_attention(inputs[layer], grads[layer])
            )
            for layer in layers
        ]
    )  # (P, L, L)
    parts = {"inputs": inputs, "attention": attention, "grads": grads, "acts": acts}
    return plain[:, -1], guided[:, -1], parts


def analyse_attention(
    loaded: LoadedModel,
    prompts: torch.Tensor,
    *,
    model: str,
    layers: Sequence[int],
    methods: Sequence[str] = ATTENTION_METHODS,
    top_k: int = default("top_k"),
    aggregate: str = default("attention_aggregate"),
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
) -> AttentionRun:
    """Hidden attention (Mamba), rollouts and attention neurons of ``layers`` on ``prompts``;
    ``aggregate``: the channel mean the Mamba rollout takes (:func:`channel_aggregate`)."""
    unknown = sorted(set(methods) - set(ATTENTION_METHODS))
    if unknown:
        raise NeuronSpecError(
            f"unknown attention methods {unknown}; known: {', '.join(ATTENTION_METHODS)}"
        )
    run = AttentionRun(model=model, family=loaded.family, prompts=prompts)
    if loaded.family == "gpt2":
        return _analyse_gpt2(loaded, prompts, run, layers, methods, top_k)
    if loaded.family != "mamba":
        raise NeuronSpecError(f"attention analyses support mamba and gpt2, not {loaded.family}")
    plain, guided, parts = mamba_relevance(
        loaded, prompts, aggregate=aggregate, memory_bytes=memory_bytes
    )
    run.relevance = {"rollout": plain.cpu().numpy(), "gradient_rollout": guided.cpu().numpy()}
    run.rollout_findings = [
        _rollout_finding(model, "rollout", aggregate, plain),
        _rollout_finding(model, "gradient_rollout", "min-max gradient ⊙ mean", guided),
    ]
    length = prompts.shape[1]
    relevant = plain > 1.0 / length  # (P, L): T*, the tokens the rollout marks
    for layer in layers:
        s, att = parts["inputs"][layer], parts["attention"][layer]
        run.layer_findings.append(_layer_finding(model, layer, s, att, loaded))
        run.mean_attention[layer] = att.mean[0].cpu().numpy()
        activation = parts["acts"][layer].double().mean((0, 1)).cpu().numpy()  # (W,)
        importances = {
            "attention_weighted": att.weighted,
            "gradient_guided": (parts["grads"][layer] * parts["acts"][layer]).abs().mean(1),
            "rollout": _rollout_mass(att.last_row_mass, relevant),
        }
        for method in methods:
            importance = importances[method].double().cpu().numpy()  # (P, W)
            run.scores[method, layer] = LayerScores(method, layer, importance, activation)
            run.neuron_findings.append(
                _neuron_finding(model, method, layer, importance, activation, top_k)
            )
    return run


def _rollout_mass(row_mass: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """Σ_{j ∈ T*} mass_c[j] / Σ_j mass_c[j], ``(P, W)``, from last-row masses ``(P, W, L)``."""
    on_relevant = (row_mass * relevant[:, None, :].to(row_mass.dtype)).sum(-1)  # (P, W)
    total = row_mass.sum(-1)  # (P, W)
    return torch.where(total > 0, on_relevant / total.clamp_min(1e-300), torch.zeros_like(total))


def _layer_finding(model, layer, s, att, loaded) -> HiddenAttentionLayerFinding:
    scan = selective_scan(
        s.x.transpose(1, 2),
        s.delta.transpose(1, 2),
        s.A,
        s.B.transpose(1, 2),
        s.C.transpose(1, 2),
        delta_softplus=False,
    ).transpose(1, 2)  # (P, L, d) fmt: skip
    mixer = loaded.adapter.mixer(layer)
    with torch.no_grad():
        rebuilt = mixer.out_proj(
            ((att.y + s.D * s.x) * torch.nn.functional.silu(s.z)).to(s.out.dtype)
        )  # (P, L, D)
    diagonal, distance = attention_distance(att.abs_mean)
    return HiddenAttentionLayerFinding(
        model=model,
        layer=layer,
        n_prompts=s.x.shape[0],
        length=s.x.shape[1],
        n_channels=s.x.shape[2],
        above_diagonal_max=att.above_diagonal_max,
        identity_rel_error=float((att.y - scan).abs().max() / scan.abs().max()),
        mixer_rel_error=float((rebuilt - s.out).abs().max() / s.out.abs().max()),
        diagonal_share=diagonal,
        mean_distance=distance,
    )


def _analyse_gpt2(loaded, prompts, run, layers, methods, top_k) -> AttentionRun:
    attentions = gpt2_attention(loaded.model, prompts.to(loaded.device))
    plain = rollout(attentions)[:, -1]  # (P, L)
    run.relevance = {"rollout": plain.cpu().numpy()}
    run.rollout_findings = [_rollout_finding(run.model, "rollout", "heads", plain)]
    for layer in layers:
        run.mean_attention[layer] = attentions[layer][0].cpu().numpy()
    chosen = [m for m in methods if m in GPT2_METHODS]
    if chosen:
        grads, acts, _ = mlp_gradients(loaded, prompts, list(layers))
        for layer in layers:
            importance = (grads[layer] * acts[layer]).abs().mean(1).double().cpu().numpy()
            activation = acts[layer].double().mean((0, 1)).cpu().numpy()
            run.scores["gradient_guided", layer] = LayerScores(
                "gradient_guided", layer, importance, activation
            )
            run.neuron_findings.append(
                _neuron_finding(run.model, "gradient_guided", layer, importance, activation, top_k)
            )
    return run


# -- relevance on toy-world fact prompts ---------------------------------------------------------


@dataclass(frozen=True)
class FactRelevanceFinding(Finding):
    """Rollout relevance of subject tokens vs the template's other tokens on fact prompts."""

    model: str
    method: str
    n_prompts: int
    mean_subject: float  # mean over prompts of the mean relevance per subject token
    mean_template: float  # ... per other template token (BOS and last token excluded)
    share_subject_higher: float  # prompts where the subject's mean exceeds the template's


def fact_prompt_tokens(tokenizer, prompt: str, subject: str) -> tuple[list[int], list[bool]]:
    """``[bos] + ids(prompt)`` and a subject mask over them (token overlaps the subject's span).
    The subject is found ignoring case: a prompt may start with it capitalised ("The fall
    of the Berlin Wall happened in" for the subject "the fall of the Berlin Wall")."""
    found = re.search(re.escape(subject), prompt, flags=re.IGNORECASE)
    if found is None:
        raise NeuronSpecError(
            f"the fact prompt {prompt!r} does not contain its subject {subject!r}"
        )
    start, end = found.span()
    encoded = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids = [tokenizer.bos_token_id, *encoded["input_ids"]]
    mask = [False] + [a < end and b > start for a, b in encoded["offset_mapping"]]
    return ids, mask


def fact_relevance(
    loaded: LoadedModel,
    facts,
    *,
    model: str,
    aggregate: str = default("attention_aggregate"),
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
) -> list[FactRelevanceFinding]:
    """Relevance findings (rollout, and for Mamba the gradient-guided rollout) on the first
    prompt of each fact (:class:`~neuronspec.data.facts.KnowledgeFact`; for the toy world,
    its first training template); prompts of equal token length share a forward.
    ``aggregate``: as in :func:`analyse_attention`."""
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        raise NeuronSpecError("fact relevance needs the model's tokenizer")
    groups: dict[int, list[tuple[list[int], list[bool]]]] = {}
    for fact in facts:
        ids, mask = fact_prompt_tokens(tokenizer, fact.prompts[0], fact.subject)
        if any(mask[1:-1]) and not all(mask[1:-1]):
            groups.setdefault(len(ids), []).append((ids, mask))
    methods = ["rollout"] + (["gradient_rollout"] if loaded.family == "mamba" else [])
    rows: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
    for _, items in sorted(groups.items()):
        ids = torch.tensor([i for i, _ in items])  # (P, L)
        masks = torch.tensor([m for _, m in items])  # (P, L)
        if loaded.family == "mamba":
            plain, guided, _ = mamba_relevance(
                loaded, ids, aggregate=aggregate, memory_bytes=memory_bytes
            )
            relevances = {"rollout": plain, "gradient_rollout": guided}
        else:
            relevances = {"rollout": rollout(gpt2_attention(loaded.model, ids))[:, -1]}
        inner = torch.zeros_like(masks)
        inner[:, 1:-1] = True  # neither BOS nor the last token
        for method, relevance in relevances.items():
            rel = relevance.double().cpu()
            for p in range(len(items)):
                subject = masks[p] & inner[p]
                template = ~masks[p] & inner[p]
                rows[method].append((float(rel[p, subject].mean()), float(rel[p, template].mean())))
    if not rows["rollout"]:
        raise NeuronSpecError("no fact prompt has both subject and template tokens")
    findings = []
    for method, values in rows.items():
        subject, template = np.array(values).T
        findings.append(
            FactRelevanceFinding(
                model=model,
                method=method,
                n_prompts=len(values),
                mean_subject=float(subject.mean()),
                mean_template=float(template.mean()),
                share_subject_higher=float((subject > template).mean()),
            )
        )
    return findings
