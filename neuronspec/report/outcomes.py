"""What the pytest plugin records of a run for the report: every spec's outcome with its
hypothesis, and the snapshot drift (which snapshotted findings moved, by how much).

Both travel from xdist workers to the controller on the test reports' ``user_properties``
(``neuronspec_*`` names), so they are collected in one place with or without ``-n``.
A spec's hypothesis is the first paragraph of its docstring; values a spec gives to
pytest's ``record_property(name, value)`` are shown beside it as its measured numbers.
"""

from __future__ import annotations

import json
import re
from typing import Any

from neuronspec.report.compare import changes
from neuronspec.snapshot import FindingsSnapshotExtension

DOC, MODEL, LAYER, DRIFT = (
    "neuronspec_doc",
    "neuronspec_model",
    "neuronspec_layer",
    "neuronspec_drift",
)
_MAX_MESSAGE = 800  # characters of a failure / xfail message kept
_MAX_CHANGES = 50  # moved leaves kept per snapshot; the rest are counted


def hypothesis_of(doc: str | None) -> str:
    """The first paragraph of a docstring on one line ("" without a docstring)."""
    if not doc:
        return ""
    paragraph = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    return " ".join(paragraph.split())


def item_properties(item: Any) -> list[tuple[str, Any]]:
    """The ``user_properties`` the plugin adds to a test's reports: hypothesis, model, layer."""
    function = getattr(item, "function", None)
    properties: list[tuple[str, Any]] = [(DOC, hypothesis_of(getattr(function, "__doc__", None)))]
    params = getattr(getattr(item, "callspec", None), "params", {})
    if "model_id" in params:
        properties.append((MODEL, str(params["model_id"])))
    if "layer" in params:
        properties.append((LAYER, int(params["layer"])))
    return properties


def _message(report: Any) -> str:
    longrepr = report.longrepr
    if longrepr is None:
        return ""
    if isinstance(longrepr, tuple):  # skips: (path, line, "Skipped: reason")
        text = str(longrepr[2])
        return text.removeprefix("Skipped: ")
    crash = getattr(longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(longrepr)
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 1] + "…"


class SpecOutcomes:
    """Outcomes of a run's tests, fed with every test report (``pytest_runtest_logreport``)."""

    def __init__(self) -> None:
        self.specs: dict[str, dict[str, Any]] = {}
        self.drift: list[dict[str, Any]] = []

    def add(self, report: Any) -> None:
        entry = self.specs.get(report.nodeid)
        if entry is None:
            path, _, name = report.nodeid.partition("::")
            entry = self.specs[report.nodeid] = {
                "nodeid": report.nodeid,
                "file": path,
                "name": name,
                "outcome": None,
                "reason": "",
                "message": "",
                "hypothesis": "",
                "measured": {},
                "duration_s": 0.0,
            }
        entry["duration_s"] = round(entry["duration_s"] + float(report.duration or 0.0), 4)
        for key, value in report.user_properties:
            if key == DOC:
                entry["hypothesis"] = value
            elif key == MODEL:
                entry["model"] = value
            elif key == LAYER:
                entry["layer"] = value
            elif key == DRIFT:
                if report.when == "teardown":
                    self.drift.extend(json.loads(value))
            elif not str(key).startswith("neuronspec_"):
                entry["measured"][str(key)] = _plain(value)
        outcome = self._outcome(report)
        if outcome is not None and (entry["outcome"] in (None, "passed") or outcome == "error"):
            entry["outcome"] = outcome
            if outcome == "xfailed":
                entry["reason"] = str(report.wasxfail)
                entry["message"] = _message(report)
            elif outcome in ("skipped", "failed", "error", "xpassed"):
                entry["message"] = _message(report)
                if outcome == "skipped":
                    entry["reason"] = entry["message"]

    @staticmethod
    def _outcome(report: Any) -> str | None:
        xfail = hasattr(report, "wasxfail")
        if report.when == "call":
            if report.passed:
                return "xpassed" if xfail else "passed"
            if report.skipped:
                return "xfailed" if xfail else "skipped"
            return "failed"
        if report.failed:
            return "error"
        if report.skipped:  # skipped (or xfail(run=False)) before the test ran
            return "xfailed" if xfail else "skipped"
        return None

    def to_json(self) -> list[dict[str, Any]]:
        return [self.specs[nodeid] for nodeid in sorted(self.specs)]


def _plain(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return repr(value)


def snapshot_drift(assertion: Any, *, nodeid: str) -> list[dict[str, Any]]:
    """The comparisons a syrupy ``SnapshotAssertion`` made in one test, for the report.

    Status: ``match`` (nothing moved), ``within tolerance`` (values moved, all accepted),
    ``out of tolerance``, ``updated`` (rewritten by ``--snapshot-update`` after moving out of
    tolerance) or ``new`` (no stored snapshot). Leaves are judged with the assertion's
    extension when it is a :class:`FindingsSnapshotExtension`, else with the default one.
    """
    extension = assertion.extension
    if not isinstance(extension, FindingsSnapshotExtension):
        extension = FindingsSnapshotExtension()
    drift = []
    for result in assertion.executions.values():
        entry: dict[str, Any] = {"nodeid": nodeid, "snapshot": result.snapshot_name}
        try:
            received = json.loads(result.asserted_data) if result.asserted_data else None
            stored = json.loads(result.recalled_data) if result.recalled_data else None
        except (TypeError, json.JSONDecodeError):
            received = stored = None
        if stored is None or received is None:
            status = "new" if result.recalled_data is None else "not comparable"
            drift.append(entry | {"status": status, "changes": [], "n_changes": 0})
            continue
        moved = list(changes(stored, received, extension=extension))
        within = all(c.within_tolerance for c in moved)
        if not moved:
            status = "match"
        elif within:
            status = "within tolerance"
        else:
            status = "updated" if result.updated else "out of tolerance"
        entry |= {
            "status": status,
            "n_changes": len(moved),
            "changes": [c.to_json() for c in moved[:_MAX_CHANGES]],
        }
        drift.append(entry)
    return drift
