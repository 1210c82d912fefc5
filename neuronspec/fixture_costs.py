"""Seconds and peak memory of every session fixture's setup, for the suite's cost table.

When the environment names a file in ``NEURONSPEC_FIXTURE_COSTS``, the plugin times each
session-scoped fixture's own setup (pytest sets up the fixtures it requests first, so a
fixture's time excludes theirs) and appends one JSON line per setup: ``fixture``, the
``model`` of its parametrisation (None when it has none), ``seconds`` (wall) and
``peak_rss_growth`` (bytes: the largest resident set size seen while it ran, sampled every
20 ms, minus the size when it began). ``python -m neuronspec.bench --only suite-real`` reads
them. Off (no sampling thread, no file) unless the variable is set.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ENVIRONMENT = "NEURONSPEC_FIXTURE_COSTS"
SAMPLE_SECONDS = 0.02


def rss_bytes() -> int:
    """Resident set size of this process in bytes (Linux ``/proc/self/statm``)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def measured(fixture: str, model: str | None) -> Iterator[None]:
    """Time the block and sample its resident memory; append the line when the variable is set."""
    path = os.environ.get(ENVIRONMENT)
    if not path:
        yield
        return
    start_rss = peak = rss_bytes()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(SAMPLE_SECONDS):
            peak = max(peak, rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
        peak = max(peak, rss_bytes())
        line = {"fixture": fixture, "model": model, "seconds": seconds,
                "peak_rss_growth": peak - start_rss}  # fmt: skip
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(line) + "\n")
