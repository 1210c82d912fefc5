"""The pytest surface of neuronspec: options, parametrization by model, fixtures, results.

A spec asks for ``model_id`` (and optionally ``layer``) and gets one test per model (and
layer) of the run; ids carry the model id, so ``pytest specs/ -k tiny-mamba`` selects one
model. Tests of one model share an xdist group (``--dist loadgroup``), so each worker
loads only the models it needs. Models that are not available offline skip with the
reason; other :class:`~neuronspec.errors.NeuronSpecError` failures are reported as their
one-line message, not a traceback.

The plugin is installed for every pytest session (entry point ``pytest11``) but acts only in
a project that opts in with the ini switch ``neuronspec = true`` (this repository's
pyproject.toml sets it; ``-o neuronspec=true`` works too). Elsewhere it adds no command-line
option, parametrizes nothing, imports neither torch nor the library, and leaves the
allocator and torch's threads alone: a foreign project's own ``model_id`` fixture or
``--device`` option stays its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from neuronspec.errors import ModelNotAvailableError, NeuronSpecError

if TYPE_CHECKING:
    from neuronspec.session import RunConfig, SpecSession

# Light on import: this module is loaded (entry point pytest11) by every pytest session in
# the environment, so it imports neither torch nor the library until a project opts in.
OPT_IN_INI = "neuronspec"
_SESSION_KEY = pytest.StashKey["SpecSession"]()
_WORKER_RESULTS: list[dict] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    """Only the opt-in switch for every project; the options come with it (see below)."""
    parser.addini(
        OPT_IN_INI,
        type="bool",
        default=False,
        help="neuronspec: true in a project of neuron specs (parametrizes model_id and "
        "layer, adds the neuronspec command-line options); off elsewhere",
    )


def is_active(config: pytest.Config) -> bool:
    """Whether this pytest session is a neuronspec project: ini ``neuronspec = true``
    (this repo's pyproject sets it; ``-o neuronspec=true`` on the command line)."""
    return bool(config.getini(OPT_IN_INI))


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser) -> None:
    # the ini file is read by now, the command line not yet parsed: add the options here so
    # a project that does not opt in never sees them (its own --device stays its own)
    if is_active(early_config):
        _add_options(parser)


def _add_options(parser: pytest.Parser) -> None:
    from neuronspec.options import add_options

    add_options(parser.getgroup("neuronspec", "neuron specs").addoption)


def run_config(config: pytest.Config) -> RunConfig:
    """The run the command line describes, checked before collection: a bad option value, an
    unknown model or a layer a model lacks is a one-line usage error."""
    from neuronspec.session import RunConfig

    try:
        run = RunConfig.from_options(
            config.option, for_report=config.option.neuronspec_report is not None
        )
        run.check_models()
    except NeuronSpecError as error:
        raise pytest.UsageError(str(error)) from None
    return run


def pytest_configure(config: pytest.Config) -> None:
    if not is_active(config):
        return
    from neuronspec.session import SpecSession

    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    _share_cores_among_workers()
    config.stash[_SESSION_KEY] = SpecSession(run_config(config))
    config.pluginmanager.import_plugin("neuronspec.fixtures")  # the finding fixtures
    if not hasattr(config, "workeroutput"):  # the reporting process: outcomes, summary, report
        from neuronspec.report.recorder import NAME, RunRecorder

        config.pluginmanager.register(RunRecorder(config), NAME)


def _share_cores_among_workers() -> None:
    """In an xdist worker, give torch its share of the cores (cores // workers, at least 1).

    Each torch process otherwise starts one intra-op thread per core, so ``-n 2`` on two
    cores runs four busy threads and is slower than ``-n 0``. An explicit
    ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` is left alone.
    """
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers is None or "OMP_NUM_THREADS" in os.environ or "MKL_NUM_THREADS" in os.environ:
        return
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cores or 1) // int(workers)))


def _session(config: pytest.Config) -> SpecSession:
    if _SESSION_KEY not in config.stash:
        raise pytest.UsageError(
            "neuronspec fixtures need a neuronspec project: set `neuronspec = true` under "
            "[tool.pytest.ini_options] (or [pytest]), or pass -o neuronspec=true"
        )
    return config.stash[_SESSION_KEY]


def _checkpoint_config(model_id: str) -> dict | None:
    """The checkpoint's config.json; None if absent; a damaged one is a usage error."""
    from neuronspec.models.registry import checkpoint_config

    try:
        return checkpoint_config(model_id)
    except NeuronSpecError as error:
        raise pytest.UsageError(str(error)) from None


def _n_layers(model_id: str) -> int | None:
    """The checkpoint's layer count; None if absent; a damaged config is a usage error."""
    from neuronspec.models.registry import checkpoint_layers

    try:
        return checkpoint_layers(model_id)
    except NeuronSpecError as error:
        raise pytest.UsageError(str(error)) from None


MARKERS = {
    "dead": "dead-neuron specs (Voita et al. 2023, section 3)",
    "ngram": "n-gram and token-detecting neuron specs (Voita et al. 2023, section 4)",
    "positional": "positional neuron specs (Voita et al. 2023, section 5)",
    "attention": "Mamba hidden attention, rollout and attention-neuron specs (Ali et al. 2024)",
    "delta": "delta-sensitive (Mamba dt) and high-variance neuron specs",
    "ablation": "ablation, perplexity and pruning specs with random controls (METHODS section 10)",
    "causal": "causal-neuron specs: single-neuron KL impact, cross-layer matrix (METHODS section 6)",
    "knowledge": "knowledge-neuron specs (Dai et al. 2022; METHODS section 8)",
    "sparsity": "sparsity and efficiency specs (METHODS sections 9 and 11)",
    "comparison": "Mamba-versus-Transformer comparison and neuron-type overlap specs",
    "measured(model_or_family=numbers)": "the hypothesis is measured not to hold on "
    "these models (id) or families (model_type, e.g. mamba): a strict xfail whose reason is "
    "the measured numbers",
}


def measured_reason(marker: pytest.Mark, model_id: str, layer: int | None = None) -> str | None:
    """The reason of a ``measured`` marker for one test: its entry by test id of a layer
    (``"tiny-gpt2-L0"``), else by model id, else by family (the checkpoint's
    ``model_type``, e.g. ``mamba``); None when none is listed."""
    entries: dict[str, str] = {}
    for arg in marker.args:
        entries.update(arg)
    entries.update(marker.kwargs)
    layer_key = f"{model_id}-L{layer}"
    if layer is not None and layer_key in entries:
        return f"measured on {layer_key}: {entries[layer_key]}"
    if model_id in entries:
        return f"measured on {model_id}: {entries[model_id]}"
    family = (_checkpoint_config(model_id) or {}).get("model_type")
    if family in entries:
        return f"measured on {family} ({model_id}): {entries[family]}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``@pytest.mark.measured``: a strict xfail for the models or families it lists, so a
    hypothesis that starts to hold (XPASS) fails the run: the finding changed."""
    if not is_active(config):
        return
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "model_id" not in params:
            continue
        for marker in item.iter_markers("measured"):
            layer = params.get("layer")
            reason = measured_reason(marker, str(params["model_id"]), layer)
            if reason is not None:
                item.add_marker(pytest.mark.xfail(strict=True, reason=reason))
                break


def pytest_collection_finish(session: pytest.Session) -> None:
    """The run's snapshot specs share its false-alarm rate (:mod:`neuronspec.snapshot`)."""
    if not is_active(session.config):
        return
    from neuronspec.snapshot import FindingsSnapshotExtension

    n = sum("findings_snapshot" in getattr(item, "fixturenames", ()) for item in session.items)
    FindingsSnapshotExtension.snapshots_in_run = max(n, 1)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "model_id" not in metafunc.fixturenames or not is_active(metafunc.config):
        return
    models = _session(metafunc.config).config.models
    if "layer" not in metafunc.fixturenames:
        metafunc.parametrize(
            "model_id",
            [pytest.param(m, id=m, marks=pytest.mark.xdist_group(m)) for m in models],
            scope="session",
        )
        return
    params = []
    run_config = _session(metafunc.config).config
    for model_id in models:
        n_layers = _n_layers(model_id)
        group = pytest.mark.xdist_group(model_id)
        if n_layers is None:
            skip = pytest.mark.skip(reason=f"model {model_id!r} is not available offline")
            params.append(pytest.param(model_id, -1, id=f"{model_id}-L?", marks=[group, skip]))
        else:
            try:
                layers = run_config.layers_of(n_layers, model=model_id)
            except NeuronSpecError as error:
                raise pytest.UsageError(str(error)) from None
            params += [
                pytest.param(model_id, layer, id=f"{model_id}-L{layer}", marks=group)
                for layer in layers
            ]
    metafunc.parametrize(("model_id", "layer"), params, scope="session")


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def neuronspec_session(request: pytest.FixtureRequest) -> SpecSession:
    return _session(request.config)


def _or_skip(function, model_id: str):
    try:
        return function(model_id)
    except ModelNotAvailableError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def model_files(neuronspec_session: SpecSession, model_id: str):
    """The checkpoint of this test's parameter on disk (weights hash, tokenizer,
    ``model_type``), without instantiating the model: cheap on a warm run."""
    return _or_skip(neuronspec_session.files, model_id)


@pytest.fixture(scope="session")
def loaded_model(neuronspec_session: SpecSession, model_id: str):
    """The model of this test's parameter, loaded once per worker."""
    return _or_skip(neuronspec_session.model, model_id)


@pytest.fixture(scope="session")
def corpus(neuronspec_session: SpecSession, model_id: str):
    """The run's corpus tokenised for this model: analysis and held-out windows."""
    return _or_skip(neuronspec_session.corpus, model_id)


@pytest.fixture(scope="session")
def neuron_stats(neuronspec_session: SpecSession, model_id: str):
    """Streamed statistics of this model on the run's corpus (disk-cached)."""
    return _or_skip(neuronspec_session.stats, model_id)


@pytest.fixture
def record_finding(neuronspec_session: SpecSession, model_id: str):
    """``record_finding(analysis, finding, layer=None)`` keeps a finding for the results file."""

    def record(analysis: str, finding, *, layer: int | None = None) -> None:
        neuronspec_session.record(model_id, analysis, finding, layer=layer)

    return record


@pytest.fixture
def plots_dir(neuronspec_session: SpecSession) -> Path | None:
    """Directory for figures (``--plots-dir``), created on use; None when not asked for."""
    directory = neuronspec_session.config.plots_dir
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture
def findings_snapshot(snapshot, request: pytest.FixtureRequest):
    """A syrupy snapshot that compares findings with numeric tolerance; what moved (within
    tolerance or not) is recorded for the report. Other tolerances:
    ``findings_snapshot(extension_class=findings_extension(rel=...))``."""
    from neuronspec.report.outcomes import DRIFT, snapshot_drift
    from neuronspec.snapshot import FindingsSnapshotExtension

    assertion = snapshot.use_extension(FindingsSnapshotExtension)
    if not request.config.option.update_snapshots and not _has_any_snapshot(assertion):
        # a first run on a model: skipped before the assertion, so syrupy counts no failure
        pytest.skip(f"{NO_SNAPSHOT_YET}: run with --snapshot-update to record this finding")
    yield assertion
    drift = snapshot_drift(assertion, nodeid=request.node.nodeid)
    if drift:
        request.node.user_properties.append((DRIFT, json.dumps(drift)))


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request: pytest.FixtureRequest):
    """The cost of each session fixture's own setup, when NEURONSPEC_FIXTURE_COSTS names a
    file (:mod:`neuronspec.fixture_costs`)."""
    if fixturedef.scope != "session" or not is_active(request.config):
        return (yield)
    from neuronspec.fixture_costs import measured

    item = getattr(request, "_pyfuncitem", None)  # the test whose setup needs the fixture
    callspec = getattr(item, "callspec", None)
    model = callspec.params.get("model_id") if callspec is not None else None
    with measured(fixturedef.argname, model):
        return (yield)


# -- reporting ----------------------------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if not is_active(item.config):
        return report
    from neuronspec.report.outcomes import item_properties

    report.user_properties.extend(item_properties(item))  # hypothesis, model, layer: the report
    if report.when == "call" and report.failed and _only_missing_snapshots(item):
        # a first run on a model: nothing to compare with is not a failure of the finding
        path, line, _ = item.location
        report.outcome = "skipped"
        report.longrepr = (
            str(path),
            (line or 0) + 1,
            f"Skipped: {NO_SNAPSHOT_YET}: run with --snapshot-update to record this finding",
        )
        return report
    if call.excinfo is not None and isinstance(call.excinfo.value, NeuronSpecError):
        error = call.excinfo.value
        report.longrepr = f"{item.nodeid}: {type(error).__name__}: {error}"
    return report


NO_SNAPSHOT_YET = "no snapshot yet"


def _has_any_snapshot(assertion) -> bool:
    """Some snapshot of this test exists, under its default index or a custom name or index
    (syrupy's single-file extensions store them as ``<test>[<name>].json``)."""
    location = assertion.extension.get_location(test_location=assertion.test_location, index=0)
    directory, filename = os.path.split(location)
    stem = filename.removesuffix(f".{assertion.extension.file_extension}")
    if not os.path.isdir(directory):
        return False
    return any(
        f == filename or f.startswith((f"{stem}[", f"{stem}.")) for f in os.listdir(directory)
    )


def _only_missing_snapshots(item: pytest.Item) -> bool:
    """The test's ``findings_snapshot`` failed only because its snapshots do not exist yet
    (and ``--snapshot-update`` was not given, which would have created them)."""
    assertion = getattr(item, "funcargs", {}).get("findings_snapshot")
    executions = getattr(assertion, "executions", None)
    if not executions:
        return False
    failed = [r for r in executions.values() if not r.success]
    return bool(failed) and all(r.recalled_data is None and not r.created for r in failed)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """xdist controller: collect the findings a worker recorded."""
    payload = getattr(node, "workeroutput", {}).get("neuronspec_results")  # None: not active
    if payload:
        _WORKER_RESULTS.append(json.loads(payload))


def pytest_sessionfinish(session: pytest.Session, exitstatus) -> None:
    config = session.config
    if _SESSION_KEY not in config.stash:  # not a neuronspec project
        return
    from neuronspec.analyses.neuron_overlap import add_neuron_overlap
    from neuronspec.session import merge_results, write_results

    spec_session = _session(config)
    results = spec_session.results()
    spec_session.add_cards(results)
    if hasattr(config, "workeroutput"):  # xdist worker: hand results to the controller
        config.workeroutput["neuronspec_results"] = json.dumps(results)
        return
    results = add_neuron_overlap(merge_results([results, *_WORKER_RESULTS]))
    recorder = config.pluginmanager.get_plugin("neuronspec-run-recorder")
    if recorder is not None:  # run configuration, spec outcomes, snapshot drift, token texts
        results = recorder.complete(results, spec_session.config)
    path = config.option.neuronspec_results
    if path:
        write_results(results, Path(path))
    if spec_session.config.plots_dir is not None and results["models"]:
        from neuronspec.plots.overlays import write_overlays
        from neuronspec.plots.sparsity import write_overlap_figures

        write_overlays(results, spec_session.config.plots_dir)
        write_overlap_figures(results, spec_session.config.plots_dir)
    if recorder is not None:
        recorder.write_report(results)
