"""The benchmark runs and reports consistent rows (``python -m neuronspec.bench --quick``).

No timing is asserted: wall time depends on the machine. What is checked is what a reader
of the table relies on: every ratio names a row of the table, and is the median of the
per-round ratios of the two rows' timings, within their range.
"""

from __future__ import annotations

import importlib
import math
import statistics

import pytest

from neuronspec.bench import Timing, row, time_side_by_side


@pytest.mark.parametrize("section", ["scan", "capture", "causal"])
def test_quick_benchmark_rows_are_consistent(section):
    rows = importlib.import_module(f"neuronspec.bench.{section}").run(quick=True)
    rounds = {}
    for r in rows:
        assert all(math.isfinite(s) for s in r["rounds"]), r  # differences may be <= 0
        assert r["seconds"] == statistics.median(r["rounds"]), r
        assert rounds.setdefault(r["name"], r["rounds"]) == r["rounds"], r
    compared = [r for r in rows if r["ratio_vs"] is not None]
    assert compared, "a section compares at least one pair of rows"
    for r in compared:
        assert r["ratio_vs"] in rounds, f"{r['name']!r} is compared with a row not shown"
        ratios = [a / b for a, b in zip(r["rounds"], rounds[r["ratio_vs"]], strict=True)]
        assert math.isclose(r["ratio"], statistics.median(ratios)), r
        assert r["ratio_range"] == (min(ratios), max(ratios)), r


def test_ratio_is_the_median_of_per_round_ratios_not_the_ratio_of_medians():
    # b is 10% slower than a in the rounds where the machine ran at speed 1 and 2; in the
    # third round a hit a slow spell (4 s) and b did not: a ratio of medians would say 0.55
    a, b = Timing((1.0, 2.0, 4.0)), Timing((1.1, 2.2, 1.0))
    r = row("b", b, "a", a)
    assert r["seconds"] == 1.1 and b.seconds / a.seconds == pytest.approx(0.55)
    assert r["ratio"] == pytest.approx(1.1) and r["ratio_range"] == pytest.approx((0.25, 1.1))
    assert (b - a).rounds == pytest.approx((0.1, 0.2, -3.0))
    with pytest.raises(ValueError, match="do not pair"):
        row("b", Timing((1.0,)), "a", a)


def test_rounds_alternate_order_and_start_after_a_warm_up():
    calls = []
    timings = time_side_by_side({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert all(len(t.rounds) == 3 for t in timings.values())
    with pytest.raises(ValueError, match="repeats"):
        time_side_by_side({"a": lambda: None}, 0)


def test_scale_measure_reports_a_pass_over_a_real_shape():
    from neuronspec.bench.scale import WINDOW, measure

    result = measure("mamba130m", 2 * WINDOW, layers=1)
    assert result["tokens"] == 2 * WINDOW and result["neurons"] == 1536
    assert 0 < result["pairs"] <= result["neurons"] * result["distinct_tokens"]
    assert result["peak_rss"] >= result["rss_before_pass"] > 0 and result["entry_bytes"] > 0
