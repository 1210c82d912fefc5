"""The pytest side of the report: a plugin object the neuronspec plugin registers in the
process that reports (the xdist controller, or the only process without ``-n``).

It collects every test report (outcomes, hypotheses, snapshot drift), completes the merged
results with the run's configuration and versions and the decoded token texts, prints the
findings summary at the end of the run, writes the HTML report (``--neuronspec-report``)
and points progress bars at the terminal.
"""

from __future__ import annotations

import datetime
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from neuronspec import __version__, progress
from neuronspec.report.outcomes import SpecOutcomes
from neuronspec.report.summary import summary_lines
from neuronspec.report.tokens import record_tokens

NAME = "neuronspec-run-recorder"
_VERSIONED = ("torch", "transformers", "tokenizers", "numpy", "pytest", "pytest-xdist", "syrupy")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


class _TerminalStream:
    """Writes to the real terminal with pytest's capture suspended for each write."""

    def __init__(self, capture_manager: Any):
        self._capture = capture_manager

    def write(self, text: str) -> int:
        with self._capture.global_and_fixture_disabled():
            sys.stderr.write(text)
            sys.stderr.flush()
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        with self._capture.global_and_fixture_disabled():
            return sys.stderr.isatty()


class RunRecorder:
    def __init__(self, config: pytest.Config):
        self.config = config
        self.outcomes = SpecOutcomes()
        self.started = time.time()
        self.results: dict[str, Any] | None = None
        capture = config.pluginmanager.getplugin("capturemanager")
        if capture is not None:
            progress.set_stream(_TerminalStream(capture))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.outcomes.add(report)

    def pytest_unconfigure(self) -> None:
        progress.set_stream(None)

    def complete(self, results: dict[str, Any], run_config: Any) -> dict[str, Any]:
        """Add ``run``, ``specs``, ``snapshot_drift`` and each model's ``tokens``."""
        record_tokens(results)
        plots = run_config.plots_dir
        results["run"] = {
            "started": datetime.datetime.fromtimestamp(
                self.started, datetime.timezone.utc
            ).isoformat(timespec="seconds"),
            "duration_s": round(time.time() - self.started, 2),
            "args": [str(arg) for arg in self.config.invocation_params.args],
            "models": list(run_config.models),
            "layers": list(run_config.layers) if run_config.layers is not None else None,
            "top_k": run_config.top_k,
            "device": run_config.device,
            "batch_size": run_config.batch_size,
            "fast_scan": run_config.fast_scan,
            "plots_dir": str(Path(plots).resolve()) if plots is not None else None,
            "versions": {
                "neuronspec": __version__,
                "python": platform.python_version(),
                **{package: _version(package) for package in _VERSIONED},
            },
            "platform": platform.platform(),
        }
        results["specs"] = self.outcomes.to_json()
        results["snapshot_drift"] = sorted(
            self.outcomes.drift, key=lambda d: (d["nodeid"], str(d["snapshot"]))
        )
        self.results = results
        return results

    def write_report(self, results: dict[str, Any]) -> None:
        directory = self.config.option.neuronspec_report
        if directory:
            from neuronspec.report.html import write_report

            write_report(results, Path(directory))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.results or not self.results.get("models"):
            return
        terminalreporter.write_sep("-", "neuronspec findings")
        for line in summary_lines(self.results):
            terminalreporter.write_line(line)
        directory = self.config.option.neuronspec_report
        if directory:
            terminalreporter.write_line(f"report: {Path(directory) / 'index.html'}")
