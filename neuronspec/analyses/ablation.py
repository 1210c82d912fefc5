"""The standard ablation study and pruning, each next to its random control (METHODS.md §10).

**Study.** Held-out perplexity (:mod:`neuronspec.interventions.perplexity`) of the model
with a neuron set ablated, for the conditions baseline; dead (Voita et al. 2023 §3);
positional (§5); the fifth condition, a parameter (delta-sensitive Δ channels on the
``dt`` site for Mamba, high-variance ``mlp`` neurons for GPT-2, METHODS §5; None until
that analysis is wired); dead ∪ positional. Each non-empty condition gets a **random
control**: for each of ``n_seeds`` seeds (default 5), as many neurons per layer as the
condition has, drawn uniformly without replacement from the layer's neurons at the same
site (:func:`~neuronspec.interventions.ablation.random_condition`, seed s = 0..n_seeds−1),
reported as mean ± sample std (ddof 1) of the PPL and of its relative change. A condition
*exceeds its control* when its relative change > control mean + 2 std.

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

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

DEFAULT_METHOD = "mean"
DEFAULT_N_WINDOWS = 64  # held-out windows per study: 4032 targets at T = 64
DEFAULT_N_SEEDS = 5  # random-control seeds (METHODS §10: mean ± std over seeds)
CONTROL_STDS = 2.0  # "exceeds its control": change > control mean + 2 std


@dataclass(frozen=True)
class RandomControl(Finding):
    """Random neurons of the same count per layer, one draw per seed."""

    seeds: list[int]
    ppl: list[float]
    ppl_mean: float
    ppl_std: float  # sample std (ddof 1) over seeds
    change_mean: float  # relative PPL change against baseline, mean over seeds
    change_std: float


@dataclass(frozen=True)
class AblationConditionFinding(Finding):
    name: str
    site: str
    n_neurons: int
    neurons_per_layer: dict[int, int]
    ppl: float
    change: float  # ppl / baseline_ppl − 1
    control: RandomControl | None  # None for an empty condition
    exceeds_control: bool | None  # change > control mean + 2 std; None without control


@dataclass(frozen=True)
class AblationStudyFinding(Finding):
    model: str
    method: str
    n_windows: int
    n_targets: int
    baseline_ppl: float
    conditions: list[AblationConditionFinding]

    def condition(self, name: str) -> AblationConditionFinding:
        for condition in self.conditions:
            if condition.name == name:
                return condition
        raise NeuronSpecError(
            f"no ablation condition {name!r}; have {[c.name for c in self.conditions]}"
        )


@dataclass(frozen=True)
class PruningFinding(Finding):
    model: str
    method: str
    ratio: float
    n_windows: int
    n_pruned: int
    pruned_per_layer: dict[int, int]
    pruned_by_class: dict[str, int]  # dead / positional / other
    n_protected: int
    baseline_ppl: float
    ppl: float
    change: float
    control: RandomControl
    pruned_neurons: dict[int, list[int]]


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


def _control(seeds: list[int], ppls: list[float], baseline: float) -> RandomControl:
    changes = [p / baseline - 1.0 for p in ppls]
    return RandomControl(
        seeds=seeds,
        ppl=ppls,
        ppl_mean=statistics.fmean(ppls),
        ppl_std=statistics.stdev(ppls) if len(ppls) > 1 else 0.0,
        change_mean=statistics.fmean(changes),
        change_std=statistics.stdev(changes) if len(changes) > 1 else 0.0,
    )


def ablation_study(
    loaded: LoadedModel,
    heldout: torch.Tensor,
    conditions: Sequence[Condition],
    *,
    means: Mapping | None = None,
    method: str = DEFAULT_METHOD,
    n_windows: int = DEFAULT_N_WINDOWS,
    n_seeds: int = DEFAULT_N_SEEDS,
    max_rows: int = DEFAULT_MAX_ROWS,
) -> AblationStudyFinding:
    """PPL of every condition and of its random controls on ``heldout[:n_windows]``, all
    conditions batched (:class:`~neuronspec.interventions.ablation.AblationEngine`)."""
    if n_seeds < 1:
        raise AblationError(f"n_seeds must be at least 1, got {n_seeds}")
    windows = _heldout(heldout, n_windows)
    engine = AblationEngine(loaded, method=method, means=means, max_rows=max_rows)
    seeds = list(range(n_seeds))
    runs = [baseline_condition(), *conditions]
    for condition in conditions:
        if condition.size:
            width = loaded.adapter.width(condition.site)
            runs += [random_condition(condition, width, seed) for seed in seeds]
    ppls = [p.ppl for p in condition_perplexities(engine, windows, runs)]
    baseline = ppls[0]
    cursor = 1 + len(conditions)
    results = []
    for index, condition in enumerate(conditions):
        ppl = ppls[1 + index]
        change = ppl / baseline - 1.0
        control = None
        if condition.size:
            control = _control(seeds, ppls[cursor : cursor + n_seeds], baseline)
            cursor += n_seeds
        results.append(
            AblationConditionFinding(
                name=condition.name,
                site=condition.site,
                n_neurons=condition.size,
                neurons_per_layer=condition.counts,
                ppl=ppl,
                change=change,
                control=control,
                exceeds_control=None
                if control is None
                else change > control.change_mean + CONTROL_STDS * control.change_std,
            )
        )
    return AblationStudyFinding(
        model=loaded.model_id,
        method=method,
        n_windows=n_windows,
        n_targets=n_windows * (windows.shape[1] - 1),
        baseline_ppl=baseline,
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
    n_seeds: int = DEFAULT_N_SEEDS,
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
    seeds = list(range(n_seeds))
    controls = [random_condition(plan, width, seed, exclude=protected) for seed in seeds]
    ppls = [
        p.ppl
        for p in condition_perplexities(engine, windows, [baseline_condition(), plan, *controls])
    ]
    baseline = ppls[0]
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
        baseline_ppl=baseline,
        ppl=ppls[1],
        change=ppls[1] / baseline - 1.0,
        control=_control(seeds, ppls[2:], baseline),
        pruned_neurons={layer: list(ids) for layer, ids in plan.neurons.items()},
    )
