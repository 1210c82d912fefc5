"""Causal neurons: single-neuron interventions, their KL impact, inter- and cross-layer
impact (METHODS.md §6).

For one neuron (l, n) at the site it was identified on (``mlp`` by default), set it to 0
(``zero``) or its corpus mean μ_n (``mean``) at every position of P prompts ``(P, T)``.

- **Impact** = KL(p_base ‖ p_mod) of the next-token distribution, averaged over the P·T
  positions: (1/PT) Σ_{b,p} Σ_v p_base(v) [ln p_base(v) − ln p_mod(v)] (natural log).
- **Inter-layer impact** of (l, n) on layer t: ‖a'_t − a_t‖_F / ‖a_t‖_F over the
  ``(P, T, W)`` block of the site at layer t, a = unablated, a' = with the intervention.
  Reported for every later layer t > l.
- **Cross-layer matrix** M[s, t] (source layer × target layer): the mean inter-layer
  impact over the candidates of source layer s, measured for *every* t. Baseline
  subtracted: a_t is the baseline group of the same forward, so any change is the
  intervention's. An upstream layer cannot be affected, so M[s, t] = 0 exactly for
  t < s: the value is measured, not set, so a leak shows (tested). At t = s the site is
  read with the intervention in place: the diagonal is the relative size of the
  intervention itself.

Where METHODS is silent: the **candidates** of a layer are its ``top_k`` neurons by a
second-order **screen** of every neuron's KL impact (:mod:`neuronspec.interventions.kl_screen`:
κ̂ = ½·E_y[(Σ_t g_t δ_t)²] per position, from ``SCREEN_SAMPLES`` target draws, one backward
each for every neuron of every layer) and its ``top_k`` by residual share ρ (the largest
fraction of the residual stream's energy the intervention moves at a position: where the
second order is blind, massive activations), at most 2·``top_k``, measured exactly and
ranked by KL. Given a set of
identified neurons instead (``neuron_sets``, e.g. the delta-sensitive Δ channels of the
``dt`` site, METHODS §5, or GPT-2's high-variance ``mlp`` neurons), those are the
candidates, intervened on at their own site, and the inter-layer impact is read there too.

The **random control**: ``n_controls`` other neurons of the same layer (not candidates;
``--control-seeds``, default 99, at most the layer's other neurons): the first of them in
one permutation of the layer's neurons (``torch.Generator(seed + layer)``), a uniform draw
of the others, measured exactly the same way (KL and the control matrix). The two sweeps of
a model share a :class:`CausalCache`: at a common site a neuron is measured once, so the
high-variance sweep of GPT-2 reuses the controls of the causal sweep. Each candidate gets
the empirical p-value of its KL among the controls' (:mod:`neuronspec.uncertainty`); it is
recorded as a *causal neuron* when p ≤
``CAUSAL_ALPHA`` = 0.01 (per neuron, uncorrected). A layer's candidates as a set are tested
against its controls by a one-sided Mann–Whitney rank-sum test (``candidates_exceed(alpha)``).
The screen's quality is reported per layer: Spearman's ρ between κ̂ and the exact KL over
the measured neurons (the candidates and the random controls). Why the controls are
measured and not taken from the screen's distribution over all other neurons: κ̂ misses
the massive-activation neurons (above), so a screen-based null, however scaled, is wrong
for exactly the neurons that matter; scaling it by the measured controls' Σ KL / Σ κ̂ was
tried and made one such control decide every p-value of its layer.
Prompts are held-out windows (default 8, P·T = 512 positions at T = 64). The screen runs on
other held-out windows (the fixtures: the next 8), so that the candidates are chosen
independently of the noise of the KL measured on them, and the rank-sum test and the
p-values are not biased by the selection.

Batching: one forward holds the baseline group and up to ``max_rows // P − 1`` single-
neuron interventions, one group of P rows each (:class:`AblationEngine`).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from neuronspec.analyses.ablation import intervention_size
from neuronspec.analyses.delta_sensitive import NeuronSets
from neuronspec.capture.stats import NeuronStats
from neuronspec.errors import NeuronSpecError, TooFewTokensError
from neuronspec.findings import Finding
from neuronspec.interventions.ablation import (
    DEFAULT_MAX_ROWS,
    AblationEngine,
    AblationError,
    Condition,
    baseline_condition,
)
from neuronspec.interventions.kl import kl_divergence
from neuronspec.interventions.kl_screen import SCREEN_SAMPLES, ScreenCache
from neuronspec.models.registry import LoadedModel
from neuronspec.options import default
from neuronspec.progress import progress
from neuronspec.uncertainty import (
    empirical_p_value,
    rank_correlation,
    rank_correlation_se,
    rank_sum_p_value,
)

DEFAULT_METHOD = "zero"  # METHODS §6: "zero (or mean) it at all positions"
DEFAULT_N_PROMPTS = 8  # held-out windows: 512 positions at T = 64
CAUSAL_ALPHA = 0.01  # per-candidate level of the recorded causal neurons


@dataclass(frozen=True)
class CausalNeuron(Finding):
    layer: int
    neuron: int
    kl: float  # mean KL(p_base ‖ p_mod) per position, nats
    intervention_size: float | None  # E[(a − v)²] on the analysis windows (mlp site only)
    downstream: dict[int, float]  # later layer t → ‖a'_t − a_t‖ / ‖a_t‖
    p_value: float  # empirical, of its KL among the layer's random controls
    screen_kl: float  # κ̂, the second-order screen's estimate of its KL (nats)


@dataclass(frozen=True)
class CausalLayerFinding(Finding):
    layer: int
    candidates: list[CausalNeuron]  # ranked by descending KL
    control_neurons: list[int]
    control_kl: list[float]
    control_kl_mean: float
    control_kl_std: float
    causal_neurons: list[int]  # candidates with p_value <= CAUSAL_ALPHA
    rank_sum_p_value: float  # one-sided Mann–Whitney: candidates' KL > controls'
    screen_rank_correlation: float | None  # Spearman ρ(κ̂, exact KL), measured neurons
    # its Fieller–Hartley–Pearson SE over the n measured neurons (None where ρ is or n < 4)
    screen_rank_correlation_se: float | None

    def candidates_exceed(self, *, alpha: float = 0.01) -> bool:
        """The layer's candidates have larger KL than its random neurons at level ``alpha``
        (one-sided rank-sum test)."""
        if not 0.0 < alpha < 1.0:
            raise NeuronSpecError(f"alpha must lie in (0, 1), got {alpha}")
        return self.rank_sum_p_value <= alpha

    def strongest(self) -> CausalNeuron:
        return self.candidates[0]

    def evidence(self) -> dict[int, dict[str, float | None]]:
        """Per causal neuron: its KL impact (nats), its p-value among the layer's random
        controls, the screen's estimate and its intervention size (a neuron card's numbers)."""
        causal = set(self.causal_neurons)
        return {
            c.neuron: {
                "kl": c.kl,
                "p_value": c.p_value,
                "screen_kl": c.screen_kl,
                "intervention_size": c.intervention_size,
            }
            for c in self.candidates
            if c.neuron in causal
        }


@dataclass(frozen=True)
class CausalFinding(Finding):
    model: str
    site: str
    candidates_by: str  # "kl_screen", or the kind of the given neuron sets
    method: str
    n_prompts: int
    n_positions: int
    top_k: int
    layers: list[CausalLayerFinding]
    source_layers: list[int]
    cross_layer: list[list[float]]  # [source index][target layer], baseline subtracted
    control_cross_layer: list[list[float]]  # the same for the random control neurons

    def of_layer(self, layer: int) -> CausalLayerFinding:
        for found in self.layers:
            if found.layer == layer:
                return found
        raise NeuronSpecError(
            f"the causal sweep has no layer {layer}; swept: {[f.layer for f in self.layers]}"
        )

    def snapshot_view(self) -> dict:
        """Per layer the 5 strongest candidates with their KL and p-value, the number found
        causal and the rank-sum p-value; the site and the cross-layer matrix."""
        top = [
            {
                "layer": layer.layer,
                "neurons": [c.neuron for c in layer.candidates[:5]],
                "kl": [c.kl for c in layer.candidates[:5]],
                "p_value": [c.p_value for c in layer.candidates[:5]],
                "n_causal": len(layer.causal_neurons),
                "rank_sum_p_value": layer.rank_sum_p_value,
                "screen_rank_correlation": layer.screen_rank_correlation,
                # ρ is a sample statistic over the measured neurons: judged against its noise
                "screen_rank_correlation_se": layer.screen_rank_correlation_se,
            }
            for layer in self.layers
        ]
        return {"site": self.site, "top": top, "cross_layer": self.cross_layer}


def causal_prompts(heldout: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sweep's held-out windows ``(n, T)`` each: the first ``n`` measured exactly, the next
    ``n`` screened (the candidates are chosen on other windows than they are measured on)."""
    if len(heldout) < 2 * n:
        raise TooFewTokensError(
            f"the causal sweep needs {2 * n} held-out windows ({n} measured, {n} screened), "
            f"the corpus has {len(heldout)}; raise --max-tokens or --text-limit"
        )
    return heldout[:n], heldout[n : 2 * n]


def _screened_candidates(screened, layer: int, top_k: int) -> list[int]:
    """The ``top_k`` of ``layer`` by κ̂ and, where the site writes into the stream, the
    ``top_k`` by residual share ρ not already among them
    (:mod:`~neuronspec.interventions.kl_screen`)."""
    chosen = [int(n) for n in torch.argsort(-screened.kl[layer], stable=True)[:top_k]]
    if screened.residual_share is not None:
        by_share = torch.argsort(-screened.residual_share[layer], stable=True)[:top_k]
        chosen += [int(n) for n in by_share if int(n) not in set(chosen)]
    return chosen


def _control_neurons(width: int, exclude: Sequence[int], k: int, seed: int) -> list[int]:
    """The first ``k`` neurons of one permutation of the layer (``seed``) outside ``exclude``:
    a uniform draw of ``k`` of the other neurons whatever ``exclude`` is, and the same
    neurons for two sweeps of the layer wherever their exclusions allow."""
    excluded = set(exclude)
    order = torch.randperm(width, generator=torch.Generator().manual_seed(seed)).tolist()
    return [n for n in order if n not in excluded][:k]


class CausalCache:
    """One model's causal sweeps on fixed prompts: the KL screens
    (:class:`~neuronspec.interventions.kl_screen.ScreenCache`, on ``screen_prompts``) and the
    exact single-neuron measurements on ``prompts``, each ``(site, layer, neuron)`` run once.
    The causal sweep and the sweep of given sets at the same site (GPT-2's high-variance
    ``mlp`` neurons) share their screen, most of their random controls (drawn from one
    permutation per layer) and any common candidate."""

    def __init__(
        self,
        loaded: LoadedModel,
        prompts: torch.Tensor,
        screen_prompts: torch.Tensor,
        *,
        method: str = DEFAULT_METHOD,
        means: Mapping | None = None,
        screen_samples: int = SCREEN_SAMPLES,
        seed: int = 0,
    ):
        self.prompts, self.method, self.means = prompts, method, means
        self.screens = ScreenCache(
            loaded, screen_prompts, method=method, means=means, samples=screen_samples, seed=seed
        )
        self._exact: dict[tuple[str, int, int], tuple[float, list[float]]] = {}

    def check(self, prompts: torch.Tensor, method: str, means: Mapping | None) -> None:
        if method != self.method:
            raise AblationError(
                f"the cache holds the {self.method!r} intervention, the sweep intervenes by "
                f"{method!r}: build a CausalCache with method={method!r}"
            )
        if means is not self.means:
            raise AblationError("the cache was measured with other means than the sweep's")
        if prompts.shape != self.prompts.shape or not torch.equal(prompts, self.prompts):
            raise AblationError("the cache was measured on other prompts than the sweep's")

    def measure(
        self, engine: AblationEngine, plan: Sequence[tuple[int, int]], site: str
    ) -> dict[tuple[int, int], tuple[float, list[float]]]:
        """``(layer, neuron) → (KL, change per layer)`` of :func:`single_neuron_sweep` for
        ``plan``, sweeping only the neurons not measured before at ``site``."""
        todo = [key for key in dict.fromkeys(plan) if (site, *key) not in self._exact]
        kls, changes = single_neuron_sweep(engine, self.prompts, todo, site=site)
        for (layer, n), kl, change in zip(todo, kls, changes, strict=True):
            self._exact[(site, layer, n)] = (kl, change)
        return {(layer, n): self._exact[(site, layer, n)] for layer, n in plan}


def single_neuron_sweep(
    engine: AblationEngine,
    prompts: torch.Tensor,
    neurons: Sequence[tuple[int, int]],
    *,
    site: str = "mlp",
    share_upstream: bool = True,
) -> tuple[list[float], list[list[float]]]:
    """KL impact and relative change at every layer for each single-neuron intervention
    ``(layer, neuron)`` on ``prompts`` ``(P, T)``: ``(kl[i], change[i][t])``. The
    interventions run in plan order, several per forward; ``share_upstream``: the layers
    below a forward's lowest intervened layer run once (:meth:`AblationEngine.forward`),
    where their change is 0 by construction, not measured."""
    n_prompts = prompts.shape[0]
    per_forward = engine.max_rows // n_prompts - 1  # interventions besides the baseline group
    if per_forward < 1:
        raise AblationError(
            f"{n_prompts} prompts need max_rows >= {2 * n_prompts} (baseline + one intervention)"
        )
    n_layers = engine.adapter.n_layers
    kls: list[float] = []
    changes: list[list[float]] = []
    firsts = range(0, len(neurons), per_forward)
    for first in progress(firsts, total=len(firsts), desc="causal sweep", unit="forward"):
        part = neurons[first : first + per_forward]
        conditions = [
            baseline_condition(),
            *(Condition(f"L{layer}N{n}", site, {layer: (n,)}) for layer, n in part),
        ]
        groups = len(conditions)
        diff_sq = torch.zeros(groups, n_layers, dtype=torch.float64)
        base_sq = torch.zeros(n_layers, dtype=torch.float64)

        def on_read(
            _site: str,
            layer: int,
            value: torch.Tensor,
            groups: int = groups,
            diff_sq: torch.Tensor = diff_sq,
            base_sq: torch.Tensor = base_sq,
        ) -> None:
            if value.shape[0] == n_prompts:  # below every intervened layer: run once, shared
                base_sq[layer] = value.double().square().sum()
                diff_sq[:, layer] = 0.0
                return
            value = value.double().view(groups, n_prompts, *value.shape[1:])  # (G, P, T, W)
            base = value[0]  # (P, T, W)
            base_sq[layer] = base.square().sum()
            diff_sq[:, layer] = (value - base).square().flatten(1).sum(1)  # (G,)

        logits = engine.forward(
            prompts,
            conditions,
            read=[(site, t) for t in range(n_layers)],
            on_read=on_read,
            share_upstream=share_upstream,
        )  # (G, P, T, V)
        kl = kl_divergence(logits[0], logits[1:]).mean((1, 2))  # (G-1,)
        kls += [float(v) for v in kl]
        relative = (diff_sq[1:] / base_sq).sqrt()  # (G-1, L)
        changes += relative.tolist()
    return kls, changes


def causal_neurons(
    loaded: LoadedModel,
    prompts: torch.Tensor,
    stats: NeuronStats,
    *,
    layers: Sequence[int] | None = None,
    top_k: int = default("top_k"),
    method: str = DEFAULT_METHOD,
    means: Mapping | None = None,
    seed: int = 0,
    max_rows: int = DEFAULT_MAX_ROWS,
    neuron_sets: NeuronSets | None = None,
    n_controls: int = default("control_seeds"),
    screen_prompts: torch.Tensor | None = None,
    screen_samples: int = SCREEN_SAMPLES,
    cache: CausalCache | None = None,
) -> CausalFinding:
    """Screen every neuron of each layer on ``screen_prompts`` (default: ``prompts``), measure
    the candidates and ``n_controls`` random neurons exactly on ``prompts`` (module
    docstring). ``neuron_sets``: the candidates and their site, per layer (default: the
    screen's top ``top_k`` at the ``mlp`` site); ``layers`` then defaults to the layers of
    the sets. ``cache``: the screens and measurements shared with another sweep of the
    model on the same prompts (it then holds the screen's prompts, samples and seed)."""
    if method not in ("zero", "mean"):
        raise AblationError(
            f"causal interventions are 'zero' or 'mean' (METHODS §6), got {method!r}"
        )
    if top_k < 1:
        raise AblationError(f"top_k must be at least 1, got {top_k}")
    site = "mlp" if neuron_sets is None else neuron_sets.site
    engine = AblationEngine(loaded, method=method, means=means, max_rows=max_rows)
    n_layers = loaded.adapter.n_layers
    width = loaded.adapter.width(site)
    if layers is None:
        layers = range(n_layers) if neuron_sets is None else sorted(neuron_sets.by_layer)
    layers = list(layers)
    if neuron_sets is not None and set(layers) - set(neuron_sets.by_layer):
        missing = sorted(set(layers) - set(neuron_sets.by_layer))
        raise AblationError(f"the {neuron_sets.kind} sets have no neurons for layers {missing}")
    engine.check([Condition(f"L{layer}", site, {layer: (0,)}) for layer in layers])  # early
    if cache is None:
        cache = CausalCache(
            loaded,
            prompts,
            prompts if screen_prompts is None else screen_prompts,
            method=method,
            means=means,
            screen_samples=screen_samples,
            seed=seed,
        )
    cache.check(prompts, method, means)
    screened = cache.screens.screen(site, layers)
    screen = screened.kl
    plan: list[tuple[int, int]] = []
    chosen: dict[int, tuple[list[int], list[int]]] = {}
    for layer in layers:
        if neuron_sets is None:
            candidates = _screened_candidates(screened, layer, top_k)
        else:
            candidates = [int(n) for n in neuron_sets.by_layer[layer][:top_k]]
        control = _control_neurons(
            width, candidates, min(n_controls, width - len(candidates)), seed + layer
        )
        chosen[layer] = (candidates, control)
        plan += [(layer, n) for n in candidates + control]
    result = cache.measure(engine, plan, site)
    findings = []
    matrix, control_matrix = [], []
    for layer in layers:
        candidates, control = chosen[layer]
        size = intervention_size(stats, layer, method) if site == "mlp" else None
        control_kl = [result[(layer, n)][0] for n in control]
        estimate = screen[layer]  # (W,)
        measured = [
            CausalNeuron(
                layer=layer,
                neuron=n,
                kl=result[(layer, n)][0],
                intervention_size=None if size is None else float(size[n]),
                downstream={t: result[(layer, n)][1][t] for t in range(layer + 1, n_layers)},
                p_value=empirical_p_value(result[(layer, n)][0], control_kl, alternative="greater"),
                screen_kl=float(estimate[n]),
            )
            for n in candidates
        ]
        measured.sort(key=lambda c: (-c.kl, c.neuron))
        mean = statistics.fmean(control_kl) if control_kl else 0.0
        std = statistics.stdev(control_kl) if len(control_kl) > 1 else 0.0
        both = candidates + control
        rho = rank_correlation(
            [float(estimate[n]) for n in both], [result[(layer, n)][0] for n in both]
        )
        findings.append(
            CausalLayerFinding(
                layer=layer,
                candidates=measured,
                control_neurons=control,
                control_kl=control_kl,
                control_kl_mean=mean,
                control_kl_std=std,
                causal_neurons=[c.neuron for c in measured if c.p_value <= CAUSAL_ALPHA],
                rank_sum_p_value=rank_sum_p_value([c.kl for c in measured], control_kl),
                screen_rank_correlation=rho,
                screen_rank_correlation_se=(
                    None if rho is None or len(both) < 4 else rank_correlation_se(rho, len(both))
                ),
            )
        )
        matrix.append(_mean_rows([result[(layer, n)][1] for n in candidates], n_layers))
        control_matrix.append(_mean_rows([result[(layer, n)][1] for n in control], n_layers))
    return CausalFinding(
        model=loaded.model_id,
        site=site,
        candidates_by="kl_screen" if neuron_sets is None else neuron_sets.kind,
        method=method,
        n_prompts=prompts.shape[0],
        n_positions=prompts.numel(),
        top_k=top_k,
        layers=findings,
        source_layers=layers,
        cross_layer=matrix,
        control_cross_layer=control_matrix,
    )


def _mean_rows(rows: list[list[float]], n_layers: int) -> list[float]:
    if not rows:
        return [0.0] * n_layers
    return [statistics.fmean(row[t] for row in rows) for t in range(n_layers)]


def upstream_leaks(finding: CausalFinding) -> list[tuple[int, int, float]]:
    """Entries (source, target, value) of the cross-layer matrices with target < source and
    a value other than exactly 0: an upstream layer changed, which cannot happen."""
    leaks = []
    for matrix in (finding.cross_layer, finding.control_cross_layer):
        for source, row in zip(finding.source_layers, matrix, strict=True):
            leaks += [(source, t, v) for t, v in enumerate(row) if t < source and v != 0.0]
    return leaks
