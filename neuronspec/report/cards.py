"""Neuron cards in the HTML report: an index of the neurons the run's findings name, and one
anchored section per neuron (:mod:`neuronspec.cards`) with its firing frequency and 95%
interval, its firing by position, the tokens covering its firings, its top-activating
contexts as text (the activating token highlighted) and links back to the findings that
name it. Static HTML, from the results file alone."""

from __future__ import annotations

from typing import Any

from neuronspec.options import REPORT_TOP_CONTEXTS
from neuronspec.report.results import is_token_field
from neuronspec.report.values import NeuronLinks, TokenText, escape, inline, number, table

# the analysis section each neuron set comes from
SET_ANALYSES = {
    "dead": "dead",
    "rarely_firing": "dead",
    "token_detecting": "ngram",
    "trigram_detecting": "ngram",
    "positional": "positional",
    "delta_sensitive": "delta_sensitive",
    "high_variance": "delta_sensitive",
    "attention": "attention_neurons",
    "causal": "causal",
    "causal_delta_sensitive": "causal_delta_sensitive",
    "knowledge": "knowledge_neurons",
}


def anchor(*parts: Any) -> str:
    """An HTML id of letters, digits and underscores joined by '-' (the report's anchors)."""
    return "-".join("".join(c if c.isalnum() else "_" for c in str(p)) for p in parts)


def card_anchor(model_id: str, layer: Any, neuron: Any) -> str:
    return anchor("card", model_id, f"L{layer}", f"N{neuron}")


def _has_card(cards: dict[str, Any], layer: Any, neuron: Any) -> bool:
    return f"{layer}:{neuron}" in cards  # the results' card keys (neuronspec.cards.card_key)


def card_link(model_id: str, layer: Any, neuron: Any, cards: dict[str, Any]) -> str:
    """Neuron ``neuron`` of ``layer`` as a link to its card, or as text when it has none."""
    if not _has_card(cards, layer, neuron):
        return escape(str(neuron))
    return f'<a class="neuron" href="#{card_anchor(model_id, layer, neuron)}">{escape(str(neuron))}</a>'


def card_links(model_id: str, cards: dict[str, Any]) -> NeuronLinks:
    """``(layer, neuron) -> link HTML`` for the neurons with a card, None for the others."""

    def link(layer: int, neuron: int) -> str | None:
        return (
            card_link(model_id, layer, neuron, cards) if _has_card(cards, layer, neuron) else None
        )

    return link


def neuron_sets_table(model_id: str, layers: dict[str, Any], cards: dict[str, Any]) -> str:
    """The run's neuron sets per layer, every neuron id a link to its card."""
    rows = []
    for layer in sorted(layers, key=lambda k: int(k) if k.lstrip("-").isdigit() else 1 << 30):
        for kind, entry in sorted(layers[layer].items()):
            links = ", ".join(card_link(model_id, layer, n, cards) for n in entry["neurons"])
            rows.append([escape(layer), escape(kind), str(len(entry["neurons"])), links or "—"])
    return table(["layer", "set", "neurons", "ids (→ card)"], rows, cls="sets", limit=None)


def _context(context: dict[str, Any], raw: dict[str, str]) -> str:
    """The context as running text (``raw``: token id → decoded text; ``#id`` unknown)."""
    pieces = []
    for i, token_id in enumerate(context["context_tokens"]):
        text = escape(raw.get(str(token_id), f"#{token_id}"))
        pieces.append(f'<mark class="fire">{text}</mark>' if i == context["at"] else text)
    return f'<span class="context">{"".join(pieces)}</span>'


def _sparkline(values: list[float]) -> str:
    """fr_n(p) as a row of bars (inline SVG, no script)."""
    top = max(values) if values and max(values) > 0 else 1.0
    width = 3 * len(values)
    bars = "".join(
        f'<rect x="{3 * i}" y="{30 - 30 * v / top:.2f}" width="2" height="{30 * v / top:.2f}"/>'
        for i, v in enumerate(values)
    )
    return (
        f'<svg class="spark" width="{width}" height="30" viewBox="0 0 {width} 30" '
        f'role="img" aria-label="firing by position">{bars}</svg>'
    )


def card_section(
    model_id: str,
    card: dict[str, Any],
    tokens: TokenText,
    analyses: set[str],
    raw: dict[str, str],
) -> str:
    """One neuron's card; ``analyses``: the sections it can link back to; ``raw``: token
    texts as decoded (the model's ``tokens`` of the results)."""
    layer, neuron = card["layer"], card["neuron"]
    interval = card.get("firing_frequency_interval")
    frequency = number(card["firing_frequency"])
    if interval:
        frequency += f" [95% {number(interval[0])}, {number(interval[1])}]"
    back = []
    for kind in card["named_by"]:
        analysis = SET_ANALYSES.get(kind)
        if analysis in analyses:
            back.append(f'<a href="#{anchor(model_id, analysis)}">{escape(kind)}</a>')
        else:
            back.append(escape(kind))
    coverage = [
        [
            escape(tokens(t["token"])),
            str(t["count"]),
            number(t["share_of_firings"]),
            number(t["share_of_occurrences"]),
        ]
        for t in card["token_coverage"]
    ]
    contexts = [
        [number(c["value"]), f"{c['window']}:{c['position']}", _context(c, raw)]
        for c in card["contexts"]
    ]
    parts = [
        f'<section class="card" id="{card_anchor(model_id, layer, neuron)}">',
        f"<h4>{escape(model_id)}, layer {layer}, neuron {neuron}</h4>",
        f"<p>named by: {', '.join(back) or '—'}. Firing frequency {frequency} over "
        f"{card['n_tokens']} tokens (window-group bootstrap).</p>",
        f"<p>firing by window position (fr_n(p), p = 0…{len(card['firing_by_position']) - 1}, "
        f"max {number(max(card['firing_by_position'], default=0.0))}): "
        f"{_sparkline(card['firing_by_position'])}</p>",
    ]
    evidence = [
        [
            escape(kind),
            "; ".join(
                f"{escape(name)} = {inline(value, is_token_field(name), tokens)}"
                for name, value in numbers.items()
            ),
        ]
        for kind, numbers in (card.get("evidence") or {}).items()
    ]
    if evidence:
        parts.append(table(["finding", "its numbers for this neuron"], evidence, cls="evidence"))
    if coverage:
        parts.append(
            table(
                ["token", "firings", "share of its firings", "share of the token's occurrences"],
                coverage,
                cls="coverage",
            )
        )
    if contexts:
        parts.append(table(["activation", "window:position", "context"], contexts, cls="contexts"))
    else:
        parts.append(f"<p>{NO_CONTEXTS}</p>")
    parts.append("</section>")
    return "".join(parts)


NO_CONTEXTS = (
    "No top-activating contexts: the statistics pass kept none (--top-contexts 0; a run with "
    f"--neuronspec-report keeps {REPORT_TOP_CONTEXTS})."
)


def cards_section(model_id: str, entry: dict[str, Any], tokens: TokenText) -> str:
    cards = entry.get("cards") or {}
    if not cards:
        return ""
    analyses = set(entry.get("analyses", {}))
    index = [
        [
            card_link(model_id, card["layer"], card["neuron"], cards),
            str(card["layer"]),
            escape(", ".join(card["named_by"])),
            number(card["firing_frequency"]),
        ]
        for card in sorted(cards.values(), key=lambda c: (c["layer"], c["neuron"]))
    ]
    parts = [
        f'<section class="cards" id="{anchor(model_id, "cards")}"><h3>neuron cards</h3>',
        table(["neuron", "layer", "named by", "firing frequency"], index, cls="cards", limit=None),
    ]
    raw = entry.get("tokens", {})
    parts += [card_section(model_id, card, tokens, analyses, raw) for card in cards.values()]
    parts.append("</section>")
    return "".join(parts)
