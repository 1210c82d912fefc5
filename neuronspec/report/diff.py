"""``python -m neuronspec diff OLD.json NEW.json``: the findings that changed between two runs.

A finding is one ``model / analysis / layer`` entry of the results files. Each is compared
leaf by leaf with the snapshots' tolerance (:mod:`neuronspec.report.compare`), and listed as

- ``out of tolerance``: a value moved past the tolerance, or its structure changed;
- ``removed``: in OLD, not in NEW;
- ``added``: in NEW, not in OLD;
- ``within tolerance``: values moved, all within the tolerance.

A value with a standard error (``x`` beside ``x_se``) is judged against noise: it is out
of tolerance when it moved more than ``k`` standard errors of the difference (and more than
the fixed tolerance), ``k`` chosen so that the whole diff raises a false alarm with
probability at most ``alpha`` (default 0.01; Bonferroni over every such value compared,
:func:`~neuronspec.snapshot.noise_k`); each such change is listed with its size in
standard errors. Timings of the machine (:data:`MACHINE_MEASUREMENTS`, e.g. the
efficiency's measured tokens/s) are no findings and are not compared. Unchanged findings
are counted, not listed. Exit status: 1 when a finding is out of
tolerance or removed, 0 otherwise (an added finding is new, not a change), 2 when a file
cannot be read. ``--markdown`` writes a CI job summary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from neuronspec.report.compare import Change, changes
from neuronspec.report.results import iter_findings
from neuronspec.snapshot import RUN_ALPHA, FindingsSnapshotExtension, count_noise_judged, noise_k

OUT, REMOVED, ADDED, WITHIN = "out of tolerance", "removed", "added", "within tolerance"
STATUSES = (OUT, REMOVED, ADDED, WITHIN)
FAILING = (OUT, REMOVED)
MACHINE_MEASUREMENTS = frozenset({"throughput"})  # finding keys that time the machine


def _findings(results: dict[str, Any]) -> dict[tuple[str, str, str], Any]:
    """``(model, analysis, layer) → finding``, without the machine's timings."""
    return {
        (m, a, layer): (
            {k: v for k, v in f.items() if k not in MACHINE_MEASUREMENTS}
            if isinstance(f, dict)
            else f
        )
        for m, a, layer, f in iter_findings(results)
    }


@dataclass(frozen=True)
class FindingDiff:
    model: str
    analysis: str
    layer: str
    status: str
    changes: tuple[Change, ...] = ()

    @property
    def name(self) -> str:
        layer = "all layers" if self.layer == "all" else f"layer {self.layer}"
        return f"{self.model} / {self.analysis} / {layer}"


@dataclass
class RunDiff:
    findings: list[FindingDiff] = field(default_factory=list)
    n_unchanged: int = 0
    rel_tol: float = FindingsSnapshotExtension.rel_tol
    abs_tol: float = FindingsSnapshotExtension.abs_tol
    alpha: float = RUN_ALPHA  # false-alarm rate of the noise-judged values, whole diff
    n_noise_judged: int = 0  # values with a standard error compared
    k: float = 0.0  # standard errors such a value may move

    def of(self, status: str) -> list[FindingDiff]:
        return [f for f in self.findings if f.status == status]

    @property
    def failed(self) -> bool:
        return any(f.status in FAILING for f in self.findings)


def diff_results(
    old: dict[str, Any],
    new: dict[str, Any],
    *,
    extension: FindingsSnapshotExtension | None = None,
    alpha: float = RUN_ALPHA,
) -> RunDiff:
    """Compare every finding of two results files (see the module docstring)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    extension = extension if extension is not None else FindingsSnapshotExtension()
    before, after = _findings(old), _findings(new)
    judged = sum(
        count_noise_judged(after[key], before[key]) for key in before.keys() & after.keys()
    )
    k = noise_k(alpha, judged)
    result = RunDiff(
        rel_tol=extension.rel_tol,
        abs_tol=extension.abs_tol,
        alpha=alpha,
        n_noise_judged=judged,
        k=k,
    )
    for key in sorted(before.keys() | after.keys()):
        if key not in after:
            result.findings.append(FindingDiff(*key, REMOVED))
        elif key not in before:
            result.findings.append(FindingDiff(*key, ADDED))
        else:
            moved = tuple(changes(before[key], after[key], extension=extension, k=k))
            if not moved:
                result.n_unchanged += 1
            else:
                within = all(change.within_tolerance for change in moved)
                result.findings.append(FindingDiff(*key, WITHIN if within else OUT, moved))
    order = {status: i for i, status in enumerate(STATUSES)}
    result.findings.sort(key=lambda f: order[f.status])
    return result


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def describe_change(change: Change) -> str:
    text = f"{change.path or '<finding>'}: {format_value(change.old)} → {format_value(change.new)}"
    extra = []
    if change.abs_change is not None:
        extra.append(f"Δ {change.abs_change:.3g}")
    if change.rel_change is not None:
        extra.append(f"rel {change.rel_change:.3g}")
    if change.se_change is not None:
        extra.append(f"{change.se_change:.2f} SE")
    if change.note:
        extra.append(change.note)
    extra.append("within tolerance" if change.within_tolerance else "OUT of tolerance")
    return f"{text} ({', '.join(extra)})"


def _tolerance(result: RunDiff) -> str:
    return (
        f"rel tol {result.rel_tol:g}, abs tol {result.abs_tol:g}; {result.n_noise_judged} values "
        f"with a standard error: k = {result.k:.2f} SE (alpha {result.alpha:g} per diff)"
    )


def _counts(result: RunDiff) -> str:
    parts = [f"{len(result.of(status))} {status}" for status in STATUSES]
    return ", ".join([*parts, f"{result.n_unchanged} unchanged"])


def format_text(result: RunDiff, *, max_changes: int = 20) -> str:
    lines = [f"neuronspec diff ({_tolerance(result)}): " + _counts(result)]
    for finding in result.findings:
        lines.append(f"{finding.status.upper():>16}  {finding.name}")
        for change in finding.changes[:max_changes]:
            lines.append(f"{'':18}{describe_change(change)}")
        if len(finding.changes) > max_changes:
            lines.append(f"{'':18}... and {len(finding.changes) - max_changes} more")
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def format_markdown(result: RunDiff, *, max_changes: int = 20) -> str:
    verdict = "❌ findings out of tolerance" if result.failed else "✅ no finding out of tolerance"
    lines = [
        f"### neuronspec diff: {verdict}",
        "",
        f"Tolerance: {_tolerance(result)}. {_counts(result)}.",
        "",
    ]
    if result.findings:
        lines += ["| status | finding | changes |", "|---|---|---|"]
        for finding in result.findings:
            shown = [describe_change(c) for c in finding.changes[:max_changes]]
            if len(finding.changes) > max_changes:
                shown.append(f"... and {len(finding.changes) - max_changes} more")
            lines.append(
                f"| {finding.status} | {_md(finding.name)} | {_md('<br>'.join(shown)) or '—'} |"
            )
    return "\n".join(lines) + "\n"
