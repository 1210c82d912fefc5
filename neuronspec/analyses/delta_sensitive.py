"""Delta-sensitive neurons (Mamba Δ) and high-variance neurons (GPT-2), METHODS.md §5.

On the ``dt`` site (Δ = softplus(W_dt · dt_low + b_dt), ``(B, L, d_inner)``, Gu & Dao 2023)
each channel c gets two scores:

- **variance**: the variance across texts of the text-mean Δ_c, ``Var_w[(1/T) Σ_t Δ_c(w, t)]``
  over the corpus windows w (a text is one analysis window of T tokens), streamed in the one
  statistics pass (:class:`~neuronspec.capture.moments.WindowMeanMoments`: Σ m_w and Σ m_w²;
  population variance, ddof 0). A value below the float64 rounding floor of the one-pass
  formula, ``4·n·ε·mean(m²)`` for n windows, is reported as 0 (a constant channel then scores
  exactly 0 instead of ±1e-20).
  Its standard error is the bootstrap over the pass's window groups
  (:mod:`neuronspec.capture.window_groups`; G − 1 degrees of freedom, ``se_df``).
- **perturbation**: mean |Δ_c(x') − Δ_c(x)| over positions t ≥ k after replacing the token at
  k with a random token (uniform over the vocabulary, never the original; k uniform over the
  window's positions other than the window start and any BOS token, as the n-gram counts
  exclude them: :func:`substitution_positions`), averaged over positions ≥ k, then over substitutions and prompts. The prompts are
  the first ``n_prompts`` analysis windows; ``substitutions`` rows per prompt go through the
  model in one batched forward with the unmodified window.

Channels are ranked by each score (ties: lower channel id first); the top ``top_k`` (default
10) are reported. GPT-2 has no Δ: the same scores on the ``mlp`` site give the
"high-variance neurons" used for comparisons (:data:`VARIANCE_SITE`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from neuronspec.capture.stats import NeuronStats
from neuronspec.errors import NeuronSpecError
from neuronspec.findings import Finding
from neuronspec.models.registry import LoadedModel
from neuronspec.options import default
from neuronspec.uncertainty import rank_correlation

VARIANCE_SITE = {"mamba": "dt", "gpt2": "mlp"}
"""The site each family's variance score reads."""
NEURON_KIND = {"dt": "delta_sensitive", "mlp": "high_variance"}
"""The neuron-set kind recorded for each site (SpecSession.record_neuron_set)."""
DEFAULT_SUBSTITUTIONS = 8  # substitutions per window, one batched forward each
DEFAULT_SEED = 0


def variance_site(stats: NeuronStats) -> str:
    """``dt`` where the statistics hold Δ moments (Mamba), else ``mlp`` (GPT-2)."""
    sites = {site for site, _ in stats.window_means}
    if "dt" in sites:
        return "dt"
    if "mlp" in sites:
        return "mlp"
    raise NeuronSpecError(
        "these statistics hold no window-mean moments; recompute them with this version "
        "of neuronspec (the cache format changed)"
    )


def variance_scores(stats: NeuronStats, layer: int, site: str | None = None) -> np.ndarray:
    """(W,) float64 variance across windows of the window-mean of ``site`` (default: Δ or mlp)."""
    site = site or variance_site(stats)
    moments = stats.window_means.get((site, layer))
    variance = stats.window_mean_variance(site, layer).numpy()  # (W,)
    n = stats.n_windows
    floor = 4 * n * np.finfo(np.float64).eps * (moments.sumsq.numpy() / n)  # (W,)
    return np.where(variance <= floor, 0.0, variance)


def top_channels(scores: np.ndarray, k: int) -> list[int]:
    """The ``k`` highest-scoring channels, ties broken by the lower channel id."""
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores)))
    return [int(c) for c in order[:k]]


@dataclass(frozen=True)
class NeuronSets:
    """Top channels per layer of one neuron kind on one site (the ablation study's input)."""

    kind: str  # "delta_sensitive" (Mamba dt) or "high_variance" (GPT-2 mlp)
    site: str  # "dt" or "mlp"
    by_layer: dict[int, list[int]]


def delta_sensitive_sets(
    stats: NeuronStats, *, top_k: int = default("top_k"), layers: list[int] | None = None
) -> NeuronSets:
    """Top-``top_k`` channels by the variance score, per layer (default every layer).

    Mamba: ``kind="delta_sensitive"``, ``site="dt"``; GPT-2: ``"high_variance"``, ``"mlp"``.
    """
    site = variance_site(stats)
    chosen = range(stats.n_layers) if layers is None else layers
    return NeuronSets(
        kind=NEURON_KIND[site],
        site=site,
        by_layer={
            layer: top_channels(variance_scores(stats, layer, site), top_k) for layer in chosen
        },
    )


def perturbation_scores(
    loaded: LoadedModel,
    windows: torch.Tensor,
    *,
    site: str,
    layers: list[int],
    substitutions: int = DEFAULT_SUBSTITUTIONS,
    bos_id: int | None,
    seed: int = DEFAULT_SEED,
    vocab_size: int | None = None,
) -> dict[int, np.ndarray]:
    """Perturbation score ``(W,)`` per layer on ``windows`` ``(P, T)`` (module docstring)."""
    if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 1:
        raise NeuronSpecError(f"need (prompts, tokens) windows, got shape {tuple(windows.shape)}")
    if substitutions < 1:
        raise NeuronSpecError(f"substitutions must be >= 1, got {substitutions}")
    vocab = int(vocab_size or loaded.model.config.vocab_size)
    if vocab < 2:
        raise NeuronSpecError("a substitution needs a vocabulary of at least 2 tokens")
    generator = torch.Generator().manual_seed(seed)
    prompts, length = windows.shape
    totals = {
        layer: torch.zeros(loaded.adapter.width(site), dtype=torch.float64) for layer in layers
    }
    state: dict[str, torch.Tensor] = {}

    def on_site(name: str, layer: int, value: torch.Tensor) -> None:
        diff = (value[1:] - value[:1]).abs().double()  # (S, T, W)
        after = state["after"].to(diff.device)  # (S, T): positions t >= k
        per_sub = (diff * after[..., None]).sum(1) / after.sum(1, keepdim=True)  # (S, W)
        totals[layer] += per_sub.sum(0).cpu()

    device = loaded.device
    with torch.inference_mode(), loaded.adapter.read([(site, layer) for layer in layers], on_site):
        for p in range(prompts):
            base = windows[p]  # (T,)
            where = substitution_positions(base, substitutions, generator, bos_id)  # (S,)
            shift = torch.randint(1, vocab, (substitutions,), generator=generator)  # (S,)
            new = (base[where] + shift) % vocab  # uniform over the other tokens
            batch = base.repeat(substitutions + 1, 1)  # (S+1, T)
            batch[1 + torch.arange(substitutions), where] = new
            state["after"] = torch.arange(length)[None, :] >= where[:, None]  # (S, T)
            loaded.model.base_model(input_ids=batch.to(device), use_cache=False)
    return {layer: (total / (prompts * substitutions)).numpy() for layer, total in totals.items()}


def substitution_positions(
    window: torch.Tensor, substitutions: int, generator: torch.Generator, bos_id: int | None
) -> torch.Tensor:
    """``(S,)`` positions k to substitute in ``window`` ``(T,)``, uniform over the positions
    that are neither the window start nor a BOS token."""
    eligible = torch.ones(window.shape[0], dtype=torch.bool)
    eligible[0] = False
    if bos_id is not None:
        eligible &= window.cpu() != bos_id
    positions = eligible.nonzero().flatten()
    if positions.numel() == 0:
        raise NeuronSpecError(
            f"a window of {window.shape[0]} tokens has no position to substitute (only the "
            "window start or BOS tokens): use longer windows (--window)"
        )
    return positions[torch.randint(0, positions.numel(), (substitutions,), generator=generator)]


@dataclass(frozen=True)
class DeltaSensitiveFinding(Finding):
    """One layer's delta-sensitive (Mamba ``dt``) or high-variance (GPT-2 ``mlp``) channels."""

    model: str
    layer: int
    site: str
    kind: str
    n_windows: int  # texts behind the variance score
    n_prompts: int  # windows behind the perturbation score
    substitutions: int  # per prompt
    seed: int
    top_by_variance: tuple[int, ...]
    top_variance: tuple[float, ...]
    top_mean: tuple[float, ...]  # corpus mean of the site at the top-variance channels
    top_by_perturbation: tuple[int, ...]
    top_perturbation: tuple[float, ...]
    n_zero_variance: int  # channels whose text-mean never varies
    top_overlap: int  # channels in both top lists
    rank_correlation: float  # Spearman ρ of the two scores over all channels
    # bootstrap SEs of top_variance over window groups (None without window groups)
    top_variance_se: tuple[float, ...] | None = None
    uncertainty: str = ""
    se_df: int | None = None

    def snapshot_view(self) -> dict:
        """The top channels by variance across texts and by token-substitution perturbation."""
        return {
            "layer": self.layer,
            "site": self.site,
            "kind": self.kind,
            "top_by_variance": list(self.top_by_variance),
            "top_variance": _with_se(self.top_variance, self.top_variance_se),
            "top_by_perturbation": list(self.top_by_perturbation),
            "top_perturbation": list(self.top_perturbation),
        }


def _with_se(values: tuple[float, ...], ses: tuple[float, ...] | None) -> list:
    """Values as ``{"x", "x_se"}`` pairs, judged against their noise by the snapshots."""
    if ses is None:
        return list(values)
    return [{"x": x, "x_se": se} for x, se in zip(values, ses, strict=True)]


def delta_sensitive_layer(
    stats: NeuronStats,
    perturbation: np.ndarray,
    layer: int,
    *,
    model: str,
    top_k: int = default("top_k"),
    n_prompts: int,
    substitutions: int,
    seed: int,
) -> DeltaSensitiveFinding:
    """The finding of one layer from the streamed variance and a perturbation score ``(W,)``."""
    site = variance_site(stats)
    variance = variance_scores(stats, layer, site)  # (W,)
    if perturbation.shape != variance.shape:
        raise NeuronSpecError(
            f"perturbation scores have shape {perturbation.shape}, expected {variance.shape}"
        )
    mean = stats.site_mean(site, layer).numpy()  # (W,)
    by_variance = top_channels(variance, top_k)
    by_perturbation = top_channels(perturbation, top_k)
    errors = {}
    bootstrap = stats.group_bootstrap()
    if bootstrap is not None:
        resampled = stats.window_mean_variance_resampled(site, layer, bootstrap).numpy()
        errors = {
            "top_variance_se": tuple(bootstrap.se(resampled[:, by_variance]).tolist()),
            "uncertainty": bootstrap.method,
            "se_df": bootstrap.df,
        }
    rho = rank_correlation(variance, perturbation)  # None where a score is constant
    return DeltaSensitiveFinding(
        **errors,
        model=model,
        layer=layer,
        site=site,
        kind=NEURON_KIND[site],
        n_windows=stats.n_windows,
        n_prompts=n_prompts,
        substitutions=substitutions,
        seed=seed,
        top_by_variance=tuple(by_variance),
        top_variance=tuple(float(variance[c]) for c in by_variance),
        top_mean=tuple(float(mean[c]) for c in by_variance),
        top_by_perturbation=tuple(by_perturbation),
        top_perturbation=tuple(float(perturbation[c]) for c in by_perturbation),
        n_zero_variance=int((variance == 0).sum()),
        top_overlap=len(set(by_variance) & set(by_perturbation)),
        rank_correlation=float("nan") if rho is None else rho,
    )
