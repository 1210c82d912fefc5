"""The attention-neuron method names and rollout aggregates (METHODS §7), and their
command-line parsing.

Kept free of torch imports: the pytest plugin parses ``--attention-methods`` at start-up.
"""

from __future__ import annotations

from neuronspec.errors import NeuronSpecError

METHODS = ("attention_weighted", "gradient_guided", "rollout")
AGGREGATES = ("clamped", "abs", "mean")
"""Channel aggregates of α̃ the Mamba rollout can take (``hidden_attention.channel_aggregate``):
the positive part of the channel mean (the official code's clamp), the mean of |α̃| (counts
inhibition as relevance), the signed mean (METHODS §7 as written; undefined where a row's
mass is negative)."""
DEFAULT_AGGREGATE = "clamped"


def parse_methods(text: str) -> tuple[str, ...]:
    """``"a,b"`` → ``("a", "b")``; a clear error for an empty list or an unknown method."""
    methods = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise NeuronSpecError(
            f"attention methods {text!r}: unknown {unknown or 'none given'}; choose from "
            f"{', '.join(METHODS)}"
        )
    return methods
