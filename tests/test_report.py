"""The results diff, the report's generic rendering and conventions, the spec outcomes and
snapshot drift recorded by the plugin, the findings summary, progress bars, the lazy API."""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from neuronspec.cli import diff as diff_module
from neuronspec.report.compare import changes
from neuronspec.report.diff import ADDED, OUT, REMOVED, WITHIN, diff_results
from neuronspec.report.html import assign_figures, render_html
from neuronspec.report.results import is_token_field, token_ids_in
from neuronspec.report.summary import summary_lines, token_text
from neuronspec.report.values import render_value
from neuronspec.snapshot import FindingsSnapshotExtension

pytestmark = pytest.mark.report
pytest_plugins = ["pytester"]
ROOT = Path(__file__).resolve().parents[1]


def planted_results() -> dict:
    layer = {
        "dead_fraction": 0.25,
        "n_dead": 2,
        "n_neurons": 8,
        "rare_fraction": 0.0,
        "dead_neurons": [1, 5],
    }
    return {
        "config": {},
        "models": {
            "m": {
                "info": {"n_tokens": 100},
                "analyses": {
                    "dead": {str(i): dict(layer, layer=i) for i in range(4)},
                    "ngram": {"0": {"detected_tokens": [3, 4], "n_token_detectors": 1}},
                },
            }
        },
    }


def planted_pair() -> tuple[dict, dict]:
    """Layer 0 moves within tolerance, layer 1 out, layer 2 is removed, layer 7 added."""
    old = planted_results()
    new = copy.deepcopy(old)
    dead = new["models"]["m"]["analyses"]["dead"]
    dead["0"]["dead_fraction"] = 0.25 * (1 + 1e-7)
    dead["1"]["dead_fraction"] = 0.375
    del dead["2"]
    dead["7"] = dict(dead["3"], layer=7)
    return old, new


def test_diff_reports_exactly_the_planted_changes():
    old, new = planted_pair()
    result = diff_results(old, new)
    found = {(f.layer, f.status) for f in result.findings}
    assert found == {("0", WITHIN), ("1", OUT), ("2", REMOVED), ("7", ADDED)}
    assert result.n_unchanged == 2  # dead layer 3 and ngram layer 0
    out = next(f for f in result.findings if f.status == OUT)
    assert [(c.path, c.old, c.new, c.within_tolerance) for c in out.changes] == [
        ("dead_fraction", 0.25, 0.375, False)
    ]
    assert out.changes[0].abs_change == pytest.approx(0.125)
    assert out.changes[0].rel_change == pytest.approx(0.125 / 0.375)


def test_diff_does_not_judge_the_machines_timings():
    """Tokens/s of the efficiency finding measure the machine, not the model: a slower run
    is no changed finding, while its analytic FLOPs still are compared."""
    old = planted_results()
    old["models"]["m"]["analyses"]["efficiency"] = {
        "all": {"flops_per_token": 1000, "throughput": {"tokens_per_second": 25933.5}}
    }
    new = copy.deepcopy(old)
    new["models"]["m"]["analyses"]["efficiency"]["all"]["throughput"]["tokens_per_second"] = 1.0
    assert not diff_results(old, new).findings
    new["models"]["m"]["analyses"]["efficiency"]["all"]["flops_per_token"] = 2000
    assert [(f.analysis, f.status) for f in diff_results(old, new).findings] == [
        ("efficiency", OUT)
    ]


@pytest.mark.parametrize("markdown", [False, True])
def test_diff_command_exit_codes_and_output(tmp_path, capsys, markdown):
    old, new = planted_pair()
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    args = [str(tmp_path / "old.json"), str(tmp_path / "new.json")] + (["--markdown"] * markdown)
    assert diff_module.main(args) == 1
    text = capsys.readouterr().out
    assert "1 out of tolerance, 1 removed, 1 added, 1 within tolerance, 2 unchanged" in text
    for name in (
        "m / dead / layer 0",
        "m / dead / layer 1",
        "m / dead / layer 2",
        "m / dead / layer 7",
    ):
        assert name in text
    assert "m / dead / layer 3" not in text and "ngram" not in text
    if markdown:
        assert (
            text.startswith("### neuronspec diff: ❌")
            and "| out of tolerance | m / dead / layer 1 |" in text
        )


def test_diff_exit_zero_when_nothing_is_out_of_tolerance_or_removed(tmp_path):
    old, new = planted_pair()
    new["models"]["m"]["analyses"]["dead"]["1"]["dead_fraction"] = 0.25
    new["models"]["m"]["analyses"]["dead"]["2"] = old["models"]["m"]["analyses"]["dead"]["2"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    assert diff_module.main([str(tmp_path / "old.json"), str(tmp_path / "new.json")]) == 0
    # a wider tolerance accepts the out-of-tolerance move; an unreadable file is exit 2
    old, new = planted_pair()
    del new["models"]["m"]["analyses"]["dead"]["7"]
    new["models"]["m"]["analyses"]["dead"]["2"] = old["models"]["m"]["analyses"]["dead"]["2"]
    (tmp_path / "new.json").write_text(json.dumps(new))
    assert (
        diff_module.main([str(tmp_path / "old.json"), str(tmp_path / "new.json"), "--rel", "0.5"])
        == 0
    )
    (tmp_path / "bad.json").write_text("{")
    assert diff_module.main([str(tmp_path / "old.json"), str(tmp_path / "bad.json")]) == 2


@pytest.mark.parametrize("factor", [1 + 0.5e-4, 1 + 0.99e-4, 1 + 1.01e-4, 1 + 2e-4])
def test_leaf_verdict_is_the_snapshot_extensions(factor):
    """A finding is within tolerance in the diff exactly when its snapshot would match."""
    extension = FindingsSnapshotExtension()
    old, new = {"x": [0.5, 3.0]}, {"x": [0.5, 3.0 * factor]}
    moved = list(changes(old, new, extension=extension))
    snapshot_matches = extension.matches(
        serialized_data=extension.serialize(new), snapshot_data=extension.serialize(old)
    )
    assert len(moved) == 1 and moved[0].path == "x.1"
    assert moved[0].within_tolerance == snapshot_matches == (factor < 1 + 1e-4)


def test_structural_and_integer_changes_are_out_of_tolerance():
    moved = {
        c.path: c for c in changes({"a": 1, "b": [1, 2], "c": 1.0}, {"a": 2, "b": [1], "d": 1.0})
    }
    assert not any(c.within_tolerance for c in moved.values())
    assert moved["b"].note == "list length changed" and moved["c"].note == "key removed"
    assert moved["d"].note == "new key" and moved["a"].abs_change == 1


def test_token_fields_convention():
    for name in (
        "tokens",
        "detected_tokens",
        "detector_tokens",
        "answer_token",
        "target_token_ids",
    ):
        assert is_token_field(name)
    for name in ("n_tokens", "max_tokens", "n_tokens_cumulative", "tokenizer", "n_new_tokens"):
        assert not is_token_field(name)
    finding = {"detector_tokens": {"17": [3, 4]}, "n_tokens": 9, "top": {"answer_token": 5}}
    assert token_ids_in(finding) == {3, 4, 5}


def test_generic_rendering_of_an_unknown_analysis():
    """Nested findings become tables: scalars as key/value rows, sibling lists of one length
    as one table, records as a table, long lists summarised; token ids as their text."""
    finding = {
        "n_facts": 3,
        "neurons": [4, 9, 11],
        "scores": [0.5, 0.25, 0.125],
        "per_fact": [{"fact": "a", "answer_token": 7}, {"fact": "b", "answer_token": 8}],
        "curve": list(range(100)),
    }
    page = render_value("", finding, token_text({"7": " Paris", "8": " Rome"}))
    assert "<th>neurons</th><th>scores</th>" in page and "<td>0.125</td>" in page
    assert "' Paris'" in page and "' Rome'" in page and 'data-token="7"' in page
    assert "100 values: min 0, mean 49.5, max 99" in page


def test_figures_are_linked_by_file_name(tmp_path):
    names = [
        "fig1_dead_neurons_tiny-gpt2.png",
        "positional_layer0_tiny-gpt2.png",
        "knowledge_neurons_top_tiny-gpt2.png",
        "mystery_tiny-gpt2.png",
        "fig4_new_tokens_all_models.png",
        "loose.png",
    ]
    analyses = {"tiny-gpt2": ["dead", "positional", "knowledge_neurons", "knowledge"]}
    assigned = assign_figures([tmp_path / n for n in names], analyses)
    named = {m: {a: [p.name for p in ps] for a, ps in g.items()} for m, g in assigned.items()}
    assert named == {
        "tiny-gpt2": {
            "dead": ["fig1_dead_neurons_tiny-gpt2.png"],
            "positional": ["positional_layer0_tiny-gpt2.png"],
            "knowledge_neurons": ["knowledge_neurons_top_tiny-gpt2.png"],
            None: ["mystery_tiny-gpt2.png"],
        },
        "all_models": {"token_detector_summary": ["fig4_new_tokens_all_models.png"]},
        "": {None: ["loose.png"]},
    }


def test_summary_lines_with_headlines_and_other_analyses():
    results = planted_results()
    entry = results["models"]["m"]
    entry["analyses"]["ngram"] = {"1": {"n_token_detectors": 2, "detected_tokens": [3]}}
    entry["analyses"]["my_analysis"] = {"all": {"delta_ppl": 1.5}}  # no headline
    entry["tokens"] = {"3": " Paris"}
    results["specs"] = [{"outcome": "passed"}, {"outcome": "xfailed"}, {"outcome": "passed"}]
    lines = summary_lines(results)
    assert lines[0] == "m (100 tokens)"
    assert (
        lines[1].split()
        == "dead 8 of 32 neurons dead (25.00%), rarely firing 0.00%; dead by layer 2/2/2/2".split()
    )
    assert "2 token-detecting neurons" in lines[2] and "' Paris'" in lines[2]
    assert lines[3].split() == ["also", "recorded", "my_analysis"]
    assert lines[4] == "specs: 2 passed, 1 xfailed"


def test_report_page_of_a_planted_results_file():
    page = render_html(planted_results(), [])
    assert page.startswith("<!DOCTYPE html>") and "http" not in page.replace("http-equiv", "")
    assert "<script" not in page and "No figures" in page
    # a value the same in every layer is shown once, tagged with the layers it stands for
    path = json.dumps(["m", "dead", "0", "dead_fraction"]).replace('"', "&quot;")
    layers = json.dumps(["0", "1", "2", "3"]).replace('"', "&quot;")
    assert f'data-path="{path}" data-value="0.25" data-layers="{layers}">0.25<' in page


OUTCOME_SPECS = '''
import os
import pytest

def test_passes(record_property):
    """Hypothesis: one is less than two."""
    record_property("measured_value", 1.5)
    assert 1 < 2

def test_fails():
    """Two is less than one (it is not)."""
    value = 2
    assert value < 1, f"measured {value}"

@pytest.mark.xfail(strict=True, reason="measured: 0 detectors")
def test_expected_to_fail():
    """There are detectors."""
    assert 0 > 0

def test_skips():
    pytest.skip("no such model here")

def test_snapshot_within(findings_snapshot):
    """A value that moves a little."""
    assert {"value": float(os.environ["WITHIN"])} == findings_snapshot

def test_snapshot_out(findings_snapshot):
    """A value that moves a lot."""
    assert {"value": float(os.environ["OUT"]), "count": 3} == findings_snapshot
'''


@pytest.mark.parametrize("workers", [0, 2])
def test_plugin_records_outcomes_and_snapshot_drift(pytester, monkeypatch, workers):
    pytester.makeini("[pytest]\nneuronspec = true\n")  # a neuronspec project (plugin opt-in)
    pytester.makepyfile(test_outcomes=OUTCOME_SPECS)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # this checkout's neuronspec in the subprocess
    monkeypatch.setenv("WITHIN", "1.0")
    monkeypatch.setenv("OUT", "1.0")
    pytester.runpytest_subprocess("-p", "no:cacheprovider", "--snapshot-update", "-k", "snapshot")
    monkeypatch.setenv("WITHIN", repr(1.0 + 1e-7))
    monkeypatch.setenv("OUT", "1.5")
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-n", str(workers), "--neuronspec-results=results.json"
    )
    result.assert_outcomes(passed=2, failed=2, xfailed=1, skipped=1)
    results = json.loads((pytester.path / "results.json").read_text())
    specs = {s["name"]: s for s in results["specs"]}
    assert {name: s["outcome"] for name, s in specs.items()} == {
        "test_passes": "passed",
        "test_fails": "failed",
        "test_expected_to_fail": "xfailed",
        "test_skips": "skipped",
        "test_snapshot_within": "passed",
        "test_snapshot_out": "failed",
    }
    assert specs["test_passes"]["hypothesis"] == "Hypothesis: one is less than two."
    assert specs["test_passes"]["measured"] == {"measured_value": 1.5}
    assert "measured 2" in specs["test_fails"]["message"]
    assert specs["test_expected_to_fail"]["reason"] == "measured: 0 detectors"
    assert specs["test_skips"]["reason"] == "no such model here"
    drift = {d["nodeid"].split("::")[1]: d for d in results["snapshot_drift"]}
    assert drift["test_snapshot_within"]["status"] == "within tolerance"
    [moved] = drift["test_snapshot_within"]["changes"]
    assert moved["path"] == "value" and moved["within_tolerance"] and moved["new"] == 1.0 + 1e-7
    assert drift["test_snapshot_out"]["status"] == "out of tolerance"
    [moved] = drift["test_snapshot_out"]["changes"]
    assert (moved["old"], moved["new"], moved["within_tolerance"]) == (1.0, 1.5, False)
    assert moved["abs_change"] == 0.5


def test_progress_is_quiet_off_a_terminal_and_in_xdist_workers(monkeypatch):
    from neuronspec import progress as progress_module

    stream = io.StringIO()
    monkeypatch.setattr(progress_module, "_stream", stream)
    monkeypatch.delenv("NEURONSPEC_PROGRESS", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # this test may run in one
    assert list(progress_module.progress(range(3), desc="quiet")) == [0, 1, 2]
    assert stream.getvalue() == ""
    monkeypatch.setenv("NEURONSPEC_PROGRESS", "1")
    assert list(progress_module.progress(range(3), desc="forced")) == [0, 1, 2]
    assert "forced" in stream.getvalue()
    monkeypatch.setenv("NEURONSPEC_PROGRESS", "")
    monkeypatch.setattr(stream, "isatty", lambda: True, raising=False)
    assert progress_module.progress_enabled()
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    assert not progress_module.progress_enabled()


def test_import_neuronspec_is_cheap_and_exposes_the_api():
    code = (
        "import sys, neuronspec\n"
        "heavy = [m for m in ('torch', 'transformers', 'matplotlib', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert neuronspec.__version__\n"
        "from neuronspec import RunConfig, SpecSession, dead_neurons, positional_layer_from_stats\n"
        "assert SpecSession.__module__ == 'neuronspec.session'\n"
        "assert set(neuronspec.__all__) <= set(dir(neuronspec))\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_a_long_loop_says_so_near_its_start():
    """After the first steps, a loop whose estimate exceeds ten minutes writes one line
    with the estimate; a short one writes nothing."""
    import io

    from neuronspec.progress import announce_long_runs

    times = iter([0.0, 10.0, 20.0, 30.0, 40.0])  # the start, then 10 s per step
    out = io.StringIO()
    items = list(
        announce_long_runs(range(4), 100, "causal sweep", "forward", out, lambda: next(times))
    )
    assert items == [0, 1, 2, 3]
    assert out.getvalue() == (
        "neuronspec: causal sweep will take about 17 min (1 of 100 forwards in 10 s)\n"
    )
    quick = iter([0.0, 10.0, 20.0])
    out = io.StringIO()
    list(announce_long_runs(range(2), 2, "ig", "fact", out, lambda: next(quick)))
    assert out.getvalue() == ""
