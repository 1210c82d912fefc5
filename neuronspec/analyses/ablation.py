"""The standard ablation study and pruning, each next to its random control (METHODS.md §10).

**Study.** Held-out perplexity (:mod:`neuronspec.interventions.perplexity`) of the model
with a neuron set ablated, for the conditions baseline; dead (Voita et al. 2023 §3);
positional (§5); the fifth condition, a parameter (delta-sensitive Δ channels on the
``dt`` site for Mamba, high-variance ``mlp`` neurons for GPT-2, METHODS §5; None until
that analysis is wired); dead ∪ positional. Each non-empty condition gets a **random
control**: for seeds s = 0, 1, … up to ``n_seeds`` (``--control-seeds``, default 99), as
many neurons per layer as the condition has, drawn uniformly without replacement from the
layer's neurons at the same site
(:func:`~neuronspec.interventions.ablation.random_condition`), reported as mean ± sample
std (ddof 1) of the PPL and of its relative change. Seeds are drawn in rounds (19, then
20 more) and a condition stops at its 10th control that changes PPL at least as much
(Besag & Clifford's sequential p-value, :mod:`neuronspec.uncertainty`): a condition that
does not beat random costs about 10/p draws, one that does all ``n_seeds``.

**Uncertainty** (:mod:`neuronspec.uncertainty`). A condition's change has a standard
error from the paired bootstrap over the held-out windows; its *difference* from the
control mean has one from the bootstrap over windows and seeds. Its p-value is the
sequential one of its change among the control seeds' changes; a condition *exceeds its
control at level α* (``exceeds(alpha=0.01)``) when p ≤ α, which needs ``n_seeds`` ≥
1/α − 1. Pruning's p-value is the other tail: priority pruning *stays below* random pruning
when few random prunings hurt as little.

**Pruning.** In every layer, ``round(ratio · width)`` neurons of the ``mlp`` site (ratio
default 0.15) are ablated, chosen by priority: dead > positional > other, never a
protected neuron (the delta-sensitive / high-variance set, a parameter). Within a class
the neurons with the smallest *intervention size* go first: the mean square of what the
ablation removes, E[(a − v)²] from the cached statistics (v = 0 for ``zero``: E[a²]; the
variance E[a²] − μ² for ``mean`` and ``resample``). The per-layer ratio (not one global
ranking) is our choice where METHODS is silent: activation scales differ across layers.
Its random control draws the same count per layer from the unprotected neurons.
Mean-ablation pruning equals deleting the neurons and moving μ·w_out into the output
bias (tested identity), i.e. a real pruned model.

Defaults: method ``mean`` (the ablated neuron keeps its average contribution, so PPL
measures the information it carries, not its offset); 64 held-out windows (64 × 63
targets at T = 64), the same windows for every condition (paired comparison).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from neuronspec.analyses.dead import DeadLayerFinding
from neuronspec.analyses.positional import PositionalLayerFinding
from neuronspec.capture.stats import NeuronStats
from neuronspec.errors import NeuronSpecError
from neuronspec.findings import Finding
from neuronspec.interventions.ablation import (
    DEFAULT_MAX_ROWS,
    AblationEngine,
    AblationError,
    Condition,
    baseline_condition,
    corpus_means,
    random_condition,
)
from neuronspec.interventions.perplexity import condition_perplexities
from neuronspec.models.registry import LoadedModel
from neuronspec.options import default
from neuronspec.uncertainty import (
    BOOTSTRAP_METHOD,
    STOP_EXCEEDANCES,
    Interval,
    change_interval,
    check_level,
    control_mean_replicates,
    normal_interval,
    paired_log_ratios,
    sequential_draws,
    sequential_p_value,
)

DEFAULT_METHOD = "mean"
DEFAULT_N_WINDOWS = 64  # held-out windows per study: 4032 targets at T = 64


@dataclass(frozen=True)
class RandomControl(Finding):
    """Random neurons of the same count per layer, one draw per seed."""

    seeds: list[int]  # drawn in order; fewer than max_seeds when the draws stopped early
    max_seeds: int  # --control-seeds: the draws a condition may take (sequential stop)
    ppl: list[float]
    ppl_mean: float
    ppl_std: float  # sample std (ddof 1) over seeds
    change_mean: float  # relative PPL change against baseline, mean over seeds
    change_std: float
    changes: list[float]  # per seed

    def p_value(self, change: float, *, alternative: str = "greater") -> float:
        """Sequential p-value of ``change`` among the seeds' changes in draw order
        (:func:`~neuronspec.uncertainty.sequential_p_value`)."""
        return sequential_p_value(
            change, self.changes, alternative=alternative, n_max=self.max_seeds
        )


@dataclass(frozen=True, kw_only=True)
class ControlledEffect(Finding):
    """A condition's relative PPL change next to its random control, with uncertainty."""

    ppl: float
    change: float  # ppl / baseline_ppl − 1
    log_ratio_se: float  # SE of log(ppl / baseline_ppl): paired bootstrap over windows
    control: RandomControl | None  # None for an empty condition
    # log(ppl) − mean over seeds of log(control ppl), nats per target, and its SE
    # (bootstrap over windows and control seeds)
    nll_difference: float | None
    nll_difference_se: float | None
    p_value: float | None  # empirical, in the direction the analysis tests
    uncertainty: str  # how the SEs and the p-value were computed

    @property
    def change_se(self) -> float:
        """SE of :attr:`change` by the delta method: ``(1 + change) · SE(log ratio)``."""
        return (1 + self.change) * self.log_ratio_se

    def interval(self, level: float = 0.95) -> Interval:
        """Interval of the relative PPL change at ``level`` (from its log ratio's)."""
        return change_interval(self.change, self.log_ratio_se, level, self.uncertainty)

    def difference_interval(self, level: float = 0.95) -> Interval:
        """Normal interval of the NLL difference from the control mean (nats per target)."""
        if self.nll_difference is None or self.nll_difference_se is None:
            raise NeuronSpecError("an empty condition has no random control to differ from")
        return normal_interval(self.nll_difference, self.nll_difference_se, level, self.uncertainty)

    def _significant(self, control: RandomControl | None, alpha: float, alternative: str) -> bool:
        control = self.control if control is None else control
        if control is None:
            raise NeuronSpecError("an empty condition has no random control to compare with")
        check_level(alpha, control.max_seeds)
        return control.p_value(self.change, alternative=alternative) <= alpha


@dataclass(frozen=True, kw_only=True)
class AblationConditionFinding(ControlledEffect):
    name: str
    site: str
    n_neurons: int
    neurons_per_layer: dict[int, int]

    def snapshot_view(self) -> dict:
        control = self.control
        return {
            "name": self.name,
            "n_neurons": self.n_neurons,
            "ppl": self.ppl,
            "change": self.change,  # judged against change_se by the snapshot
            "change_se": self.change_se,
            "control_ppl_mean": None if control is None else control.ppl_mean,
            "control_ppl_std": None if control is None else control.ppl_std,
            "p_value": self.p_value,
        }

    def exceeds(self, control: RandomControl | None = None, *, alpha: float = 0.01) -> bool:
        """The change exceeds the random control's at level ``alpha`` (empirical p ≤ α;
        ``control`` defaults to the condition's own)."""
        return self._significant(control, alpha, "greater")


@dataclass(frozen=True)
class AblationStudyFinding(Finding):
    model: str
    method: str
    n_windows: int
    n_targets: int
    baseline_ppl: float
    conditions: list[AblationConditionFinding]

    def snapshot_view(self) -> dict:
        return {
            "baseline_ppl": self.baseline_ppl,
            "method": self.method,
            "n_targets": self.n_targets,
            "conditions": [c.snapshot_view() for c in self.conditions],
        }

    def condition(self, name: str) -> AblationConditionFinding:
        for condition in self.conditions:
            if condition.name == name:
                return condition
        raise NeuronSpecError(
            f"no ablation condition {name!r}; have {[c.name for c in self.conditions]}"
        )


@dataclass(frozen=True, kw_only=True)
class PruningFinding(ControlledEffect):
    model: str
    method: str
    ratio: float
    n_windows: int
    n_pruned: int
    pruned_per_layer: dict[int, int]
    pruned_by_class: dict[str, int]  # dead / positional / other
    n_protected: int
    baseline_ppl: float
    pruned_neurons: dict[int, list[int]]

    def snapshot_view(self) -> dict:
        return {
            "ratio": self.ratio,
            "n_pruned": self.n_pruned,
            "pruned_by_class": self.pruned_by_class,
            "ppl": self.ppl,
            "change": self.change,  # judged against change_se by the snapshot
            "change_se": self.change_se,
            "control_ppl_mean": self.control.ppl_mean,
            "control_ppl_std": self.control.ppl_std,
            "p_value": self.p_value,
        }

    def stays_below(self, control: RandomControl | None = None, *, alpha: float = 0.01) -> bool:
        """Priority pruning raises PPL less than random pruning at level ``alpha``
        (empirical lower-tail p ≤ α)."""
        return self._significant(control, alpha, "less")


def standard_conditions(
    dead: Sequence[DeadLayerFinding],
    positional: Sequence[PositionalLayerFinding],
    *,
    sensitive: Condition | None = None,
) -> list[Condition]:
    """dead, positional, [sensitive], dead+positional (all on ``mlp`` but the sensitive one,
    which keeps its own site and name)."""
    dead_set = Condition("dead", "mlp", {f.layer: f.dead_neurons for f in dead})
    positional_set = Condition(
        "positional", "mlp", {f.layer: tuple(f.positional_neurons) for f in positional}
    )
    conditions = [dead_set, positional_set]
    if sensitive is not None:
        conditions.append(sensitive)
    conditions.append(dead_set.union(positional_set, "dead+positional"))
    return conditions


def _heldout(windows: torch.Tensor, n_windows: int) -> torch.Tensor:
    if n_windows < 2:
        raise AblationError(f"n_windows must be at least 2, got {n_windows}")
    if windows.shape[0] < n_windows:
        raise AblationError(
            f"the corpus has {windows.shape[0]} held-out windows, the study asks for "
            f"{n_windows}; lower n_windows or use a corpus with more held-out text"
        )
    return windows[:n_windows]


def _effect(
    window_nll: np.ndarray, targets_per_window: int, row: int, controls: list[int],
    max_seeds: int, *, alternative: str,
) -> dict:  # fmt: skip
    """The :class:`ControlledEffect` fields of condition ``row`` of ``window_nll`` ``(C, N)``
    (Σ NLL per held-out window, row 0 the baseline), with its random control in rows
    ``controls`` (seeds 0, 1, … in order); ``alternative``: the tail the p-value tests."""
    mean_nll, change_of = _changes(window_nll, targets_per_window)  # (C,) each
    ppl_of = np.exp(mean_nll)
    replicates = paired_log_ratios(window_nll, targets_per_window)  # (C, B)
    change = float(change_of[row])
    fields = {
        "ppl": float(ppl_of[row]),
        "change": change,
        "log_ratio_se": float(replicates[row].std(ddof=1)),
        "control": None,
        "nll_difference": None,
        "nll_difference_se": None,
        "p_value": None,
        "uncertainty": BOOTSTRAP_METHOD + "; sequential p-value among the control seeds",
    }
    if not controls:
        return fields
    ppls = [float(ppl_of[c]) for c in controls]
    changes = [float(change_of[c]) for c in controls]
    control = RandomControl(
        seeds=list(range(len(controls))),
        max_seeds=max_seeds,
        ppl=ppls,
        ppl_mean=statistics.fmean(ppls),
        ppl_std=statistics.stdev(ppls) if len(ppls) > 1 else 0.0,
        change_mean=statistics.fmean(changes),
        change_std=statistics.stdev(changes) if len(changes) > 1 else 0.0,
        changes=changes,
    )
    log_ratios = mean_nll - mean_nll[0]  # (C,)
    difference = replicates[row] - control_mean_replicates(replicates[controls])  # (B,)
    fields.update(
        control=control,
        nll_difference=float(log_ratios[row] - log_ratios[controls].mean()),
        nll_difference_se=float(difference.std(ddof=1)),
        p_value=control.p_value(change, alternative=alternative),
    )
    return fields


def _changes(window_nll: np.ndarray, targets_per_window: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean NLL per target and relative PPL change against row 0, ``(C,)`` each, of the
    window sums ``(C, N)``."""
    mean_nll = window_nll.sum(1) / (window_nll.shape[1] * targets_per_window)
    return mean_nll, np.expm1(mean_nll - mean_nll[0])


def _measure_with_controls(
    engine: AblationEngine,
    windows: torch.Tensor,
    conditions: Sequence[Condition],
    draw: Callable[[Condition, int], Condition],
    max_seeds: int,
    *,
    alternative: str,
) -> tuple[np.ndarray, list[list[int]]]:
    """Σ NLL per window ``(R, N)`` of the baseline (row 0), ``conditions`` (rows 1..) and
    the random controls ``draw(condition, seed)``, and per condition its control rows in
    seed order. Seeds are drawn in rounds (first 2h − 1, then 20) for the conditions whose
    sequential p-value is not decided (:func:`~neuronspec.uncertainty.sequential_p_value`),
    and each condition keeps the seeds up to its stopping draw."""
    rows = [baseline_condition(), *conditions]
    control_rows: list[list[int]] = [[] for _ in conditions]
    pending = [i for i, condition in enumerate(conditions) if condition.size]
    nll: list[tuple[float, ...]] = []
    drawn = 0
    while True:
        upto = min(max_seeds, drawn + (2 * STOP_EXCEEDANCES - 1 if drawn == 0 else 20))
        runs = [draw(conditions[i], seed) for i in pending for seed in range(drawn, upto)]
        first = len(nll) + len(rows) * (drawn == 0)
        for offset, i in enumerate(pending):
            width = upto - drawn
            control_rows[i] += range(first + offset * width, first + (offset + 1) * width)
        measured = condition_perplexities(engine, windows, (rows if drawn == 0 else []) + runs)
        nll += [p.window_nll for p in measured]
        drawn = upto
        _, change = _changes(np.asarray(nll), windows.shape[1] - 1)  # (R,) as _effect has them
        for i in list(pending):
            used = sequential_draws(
                float(change[1 + i]), change[control_rows[i]].tolist(),
                alternative=alternative, n_max=max_seeds,
            )  # fmt: skip
            if used is not None:  # decided: keep the seeds up to the stopping draw
                del control_rows[i][used:]
                pending.remove(i)
        if not pending:
            return np.asarray(nll), control_rows


def ablation_study(
    loaded: LoadedModel,
    heldout: torch.Tensor,
    conditions: Sequence[Condition],
    *,
    means: Mapping | None = None,
    method: str = DEFAULT_METHOD,
    n_windows: int = DEFAULT_N_WINDOWS,
    n_seeds: int = default("control_seeds"),
    max_rows: int = DEFAULT_MAX_ROWS,
) -> AblationStudyFinding:
    """PPL of every condition and of its random controls on ``heldout[:n_windows]``, all
    conditions batched (:class:`~neuronspec.interventions.ablation.AblationEngine`)."""
    if n_seeds < 1:
        raise AblationError(f"n_seeds must be at least 1, got {n_seeds}")
    windows = _heldout(heldout, n_windows)
    engine = AblationEngine(loaded, method=method, means=means, max_rows=max_rows)

    def draw(condition: Condition, seed: int) -> Condition:
        return random_condition(condition, loaded.adapter.width(condition.site), seed)

    window_nll, control_rows = _measure_with_controls(
        engine, windows, conditions, draw, n_seeds, alternative="greater"
    )
    targets = windows.shape[1] - 1
    results = []
    for index, condition in enumerate(conditions):
        effect = _effect(
            window_nll, targets, 1 + index, control_rows[index], n_seeds, alternative="greater"
        )
        results.append(
            AblationConditionFinding(
                name=condition.name,
                site=condition.site,
                n_neurons=condition.size,
                neurons_per_layer=condition.counts,
                **effect,
            )
        )
    return AblationStudyFinding(
        model=loaded.model_id,
        method=method,
        n_windows=n_windows,
        n_targets=n_windows * targets,
        baseline_ppl=float(np.exp(window_nll[0].sum() / (n_windows * targets))),
        conditions=results,
    )


def intervention_size(stats: NeuronStats, layer: int, method: str) -> torch.Tensor:
    """E[(a − v)²] per ``mlp`` neuron over the analysis tokens, ``(W,)`` float64: E[a²]
    for ``zero``, the variance for ``mean`` and ``resample`` (module docstring)."""
    layer_stats = stats.layer(layer)
    mean_square = layer_stats.act_sumsq / stats.n_tokens  # (W,)
    if method == "zero":
        return mean_square
    mean = layer_stats.act_sum / stats.n_tokens  # (W,)
    return (mean_square - mean.square()).clamp_min(0.0)


def pruning_plan(
    stats: NeuronStats,
    dead: Sequence[DeadLayerFinding],
    positional: Sequence[PositionalLayerFinding],
    *,
    ratio: float = default("pruning_ratio"),
    method: str = DEFAULT_METHOD,
    protected: Mapping[int, Iterable[int]] | None = None,
) -> tuple[Condition, dict[str, int]]:
    """The ``mlp`` neurons to prune per layer by priority (module docstring), and how many
    of them are dead / positional / other."""
    if not 0.0 < ratio < 1.0:
        raise AblationError(f"pruning ratio must lie in (0, 1), got {ratio}")
    dead_by_layer = {f.layer: set(f.dead_neurons) for f in dead}
    positional_by_layer = {f.layer: set(f.positional_neurons) for f in positional}
    by_class = {"dead": 0, "positional": 0, "other": 0}
    neurons = {}
    for layer in range(stats.n_layers):
        size = intervention_size(stats, layer, method)  # (W,)
        width = size.numel()
        budget = round(ratio * width)
        kept = {int(n) for n in (protected or {}).get(layer, ())}
        eligible = [n for n in range(width) if n not in kept]
        if budget > len(eligible):
            raise AblationError(
                f"layer {layer}: pruning {budget} of {width} neurons, but only "
                f"{len(eligible)} are not protected"
            )

        def rank(n: int, layer: int = layer, size: torch.Tensor = size) -> tuple:
            group = (
                0
                if n in dead_by_layer.get(layer, ())
                else 1
                if n in positional_by_layer.get(layer, ())
                else 2
            )
            return (group, float(size[n]), n)

        chosen = sorted(eligible, key=rank)[:budget]
        for n in chosen:
            group = rank(n)[0]
            by_class[("dead", "positional", "other")[group]] += 1
        neurons[layer] = tuple(chosen)
    return Condition("pruned", "mlp", neurons), by_class


def pruning_study(
    loaded: LoadedModel,
    heldout: torch.Tensor,
    stats: NeuronStats,
    dead: Sequence[DeadLayerFinding],
    positional: Sequence[PositionalLayerFinding],
    *,
    ratio: float = default("pruning_ratio"),
    method: str = DEFAULT_METHOD,
    protected: Mapping[int, Iterable[int]] | None = None,
    n_windows: int = DEFAULT_N_WINDOWS,
    n_seeds: int = default("control_seeds"),
    max_rows: int = DEFAULT_MAX_ROWS,
) -> PruningFinding:
    """Held-out PPL after pruning by priority, beside random pruning of the same size."""
    plan, by_class = pruning_plan(
        stats, dead, positional, ratio=ratio, method=method, protected=protected
    )
    windows = _heldout(heldout, n_windows)
    means = corpus_means(stats) if method == "mean" else None
    engine = AblationEngine(loaded, method=method, means=means, max_rows=max_rows)
    width = loaded.adapter.width("mlp")
    window_nll, control_rows = _measure_with_controls(
        engine, windows, [plan], lambda c, seed: random_condition(c, width, seed, exclude=protected),
        n_seeds, alternative="less",
    )  # fmt: skip
    targets = windows.shape[1] - 1
    effect = _effect(window_nll, targets, 1, control_rows[0], n_seeds, alternative="less")
    n_protected = sum(len(set(ids)) for ids in (protected or {}).values())
    return PruningFinding(
        model=loaded.model_id,
        method=method,
        ratio=ratio,
        n_windows=n_windows,
        n_pruned=plan.size,
        pruned_per_layer=plan.counts,
        pruned_by_class=by_class,
        n_protected=n_protected,
        baseline_ppl=float(np.exp(window_nll[0].sum() / (n_windows * targets))),
        pruned_neurons={layer: list(ids) for layer, ids in plan.neurons.items()},
        **effect,
    )
