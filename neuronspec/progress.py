"""Progress bars for long work (the statistics pass, integrated gradients, ablation sweeps).

``progress(iterable, total=, desc=, unit=)`` is a tqdm bar when a person watches a terminal
and a silent pass-through otherwise::

    for batch in progress(batches, total=len(batches), desc="statistics tiny-gpt2", unit="batch"):
        ...

Shown when the output stream is a terminal; never in an xdist worker (its output would
interleave with other workers' and pytest's); ``NEURONSPEC_PROGRESS=1`` / ``=0`` force it on
or off. Under pytest the plugin points the bars at the terminal with pytest's output
capture suspended for each write (:func:`set_stream`); elsewhere they go to ``sys.stderr``.
Bars are cleared when done (``leave=False``), so finished work leaves no lines behind.

Work that will take long says so near its start, bar or no bar: after the first step
(and at least :data:`ESTIMATE_AFTER_SECONDS`), a loop whose estimated total exceeds
:data:`LONG_RUN_SECONDS` (ten minutes) writes one line with the estimate to the stream.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

_stream: TextIO | None = None  # set by the pytest plugin; None: sys.stderr
LONG_RUN_SECONDS = 600.0
ESTIMATE_AFTER_SECONDS = 5.0


def set_stream(stream: TextIO | None) -> None:
    """Send bars to ``stream`` (None: back to ``sys.stderr``)."""
    global _stream
    _stream = stream


def progress_enabled(stream: TextIO | None = None) -> bool:
    """Whether bars are shown: forced by ``NEURONSPEC_PROGRESS``, else a terminal outside
    xdist workers."""
    forced = os.environ.get("NEURONSPEC_PROGRESS", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return False
    stream = stream if stream is not None else (_stream or sys.stderr)
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
) -> Any:
    """A tqdm bar over ``iterable`` (or a manual one with ``.update(n)``), disabled when
    :func:`progress_enabled` says no; use as an iterable or a context manager."""
    from tqdm import tqdm

    stream = _stream or sys.stderr
    if iterable is not None and total:
        iterable = announce_long_runs(iterable, total, desc, unit, stream)
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        file=stream,
        leave=False,
        dynamic_ncols=True,
        disable=not progress_enabled(stream),
    )


def announce_long_runs(
    iterable: Iterable[Any], total: int, desc: str, unit: str, stream: TextIO, clock=time.monotonic
) -> Iterable[Any]:
    """``iterable`` unchanged; once the steps done so far took ``ESTIMATE_AFTER_SECONDS``
    (checked after each step until the first estimate), writes "``desc``: about N min for
    ``total`` ``unit``s" to ``stream`` when the estimated total exceeds ``LONG_RUN_SECONDS``."""
    start = clock()
    estimated = False
    for done, item in enumerate(iterable, start=1):
        yield item
        elapsed = clock() - start
        if estimated or (elapsed < ESTIMATE_AFTER_SECONDS and done < total):
            continue
        estimated = True
        estimate = elapsed * total / done
        if estimate > LONG_RUN_SECONDS:
            stream.write(
                f"neuronspec: {desc or 'this step'} will take about {estimate / 60:.0f} min "
                f"({done} of {total} {unit}s in {elapsed:.0f} s)\n"
            )
            stream.flush()
