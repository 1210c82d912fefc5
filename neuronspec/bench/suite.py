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
    return [
        {"name": "specs, cold cache, -n 0", "seconds": cold, "ratio_vs": None, "ratio": None},
        {
            "name": "specs, warm cache, -n 0",
            "seconds": warm,
            "ratio_vs": "specs, cold cache, -n 0",
            "ratio": warm / cold,
        },
        {
            "name": "specs, cold cache, -n 2",
            "seconds": cold_parallel,
            "ratio_vs": "specs, cold cache, -n 0",
            "ratio": cold_parallel / cold,
        },
    ]
