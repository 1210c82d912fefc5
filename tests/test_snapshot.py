"""FindingsSnapshotExtension: tolerant comparison, key-path diffs, minimal --snapshot-update.

The integration tests drive pytest itself in a subprocess (``pytester``), as syrupy's own
tests do, including under pytest-xdist.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from syrupy.utils import import_module_member

import neuronspec.snapshot
from neuronspec.findings import Finding
from neuronspec.snapshot import FindingsSnapshotExtension, findings_extension

pytest_plugins = ["pytester"]

REPO_ROOT = Path(__file__).resolve().parents[1]

# A spec that snapshots the findings stored next to it in findings_<case>.json.
SPEC = """
import json
import pathlib

import pytest

from neuronspec.snapshot import FindingsSnapshotExtension, findings_extension

@pytest.mark.parametrize("case", {cases!r})
def test_findings(snapshot, case):
    path = pathlib.Path(__file__).parent / f"findings_{{case}}.json"
    assert snapshot.use_extension({extension}) == json.loads(path.read_text())
"""

FINDINGS = {
    "model": "tiny-gpt2",
    "n_tokens": 4096,
    "layers": [
        {"dead_fraction": 0.0, "n_dead": 0, "mean_activation": 0.731},
        {"dead_fraction": 0.1234, "n_dead": 158, "mean_activation": 0.052},
    ],
}


# --- unit tests -------------------------------------------------------------------------


def diffs(received, stored, extension=FindingsSnapshotExtension):
    ext = extension()
    return list(ext.diff_lines(ext.serialize(received), ext.serialize(stored)))


def test_serialises_to_json_with_sorted_keys_and_round_tripping_floats():
    @dataclasses.dataclass(frozen=True)
    class DeadFinding(Finding):
        layer: int
        fraction: float
        per_bin: tuple[float, ...]

    text = FindingsSnapshotExtension().serialize(DeadFinding(2, 0.1 + 0.2, (1 / 3, 2.0)))
    assert text == (
        '{\n  "fraction": 0.30000000000000004,\n  "layer": 2,\n'
        '  "per_bin": [\n    0.3333333333333333,\n    2.0\n  ]\n}\n'
    )
    assert json.loads(text)["per_bin"][0] == 1 / 3


def test_unsupported_values_raise_with_their_path():
    with pytest.raises(TypeError, match=r"layers\.0: cannot snapshot a object"):
        FindingsSnapshotExtension().serialize({"layers": [object()]})


@pytest.mark.parametrize(
    ("received", "stored", "close"),
    [
        (1.0, 1.0 + 0.99e-4, True),  # relative: |a-b| <= 1e-4 * max(|a|, |b|)
        (1.0, 1.0 + 1.01e-4, False),
        (0.0, 0.99e-6, True),  # absolute floor near zero
        (0.0, 1.01e-6, False),
        (-0.5, 0.5, False),
    ],
)
def test_floats_are_compared_with_rel_and_abs_tolerance(received, stored, close):
    ext = FindingsSnapshotExtension()
    assert (
        ext.matches(
            serialized_data=ext.serialize({"x": received}),
            snapshot_data=ext.serialize({"x": stored}),
        )
        is close
    )


def test_diff_names_key_path_and_both_values():
    stored = FINDINGS
    received = json.loads(json.dumps(FINDINGS))
    received["layers"][1]["dead_fraction"] = 0.2
    received["layers"][1]["n_dead"] = 159  # counts are ints: exact
    received["layers"][0]["mean_activation"] = 0.731 * (1 + 1e-6)  # within tolerance
    assert diffs(received, stored) == [
        "layers.1.dead_fraction: received 0.2 != snapshot 0.1234 (rel tol 0.0001, abs tol 1e-06)",
        "layers.1.n_dead: received 159 != snapshot 158",
    ]


def test_structural_changes_are_differences():
    stored = {"a": 1, "b": [1.0, 2.0], "c": "x", "d": True}
    received = {"a": 1.0, "b": [1.0], "c": "y", "e": True}
    assert diffs(received, stored) == [
        "a: received 1.0 != snapshot 1 (float vs int)",
        "b: received 1 items != snapshot 2 items (list length changed)",
        "c: received 'y' != snapshot 'x'",
        "d: received missing != snapshot present (key removed)",
        "e: received present != snapshot missing (new key)",
    ]


def test_factory_sets_tolerances_and_is_importable_by_name():
    loose = findings_extension(rel=1e-2, abs=0)
    assert loose is findings_extension(rel=0.01, abs=0.0)
    assert getattr(neuronspec.snapshot, loose.__name__) is loose  # xdist controller does this
    # ... also for a class this process never made (module path + qualname, as syrupy does)
    name = "neuronspec.snapshot.FindingsSnapshotExtension__rel_2_5em05__abs_0_0"
    rebuilt = import_module_member(name)
    assert (rebuilt.rel_tol, rebuilt.abs_tol) == (2.5e-5, 0.0)
    assert rebuilt is findings_extension(rel=2.5e-5, abs=0)
    assert diffs({"x": 1.005}, {"x": 1.0}, loose) == []
    assert diffs({"x": 1.02}, {"x": 1.0}, loose) == [
        "x: received 1.02 != snapshot 1.0 (rel tol 0.01, abs tol 0)"
    ]
    with pytest.raises(ValueError, match="rel must be finite and >= 0"):
        findings_extension(rel=-1.0)


# --- pytest integration -----------------------------------------------------------------


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A temp project whose subprocess pytest runs import neuronspec from this checkout.

    Plugin autoload is off (faster start, and neuronspec's own plugin stays out);
    ``run`` loads syrupy explicitly and the xdist test adds ``-p xdist``.
    """
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    return pytester


def write_spec(project, name, cases, extension="FindingsSnapshotExtension"):
    project.makepyfile(**{name: SPEC.format(extension=extension, cases=list(cases))})
    for case in cases:
        write_findings(project, case, FINDINGS)


def write_findings(project, case, findings):
    (project.path / f"findings_{case}.json").write_text(json.dumps(findings))


def perturbed(path, value):
    findings = json.loads(json.dumps(FINDINGS))
    findings["layers"][1][path] = value
    return findings


def run(project, *args):
    return project.runpytest_subprocess("-p", "syrupy", "-p", "no:cacheprovider", *args)


def snapshot_file(project, module, case):
    return project.path / "__snapshots__" / module / f"test_findings[{case}].json"


def test_within_tolerance_passes_and_update_leaves_file_byte_identical(project):
    write_spec(project, "test_spec", ["a"])
    run(project, "--snapshot-update").assert_outcomes(passed=1)
    stored = snapshot_file(project, "test_spec", "a").read_bytes()
    assert json.loads(stored) == FINDINGS

    write_findings(project, "a", perturbed("dead_fraction", 0.1234 * (1 + 5e-5)))
    run(project).assert_outcomes(passed=1)
    run(project, "--snapshot-update").assert_outcomes(passed=1)
    assert snapshot_file(project, "test_spec", "a").read_bytes() == stored


def test_out_of_tolerance_fails_with_key_path_and_update_rewrites_only_that_value(project):
    write_spec(project, "test_spec", ["a"])
    run(project, "--snapshot-update").assert_outcomes(passed=1)

    findings = perturbed("dead_fraction", 0.2)
    findings["layers"][0]["mean_activation"] = 0.731 * (1 + 5e-5)  # within tolerance
    write_findings(project, "a", findings)
    result = run(project)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*layers.1.dead_fraction: received 0.2 != snapshot 0.1234 (rel*"])
    assert "mean_activation" not in result.stdout.str()

    run(project, "--snapshot-update").assert_outcomes(passed=1)
    stored = json.loads(snapshot_file(project, "test_spec", "a").read_text())
    assert stored["layers"][1]["dead_fraction"] == 0.2
    assert stored["layers"][0]["mean_activation"] == 0.731  # kept: still within tolerance
    run(project).assert_outcomes(passed=1)


def test_changed_keys_list_lengths_and_counts_fail(project):
    cases = ["new_key", "removed_key", "shorter_list", "count", "string"]
    write_spec(project, "test_spec", cases)
    run(project, "--snapshot-update").assert_outcomes(passed=len(cases))

    changed = {case: json.loads(json.dumps(FINDINGS)) for case in cases}
    changed["new_key"]["layers"][0]["n_alive"] = 7
    del changed["removed_key"]["n_tokens"]
    changed["shorter_list"]["layers"].pop()
    changed["count"]["layers"][1]["n_dead"] = 159
    changed["string"]["model"] = "tiny-mamba"
    for case, findings in changed.items():
        write_findings(project, case, findings)
    result = run(project)
    result.assert_outcomes(failed=len(cases))
    result.stdout.fnmatch_lines_random(
        [
            "*layers.0.n_alive: received present != snapshot missing (new key)*",
            "*n_tokens: received missing != snapshot present (key removed)*",
            "*layers: received 1 items != snapshot 2 items (list length changed)*",
            "*layers.1.n_dead: received 159 != snapshot 158*",
            "*model: received 'tiny-mamba' != snapshot 'tiny-gpt2'*",
        ]
    )


def test_under_xdist_workers_write_read_and_update_only_what_changed(project):
    write_spec(project, "test_a", ["a"])
    write_spec(project, "test_b", ["b"], extension="findings_extension(rel=1e-3)")
    xdist = ("-p", "xdist", "-n", "2")
    run(project, *xdist, "--snapshot-update").assert_outcomes(passed=2)
    stored_a = snapshot_file(project, "test_a", "a").read_bytes()
    assert json.loads(snapshot_file(project, "test_b", "b").read_text()) == FINDINGS

    write_findings(project, "a", perturbed("dead_fraction", 0.1234 * (1 + 5e-5)))
    write_findings(project, "b", perturbed("dead_fraction", 0.1234 * (1 + 2e-3)))
    result = run(project, *xdist)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        ["*layers.1.dead_fraction: received * (rel tol 0.001, abs tol 1e-06)"]
    )

    run(project, *xdist, "--snapshot-update").assert_outcomes(passed=2)
    assert snapshot_file(project, "test_a", "a").read_bytes() == stored_a
    stored_b = json.loads(snapshot_file(project, "test_b", "b").read_text())
    assert stored_b["layers"][1]["dead_fraction"] == 0.1234 * (1 + 2e-3)
    run(project).assert_outcomes(passed=2)
