"""Values of the results rendered as HTML: numbers, token ids with their text, nested
findings as tables, long lists summarised (:func:`render_value`)."""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from typing import Any

from neuronspec.report.results import is_token_field

INLINE_ITEMS = 12  # list items shown inline in a table cell
LIST_ITEMS = 40  # list items shown for a long list
TABLE_ROWS = 60  # rows shown of a long table

TokenText = Callable[[int], str]
escape = html.escape


def number(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if isinstance(value, bool) else "—"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _token(token_id: Any, tokens: TokenText) -> str:
    if not isinstance(token_id, int) or isinstance(token_id, bool):
        return escape(number(token_id))
    return (
        f'<span class="tok" data-token="{token_id}" title="token id {token_id}">'
        f"{html.escape(tokens(token_id), quote=False)}</span>"
    )


def _leaf(value: Any, token: bool, tokens: TokenText) -> str:
    if token and isinstance(value, int) and not isinstance(value, bool):
        return _token(value, tokens)
    return escape(number(value))


def inline(value: Any, token: bool, tokens: TokenText) -> str:
    """A value compactly, for a table cell."""
    if scalar(value):
        return _leaf(value, token, tokens)
    if isinstance(value, list):
        if all(scalar(v) for v in value) and len(value) <= INLINE_ITEMS:
            return "[" + ", ".join(_leaf(v, token, tokens) for v in value) + "]"
        if all(scalar(v) for v in value):
            shown = ", ".join(_leaf(v, token, tokens) for v in value[:INLINE_ITEMS])
            return f"[{shown}, … {len(value)} items]"
        if len(value) <= 4:
            return "[" + ", ".join(inline(v, token, tokens) for v in value) + "]"
        return f"[{len(value)} items]"
    if isinstance(value, dict):
        if len(value) <= 4:
            inner = ", ".join(
                f"{escape(str(k))}: {inline(v, token, tokens)}" for k, v in value.items()
            )
            return "{" + inner + "}"
        return f"{{{len(value)} keys}}"
    return escape(str(value))


def _numeric_summary(values: list[Any]) -> str:
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(numbers) != len(values) or not numbers:
        return f"{len(values)} items"
    finite = [float(v) for v in numbers if math.isfinite(float(v))]
    mean = sum(finite) / len(finite) if finite else float("nan")
    return (
        f"{len(values)} values: min {number(min(numbers))}, mean {mean:.4g}, "
        f"max {number(max(numbers))}"
    )


def table(
    header: list[str], rows: list[list[str]], *, cls: str = "", limit: int | None = TABLE_ROWS
) -> str:
    """An HTML table of the first ``limit`` rows (None: every row) and a count of the rest."""
    shown = rows if limit is None else rows[:limit]
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in shown)
    more = (
        f'<p class="more">… {len(rows) - len(shown)} more rows</p>'
        if len(rows) > len(shown)
        else ""
    )
    table = f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    return f'<div class="scroll">{table}</div>{more}'


def render_value(name: str, value: Any, tokens: TokenText, *, token: bool = False) -> str:
    """Any finding value as readable HTML: scalars in a key/value table, sibling lists of
    one length as one table, lists of records as tables, long number lists summarised."""
    token = token or is_token_field(name)
    if scalar(value):
        return _leaf(value, token, tokens)
    if isinstance(value, list):
        if all(isinstance(v, dict) for v in value) and value:
            keys = list(dict.fromkeys(k for v in value for k in v))
            rows = [
                [inline(v.get(k), token or is_token_field(k), tokens) for k in keys] for v in value
            ]
            return table([escape(k) for k in keys], rows)
        if all(scalar(v) for v in value) and len(value) > LIST_ITEMS:
            shown = ", ".join(_leaf(v, token, tokens) for v in value[:LIST_ITEMS])
            return f'<p class="list">{escape(_numeric_summary(value))}<br>{shown}, …</p>'
        return f'<p class="list">{inline(value, token, tokens) if len(value) <= LIST_ITEMS else escape(_numeric_summary(value))}</p>'
    # a dict
    scalars = {k: v for k, v in value.items() if scalar(v)}
    lists = {k: v for k, v in value.items() if isinstance(v, list) and len(v) > 1}
    groups: dict[int, list[str]] = {}
    for key, items in lists.items():
        if all(scalar(v) or isinstance(v, list) for v in items):
            groups.setdefault(len(items), []).append(key)
    parts = []
    if scalars and len(scalars) == len(value) and all(k.lstrip("-").isdigit() for k in value):
        rows = [[escape(k), _leaf(v, token, tokens)] for k, v in value.items()]
        return table(["key", escape(name)], rows, cls="kv")
    if scalars:
        rows = [
            [escape(k), _leaf(v, token or is_token_field(k), tokens)] for k, v in scalars.items()
        ]
        parts.append(table(["field", "value"], rows, cls="kv"))
    grouped: set[str] = set()
    for length, keys in sorted(groups.items()):
        if len(keys) < 2:
            continue
        grouped |= set(keys)
        rows = [
            [inline(value[k][i], token or is_token_field(k), tokens) for k in keys]
            for i in range(length)
        ]
        parts.append(table([escape(k) for k in keys], rows))
    for key, item in value.items():
        if key in scalars or key in grouped:
            continue
        child_token = token or is_token_field(key)
        if isinstance(item, dict) and item and all(not isinstance(v, dict) for v in item.values()):
            rows = [[escape(str(k)), inline(v, child_token, tokens)] for k, v in item.items()]
            inner = table(["key", "value"], rows, cls="kv")
        elif isinstance(item, (list, dict)) and not item:
            inner = f'<p class="list">{"[]" if isinstance(item, list) else "{}"} (empty)</p>'
        else:
            inner = render_value(key, item, tokens, token=child_token)
        parts.append(f'<div class="nested"><h5>{escape(key)}</h5>{inner}</div>')
    return "".join(parts)
