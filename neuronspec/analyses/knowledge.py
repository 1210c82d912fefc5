"""Knowledge neurons by integrated gradients: refined sets, suppress/enhance, overlap (METHODS.md §8).

Dai, Dong, Hao, Sui, Chang, Wei (2022), *Knowledge Neurons in Pretrained Transformers*, §3.
The neuron is the ``mlp`` site at the last prompt position. For each paraphrase prompt of a
fact, integrated gradients (:mod:`neuronspec.interventions.integrated_gradients`, baseline 0,
m steps) attribute P(gold first token) to every neuron of every layer, ``(n_layers, width)``.

- **Coarse set** of a prompt: neurons with Attr ≥ t · (max of Attr over all layers and
  neurons of that prompt), t = 0.2. If that maximum is ≤ 0 the coarse set is empty (no
  neuron raises P; a threshold below zero would admit neurons that lower it).
- **Refined set** of a fact: neurons in the coarse sets of at least a share p = 0.7 of its
  prompts (count ≥ p · n_prompts); a fact needs at least 2 prompts.
- **Suppress / enhance**: the fact's refined neurons (all layers at once) are set to 0 /
  multiplied by 2 at the last position; the relative change (P' − P) / P of the gold
  probability is averaged over the fact's prompts. **Control**: the same intervention on
  ``n_controls`` unrelated facts (facts of other relations: the next ones in table order,
  cyclically), each scored on its own gold token and prompts, averaged.
- **Overlap**: Jaccard |A ∩ B| / |A ∪ B| of two facts' refined sets, per layer (sets of
  neuron ids) and overall (sets of (layer, neuron)), averaged over intra-relation pairs and
  over inter-relation pairs. A pair whose union is empty has no Jaccard and is left out
  of the mean (the counts of pairs used are reported).

Decisions where METHODS.md is silent: prompts are read as the start of a document,
``[bos] + ids(prompt)`` when the tokenizer has a bos token (as the zoo's fact recall does);
the gold token is the first id of ``tokenizer(" " + object)`` and the answer's token count is
recorded; summaries over facts (the specs' means) use the facts whose refined set is not
empty, and say how many those are. Results are recorded per run (``knowledge_neurons``,
``knowledge_overlap``); they are not disk-cached.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from neuronspec.data.facts import FactsError, KnowledgeFact
from neuronspec.findings import Finding
from neuronspec.interventions.integrated_gradients import (
    DEFAULT_MAX_ROWS,
    LayerAttributions,
    gold_probability,
    integrated_gradients,
)
from neuronspec.models.adapters import SiteAdapter
from neuronspec.options import default
from neuronspec.progress import progress
from neuronspec.uncertainty import Interval, mean_se, normal_interval, sign_flip_p_value

DEFAULT_THRESHOLD = 0.2  # Dai et al.: t = 0.2 of the prompt's maximum attribution
DEFAULT_MIN_SHARE = 0.7  # Dai et al.: p = 0.7 of the paraphrase prompts
DEFAULT_CONTROLS = 3  # unrelated facts per fact for the suppress/enhance control
MODES = ("suppress", "enhance")  # set to 0, multiply by 2 (METHODS.md §8)


@dataclass(frozen=True)
class KnowledgeFactFinding(Finding):
    """One fact: its refined set per layer, top attributions, suppress/enhance effects."""

    subject: str
    relation: str
    object: str
    answer_token: int  # first id of " " + object
    answer_token_text: str
    answer_n_tokens: int  # tokens of " " + object (only the first is scored)
    n_prompts: int
    gold_prob: float  # mean over prompts of P(gold), unpatched
    layers: tuple[int, ...]
    refined: tuple[tuple[int, ...], ...]  # refined[j]: neuron ids of layers[j]
    n_refined: int
    top_neurons: tuple[tuple[int, ...], ...]  # per layer, top-k by mean attribution over prompts
    top_attributions: tuple[tuple[float, ...], ...]
    suppress_change: float  # mean over prompts of (P' − P) / P with the refined set zeroed
    enhance_change: float  # … with the refined set doubled
    control_suppress_change: float  # mean over control facts of their own mean change
    control_enhance_change: float
    control_facts: tuple[str, ...]
    max_completeness_error: float  # max over prompts and layers of |Σ Attr − (P(w̄) − P(0))|
    steps: int
    threshold: float
    min_share: float

    @property
    def name(self) -> str:
        return f"{self.relation}({self.subject})"


@dataclass(frozen=True)
class KnowledgeNeuronsFinding(Finding):
    """All facts of a run, with the means the specs assert on (over facts with a refined set)."""

    facts: tuple[KnowledgeFactFinding, ...]
    n_facts: int
    n_with_refined: int
    mean_suppress_change: float
    mean_control_suppress_change: float
    mean_enhance_change: float
    mean_control_enhance_change: float
    mean_refined_size: float
    # own − control change per fact (paired over the facts with a refined set): mean, SE
    # (s/√n) and the sign-flip p-value in the direction Dai et al. predict
    suppress_difference: float
    suppress_difference_se: float
    suppress_p_value: float  # own suppress change < control's
    enhance_difference: float
    enhance_difference_se: float
    enhance_p_value: float  # own enhance change > control's

    def suppress_exceeds_control(self, *, alpha: float = 0.01) -> bool:
        """Zeroing a fact's neurons lowers its P(gold) more than its controls', at ``alpha``
        (paired sign-flip test over facts)."""
        return _at_level(self.suppress_p_value, alpha)

    def enhance_exceeds_control(self, *, alpha: float = 0.01) -> bool:
        """Doubling a fact's neurons raises its P(gold) more than its controls', at ``alpha``."""
        return _at_level(self.enhance_p_value, alpha)

    def suppress_interval(self, level: float = 0.95) -> Interval:
        return normal_interval(
            self.suppress_difference, self.suppress_difference_se, level, UNCERTAINTY
        )

    def enhance_interval(self, level: float = 0.95) -> Interval:
        return normal_interval(
            self.enhance_difference, self.enhance_difference_se, level, UNCERTAINTY
        )

    def evidence(self, j: int) -> dict[int, dict[str, Any]]:
        """Per neuron of the union of refined sets at layer index ``j``: the facts whose
        refined set holds it and its largest IG attribution among those facts' top neurons
        (the numbers a neuron card shows)."""
        union = sorted(set().union(*(set(f.refined[j]) for f in self.facts)))
        evidence: dict[int, dict[str, Any]] = {}
        for n in union:
            facts = [f for f in self.facts if n in f.refined[j]]
            attributions = [
                a
                for f in facts
                for top, a in zip(f.top_neurons[j], f.top_attributions[j], strict=True)
                if top == n
            ]
            evidence[n] = {
                "facts": [f"{f.subject} {f.relation} {f.object}" for f in facts],
                "max_ig_attribution": max(attributions) if attributions else None,
            }
        return evidence


UNCERTAINTY = "paired over facts: normal interval mean ± z·s/√n; sign-flip permutation p-value"


def _at_level(p_value: float, alpha: float) -> bool:
    if not 0.0 < alpha < 1.0:
        raise FactsError(f"alpha must lie in (0, 1), got {alpha}")
    return p_value <= alpha


@dataclass(frozen=True)
class KnowledgeOverlapFinding(Finding):
    """Mean Jaccard of refined sets, intra- vs inter-relation pairs, for a layer or overall."""

    layer: int | None  # None: overall, over (layer, neuron) pairs
    intra_jaccard: float
    inter_jaccard: float
    n_intra_pairs: int  # pairs with a non-empty union, used in the mean
    n_inter_pairs: int


# -- tokens -------------------------------------------------------------------------------------


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """``[bos] + ids(prompt)`` (no bos when the tokenizer has none), shape ``(1, T)``."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    return torch.tensor([([bos] if bos is not None else []) + list(ids)])


def gold_token(tokenizer, answer: str) -> tuple[int, int]:
    """(first id, token count) of ``answer``, which carries its leading space."""
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not ids:
        raise FactsError(f"answer {answer!r} tokenizes to nothing")
    return int(ids[0]), len(ids)


# -- sets ---------------------------------------------------------------------------------------


def coarse_set(attributions: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """Bool ``(n_layers, width)``: Attr ≥ t · max over all layers; empty if the max is ≤ 0."""
    top = float(attributions.max())
    if top <= 0:
        return torch.zeros(attributions.shape, dtype=torch.bool)
    return attributions >= threshold * top


def refined_set(
    coarse: Sequence[torch.Tensor], min_share: float = DEFAULT_MIN_SHARE
) -> torch.Tensor:
    """Bool ``(n_layers, width)``: in the coarse sets of ≥ p · n prompts (n ≥ 2)."""
    if len(coarse) < 2:
        raise FactsError(
            f"a refined set needs at least 2 paraphrase prompts, got {len(coarse)}; "
            "give every fact two or more prompts"
        )
    count = torch.stack([c.to(torch.int64) for c in coarse]).sum(dim=0)  # (nL, W)
    return count >= min_share * len(coarse) - 1e-9


def jaccard(a: set, b: set) -> float | None:
    """|A ∩ B| / |A ∪ B|; None when both are empty."""
    union = a | b
    return len(a & b) / len(union) if union else None


# -- interventions ------------------------------------------------------------------------------


def intervened_probability(
    model: torch.nn.Module,
    adapter: SiteAdapter,
    input_ids: torch.Tensor,
    target: int,
    neurons: dict[int, Sequence[int]],
    mode: str | None,
    *,
    site: str = "mlp",
) -> float:
    """P(target) at the last position with ``neurons`` ({layer: ids}) set to 0 (``suppress``)
    or doubled (``enhance``) at the last position; ``mode=None``: unpatched."""
    if mode is not None and mode not in MODES:
        raise FactsError(f"mode must be one of {MODES}, got {mode!r}")
    device = next(model.parameters()).device
    with torch.no_grad(), ExitStack() as stack:
        for layer, ids in sorted(neurons.items()):
            if mode is None or len(ids) == 0:
                continue
            index = torch.as_tensor(list(ids), dtype=torch.long, device=device)
            factor = 0.0 if mode == "suppress" else 2.0

            def scale(value: torch.Tensor, index=index, factor=factor) -> torch.Tensor:
                value = value.clone()  # (B, T, W)
                value[:, -1, index] = value[:, -1, index] * factor
                return value

            stack.enter_context(adapter.patch(site, layer, scale))
        logits = model(input_ids=input_ids.to(device), use_cache=False, logits_to_keep=1).logits
        return float(gold_probability(logits[:, -1, :], target)[0])


# -- the analysis -------------------------------------------------------------------------------


@dataclass
class _FactWork:
    fact: KnowledgeFact
    target: int
    n_tokens: int
    ids: list[torch.Tensor]
    probs: list[float]
    attributions: list[LayerAttributions]
    refined: torch.Tensor  # (nL, W) bool


def _relative_change(before: float, after: float) -> float:
    return (after - before) / before if before > 0 else math.nan


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def _control_indices(facts: Sequence[KnowledgeFact], i: int, n_controls: int) -> list[int]:
    """The next ``n_controls`` facts after ``i`` (cyclically) whose relation differs."""
    n = len(facts)
    order = [(i + step) % n for step in range(1, n)]
    return [j for j in order if facts[j].relation != facts[i].relation][:n_controls]


class KnowledgeResult(NamedTuple):
    """What :func:`knowledge_neurons` returns: the summary over facts and the overlaps
    (unpacks as ``summary, overlaps``)."""

    summary: KnowledgeNeuronsFinding
    overlaps: list[KnowledgeOverlapFinding]

    def snapshot_view(self) -> dict:
        """Refined-set sizes per fact and layer, the intervention means, the paired
        differences with their SEs (``x`` beside ``x_se``: judged against noise) and the
        overlaps."""
        summary = self.summary
        return {
            "refined_sizes": {f.name: [len(r) for r in f.refined] for f in summary.facts},
            "means": {
                "n_with_refined": summary.n_with_refined,
                "suppress": summary.mean_suppress_change,
                "control_suppress": summary.mean_control_suppress_change,
                "enhance": summary.mean_enhance_change,
                "control_enhance": summary.mean_control_enhance_change,
                "suppress_difference": summary.suppress_difference,
                "suppress_difference_se": summary.suppress_difference_se,
                "suppress_p_value": summary.suppress_p_value,
                "enhance_difference": summary.enhance_difference,
                "enhance_difference_se": summary.enhance_difference_se,
                "enhance_p_value": summary.enhance_p_value,
            },
            "overlap": [o.to_json() for o in self.overlaps],
        }


def knowledge_neurons(
    model: torch.nn.Module,
    adapter: SiteAdapter,
    tokenizer,
    facts: Sequence[KnowledgeFact],
    *,
    steps: int = default("ig_steps"),
    threshold: float = DEFAULT_THRESHOLD,
    min_share: float = DEFAULT_MIN_SHARE,
    n_controls: int = DEFAULT_CONTROLS,
    top_k: int = default("top_k"),
    max_rows: int = DEFAULT_MAX_ROWS,
    site: str = "mlp",
) -> KnowledgeResult:
    """Refined sets, suppress/enhance with controls, and overlap for ``facts`` (every layer)."""
    if not facts:
        raise FactsError("no facts to analyse")
    layers = tuple(range(adapter.n_layers))
    work: list[_FactWork] = []
    for fact in progress(facts, total=len(facts), desc="integrated gradients", unit="fact"):
        target, n_tokens = gold_token(tokenizer, fact.answer)
        ids = [prompt_ids(tokenizer, p) for p in fact.prompts]
        attrs = [
            integrated_gradients(
                model, adapter, x, target, steps=steps, site=site, max_rows=max_rows,
                with_zero=True,
            )
            for x in ids
        ]  # fmt: skip
        refined = refined_set([coarse_set(a.attributions, threshold) for a in attrs], min_share)
        work.append(_FactWork(fact, target, n_tokens, ids, [a.prob for a in attrs], attrs, refined))

    def effect(w: _FactWork, neurons: dict[int, list[int]], mode: str) -> float:
        return _mean(
            [
                _relative_change(p, intervened_probability(
                    model, adapter, x, w.target, neurons, mode, site=site))
                for x, p in zip(w.ids, w.probs, strict=True)
            ]
        )  # fmt: skip

    findings = []
    for i, w in enumerate(work):
        neurons = {
            layer: torch.nonzero(w.refined[j]).flatten().tolist() for j, layer in enumerate(layers)
        }
        controls = _control_indices(facts, i, n_controls)
        mean_attr = torch.stack([a.attributions for a in w.attributions]).mean(dim=0)  # (nL, W)
        k = min(top_k, mean_attr.shape[1])
        top = torch.topk(mean_attr, k, dim=1)
        n_refined = int(w.refined.sum())
        changes = {mode: effect(w, neurons, mode) if n_refined else 0.0 for mode in MODES}
        control = {
            mode: _mean([effect(work[c], neurons, mode) for c in controls]) if n_refined else 0.0
            for mode in MODES
        }
        findings.append(
            KnowledgeFactFinding(
                subject=w.fact.subject,
                relation=w.fact.relation,
                object=w.fact.object,
                answer_token=w.target,
                answer_token_text=tokenizer.decode([w.target]),
                answer_n_tokens=w.n_tokens,
                n_prompts=len(w.ids),
                gold_prob=_mean(w.probs),
                layers=layers,
                refined=tuple(tuple(neurons[layer]) for layer in layers),
                n_refined=n_refined,
                top_neurons=tuple(tuple(row) for row in top.indices.tolist()),
                top_attributions=tuple(tuple(row) for row in top.values.tolist()),
                suppress_change=changes["suppress"],
                enhance_change=changes["enhance"],
                control_suppress_change=control["suppress"],
                control_enhance_change=control["enhance"],
                control_facts=tuple(work[c].fact.name for c in controls),
                max_completeness_error=max(
                    float(a.completeness_error().max()) for a in w.attributions
                ),
                steps=steps,
                threshold=threshold,
                min_share=min_share,
            )
        )
    return KnowledgeResult(summarise(findings), knowledge_overlap(findings))


def summarise(findings: Sequence[KnowledgeFactFinding]) -> KnowledgeNeuronsFinding:
    """Means over the facts whose refined set is not empty."""
    used = [f for f in findings if f.n_refined > 0]
    suppress = _finite([f.suppress_change - f.control_suppress_change for f in used])
    enhance = _finite([f.enhance_change - f.control_enhance_change for f in used])
    return KnowledgeNeuronsFinding(
        facts=tuple(findings),
        n_facts=len(findings),
        n_with_refined=len(used),
        mean_suppress_change=_mean([f.suppress_change for f in used]),
        mean_control_suppress_change=_mean([f.control_suppress_change for f in used]),
        mean_enhance_change=_mean([f.enhance_change for f in used]),
        mean_control_enhance_change=_mean([f.control_enhance_change for f in used]),
        mean_refined_size=_mean([float(f.n_refined) for f in findings]),
        suppress_difference=_mean(suppress),
        suppress_difference_se=mean_se(suppress),
        suppress_p_value=sign_flip_p_value(suppress, alternative="less") if suppress else 1.0,
        enhance_difference=_mean(enhance),
        enhance_difference_se=mean_se(enhance),
        enhance_p_value=sign_flip_p_value(enhance, alternative="greater") if enhance else 1.0,
    )


def knowledge_overlap(findings: Sequence[KnowledgeFactFinding]) -> list[KnowledgeOverlapFinding]:
    """Per-layer findings (in layer order) followed by the overall one (``layer=None``)."""
    if not findings:
        raise FactsError("no facts to compare")
    layers = findings[0].layers

    def sets_of(f: KnowledgeFactFinding, j: int | None) -> set:
        if j is None:
            return {(layer, n) for layer, ids in zip(layers, f.refined, strict=True) for n in ids}
        return set(f.refined[j])

    out = []
    for j in [*range(len(layers)), None]:
        intra, inter = [], []
        for a, b in itertools.combinations(findings, 2):
            value = jaccard(sets_of(a, j), sets_of(b, j))
            if value is not None:
                (intra if a.relation == b.relation else inter).append(value)
        out.append(
            KnowledgeOverlapFinding(
                layer=None if j is None else layers[j],
                intra_jaccard=_mean(intra),
                inter_jaccard=_mean(inter),
                n_intra_pairs=len(intra),
                n_inter_pairs=len(inter),
            )
        )
    return out
