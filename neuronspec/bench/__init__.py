"""Benchmarks: ``python -m neuronspec.bench [--quick] [--only NAME]``.

Each section is a module ``neuronspec.bench.<name>`` with ``run(quick: bool = False) ->
list[dict]``; rows carry ``name``, ``seconds`` (median over rounds), ``rounds`` (seconds
of each round), ``ratio_vs`` (the name of the row it is compared with, or None),
``ratio`` (median over rounds of ``rounds[i] / rounds of ratio_vs[i]``) and
``ratio_range`` (lowest and highest of those per-round ratios). Benchmarks report; they
never assert on wall time.

Why per-round ratios: on a shared VM the CPU's speed drifts by ±10% over seconds (CPU time
follows wall time, so it is the machine, not scheduling). Calls of one round run back to
back, so a per-round ratio compares two candidates under the same conditions, and its
median over rounds is steadier than the ratio of two medians.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Timing", "print_table", "row", "time_side_by_side"]


@dataclass(frozen=True)
class Timing:
    """Wall seconds of one candidate, one per round of :func:`time_side_by_side`."""

    rounds: tuple[float, ...]

    @property
    def seconds(self) -> float:
        return statistics.median(self.rounds)

    def __sub__(self, other: Timing) -> Timing:
        """Round by round difference (e.g. a pass minus its part timed inside it)."""
        _check_rounds(self, other)
        return Timing(tuple(a - b for a, b in zip(self.rounds, other.rounds, strict=True)))


def _check_rounds(a: Timing, b: Timing) -> None:
    if len(a.rounds) != len(b.rounds):
        raise ValueError(f"timings of {len(a.rounds)} and {len(b.rounds)} rounds do not pair")


def row(name: str, timing: Timing, vs: str | None = None, vs_timing: Timing | None = None) -> dict:
    """A result row for ``timing``, compared round by round with ``vs_timing`` (row ``vs``)."""
    result = {"name": name, "seconds": timing.seconds, "rounds": timing.rounds, "ratio_vs": vs}
    if vs_timing is None:
        return {**result, "ratio": None, "ratio_range": None}
    _check_rounds(timing, vs_timing)
    ratios = [a / b for a, b in zip(timing.rounds, vs_timing.rounds, strict=True)]
    return {**result, "ratio": statistics.median(ratios), "ratio_range": (min(ratios), max(ratios))}


def time_side_by_side(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, Timing]:
    """Wall seconds of each function in ``repeats`` rounds; every round calls each once.

    One untimed warm-up round comes first. Odd rounds run the functions in reverse order
    (a, b, c, then c, b, a), so a steady drift of the machine's speed favours no position.
    Compare candidates that are neighbours in ``fns``: they run back to back in every round.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    for round_index in range(repeats):
        for name, fn in order if round_index % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: Timing(tuple(ts)) for name, ts in times.items()}


def _ratio_text(r: dict) -> str:
    if r.get("ratio") is None:
        return ""
    if len(r["rounds"]) == 1:  # one round: the range is the ratio itself
        return f"{r['ratio']:.3f}"
    low, high = r["ratio_range"]
    return f"{r['ratio']:.3f} ({low:.3f}-{high:.3f})"


def print_table(rows: list[dict]) -> None:
    """Print rows as an aligned text table; a ratio is followed by its per-round range."""
    header = ("name", "seconds", "ratio (range)", "vs")
    lines = [
        (str(r["name"]), f"{r['seconds']:.3f}", _ratio_text(r), r.get("ratio_vs") or "")
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:{'<' if i in (0, 3) else '>'}{w}}}" for i, w in enumerate(widths))
    print(fmt.format(*header))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print(fmt.format(*line))
