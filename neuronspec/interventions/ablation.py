"""Ablation engine: replace a neuron set at its site, several conditions in one forward
(METHODS.md §10, §6).

A :class:`Condition` is data: a name, a site (``mlp``, ``mlp_pre``, ``dt``, ``resid``) and
``{layer: neuron ids}``. :class:`AblationEngine` runs a batch of token windows under
several conditions in one forward: the windows are repeated once per condition, and the
rows of condition c (one *group* of batch rows) get condition c's neurons replaced at its
site, through the site adapter's :meth:`~neuronspec.models.adapters.SiteAdapter.patch`;
the other groups pass unchanged. Batch rows never interact in GPT-2 or Mamba, so a group's
numbers equal one forward of that condition alone (tested).

Methods (the value an ablated neuron n of layer l takes at every position p of a window):

- ``zero``: 0.
- ``mean``: μ_n, the neuron's mean over all tokens of the *analysis* windows, from the
  cached statistics (:func:`corpus_means`: ``act_sum / n_tokens`` of the ``mlp`` site, and
  the window-mean moments of the other sites the pass collects, e.g. Mamba's ``dt``);
  the caller passes means for sites the statistics do not hold.
  Mean ablation of ``mlp`` neurons equals deleting them and adding μ_n · w_out,n to the
  output projection's bias (the weight-edit identity, tested for GPT-2 and Mamba).
- ``resample``: the value the *unablated* model gives the same neuron, at the same
  position p, on another window: the windows evaluated together are paired with donors
  by a random derangement π (no window is its own donor) drawn from
  ``torch.Generator().manual_seed(seed)``; window j takes the clean site values of window
  π(j). Donor values of every layer come from the clean model (resample ablation as in
  causal scrubbing, Chan et al. 2022), not from a run ablated at earlier layers.
  Derangements are drawn over the whole evaluation set (see
  :func:`neuronspec.interventions.perplexity.condition_perplexities`), not per chunk.

Shapes: windows ``(n, T)`` int64; a forward of C conditions has ``C·n`` rows; logits
``(C·n, T, V)``; a site ``(C·n, T, W)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch

from neuronspec.capture.stats import NeuronStats
from neuronspec.errors import NeuronSpecError
from neuronspec.findings import Finding
from neuronspec.models.registry import LoadedModel

ABLATION_METHODS: tuple[str, ...] = ("zero", "mean", "resample")
DEFAULT_MAX_ROWS = 128  # batch rows per forward: tiny models at T = 64 stay well under 1 GB
LOGITS_BYTES = 512 * 2**20
"""Float32 logits a perplexity forward may hold (:meth:`AblationEngine.rows_for`): at
GPT-2's 50k vocabulary and T = 64, 41 rows (128 rows took 8 GB with their float64 copies)."""

SiteLayer = tuple[str, int]


class AblationError(NeuronSpecError, ValueError):
    """An ablation that cannot be run as asked (unknown method, missing means, bad ids)."""


@dataclass(frozen=True)
class Condition(Finding):
    """A neuron set to ablate: ``neurons`` maps layer → sorted neuron ids at ``site``.

    The empty condition (no neurons) is the baseline: its rows run the unablated model.
    """

    name: str
    site: str = "mlp"
    neurons: Mapping[int, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clean = {}
        for layer, ids in self.neurons.items():
            unique = tuple(sorted({int(n) for n in ids}))
            if unique:
                clean[int(layer)] = unique
        object.__setattr__(self, "neurons", dict(sorted(clean.items())))

    @property
    def size(self) -> int:
        return sum(len(ids) for ids in self.neurons.values())

    @property
    def counts(self) -> dict[int, int]:
        """Neurons per layer (layers without neurons left out)."""
        return {layer: len(ids) for layer, ids in self.neurons.items()}

    def union(self, other: Condition, name: str) -> Condition:
        if other.site != self.site:
            raise AblationError(
                f"cannot unite conditions on sites {self.site!r} and {other.site!r}; "
                "a condition ablates neurons of one site"
            )
        layers = set(self.neurons) | set(other.neurons)
        return Condition(
            name,
            self.site,
            {
                layer: (*self.neurons.get(layer, ()), *other.neurons.get(layer, ()))
                for layer in layers
            },
        )


def baseline_condition() -> Condition:
    return Condition("baseline")


def random_condition(
    like: Condition,
    width: int,
    seed: int,
    *,
    name: str | None = None,
    exclude: Mapping[int, Iterable[int]] | None = None,
) -> Condition:
    """Random neurons, as many per layer as ``like`` has, drawn without replacement from the
    layer's ``width`` neurons (minus ``exclude[layer]``) with ``torch.Generator(seed)``."""
    generator = torch.Generator().manual_seed(seed)
    neurons = {}
    for layer, ids in like.neurons.items():
        excluded = set(int(n) for n in (exclude or {}).get(layer, ()))
        pool = torch.tensor([n for n in range(width) if n not in excluded], dtype=torch.long)
        if len(ids) > len(pool):
            raise AblationError(
                f"layer {layer}: cannot draw {len(ids)} random neurons from {len(pool)} "
                "eligible ones"
            )
        pick = pool[torch.randperm(len(pool), generator=generator)[: len(ids)]]
        neurons[layer] = tuple(int(n) for n in pick)
    return Condition(name or f"random[{like.name}] seed {seed}", like.site, neurons)


def corpus_means(stats: NeuronStats) -> dict[SiteLayer, torch.Tensor]:
    """Per-neuron means μ_n over all tokens of the analysis windows, from the cached
    statistics: ``{(site, layer): (W,) float64}`` for the ``mlp`` site of every layer and
    for every other site with window-mean moments (e.g. ``dt``; equal-length windows, so
    the mean of window means is the token mean)."""
    n_tokens = stats.n_tokens
    if n_tokens <= 0:
        raise AblationError("the statistics hold no tokens; mean ablation needs corpus means")
    means = {
        ("mlp", layer): stats.layer(layer).act_sum / n_tokens for layer in range(stats.n_layers)
    }
    for site, layer in stats.window_means:
        if site != "mlp":
            means[(site, layer)] = stats.site_mean(site, layer)
    return means


def derangement(n: int, seed: int) -> torch.Tensor:
    """A random permutation of ``range(n)`` without fixed points (``(n,)`` int64), seeded:
    Sattolo's algorithm (a uniformly random cyclic permutation)."""
    if n < 2:
        raise AblationError(
            f"resample ablation needs at least 2 windows (a donor other than itself), got {n}"
        )
    generator = torch.Generator().manual_seed(seed)
    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        j = int(torch.randint(0, i, (1,), generator=generator))
        perm[i], perm[j] = perm[j], perm[i]
    return torch.tensor(perm, dtype=torch.long)


@contextmanager
def _repeat_rows_at(block: torch.nn.Module, n: int, copies: int) -> Iterator[None]:
    """Repeat the ``(n, T, ...)`` tensor arguments of ``block`` (the stream ``(n, T, d)``, a
    mask ``(n, 1, T, T)``; not position vectors) ``copies`` times along the rows."""

    def repeat(value):
        if isinstance(value, torch.Tensor) and value.dim() >= 3 and value.shape[0] == n:
            return value.repeat(copies, *([1] * (value.dim() - 1)))
        return value

    handle = block.register_forward_pre_hook(
        lambda module, args, kwargs: (
            tuple(repeat(a) for a in args),
            {key: repeat(v) for key, v in kwargs.items()},
        ),
        with_kwargs=True,
    )
    try:
        yield
    finally:
        handle.remove()


class AblationEngine:
    """Forwards of one model with conditions applied per group of batch rows.

    ``method``: one of :data:`ABLATION_METHODS`. ``means``: ``{(site, layer): (W,)}`` for
    ``mean`` (e.g. :func:`corpus_means`). ``max_rows``: batch rows per forward (callers
    chunk windows and conditions to stay under it).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        method: str = "zero",
        means: Mapping[SiteLayer, torch.Tensor] | None = None,
        max_rows: int = DEFAULT_MAX_ROWS,
    ):
        if method not in ABLATION_METHODS:
            raise AblationError(
                f"unknown ablation method {method!r}; choose one of {', '.join(ABLATION_METHODS)}"
            )
        if max_rows < 1:
            raise AblationError(f"max_rows must be at least 1, got {max_rows}")
        self.loaded = loaded
        self.adapter = loaded.adapter
        self.method = method
        self.means = dict(means or {})
        self.max_rows = max_rows

    def rows_for(self, length: int) -> int:
        """Rows of ``length`` positions per forward: at most ``max_rows``, and no more than
        :data:`LOGITS_BYTES` of float32 logits over the model's vocabulary."""
        vocab = self.loaded.model.get_output_embeddings().weight.shape[0]
        return max(1, min(self.max_rows, LOGITS_BYTES // (4 * length * vocab)))

    # -- checks ------------------------------------------------------------------------------
    def check(self, conditions: Sequence[Condition]) -> None:
        """Clear errors for unknown sites, layers out of range, ids out of range, missing means."""
        for condition in conditions:
            for layer, ids in condition.neurons.items():
                self.adapter.check(condition.site, layer)
                width = self.adapter.width(condition.site)
                if ids and (ids[0] < 0 or ids[-1] >= width):
                    raise AblationError(
                        f"condition {condition.name!r}: neuron ids of layer {layer} must lie in "
                        f"0..{width - 1} (site {condition.site!r}), got {ids[0]}..{ids[-1]}"
                    )
                if self.method == "mean" and (condition.site, layer) not in self.means:
                    raise AblationError(
                        f"mean ablation of site {condition.site!r} layer {layer} needs its "
                        "per-neuron means; corpus_means(stats) has those the statistics hold "
                        "(mlp, and dt for Mamba); pass means={(site, layer): tensor} for others"
                    )

    @staticmethod
    def sites_of(conditions: Sequence[Condition]) -> list[SiteLayer]:
        return sorted({(c.site, layer) for c in conditions for layer in c.neurons})

    # -- forwards ----------------------------------------------------------------------------
    def clean_sites(self, windows: torch.Tensor, targets: Sequence[SiteLayer]) -> dict:
        """The unablated model's site values ``{(site, layer): (n, T, W)}`` on ``windows``
        (donors for resample ablation)."""
        captured: dict[SiteLayer, torch.Tensor] = {}

        def keep(site: str, layer: int, value: torch.Tensor) -> None:
            captured[(site, layer)] = value.detach().clone()

        with torch.inference_mode(), self.adapter.read(list(targets), keep):
            self.loaded.model(input_ids=windows.to(self.loaded.device), use_cache=False)
        return captured

    def forward(
        self,
        windows: torch.Tensor,
        conditions: Sequence[Condition],
        *,
        donors: Mapping[SiteLayer, torch.Tensor] | None = None,
        read: Sequence[SiteLayer] = (),
        on_read: Callable[[str, int, torch.Tensor], None] | None = None,
        share_upstream: bool = False,
    ) -> torch.Tensor:
        """One forward of ``windows`` ``(n, T)`` under every condition; returns logits
        ``(C, n, T, V)`` (C = ``len(conditions)``; group c = rows ``c·n .. c·n + n - 1``).

        ``share_upstream``: the layers below the lowest intervened layer l₀ are the same in
        every group, so they run once on the ``n`` windows and the stream is repeated C
        times at block l₀'s input (a read of such a layer gets ``(n, T, W)``). Exact; a
        patch that runs before l₀ then sees n rows and raises.

        ``donors``: for ``resample``, the clean site values ``{(site, layer): (n, T, W)}``
        of each window's donor (row j of the donors replaces row j of every group).
        ``read``/``on_read``: sites passed to ``on_read(site, layer, (C·n, T, W))`` after
        the patches are applied (a patched site is read with its replacement in place).
        """
        self.check(conditions)
        n = windows.shape[0]
        n_conditions = len(conditions)
        rows = n * n_conditions
        if rows > self.max_rows:
            raise AblationError(
                f"{n_conditions} conditions x {n} windows = {rows} rows exceed max_rows "
                f"{self.max_rows}; split the windows or the conditions"
            )
        device = self.loaded.device
        sites = self.sites_of(conditions)
        first = min((layer for _, layer in sites), default=0) if share_upstream else 0
        repeat_at = first if first > 0 and n_conditions > 1 else None
        copies = 1 if repeat_at is not None else n_conditions
        batch = windows.to(device).repeat(copies, 1)  # (C·n, T), or (n, T) when shared
        with ExitStack() as stack:
            if repeat_at is not None:
                stack.enter_context(_repeat_rows_at(self.adapter.block(repeat_at), n, n_conditions))
            for site, layer in sites:
                fn = self._patch_fn(site, layer, conditions, n, donors)
                stack.enter_context(self.adapter.patch(site, layer, fn))
            if read:
                if on_read is None:
                    raise AblationError("read= needs on_read=")
                stack.enter_context(self.adapter.read(list(read), on_read))
            stack.enter_context(torch.inference_mode())
            logits = self.loaded.model(input_ids=batch, use_cache=False).logits  # (C·n, T, V)
        return logits.view(n_conditions, n, *logits.shape[1:])

    def _patch_fn(
        self,
        site: str,
        layer: int,
        conditions: Sequence[Condition],
        n: int,
        donors: Mapping[SiteLayer, torch.Tensor] | None,
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        width = self.adapter.width(site)
        mask = torch.zeros(len(conditions), width, dtype=torch.bool)  # (C, W)
        for c, condition in enumerate(conditions):
            if condition.site == site and layer in condition.neurons:
                mask[c, list(condition.neurons[layer])] = True
        mask = mask.repeat_interleave(n, dim=0)[:, None, :]  # (C·n, 1, W)
        if self.method == "resample":
            if donors is None or (site, layer) not in donors:
                raise AblationError(
                    f"resample ablation of site {site!r} layer {layer} needs donor values"
                )
            donor = donors[(site, layer)]  # (n, T, W)
            if donor.shape[0] != n:
                raise AblationError(f"donors hold {donor.shape[0]} windows, the batch {n}")
            replacement = donor.repeat(len(conditions), 1, 1)  # (C·n, T, W)
        elif self.method == "mean":
            replacement = self.means[(site, layer)].reshape(1, 1, width)  # (1, 1, W)
        else:
            replacement = torch.zeros(1, 1, width)  # (1, 1, W)

        def apply(value: torch.Tensor) -> torch.Tensor:  # (C·n, T, W)
            if value.shape[0] != mask.shape[0]:
                raise AblationError(
                    f"site {site!r} layer {layer} was patched on {value.shape[0]} rows, not "
                    f"{mask.shape[0]}: the patch runs upstream of the layers intervened on"
                )
            return torch.where(
                mask.to(value.device),
                replacement.to(device=value.device, dtype=value.dtype),
                value,
            )

        return apply
