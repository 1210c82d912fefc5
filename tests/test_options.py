"""The one options table: the pytest plugin, ``collect``, RunConfig and the README agree
with it, option by option."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from neuronspec import plugin
from neuronspec.cli.collect import parse_run_config
from neuronspec.cli.collect import parser as collect_parser
from neuronspec.errors import NeuronSpecError
from neuronspec.options import BY_FIELD, OPTIONS, REPORT_TOP_CONTEXTS, markdown_table
from neuronspec.session import RunConfig

pytest_plugins = ["pytester"]
README = Path(__file__).resolve().parents[1] / "README.md"

NON_DEFAULT = {  # a valid value other than the default, for every option of the run
    "--models": "tiny-mamba",
    "--corpus": "wikitext2",
    "--text-limit": "50",
    "--max-tokens": "1000",
    "--window": "32",
    "--neuronspec-cache": "elsewhere",
    "--plots-dir": "figures",
    "--device": "auto",
    "--dtype": "float64",
    "--batch-size": "3",
    "--no-fast-scan": None,
    "--keep-malloc-heap": None,
    "--layers": "1,0",
    "--trigrams": None,
    "--detector-intervals": None,
    "--top-contexts": "5",
    "--top-k": "4",
    "--attention-methods": "rollout,gradient_guided",
    "--attention-aggregate": "abs",
    "--attention-prompts": "2",
    "--delta-prompts": "3",
    "--pruning-ratio": "0.3",
    "--control-seeds": "20",
    "--ig-steps": "5",
    "--facts": "facts.json",
    "--knowledge-facts-per-relation": "0",
    "--knowledge-templates": "all",
}


def _arguments() -> list[str]:
    arguments = []
    for flag, value in NON_DEFAULT.items():
        arguments += [flag] if value is None else [f"{flag}={value}"]
    return arguments


def test_every_run_option_has_a_non_default_case():
    assert set(NON_DEFAULT) == set(option.flag for option in BY_FIELD.values())


def test_collect_honours_every_option_of_the_plugin(pytester):
    pytester.makepyprojecttoml('[tool.pytest.ini_options]\nneuronspec = "true"\n')
    config = pytester.parseconfig(*_arguments())
    from_pytest = plugin.run_config(config)
    from_collect = parse_run_config(_arguments())
    assert from_collect == from_pytest
    for field in BY_FIELD:  # each option reached its field: nothing left at the default
        head, _, tail = field.partition(".")
        given, default = getattr(from_pytest, head), getattr(RunConfig(), head)
        if tail:
            given, default = getattr(given, tail), getattr(default, tail)
        assert given != default, field
    assert from_pytest.layers == (0, 1) and from_pytest.fast_scan is False
    assert from_pytest.attention_methods == ("rollout", "gradient_guided")

    plugin_flags = {o for action in config._parser._anonymous.options for o in action.names()}
    plugin_flags |= {
        o for group in config._parser._groups for action in group.options for o in action.names()
    }
    collect_flags = {flag for action in collect_parser()._actions for flag in action.option_strings}
    run_flags = {option.flag for option in OPTIONS}
    assert run_flags <= plugin_flags
    assert run_flags - collect_flags == {"--neuronspec-results", "--neuronspec-report"}


def test_defaults_are_the_tables():
    assert RunConfig.from_options(vars(collect_parser().parse_args([]))) == RunConfig()


@pytest.mark.parametrize(
    ("arguments", "for_report", "kept"),
    [([], False, 0), ([], True, REPORT_TOP_CONTEXTS), (["--top-contexts=0"], True, 0)],
)
def test_top_contexts_are_kept_for_a_report_unless_told(arguments, for_report, kept):
    """Off by default (they cost over 5% of the pass); a report or card run keeps them."""
    values = vars(collect_parser().parse_args(arguments))
    assert RunConfig.from_options(values, for_report=for_report).stats.top_contexts == kept


def test_a_report_run_of_the_plugin_keeps_top_contexts(pytester):
    pytester.makepyprojecttoml('[tool.pytest.ini_options]\nneuronspec = "true"\n')
    plain = plugin.run_config(pytester.parseconfig())
    reporting = plugin.run_config(pytester.parseconfig("--neuronspec-report=out"))
    assert (plain.stats.top_contexts, reporting.stats.top_contexts) == (0, REPORT_TOP_CONTEXTS)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--top-k=0"], "--top-k must be at least 1, got 0"),
        (["--pruning-ratio=1.5"], r"--pruning-ratio must be in \(0, 1\), got 1.5"),
        (["--layers=a"], "--layers must be comma-separated layer indices"),
        (["--layers=7"], "--layers asks for layer"),
        (["--attention-methods=nope"], "--attention-methods 'nope': unknown"),
        (["--models=,"], "--models is empty"),
    ],
)
def test_bad_values_name_the_option(arguments, message):
    with pytest.raises(NeuronSpecError, match=message):
        parse_run_config(arguments)


def test_readme_options_table_is_generated_from_the_table():
    text = README.read_text()
    table = re.search(r"<!-- options:begin -->\n(.*?)<!-- options:end -->", text, re.S)
    assert table is not None, "README lacks the <!-- options:begin/end --> block"
    assert table.group(1) == markdown_table(), "regenerate: python -m neuronspec.options"
