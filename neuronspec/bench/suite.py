"""The spec suite end to end: a cold run (empty cache) against a warm rerun, and a cold
``-n 2`` run against the cold ``-n 0`` run, on the embedded models, each run a fresh pytest
process.

Rows are wall seconds of whole ``pytest specs/`` processes; one run each (the suite is
deterministic, and a cold run can only be cold once per cache directory).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from neuronspec.bench import Timing, row

SPECS = Path(__file__).resolve().parents[2] / "specs"


def _pytest(cache: Path, *args: str) -> float:
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(SPECS),
        "-q",
        "-p",
        "no:randomly",
        f"--neuronspec-cache={cache}",
        *args,
    ]
    start = time.perf_counter()
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}")
    return seconds


def run(quick: bool = False) -> list[dict]:
    extra = ["--max-tokens=20000"] if quick else []
    with tempfile.TemporaryDirectory() as first, tempfile.TemporaryDirectory() as second:
        cold = _pytest(Path(first), "-n", "0", *extra)
        warm = _pytest(Path(first), "-n", "0", *extra)
        cold_parallel = _pytest(Path(second), "-n", "2", *extra)
    cold_row = "specs, cold cache, -n 0"
    return [  # one round each: a cold run can be cold only once per cache directory
        row(cold_row, Timing((cold,))),
        row("specs, warm cache, -n 0", Timing((warm,)), cold_row, Timing((cold,))),
        row("specs, cold cache, -n 2", Timing((cold_parallel,)), cold_row, Timing((cold,))),
    ]
