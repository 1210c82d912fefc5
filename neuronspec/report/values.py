"""Values of the results rendered as HTML: numbers, token ids with their text, nested
findings as tables, long lists summarised (:func:`render_value`)."""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from neuronspec.report.results import is_neuron_field, is_token_field

INLINE_ITEMS = 12  # list items shown inline in a table cell
LIST_ITEMS = 40  # list items shown for a long list
TABLE_ROWS = 60  # rows shown of a long table

TokenText = Callable[[int], str]
NeuronLinks = Callable[[int, int], "str | None"]  # (layer, neuron) -> link to its card, or None
escape = html.escape


@dataclass(frozen=True)
class Where:
    """Where a rendered value sits: the run's neuron-card links and the layer of the finding
    around it. A neuron id links to its card only where both are known and the finding is of
    the ``mlp`` site (cards are of mlp neurons; a ``dt`` channel id is not one)."""

    links: NeuronLinks | None = None
    layer: int | None = None

    def inside(self, record: dict) -> Where:
        """The place of ``record``'s fields: its own ``layer`` and ``site`` if it has them."""
        if self.links is None:
            return self
        if record.get("site", "mlp") != "mlp":
            return NOWHERE
        layer = record.get("layer")
        if isinstance(layer, int) and not isinstance(layer, bool):
            return Where(self.links, layer)
        return self

    def neuron(self, value: Any) -> str | None:
        if self.links is None or self.layer is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            return None
        return self.links(self.layer, value)


NOWHERE = Where()


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


def _leaf(
    value: Any, token: bool, tokens: TokenText, neuron: bool = False, where: Where = NOWHERE
) -> str:
    if token and isinstance(value, int) and not isinstance(value, bool):
        return _token(value, tokens)
    if neuron and (link := where.neuron(value)) is not None:
        return link
    return escape(number(value))


def inline(
    value: Any, token: bool, tokens: TokenText, neuron: bool = False, where: Where = NOWHERE
) -> str:
    """A value compactly, for a table cell (``neuron``: its ints are neuron ids of ``where``)."""
    if scalar(value):
        return _leaf(value, token, tokens, neuron, where)
    if isinstance(value, list):
        if all(scalar(v) for v in value) and len(value) <= INLINE_ITEMS:
            return "[" + ", ".join(_leaf(v, token, tokens, neuron, where) for v in value) + "]"
        if all(scalar(v) for v in value):
            shown = ", ".join(_leaf(v, token, tokens, neuron, where) for v in value[:INLINE_ITEMS])
            return f"[{shown}, … {len(value)} items]"
        if len(value) <= 4:
            return "[" + ", ".join(inline(v, token, tokens, neuron, where) for v in value) + "]"
        return f"[{len(value)} items]"
    if isinstance(value, dict):
        if len(value) <= 4:
            place = where.inside(value)
            inner = ", ".join(
                f"{escape(str(k))}: "
                + inline(v, token or is_token_field(k), tokens, is_neuron_field(k), place)
                for k, v in value.items()
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


def render_value(
    name: str, value: Any, tokens: TokenText, *, token: bool = False, where: Where = NOWHERE
) -> str:
    """Any finding value as readable HTML: scalars in a key/value table, sibling lists of
    one length as one table, lists of records as tables, long number lists summarised.
    Token ids show their text; neuron ids link to their cards where ``where`` knows the
    links and the layer (a record's own ``layer`` field sets it for its fields)."""
    token = token or is_token_field(name)
    neuron = is_neuron_field(name)
    if scalar(value):
        return _leaf(value, token, tokens, neuron, where)
    if isinstance(value, list):
        if all(isinstance(v, dict) for v in value) and value:
            keys = list(dict.fromkeys(k for v in value for k in v))
            rows = [
                [
                    inline(
                        v.get(k), token or is_token_field(k), tokens, is_neuron_field(k),
                        where.inside(v),
                    )
                    for k in keys
                ]
                for v in value
            ]  # fmt: skip
            return table([escape(k) for k in keys], rows)
        if all(scalar(v) for v in value) and len(value) > LIST_ITEMS:
            shown = ", ".join(_leaf(v, token, tokens, neuron, where) for v in value[:LIST_ITEMS])
            return f'<p class="list">{escape(_numeric_summary(value))}<br>{shown}, …</p>'
        shown = (
            inline(value, token, tokens, neuron, where)
            if len(value) <= LIST_ITEMS
            else escape(_numeric_summary(value))
        )
        return f'<p class="list">{shown}</p>'
    # a dict
    where = where.inside(value)
    scalars = {k: v for k, v in value.items() if scalar(v)}
    lists = {k: v for k, v in value.items() if isinstance(v, list) and len(v) > 1}
    groups: dict[int, list[str]] = {}
    for key, items in lists.items():
        if all(scalar(v) or isinstance(v, list) for v in items):
            groups.setdefault(len(items), []).append(key)
    parts = []
    if scalars and len(scalars) == len(value) and all(k.lstrip("-").isdigit() for k in value):
        rows = [[escape(k), _leaf(v, token, tokens, neuron, where)] for k, v in value.items()]
        return table(["key", escape(name)], rows, cls="kv")
    if scalars:
        rows = [
            [escape(k), _leaf(v, token or is_token_field(k), tokens, is_neuron_field(k), where)]
            for k, v in scalars.items()
        ]
        parts.append(table(["field", "value"], rows, cls="kv"))
    grouped: set[str] = set()
    for length, keys in sorted(groups.items()):
        if len(keys) < 2:
            continue
        grouped |= set(keys)
        rows = [
            [
                inline(value[k][i], token or is_token_field(k), tokens, is_neuron_field(k), where)
                for k in keys
            ]
            for i in range(length)
        ]
        parts.append(table([escape(k) for k in keys], rows))
    for key, item in value.items():
        if key in scalars or key in grouped:
            continue
        child_token = token or is_token_field(key)
        if isinstance(item, dict) and item and all(not isinstance(v, dict) for v in item.values()):
            child = where.inside(item)
            rows = [
                [escape(str(k)), inline(v, child_token, tokens, is_neuron_field(key), child)]
                for k, v in item.items()
            ]
            inner = table(["key", "value"], rows, cls="kv")
        elif isinstance(item, (list, dict)) and not item:
            inner = f'<p class="list">{"[]" if isinstance(item, list) else "{}"} (empty)</p>'
        else:
            inner = render_value(key, item, tokens, token=child_token, where=where)
        parts.append(f'<div class="nested"><h5>{escape(key)}</h5>{inner}</div>')
    return "".join(parts)
