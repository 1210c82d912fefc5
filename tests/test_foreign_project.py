"""A new project that only installs neuronspec and opts in writes its hypotheses against the
plugin's finding fixtures, a few lines each, with snapshots that catch a changed finding.

The project is made with ``pytester`` and run in a subprocess on the embedded models with a
small corpus (``--text-limit``), its own cache and its own snapshots."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

import neuronspec

pytest_plugins = ["pytester"]

REPO = Path(neuronspec.__file__).resolve().parents[1]

PYPROJECT = """
[tool.pytest.ini_options]
neuronspec = "true"
"""

HYPOTHESES = """
import pytest

from neuronspec.analyses.comparison import family_rows


def test_few_dead_neurons(model_id, layer, dead):
    assert dead[layer].dead_fraction < 0.1, dead[layer]


@pytest.mark.measured({"tiny-mamba": "no token-detecting neuron in any layer"})
def test_more_token_detectors_in_layer_1_than_in_layer_0(model_id, ngram):
    assert ngram[1].n_token_detectors > ngram[0].n_token_detectors


@pytest.mark.measured({"tiny-gpt2": "PPL -0.04% vs random +0.03% (20 seeds): p = 1.00"})
def test_positional_ablation_beats_its_random_control(model_id, ablation):
    positional = ablation.condition("positional")
    if positional.n_neurons == 0:
        pytest.skip(f"{model_id} has no positional neurons")
    assert positional.exceeds(alpha=0.05), positional


def test_suppressing_knowledge_neurons_hurts_the_fact_more_than_controls(knowledge_neurons):
    summary, _ = knowledge_neurons
    assert summary.mean_suppress_change < summary.mean_control_suppress_change < 0.05


def test_hidden_attention_is_causal(model_id, layer, model_files, hidden_attention):
    if model_files.model_type != "mamba":
        pytest.skip("hidden attention is Mamba's")
    finding = next(f for f in hidden_attention.layer_findings if f.layer == layer)
    assert finding.above_diagonal_max == 0.0, finding


def test_mamba_sparser_than_the_transformer_in_the_last_layer(comparison):
    rows = family_rows(comparison.tables["sparsity"])
    last = {m: max(rows[m], key=lambda row: row["layer"]) for m in comparison.models}
    mamba, transformer = comparison.models
    assert last[mamba]["gini"] > last[transformer]["gini"], last


def test_dead_snapshot(model_id, layer, dead, findings_snapshot):
    assert dead[layer].snapshot_view() == findings_snapshot
"""

OPTIONS = [
    "--text-limit=1000",
    "--knowledge-facts-per-relation=1",
    "--control-seeds=20",
    "-p",
    "no:cacheprovider",
]


def _run(pytester: pytest.Pytester, *args: str):
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    pytester._monkeypatch.setenv("PYTHONPATH", path)
    pytester._monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = f"--neuronspec-cache={pytester.path / '.cache'}"
    return pytester.run(
        sys.executable, "-m", "pytest", "test_hypotheses.py", cache, *OPTIONS, "-rxXs", *args
    )


@pytest.mark.slow
def test_a_foreign_project_holds_hypotheses_and_snapshots(pytester):
    project = pytester.path
    (project / "pyproject.toml").write_text(PYPROJECT)
    (project / "test_hypotheses.py").write_text(HYPOTHESES)
    bodies = re.findall(r"def test_\w+\(.*?\):\n((?:    .*\n)+)", HYPOTHESES)
    assert len(bodies) == 7 and all(len(body.splitlines()) <= 5 for body in bodies)

    created = _run(pytester, "--snapshot-update")
    assert created.ret == 0, created.stdout.str()
    outcomes = created.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes.get("error", 0) == 0, outcomes
    assert outcomes.get("xfailed") == 2  # the measured markers: tiny-mamba, tiny-gpt2
    snapshot = (
        project / "__snapshots__" / "test_hypotheses" / "test_dead_snapshot[tiny-gpt2-L1].json"
    )
    text = snapshot.read_text()
    assert "dead_fraction" in text

    # a changed finding fails its snapshot spec, and the message names the finding's field
    changed = re.sub(
        r'"n_dead": (\d+)', lambda m: f'"n_dead": {int(m.group(1)) + 7}', text, count=1
    )
    assert changed != text
    snapshot.write_text(changed)
    rerun = _run(pytester, "-k", "snapshot")
    assert rerun.ret == 1, rerun.stdout.str()
    rerun.stdout.fnmatch_lines(["*n_dead*"])
    assert rerun.parseoutcomes().get("failed") == 1
