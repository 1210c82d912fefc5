"""The benchmark runs and reports consistent rows (``python -m neuronspec.bench --quick``).

No timing is asserted: wall time depends on the machine. What is checked is what a reader
of the table relies on: every ratio names a row of the table, and equals the quotient of
the two rows' seconds.
"""

from __future__ import annotations

import importlib
import math

import pytest


@pytest.mark.parametrize("section", ["scan", "capture"])
def test_quick_benchmark_rows_are_consistent(section):
    rows = importlib.import_module(f"neuronspec.bench.{section}").run(quick=True)
    seconds = {}
    for row in rows:
        assert math.isfinite(row["seconds"]), row  # differences of timings may be <= 0
        assert seconds.setdefault(row["name"], row["seconds"]) == row["seconds"], row
    compared = [row for row in rows if row["ratio_vs"] is not None]
    assert compared, "a section compares at least one pair of rows"
    for row in compared:
        assert row["ratio_vs"] in seconds, f"{row['name']!r} is compared with a row not shown"
        assert math.isclose(row["ratio"], row["seconds"] / seconds[row["ratio_vs"]]), row
