"""Benchmarks: ``python -m neuronspec.bench [--quick] [--only NAME]``.

Each section is a module ``neuronspec.bench.<name>`` with ``run(quick: bool = False) ->
list[dict]``; rows carry ``name``, ``seconds``, ``ratio_vs`` (the name of the row it is
compared with, or None) and ``ratio`` (``seconds / seconds of ratio_vs``). Benchmarks
report; they never assert on wall time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

__all__ = ["print_table", "row", "time_side_by_side"]


def row(name: str, seconds: float, vs: str | None = None, vs_seconds: float | None = None) -> dict:
    """A result row: ``seconds``, and its ratio to ``vs_seconds`` (the row named ``vs``)."""
    ratio = None if vs_seconds is None else seconds / vs_seconds
    return {"name": name, "seconds": seconds, "ratio_vs": vs, "ratio": ratio}


def time_side_by_side(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall seconds per function, calls interleaved (a, b, c, a, b, c, ...).

    One untimed warm-up round comes first. Interleaving spreads load from other
    processes over all candidates instead of penalising whichever ran during it.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def print_table(rows: list[dict]) -> None:
    """Print rows (name, seconds, ratio_vs, ratio) as an aligned text table."""
    header = ("name", "seconds", "ratio", "vs")
    lines = [
        (
            str(r["name"]),
            f"{r['seconds']:.3f}",
            "" if r.get("ratio") is None else f"{r['ratio']:.3f}",
            r.get("ratio_vs") or "",
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:{'<' if i in (0, 3) else '>'}{w}}}" for i, w in enumerate(widths))
    print(fmt.format(*header))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print(fmt.format(*line))
