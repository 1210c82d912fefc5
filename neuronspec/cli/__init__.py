"""``python -m neuronspec COMMAND ...``: one module per command, each with ``main(argv)``.

Commands: ``collect`` (fill the statistics cache), ``report`` (HTML report of a results
file), ``diff`` (findings that changed between two results files), ``card`` (the evidence behind
one neuron). The run options of
``collect`` come from the one options table (:mod:`neuronspec.options`), as the pytest
plugin's do.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, str] = {
    "collect": "neuronspec.cli.collect",
    "report": "neuronspec.cli.report",
    "diff": "neuronspec.cli.diff",
    "card": "neuronspec.cli.card",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        known = ", ".join(COMMANDS)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"unknown command {argv[0]!r}; known: {known}", file=sys.stderr)
            return 2
        print(f"usage: python -m neuronspec {{{known}}} ...", file=sys.stderr)
        return 0 if argv else 2
    module = importlib.import_module(COMMANDS[argv[0]])
    return int(module.main(argv[1:]) or 0)
