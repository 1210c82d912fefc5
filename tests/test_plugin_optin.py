"""The plugin acts only in a project that opts in (ini ``neuronspec = true``).

neuronspec registers its pytest plugin for every session in the environment (entry point
``pytest11``); a foreign project must run exactly as without it: its own ``model_id``
fixture and ``--device`` option, no torch imported, no allocator or thread settings.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import neuronspec

pytest_plugins = ["pytester"]

REPO = Path(neuronspec.__file__).resolve().parents[1]

FOREIGN_CONFTEST = """
import pytest

def pytest_addoption(parser):
    parser.addoption("--device", default="gpu0", help="the foreign project's own option")

@pytest.fixture
def model_id(request):
    return "foreign-" + request.config.getoption("--device")
"""

FOREIGN_TEST = """
import sys

def test_own_model_id(model_id):
    assert model_id == "foreign-gpu0"

def test_no_torch_and_no_allocator_setting():
    assert "neuronspec.plugin" in sys.modules  # the plugin was loaded, and stayed out
    assert "torch" not in sys.modules
    assert "neuronspec.heap" not in sys.modules  # keep_malloc_heap() never ran
"""


@pytest.fixture
def foreign(pytester: pytest.Pytester) -> pytest.Pytester:
    """A project with its own ``model_id`` fixture and ``--device`` option, no ini switch."""
    pytester.makeconftest(FOREIGN_CONFTEST)
    pytester.makepyfile(test_foreign=FOREIGN_TEST)
    # the subprocess imports this checkout's neuronspec (the installed one may be another)
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    pytester._monkeypatch.setenv("PYTHONPATH", path)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        pytester._monkeypatch.delenv(name, raising=False)
    return pytester


def test_foreign_project_runs_untouched(foreign):
    result = foreign.runpytest_subprocess("-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=2)
    assert "--models" not in foreign.runpytest_subprocess("--help").stdout.str()


def test_foreign_project_under_xdist_imports_no_torch(foreign):
    """xdist workers of a foreign project load the plugin module, but not torch."""
    result = foreign.runpytest_subprocess("-p", "no:cacheprovider", "-p", "xdist", "-n", "2")
    result.assert_outcomes(passed=2)


def test_opting_in_parametrizes_model_id(foreign):
    """The same test file in a project that opts in (``-o neuronspec=true``, no conftest of its
    own): ``model_id`` is parametrized over the embedded models."""
    foreign.makeconftest("")
    result = foreign.runpytest_subprocess(
        "-p", "no:cacheprovider", "-o", "neuronspec=true", "--collect-only", "-q"
    )
    result.stdout.fnmatch_lines(
        [
            "test_foreign.py::test_own_model_id[[]tiny-gpt2[]]",
            "*::test_own_model_id[[]tiny-mamba[]]",
        ]
    )


HEAP_TEST = """
import sys

def test_heap_setting(request):
    kept = request.config.getoption("keep_malloc_heap")
    assert ("neuronspec.heap" in sys.modules) == kept
"""


@pytest.mark.parametrize("flags", [(), ("--keep-malloc-heap",)])
def test_allocator_tuning_applies_only_when_asked(foreign, flags):
    """An opted-in project leaves glibc's allocator alone unless ``--keep-malloc-heap``."""
    foreign.makeconftest("")
    foreign.makepyfile(test_foreign=HEAP_TEST)
    result = foreign.runpytest_subprocess("-p", "no:cacheprovider", "-o", "neuronspec=true", *flags)
    result.assert_outcomes(passed=1)


def test_neuronspec_fixture_outside_a_spec_project_says_how_to_opt_in(pytester):
    pytester.makepyfile(test_x="def test_x(neuronspec_session):\n    pass\n")
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    pytester._monkeypatch.setenv("PYTHONPATH", path)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(
        [
            "*neuronspec fixtures need a neuronspec project: set `neuronspec = true` under "
            "[[]tool.pytest.ini_options[]] (or [[]pytest[]]), or pass -o neuronspec=true*"
        ]
    )
