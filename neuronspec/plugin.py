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

import argparse
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
    from neuronspec.analyses.attention_options import AGGREGATES, DEFAULT_AGGREGATE
    from neuronspec.data.corpus import DEFAULT_CORPUS, DEFAULT_WINDOW
    from neuronspec.models.registry import DEFAULT_MODELS

    group = parser.getgroup("neuronspec", "neuron specs")
    group.addoption(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help="comma-separated model ids or local checkpoint directories "
        f"(default: the embedded {', '.join(DEFAULT_MODELS)})",
    )
    group.addoption(
        "--corpus",
        default=DEFAULT_CORPUS,
        help="toyworld (default), wikitext2, or a local .txt/.jsonl file",
    )
    group.addoption("--text-limit", type=int, default=None, help="use at most N documents")
    group.addoption("--max-tokens", type=int, default=None, help="use at most N analysis tokens")
    group.addoption(
        "--window",
        type=int,
        default=DEFAULT_WINDOW,
        help=f"tokens per analysis window (default {DEFAULT_WINDOW})",
    )
    group.addoption(
        "--neuronspec-cache",
        default=".neuronspec-cache",
        help="statistics cache directory, or 'none' to disable",
    )
    group.addoption("--plots-dir", default=None, help="write figures to this directory")
    group.addoption("--device", default="cpu", help="auto, cpu or cuda (default cpu)")
    group.addoption("--dtype", default="float32", help="float32 (default), float64, bfloat16")
    group.addoption("--batch-size", type=int, default=16, help="windows per forward pass")
    group.addoption(
        "--no-fast-scan",
        action="store_true",
        help="use the HF reference Mamba scan instead of neuronspec's fast exact scan",
    )
    group.addoption(
        "--layers",
        default=None,
        help="comma-separated layer indices the per-layer analyses run on (default: all)",
    )
    group.addoption(
        "--trigrams",
        action="store_true",
        help="also count (neuron, trigram) firings and report trigram-detecting neurons "
        "(Voita et al. §4, trigram variant: 1-50 trigrams, same 95%% rules); larger statistics",
    )
    group.addoption(
        "--top-k",
        type=int,
        default=10,
        help="neurons reported per ranking: top delta-sensitive, attention, causal (default 10)",
    )
    group.addoption(
        "--attention-methods",
        default="attention_weighted,gradient_guided,rollout",
        type=_attention_methods,
        help="attention-neuron methods: comma-separated attention_weighted, gradient_guided, "
        "rollout (default all three)",
    )
    group.addoption(
        "--attention-aggregate",
        default=DEFAULT_AGGREGATE,
        choices=AGGREGATES,
        help="channel mean of |α̃| (abs, default) or of α̃ (mean, METHODS §7; undefined where "
        "a row of I + mean α̃ sums to <= 0, which raises) that the Mamba rollout takes",
    )
    group.addoption(
        "--attention-prompts",
        type=_positive_int,
        default=4,
        help="corpus windows the hidden-attention analyses run on (default 4)",
    )
    group.addoption(
        "--delta-prompts",
        type=_positive_int,
        default=8,
        help="corpus windows of the delta-sensitivity perturbation score (default 8)",
    )
    group.addoption(
        "--pruning-ratio",
        type=float,
        default=0.15,
        help="fraction of each layer's mlp neurons the pruning study removes (default 0.15)",
    )
    group.addoption(
        "--ig-steps",
        type=int,
        default=20,
        help="Riemann steps m of integrated gradients for knowledge neurons (default 20)",
    )
    group.addoption(
        "--facts",
        default=None,
        help="knowledge-neuron facts: a JSON/JSONL file (subject, relation, object, prompts); "
        "default: the toy world for embedded models, the shipped English set otherwise",
    )
    group.addoption(
        "--knowledge-facts-per-relation",
        type=int,
        default=3,
        help="facts per relation used for knowledge neurons (default 3; 0: all)",
    )
    group.addoption(
        "--knowledge-templates",
        default="train",
        choices=("train", "heldout", "all"),
        help="toy-world prompt templates for knowledge neurons (default train)",
    )
    group.addoption(
        "--neuronspec-results",
        default=None,
        help="write every finding of the run to this JSON file",
    )
    group.addoption(
        "--neuronspec-report",
        default=None,
        help="write the run's HTML report (findings, figures, spec outcomes, drift) to this directory",
    )


def _attention_methods(text: str) -> tuple[str, ...]:
    from neuronspec.analyses.attention_options import parse_methods

    try:
        return parse_methods(text)
    except NeuronSpecError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _run_config(config: pytest.Config) -> RunConfig:
    from neuronspec.capture.stats import StatsConfig
    from neuronspec.data.corpus import CorpusConfig
    from neuronspec.models.registry import resolve
    from neuronspec.session import RunConfig

    option = config.option
    models = tuple(m.strip() for m in option.models.split(",") if m.strip())
    if not models:
        raise pytest.UsageError("--models is empty; give at least one model id")
    for model_id in models:
        try:
            resolve(model_id)
        except NeuronSpecError as error:
            raise pytest.UsageError(str(error)) from None
    if option.batch_size < 1:
        raise pytest.UsageError(f"--batch-size must be at least 1, got {option.batch_size}")
    if option.top_k < 1:
        raise pytest.UsageError(f"--top-k must be at least 1, got {option.top_k}")
    if not 0.0 < option.pruning_ratio < 1.0:
        raise pytest.UsageError(f"--pruning-ratio must lie in (0, 1), got {option.pruning_ratio}")
    layers = None
    if option.layers is not None:
        try:
            layers = tuple(sorted({int(part) for part in option.layers.split(",") if part.strip()}))
        except ValueError:
            raise pytest.UsageError(
                f"--layers must be comma-separated layer indices such as 0,2,3; got {option.layers!r}"
            ) from None
        if not layers:
            raise pytest.UsageError("--layers is empty; give at least one layer index")
    try:
        corpus = CorpusConfig(
            name=option.corpus,
            window=option.window,
            text_limit=option.text_limit,
            max_tokens=option.max_tokens,
        )
    except NeuronSpecError as error:
        raise pytest.UsageError(str(error)) from None
    for model_id in models:  # checked here, so an error is one line, before collection
        n_layers = _n_layers(model_id)  # a damaged config.json is a usage error
        if layers is not None and n_layers is not None:
            try:
                RunConfig(layers=layers).layers_of(n_layers, model=model_id)
            except NeuronSpecError as error:
                raise pytest.UsageError(str(error)) from None
    cache = option.neuronspec_cache
    return RunConfig(
        models=models,
        corpus=corpus,
        stats=StatsConfig(trigrams=option.trigrams),
        cache_dir=None if cache.lower() == "none" else Path(cache),
        plots_dir=Path(option.plots_dir) if option.plots_dir else None,
        device=option.device,
        dtype=option.dtype,
        batch_size=option.batch_size,
        fast_scan=not option.no_fast_scan,
        layers=layers,
        top_k=option.top_k,
        pruning_ratio=option.pruning_ratio,
    )


def pytest_configure(config: pytest.Config) -> None:
    if not is_active(config):
        return
    from neuronspec.heap import keep_malloc_heap
    from neuronspec.session import SpecSession

    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    _share_cores_among_workers()
    keep_malloc_heap()
    config.stash[_SESSION_KEY] = SpecSession(_run_config(config))
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
    """The checkpoint's config.json without loading weights; None if absent. A damaged
    config.json is a usage error naming the file, not a skip."""
    from neuronspec.models.registry import read_config, resolve

    try:
        source = resolve(model_id)
        if source.local_dir is not None:
            directory = source.local_dir
        else:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(source.repo, "config.json")
            if not isinstance(found, str):
                return None
            directory = Path(found).parent
        return read_config(directory)
    except FileNotFoundError:
        return None
    except NeuronSpecError as error:
        raise pytest.UsageError(str(error)) from None


def _n_layers(model_id: str) -> int | None:
    """Layer count from the checkpoint's config.json; None if absent."""
    config = _checkpoint_config(model_id) or {}
    for key in ("n_layer", "num_hidden_layers"):
        if key in config:
            return int(config[key])
    return None


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
    yield assertion
    drift = snapshot_drift(assertion, nodeid=request.node.nodeid)
    if drift:
        request.node.user_properties.append((DRIFT, json.dumps(drift)))


# -- reporting ----------------------------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if not is_active(item.config):
        return report
    from neuronspec.report.outcomes import item_properties

    report.user_properties.extend(item_properties(item))  # hypothesis, model, layer: the report
    if call.excinfo is not None and isinstance(call.excinfo.value, NeuronSpecError):
        error = call.excinfo.value
        report.longrepr = f"{item.nodeid}: {type(error).__name__}: {error}"
    return report


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
