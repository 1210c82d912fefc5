"""The pytest plugin end to end, driven with ``pytester``: options, skips, errors, results, xdist."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from builders import make_gpt2

import neuronspec

pytest_plugins = ["pytester"]

REPO = Path(neuronspec.__file__).resolve().parents[1]

SPEC = """
import pytest
from neuronspec.analyses.dead import dead_neurons

@pytest.mark.dead
def test_dead(model_id, layer, neuron_stats, record_finding):
    finding = dead_neurons(neuron_stats, layer)
    record_finding("dead", finding, layer=layer)
    assert finding.dead_fraction < 0.5

def test_tokens(model_id, neuron_stats, record_finding):
    record_finding("tokens", {"n_tokens": neuron_stats.n_tokens})
    assert neuron_stats.n_tokens > 0
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A local HF checkpoint: a random 2-layer GPT-2 and a small BPE tokenizer of the toy world."""
    from neuronspec.data.toyworld import toyworld_documents
    from neuronspec.zoo.tokenizer import train_tokenizer

    directory = tmp_path_factory.mktemp("ckpt")
    tokenizer = train_tokenizer(toyworld_documents("train", n_docs=200), vocab_size=300)
    model = make_gpt2(seed=7)
    model.resize_token_embeddings(len(tokenizer))
    torch.manual_seed(7)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def run(pytester, checkpoint, tmp_path):
    pytester.makepyfile(test_spec=SPEC)
    pytester.makeini("[pytest]\nneuronspec = true\n")  # a neuronspec project (plugin opt-in)
    # this checkout's neuronspec in the subprocess (the installed one may be another)
    env_path = os.pathsep.join(
        filter(None, [str(pytester.path), str(REPO), os.environ.get("PYTHONPATH")])
    )
    pytester._monkeypatch.setenv("PYTHONPATH", env_path)
    pytester._monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "cache"

    def run_pytest(*args, models=str(checkpoint)):
        return pytester.runpytest_subprocess(
            "-p",
            "no:cacheprovider",
            f"--models={models}",
            "--text-limit=60",
            f"--neuronspec-cache={cache}",
            *args,
        )

    run_pytest.cache = cache
    return run_pytest


def test_results_file_and_model_ids_in_test_ids(run, checkpoint, pytester):
    result = run("-v", "--neuronspec-results=results.json")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines([f"*test_dead?{checkpoint}-L0?*PASSED*"])
    results = json.loads((pytester.path / "results.json").read_text())
    entry = results["models"][str(checkpoint)]
    assert sorted(entry["analyses"]["dead"]) == ["0", "1"]
    assert entry["info"]["n_tokens"] == entry["analyses"]["tokens"]["all"]["n_tokens"]
    assert entry["analyses"]["dead"]["0"]["n_tokens"] == entry["info"]["n_tokens"]


def test_trigrams_option_counts_trigrams(run, pytester):
    """``--trigrams`` turns on the (neuron, trigram) counts of the pass (off by default)."""
    pytester.makepyfile(
        test_trigram_spec="""
def test_trigram_counts(neuron_stats, request):
    assert neuron_stats.config.trigrams == request.config.getoption("trigrams")
    if neuron_stats.config.trigrams:
        neuron, key, count = neuron_stats.trigram_table(0)
        assert len(key) > 0 and int(count.min()) >= 1
"""
    )
    run("test_trigram_spec.py").assert_outcomes(passed=1)
    run("test_trigram_spec.py", "--trigrams").assert_outcomes(passed=1)


def test_unavailable_real_model_skips_with_reason(run):
    result = run("-rs", models="mamba130m")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["*not available offline*"])


@pytest.mark.parametrize("snapshot_call", ["findings_snapshot", 'findings_snapshot(name="n")'])
def test_a_first_run_without_snapshots_skips_with_the_update_hint(run, pytester, snapshot_call):
    """A user's new model has no snapshot: that is no failure of the finding. Once recorded
    (under the default or a custom name), the same finding matches and a changed one fails."""
    spec = (
        """
def test_finding(model_id, neuron_stats, findings_snapshot):
    assert {{"n_tokens": neuron_stats.n_tokens * {factor}}} == """
        + snapshot_call.replace("{", "{{")
        + "\n"
    )
    pytester.makepyfile(test_spec=spec.format(factor=1))
    first = run("-rs", "-k", "test_finding")
    first.assert_outcomes(skipped=1)
    first.stdout.fnmatch_lines(["*no snapshot yet: run with --snapshot-update*"])
    assert "snapshot failed" not in first.stdout.str()  # syrupy counts no failure either
    run("-k", "test_finding", "--snapshot-update").assert_outcomes(passed=1)
    run("-k", "test_finding").assert_outcomes(passed=1)
    pytester.makepyfile(test_spec=spec.format(factor=3))
    run("-k", "test_finding").assert_outcomes(failed=1)


def test_unknown_model_is_a_usage_error(run):
    result = run(models="mamba13m")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown model 'mamba13m'; did you mean 'mamba130m'*"])


def test_text_limit_zero_is_a_usage_error(run):
    result = run("--text-limit=0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*text limit must be at least 1 document, got 0*"])


def test_too_short_corpus_is_a_one_line_error(run, pytester):
    (pytester.path / "short.txt").write_text("A tiny corpus.\n")
    result = run("--corpus=short.txt")
    result.assert_outcomes(errors=3)
    result.stdout.fnmatch_lines(["*CorpusError: corpus 'short.txt' is too short*"])
    assert "Traceback" not in result.stdout.str()


def test_corrupt_cache_is_recomputed_with_warning(run, pytester):
    first = run("--neuronspec-results=first.json")
    first.assert_outcomes(passed=3)
    entries = sorted(run.cache.glob("*.safetensors"))  # the statistics
    (store,) = (p for p in run.cache.glob("windows-*") if p.is_dir())  # the token windows
    assert len(entries) == 1
    for entry in [*entries, store / "windows.i64"]:
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])  # a torn write
    second = run("--neuronspec-results=second.json", "-W", "always")
    second.assert_outcomes(passed=3)
    second.stdout.fnmatch_lines(["*token-window store*damaged*", "*recomputing*"])
    assert (
        json.loads((pytester.path / "first.json").read_text())["models"]
        == json.loads((pytester.path / "second.json").read_text())["models"]
    )


def test_xdist_gives_the_same_findings(run, pytester):
    run("--neuronspec-results=serial.json").assert_outcomes(passed=3)
    parallel = run("-n", "2", "--neuronspec-results=parallel.json")
    parallel.assert_outcomes(passed=3)
    serial, parallel = (
        json.loads((pytester.path / f"{n}.json").read_text()) for n in ("serial", "parallel")
    )
    assert serial["models"] == parallel["models"] and serial["config"] == parallel["config"]
    # spec outcomes and hypotheses reach the controller from the workers (durations differ)
    specs = [
        [{k: v for k, v in s.items() if k != "duration_s"} for s in r["specs"]]
        for r in (serial, parallel)
    ]
    assert specs[0] == specs[1] and len(specs[0]) == 3


SPECS_DIR = Path(__file__).resolve().parents[1] / "specs"
EXPECTED_FIGURES = [
    "fig1_dead_neurons",
    "fig2_covering_unigrams",
    "fig3a_token_detectors",
    "fig3b_detected_tokens",
    "fig4_new_tokens",
]


def test_spec_suite_writes_every_figure_for_both_embedded_models(pytester, tmp_path):
    """The finding fixtures draw their figures: the dead, n-gram and positional specs with
    ``--plots-dir D`` write Fig. 1-4 and the positional plots per model, and the overlays
    across models (on a small corpus: figures, not findings, are tested here)."""
    plots = tmp_path / "plots"
    pytester._monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytester._monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    )
    result = pytester.runpytest_subprocess(
        *(str(SPECS_DIR / f"test_{name}.py") for name in ("dead", "ngram", "positional")),
        "-p",
        "no:cacheprovider",
        "--max-tokens=4096",
        f"--plots-dir={plots}",
        f"--neuronspec-cache={tmp_path / 'cache'}",
        f"--rootdir={SPECS_DIR.parent}",
    )
    assert "errors" not in result.parseoutcomes(), result.stdout.str()[-3000:]
    written = {path.name: path.stat().st_size for path in plots.glob("*.png")}
    for model_id in ("tiny-gpt2", "tiny-mamba"):
        for figure in EXPECTED_FIGURES:
            assert written[f"{figure}_{model_id}.png"] > 0
        assert any(name.startswith("positional_layer") and model_id in name for name in written)
        assert written[f"positional_measures_{model_id}.png"] > 0
    for figure in EXPECTED_FIGURES:
        assert written[f"{figure}_all_models.png"] > 0
