"""The one table of neuronspec's options: name, type, default, help and METHODS section.

The pytest plugin's command-line options, :class:`~neuronspec.session.RunConfig`'s defaults,
the ``collect`` command line and the README's options table are all built from
:data:`OPTIONS`; a default written here is written nowhere else.

Kept free of torch and of the library's heavy modules: the plugin adds these options at
start-up of every opted-in pytest process.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuronspec.errors import NeuronSpecError

AGGREGATES = ("clamped", "abs", "mean")
"""Channel aggregates of α̃ the Mamba rollout can take (``hidden_attention.channel_aggregate``):
the positive part of the channel mean (the official code's clamp), the mean of |α̃| (counts
inhibition as relevance), the signed mean (METHODS §7 as written; undefined where a row's
mass is negative)."""
ATTENTION_METHODS = ("attention_weighted", "gradient_guided", "rollout")
KNOWLEDGE_TEMPLATES = ("train", "heldout", "all")
REPORT_TOP_CONTEXTS = 16
"""Top-activating contexts kept per mlp neuron when ``--top-contexts`` is not given and the run
writes a report or a card (the cards show them); other runs keep none."""


def parse_methods(text: str) -> tuple[str, ...]:
    """``"a,b"`` → ``("a", "b")``; a clear error for an empty list or an unknown method."""
    methods = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [m for m in methods if m not in ATTENTION_METHODS]
    if not methods or unknown:
        raise NeuronSpecError(
            f"--attention-methods {text!r}: unknown {unknown or 'none given'}; choose from "
            f"{', '.join(ATTENTION_METHODS)}"
        )
    return methods


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """``"0,2"`` → ``(0, 2)`` (sorted, unique); None stays None (all layers)."""
    if text is None:
        return None
    try:
        layers = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise NeuronSpecError(
            f"--layers must be comma-separated layer indices such as 0,2,3; got {text!r}"
        ) from None
    if not layers:
        raise NeuronSpecError("--layers is empty; give at least one layer index")
    return layers


def parse_models(text: str) -> tuple[str, ...]:
    models = tuple(m.strip() for m in text.split(",") if m.strip())
    if not models:
        raise NeuronSpecError("--models is empty; give at least one model id")
    return models


@dataclass(frozen=True)
class Option:
    """One command-line option and where its value goes.

    ``field`` is the :class:`~neuronspec.session.RunConfig` attribute it sets (dotted for a
    nested config, e.g. ``corpus.window``); None for an option of the pytest run only (its
    output files). ``convert`` turns the command-line text into the value (a
    :class:`NeuronSpecError` names what was wrong); ``valid`` and ``requirement`` state the
    range, reported as ``--flag must be <requirement>, got <value>``.
    """

    flag: str
    default: Any
    help: str
    section: str  # the METHODS section it configures, or "run"
    field: str | None
    kind: type = str  # the value's type as argparse reads it (int, float, str, bool: a switch)
    convert: Callable[[Any], Any] | None = None
    choices: tuple[str, ...] | None = None
    valid: Callable[[Any], bool] | None = None
    requirement: str = ""
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def add_to(self, add: Callable[..., Any]) -> None:
        """Register on ``add``: a pytest option group's ``addoption`` or an argparse
        parser's ``add_argument`` (both take argparse's keywords)."""
        help_text = self.help.replace("%", "%%")
        if self.kind is bool:
            add(self.flag, dest=self.dest, action="store_true", help=help_text)
            return
        shown = "none" if self.default is None else self.default
        add(
            self.flag,
            dest=self.dest,
            type=self.kind,
            default=self.default,
            choices=self.choices,
            metavar=self.metavar,
            help=f"{help_text} (default {shown})",
        )

    def value(self, raw: Any) -> Any:
        """The checked value this option gives to its :class:`RunConfig` field."""
        if self.valid is not None and raw is not None and not self.valid(raw):
            raise NeuronSpecError(f"{self.flag} must be {self.requirement}, got {raw}")
        return self.convert(raw) if self.convert is not None and raw is not None else raw


def _at_least_1(value: int) -> bool:
    return value >= 1


OPTIONS: tuple[Option, ...] = (
    Option(
        "--models",
        "tiny-gpt2,tiny-mamba",
        "comma-separated registry ids or local checkpoint directories",
        "run",
        "models",
        convert=parse_models,
    ),
    Option(
        "--corpus",
        "toyworld",
        "toyworld, wikitext2, a .txt/.jsonl file, a save_to_disk dataset or a .parquet/.jsonl "
        "folder (streamed)",
        "§1",
        "corpus.name",
    ),
    Option("--text-limit", None, "use at most N documents", "§1", "corpus.text_limit", int),
    Option("--max-tokens", None, "use at most N analysis tokens", "§1", "corpus.max_tokens", int),
    Option("--window", 64, "tokens T per analysis window", "§1", "corpus.window", int),
    Option(
        "--neuronspec-cache",
        ".neuronspec-cache",
        "statistics cache directory, or 'none' to disable",
        "run",
        "cache_dir",
        convert=lambda text: None if text.lower() == "none" else Path(text),
    ),
    Option(
        "--plots-dir", None, "write figures to this directory", "run", "plots_dir", convert=Path
    ),
    Option("--device", "cpu", "auto, cpu or cuda", "run", "device"),
    Option("--dtype", "float32", "float32, float64 or bfloat16", "run", "dtype"),
    Option(
        "--batch-size",
        16,
        "windows per forward pass",
        "run",
        "batch_size",
        int,
        valid=_at_least_1,
        requirement="at least 1",
    ),
    Option(
        "--no-fast-scan",
        False,
        "use the HF reference Mamba scan instead of neuronspec's fast exact scan",
        "run",
        "fast_scan",
        bool,
        convert=lambda off: not off,
    ),
    Option(
        "--keep-malloc-heap",
        False,
        "keep glibc's malloc heap between forwards (neuronspec.heap)",
        "run",
        "keep_malloc_heap",
        bool,
    ),
    Option(
        "--layers",
        None,
        "comma-separated layer indices the per-layer analyses run on (none: all)",
        "run",
        "layers",
        convert=parse_layers,
    ),
    Option(
        "--trigrams",
        False,
        "also count (neuron, trigram) firings: trigram-detecting neurons (larger statistics)",
        "§3",
        "stats.trigrams",
        bool,
    ),
    Option(
        "--detector-intervals",
        False,
        "(neuron, token) firings per window group: SEs of the token-detector counts (slower)",
        "§3",
        "stats.detector_intervals",
        bool,
    ),
    Option(
        "--top-contexts",
        None,
        "top-activating contexts kept per mlp neuron for the neuron cards; 0: none (none: "
        f"{REPORT_TOP_CONTEXTS} when the run writes a report or a card, else 0)",
        "§13",
        "stats.top_contexts",
        int,
        valid=lambda n: n >= 0,
        requirement="at least 0",
    ),
    Option(
        "--top-k",
        10,
        "neurons reported per ranking: top delta-sensitive, attention, causal, knowledge",
        "§5–§8",
        "top_k",
        int,
        valid=_at_least_1,
        requirement="at least 1",
    ),
    Option(
        "--attention-methods",
        ",".join(ATTENTION_METHODS),
        f"attention-neuron methods, comma-separated: {', '.join(ATTENTION_METHODS)}",
        "§7",
        "attention_methods",
        convert=parse_methods,
    ),
    Option(
        "--attention-aggregate",
        "clamped",
        "channel aggregate of α̃ in the Mamba rollout: clamped (mean α̃)⁺, abs mean |α̃|, or "
        "mean (signed; raises where a row of I + mean α̃ sums to <= 0)",
        "§7",
        "attention_aggregate",
        choices=AGGREGATES,
    ),
    Option(
        "--attention-prompts",
        4,
        "corpus windows the hidden-attention analyses run on",
        "§7",
        "attention_prompts",
        int,
        valid=_at_least_1,
        requirement="at least 1",
    ),
    Option(
        "--delta-prompts",
        8,
        "corpus windows of the delta-sensitivity perturbation score",
        "§5",
        "delta_prompts",
        int,
        valid=_at_least_1,
        requirement="at least 1",
    ),
    Option(
        "--pruning-ratio",
        0.15,
        "fraction of each layer's mlp neurons the pruning study removes",
        "§10",
        "pruning_ratio",
        float,
        valid=lambda ratio: 0.0 < ratio < 1.0,
        requirement="in (0, 1)",
    ),
    Option(
        "--control-seeds",
        99,
        "random controls: seeds per ablation or pruning condition, random neurons per causal "
        "layer; a test at level α needs at least 1/α − 1 (99: α = 0.01)",
        "§10",
        "control_seeds",
        int,
        valid=lambda n: n >= 2,
        requirement="at least 2",
    ),
    Option(
        "--ig-steps",
        20,
        "Riemann steps m of integrated gradients for knowledge neurons",
        "§8",
        "ig_steps",
        int,
        valid=_at_least_1,
        requirement="at least 1",
    ),
    Option(
        "--facts",
        None,
        "knowledge facts, a JSON/JSONL file (none: the toy world for embedded models, else "
        "the shipped English set)",
        "§8",
        "facts",
    ),
    Option(
        "--knowledge-facts-per-relation",
        3,
        "facts per relation used for knowledge neurons (0: all)",
        "§8",
        "knowledge_facts_per_relation",
        int,
        valid=lambda n: n >= 0,
        requirement="at least 0",
    ),
    Option(
        "--knowledge-templates",
        "train",
        "toy-world prompt templates for knowledge neurons",
        "§8",
        "knowledge_templates",
        choices=KNOWLEDGE_TEMPLATES,
    ),
    Option(
        "--neuronspec-results",
        None,
        "write every finding of the run to this JSON file",
        "run",
        None,
    ),
    Option(
        "--neuronspec-report",
        None,
        "write the run's HTML report to this directory",
        "run",
        None,
    ),
)

BY_FIELD: dict[str, Option] = {option.field: option for option in OPTIONS if option.field}


def default(field: str) -> Any:
    """The converted default of the option that sets RunConfig's ``field``."""
    return BY_FIELD[field].value(BY_FIELD[field].default)


def add_options(add: Callable[..., Any], *, run_only: bool = False) -> None:
    """Register every option on ``add`` (pytest ``group.addoption`` or argparse
    ``parser.add_argument``); ``run_only`` leaves out the pytest run's output options."""
    for option in OPTIONS:
        if option.field is not None or not run_only:
            option.add_to(add)


def field_values(values: Mapping[str, Any] | argparse.Namespace) -> dict[str, Any]:
    """``{field: checked value}`` from parsed options (keyed by ``dest``); raises
    :class:`NeuronSpecError` naming the option that is out of range."""
    if isinstance(values, argparse.Namespace):
        values = vars(values)
    return {option.field: option.value(values[option.dest]) for option in BY_FIELD.values()}


def markdown_table() -> str:
    """The README's options table."""
    lines = ["| option | default | section | what |", "|---|---|---|---|"]
    for option in OPTIONS:
        shown = (
            "off"
            if option.kind is bool
            else ("" if option.default is None else f"`{option.default}`")
        )
        text = option.help.replace("|", "\\|")
        lines.append(f"| `{option.flag}` | {shown} | {option.section} | {text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m neuronspec.options: the README's table
    print(markdown_table(), end="")
