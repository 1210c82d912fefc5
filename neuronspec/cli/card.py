"""``python -m neuronspec card MODEL LAYER NEURON [run options]``: the evidence behind one
``mlp`` neuron (:mod:`neuronspec.cards`) in the terminal, and its card as a static HTML
page. The statistics come from the cache when a run with the same options filled it (warm),
else from one pass; the run options are those of ``pytest specs/``."""

from __future__ import annotations

import argparse
import html
import os
import sys
from pathlib import Path

from neuronspec.errors import NeuronSpecError
from neuronspec.options import add_options
from neuronspec.report.cards import NO_CONTEXTS
from neuronspec.session import RunConfig, SpecSession


def parser() -> argparse.ArgumentParser:
    made = argparse.ArgumentParser(
        prog="python -m neuronspec card",
        description="Print the evidence behind one mlp neuron and write its card (HTML).",
    )
    made.add_argument("model", help="registry id or local checkpoint directory")
    made.add_argument("layer", type=int)
    made.add_argument("neuron", type=int)
    made.add_argument(
        "--out", type=Path, default=None, help="card file (default neuronspec-out/cards/...)"
    )
    add_options(made.add_argument, run_only=True)
    return made


def terminal_text(card: dict, tokens, raw: dict[str, str]) -> str:
    """The card as lines for a terminal: the activating token in [[brackets]]."""
    interval = card["firing_frequency_interval"]
    lines = [
        f"{card['model']} layer {card['layer']} neuron {card['neuron']}"
        f" ({card['n_tokens']} tokens)",
        f"  firing frequency {card['firing_frequency']:.5f}"
        + (f" [95% {interval[0]:.5f}, {interval[1]:.5f}]" if interval else ""),
        "  firing by position: "
        + " ".join(f"{v:.2f}" for v in card["firing_by_position"][:16])
        + (" ..." if len(card["firing_by_position"]) > 16 else ""),
        "  tokens covering its firings:",
    ]
    for entry in card["token_coverage"]:
        lines.append(
            f"    {tokens(entry['token'])!r:>16} {entry['count']:>7} firings, "
            f"{100 * entry['share_of_firings']:.1f}% of its firings, "
            f"fires on {100 * entry['share_of_occurrences']:.1f}% of the token"
        )
    lines.append("  top-activating contexts:" if card["contexts"] else f"  {NO_CONTEXTS}")
    for context in card["contexts"]:
        pieces = [raw.get(str(t), f"#{t}") for t in context["context_tokens"]]
        pieces[context["at"]] = f"[[{pieces[context['at']]}]]"
        text = "".join(pieces).replace("\n", "⏎")
        lines.append(
            f"    {context['value']:>9.4f}  {context['window']}:{context['position']}  {text}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from neuronspec.cards import neuron_card
    from neuronspec.report.cards import card_section
    from neuronspec.report.html import _CSS
    from neuronspec.report.results import token_ids_in
    from neuronspec.report.summary import token_text
    from neuronspec.report.tokens import decode_tokens

    args = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        args.models = args.model
        run = RunConfig.from_options(args, for_report=True)
        run.check_models()
        session = SpecSession(run)
        model_id = run.models[0]
        stats = session.stats(model_id)
        windows = session.corpus(model_id).analysis
        card = neuron_card(model_id, stats, windows, args.layer, args.neuron).to_json()
    except NeuronSpecError as error:
        print(f"neuronspec card: {error}", file=sys.stderr)
        return 2
    raw = decode_tokens(model_id, token_ids_in(card))
    tokens = token_text(raw)
    print(terminal_text(card, tokens, raw))
    out = (
        args.out
        or Path("neuronspec-out/cards")
        / f"{model_id.replace('/', '_')}-L{args.layer}-N{args.neuron}.html"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    title = f"neuron card: {model_id} layer {args.layer} neuron {args.neuron}"
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><main>"
        f"{card_section(model_id, card, tokens, set(), raw)}</main></body></html>"
    )
    out.write_text(page, encoding="utf-8")
    print(f"card: {out}")
    return 0
