"""The findings table printed at the end of ``pytest specs/``: a few lines per model."""

from __future__ import annotations

from typing import Any

from neuronspec.report.headlines import headlines_of


def token_text(tokens: dict[str, str]):
    """``id -> text`` for display: the decoded text quoted (``'#id'`` when not recorded)."""

    def text(token_id: int) -> str:
        decoded = tokens.get(str(token_id))
        return repr(decoded) if decoded is not None else f"#{token_id}"

    return text


def _model_line(model_id: str, info: dict[str, Any]) -> str:
    parts = [info.get("model_type"), f"{info['n_layers']} layers" if "n_layers" in info else None]
    if "n_tokens" in info:
        corpus = f" of {info['corpus']}" if "corpus" in info else ""
        parts.append(f"{info['n_tokens']:,} tokens{corpus}")
    described = ", ".join(p for p in parts if p)
    return f"{model_id} ({described})" if described else model_id


def outcome_counts(specs: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for spec in specs:
        counts[spec["outcome"] or "not run"] = counts.get(spec["outcome"] or "not run", 0) + 1
    order = ["passed", "failed", "error", "xfailed", "xpassed", "skipped", "not run"]
    return ", ".join(f"{counts[o]} {o}" for o in order if o in counts) or "no specs"


def drift_counts(drift: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for entry in drift:
        counts[entry["status"]] = counts.get(entry["status"], 0) + 1
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "none compared"


def summary_lines(results: dict[str, Any]) -> list[str]:
    """Per model: its line, one headline per known analysis, the others by name."""
    lines: list[str] = []
    for model_id, entry in sorted(results.get("models", {}).items()):
        lines.append(_model_line(model_id, entry.get("info", {})))
        known, others = headlines_of(entry.get("analyses", {}), token_text(entry.get("tokens", {})))
        width = max([len(label) for _, label, _ in known] + [len("also recorded")])
        lines += [f"  {label:<{width}}  {text}" for _, label, text in known]
        if others:
            lines.append(f"  {'also recorded':<{width}}  {', '.join(others)}")
    if "specs" in results:
        lines.append(f"specs: {outcome_counts(results['specs'])}")
    if "snapshot_drift" in results:
        lines.append(f"snapshots: {drift_counts(results['snapshot_drift'])}")
    return lines
