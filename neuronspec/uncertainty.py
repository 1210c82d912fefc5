"""Uncertainty of intervention findings: random-control p-values and window-paired intervals.

**Empirical p-value** against a random control of n draws (seeds):
p = (1 + #{control ≥ observed}) / (1 + n) for "the condition exceeds its control"
(``≤`` for "stays below"), the permutation p-value of Phipson & Smyth (2010): exact under
the null that the condition's neurons are exchangeable with random ones, never 0. The
smallest p that n seeds can give is 1 / (n + 1), so a test at level α needs
n ≥ 1/α − 1 seeds (99 for α = 0.01, ``--control-seeds``); asking for less raises.

**Sequential draws** (Besag & Clifford 1991, "Sequential Monte Carlo p-values"): the
seeds are drawn in order and a condition stops drawing once h = :data:`STOP_EXCEEDANCES`
(10) of them reached its change; its p-value is then h / n at the n-th draw (≥ h / n_max,
so it never decides "exceeds at α" for α < h / n_max), else the empirical one over all
n_max seeds. Both are valid p-values; a condition that clearly does not exceed its control
costs about h / p draws instead of n_max (:func:`sequential_p_value`).

**Standard errors by a paired bootstrap**, in log-PPL: a condition's log PPL ratio
log(PPL_c / PPL_0) is its mean next-token NLL minus the baseline's (nats per target), a
mean over windows, so its bootstrap distribution is near normal even where the PPL ratio
is large. Every condition is measured on the same held-out windows, so an effect's noise
is the windows' and, for a difference from a random control, the seeds'. B = 2000
replicates draw the windows with replacement (the same draw for every condition: paired)
and, for a control mean, the seeds with replacement; the standard error is the
replicates' standard deviation. A change's interval is expm1(log ratio ± z·SE) (z the
standard normal quantile); a snapshot stores (value, SE).

**Corpus statistics** (dead fractions, firing frequencies, positional MI and counts,
sparsity, the Δ variance score) get their SE from a bootstrap over the pass's window
groups (:class:`neuronspec.capture.window_groups.GroupBootstrap`), with G − 1 degrees of
freedom: their intervals and one-sided tests use the Student-t quantile
(:func:`t_quantile`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from neuronspec.errors import NeuronSpecError
from neuronspec.findings import Finding

BOOTSTRAP_REPLICATES = 2000
BOOTSTRAP_SEED = 0
BOOTSTRAP_METHOD = (
    f"paired bootstrap, {BOOTSTRAP_REPLICATES} replicates over held-out windows "
    "(and control seeds for a control mean); normal interval value ± z·SE"
)


@dataclass(frozen=True)
class Interval(Finding):
    low: float
    high: float
    level: float
    method: str

    def __contains__(self, value: float) -> bool:
        return self.low <= value <= self.high


@dataclass(frozen=True)
class Estimate(Finding):
    """A value with its standard error and how the error was measured."""

    value: float
    se: float
    method: str
    df: int | None = None  # degrees of freedom of the SE (window groups: G − 1); None: normal

    def interval(self, level: float = 0.95) -> Interval:
        return normal_interval(self.value, self.se, level, self.method, df=self.df)

    def below(self, bound: float, *, alpha: float = 0.01) -> bool:
        """The value is below ``bound`` at level ``alpha``: the one-sided (1 − α) upper
        bound value + q_{1−α}·SE is below it (q the normal or Student-t quantile)."""
        return self.value + _one_sided_quantile(alpha, self.df) * self.se < bound

    def above(self, bound: float, *, alpha: float = 0.01) -> bool:
        return self.value - _one_sided_quantile(alpha, self.df) * self.se > bound

    def minus(self, other: Estimate) -> Estimate:
        """The difference ``self − other`` (two layers, two models), its SE combined as of
        independent estimates: conservative where both come from one corpus and correlate
        positively (the usual case for layers of one model and models on one corpus)."""
        df = None if self.df is None or other.df is None else min(self.df, other.df)
        return Estimate(
            self.value - other.value,
            math.hypot(self.se, other.se),
            f"difference; SEs combined as independent ({self.method})",
            df,
        )


def _one_sided_quantile(alpha: float, df: int | None) -> float:
    if not 0.0 < alpha < 1.0:
        raise NeuronSpecError(f"alpha must lie in (0, 1), got {alpha}")
    return t_quantile(1.0 - alpha, df)


def t_quantile(p: float, df: int | None) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (None: the normal).

    Closed forms for df 1, 2 and 4; Newton steps on the closed-form CDF for df 3; from
    df 5 the Cornish-Fisher expansion in 1/df to the fourth order (Abramowitz & Stegun
    26.7.5): within 0.6% of the exact quantile for 0.0005 ≤ p ≤ 0.9995, within 0.1% from
    df 8 (tested against scipy)."""
    z = NormalDist().inv_cdf(p)
    if df is None:
        return z
    if df < 1:
        raise NeuronSpecError(f"a t quantile needs at least 1 degree of freedom, got {df}")
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    if df == 4:
        root = math.sqrt(4 * p * (1 - p))
        return math.copysign(2 * math.sqrt(math.cos(math.acos(root) / 3) / root - 1), p - 0.5)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    t = z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4
    if df == 3:
        for _ in range(4):  # Newton on F(t) = 1/2 + (atan(u) + u / (1 + u²)) / π, u = t/√3
            u = t / math.sqrt(3)
            cdf = 0.5 + (math.atan(u) + u / (1 + u * u)) / math.pi
            t -= (cdf - p) / (6 * math.sqrt(3) / (math.pi * (3 + t * t) ** 2))
    return t


NO_WINDOW_GROUPS = (
    "the statistics hold fewer than 2 non-empty window groups (collected with "
    "StatsConfig.window_groups = 0, or from fewer than 2 windows)"
)


def normal_interval(
    value: float, se: float, level: float, method: str, *, df: int | None = None
) -> Interval:
    """value ± q·se with q the two-sided quantile of ``level``: standard normal, or
    Student-t with ``df`` degrees of freedom."""
    if not 0.0 < level < 1.0:
        raise NeuronSpecError(f"an interval's level must lie in (0, 1), got {level}")
    q = t_quantile(0.5 + level / 2, df)
    return Interval(value - q * se, value + q * se, level, method)


def change_interval(change: float, log_ratio_se: float, level: float, method: str) -> Interval:
    """The interval of a relative PPL change from the normal interval of its log ratio:
    expm1(log1p(change) ± z·SE)."""
    log_interval = normal_interval(math.log1p(change), log_ratio_se, level, method)
    return Interval(math.expm1(log_interval.low), math.expm1(log_interval.high), level, method)


def empirical_p_value(observed: float, control: list[float], *, alternative: str) -> float:
    """(1 + #{c ≥ observed}) / (1 + n) for ``alternative="greater"``, ``≤`` for ``"less"``."""
    hits = _hits(observed, control, alternative)
    return (1 + int(hits.sum())) / (1 + hits.size)


STOP_EXCEEDANCES = 10
"""h of the sequential p-value: a condition stops drawing controls at its h-th exceedance."""


def sequential_draws(
    observed: float,
    control: list[float],
    *,
    alternative: str,
    n_max: int,
    stop_at: int = STOP_EXCEEDANCES,
) -> int | None:
    """How many of ``control`` (in draw order) the sequential p-value of ``observed`` uses:
    the draw of its ``stop_at``-th exceedance, else ``n_max`` once that many are given;
    None while the draws so far do not decide."""
    hits = _hits(observed, control[:n_max], alternative)
    reached = np.flatnonzero(np.cumsum(hits) >= stop_at)
    if reached.size:
        return int(reached[0]) + 1
    return n_max if hits.size >= n_max else None


def sequential_p_value(
    observed: float,
    control: list[float],
    *,
    alternative: str,
    n_max: int,
    stop_at: int = STOP_EXCEEDANCES,
) -> float:
    """Besag-Clifford p-value of ``observed`` among ``control`` (in draw order):
    ``stop_at / n`` when the ``stop_at``-th exceedance is the n-th draw, else the empirical
    p-value over the first ``n_max`` draws. Raises when the draws given do not decide."""
    used = sequential_draws(
        observed, control, alternative=alternative, n_max=n_max, stop_at=stop_at
    )
    if used is None:
        raise NeuronSpecError(
            f"{len(control)} control draws of {n_max} do not decide the sequential p-value "
            f"(fewer than {stop_at} exceedances): it needs all {n_max} draws"
        )
    hits = int(_hits(observed, control[:used], alternative).sum())
    return stop_at / used if hits >= stop_at else (1 + hits) / (1 + n_max)


def _hits(observed: float, control: list[float], alternative: str) -> np.ndarray:
    """``(n,)`` bool: the controls at least as extreme as ``observed`` in ``alternative``."""
    if alternative not in ("greater", "less"):
        raise NeuronSpecError(f"alternative must be 'greater' or 'less', got {alternative!r}")
    values = np.asarray(control, dtype=float)
    return values >= observed if alternative == "greater" else values <= observed


def _mid_ranks(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1-based ranks of ``values`` (n,), ties given their average rank; and the tie group sizes."""
    order = np.argsort(values, kind="stable")
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    ranks = np.empty(values.size)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks, counts


def rank_correlation(x: list[float], y: list[float]) -> float | None:
    """Spearman's ρ of paired values: Pearson's r of their mid-ranks; None for fewer than
    2 pairs or when one side is constant."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.size != b.size:
        raise NeuronSpecError(f"rank correlation of {a.size} and {b.size} values: pair them")
    if a.size < 2:
        return None
    ra, rb = _mid_ranks(a)[0], _mid_ranks(b)[0]
    ra, rb = ra - ra.mean(), rb - rb.mean()
    norm = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return None if norm == 0.0 else float((ra * rb).sum() / norm)


def rank_correlation_se(rho: float, n: int) -> float:
    """Sampling standard error of Spearman's ρ over ``n`` pairs: Fieller, Hartley & Pearson
    (1957), var(atanh ρ) ≈ 1.06 / (n − 3), carried back by the delta method,
    SE(ρ) ≈ (1 − ρ²)·√(1.06 / (n − 3)). Needs n ≥ 4."""
    if n < 4:
        raise NeuronSpecError(f"the SE of a rank correlation needs at least 4 pairs, got {n}")
    return (1.0 - rho * rho) * math.sqrt(1.06 / (n - 3))


def rank_sum_p_value(values: list[float], control: list[float]) -> float:
    """One-sided Mann–Whitney U p-value that ``values`` tend to exceed ``control``: normal
    approximation with tie correction and continuity correction (as
    ``scipy.stats.mannwhitneyu(..., alternative="greater", method="asymptotic")``)."""
    x, y = np.asarray(values, dtype=float), np.asarray(control, dtype=float)
    n, m = x.size, y.size
    if n == 0 or m == 0:
        raise NeuronSpecError("a rank-sum test needs values and controls, got an empty side")
    ranks, counts = _mid_ranks(np.concatenate([x, y]))
    u = ranks[:n].sum() - n * (n + 1) / 2.0
    total = n + m
    tie_term = float((counts**3 - counts).sum()) / (total * (total - 1))
    sd = math.sqrt(n * m / 12.0 * ((total + 1) - tie_term))
    if sd == 0.0:
        return 1.0  # every value tied: no evidence either way
    z = (u - n * m / 2.0 - 0.5) / sd
    return 1.0 - NormalDist().cdf(z)


SIGN_FLIPS = 20000  # Monte Carlo sign flips above EXACT_FLIPS_UP_TO pairs
EXACT_FLIPS_UP_TO = 16  # 2^16 sign patterns enumerated exactly


def sign_flip_p_value(differences: list[float], *, alternative: str) -> float:
    """Paired permutation p-value that the mean of ``differences`` (one per unit, e.g. a
    fact's own effect minus its controls') is > 0 (``"greater"``) or < 0 (``"less"``):
    under the null each difference is symmetric about 0, so its sign is a coin flip. Exact
    over all 2^n sign patterns for n ≤ 16, else 20,000 seeded flips with the observed one
    counted ((1 + hits) / (1 + flips))."""
    if alternative not in ("greater", "less"):
        raise NeuronSpecError(f"alternative must be 'greater' or 'less', got {alternative!r}")
    d = np.asarray(differences, dtype=float)
    if d.size == 0:
        raise NeuronSpecError("a sign-flip test needs at least one paired difference")
    sign = 1.0 if alternative == "greater" else -1.0
    observed = sign * d.mean()
    if d.size <= EXACT_FLIPS_UP_TO:
        patterns = ((np.arange(2**d.size)[:, None] >> np.arange(d.size)) & 1) * 2.0 - 1.0
        means = sign * (patterns @ d) / d.size
        return float((means >= observed - 1e-12 * abs(observed)).mean())
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    flips = rng.choice((-1.0, 1.0), size=(SIGN_FLIPS, d.size))
    means = sign * (flips @ d) / d.size
    return (1 + int((means >= observed - 1e-12 * abs(observed)).sum())) / (1 + SIGN_FLIPS)


def mean_se(values: list[float]) -> float:
    """Standard error of a mean, s / √n (0 for fewer than 2 values)."""
    v = np.asarray(values, dtype=float)
    return float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else 0.0


def check_level(alpha: float, n_controls: int) -> None:
    """Raise when ``n_controls`` random draws cannot give a p-value at or below ``alpha``."""
    if not 0.0 < alpha < 1.0:
        raise NeuronSpecError(f"alpha must lie in (0, 1), got {alpha}")
    if 1.0 / (n_controls + 1) > alpha:
        needed = math.ceil(1.0 / alpha) - 1
        raise NeuronSpecError(
            f"a test at alpha = {alpha} needs at least {needed} random-control seeds (the "
            f"smallest p-value of n seeds is 1/(n+1)); this finding has {n_controls}: pass "
            f"--control-seeds {needed} or more"
        )


def bootstrap_weights(n: int, replicates: int, seed: int) -> np.ndarray:
    """``(replicates, n)`` multinomial counts: each replicate draws n of n with replacement."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=replicates).astype(np.float64)


def paired_log_ratios(window_nll: np.ndarray, targets_per_window: int) -> np.ndarray:
    """Bootstrap replicates of every condition's log PPL ratio against row 0 (the
    baseline): ``window_nll`` ``(C, N)``, Σ NLL per window over its ``targets_per_window``
    targets (the same windows for every condition) → ``(C, B)`` replicates of
    mean NLL_c − mean NLL_0 (nats per target), the windows drawn with replacement, the
    same draw for every condition (paired)."""
    n_windows = window_nll.shape[1]
    weights = bootstrap_weights(n_windows, BOOTSTRAP_REPLICATES, BOOTSTRAP_SEED)  # (B, N)
    sums = window_nll @ weights.T  # (C, B): Σ NLL over each replicate's windows
    return (sums - sums[0]) / (n_windows * targets_per_window)


def control_mean_replicates(control_changes: np.ndarray) -> np.ndarray:
    """``(S, B)`` replicates of S seeds' values → ``(B,)`` replicates of their mean, the
    seeds resampled with replacement in each replicate."""
    seeds = control_changes.shape[0]
    weights = bootstrap_weights(seeds, control_changes.shape[1], BOOTSTRAP_SEED + 1)  # (B, S)
    return (weights * control_changes.T).sum(1) / seeds
