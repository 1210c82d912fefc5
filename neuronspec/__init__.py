"""neuronspec: reproducible findings about the neurons of language models, as pytest specs.

The public API, in one place and imported on first use (``import neuronspec`` itself
imports neither torch, transformers nor matplotlib)::

    from neuronspec import RunConfig, SpecSession, dead_neurons

    session = SpecSession(RunConfig(models=("tiny-mamba",)))
    finding = dead_neurons(session.stats("tiny-mamba"), layer=0)

An analysis joins the API with one entry in ``_API`` (name -> module).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API: dict[str, str] = {
    # sessions and configuration
    "SpecSession": "neuronspec.session",
    "RunConfig": "neuronspec.session",
    "CorpusConfig": "neuronspec.data.corpus",
    "StatsConfig": "neuronspec.capture.config",
    "NeuronStats": "neuronspec.capture.stats",
    "load_model": "neuronspec.models.registry",
    "Finding": "neuronspec.findings",
    "NeuronSpecError": "neuronspec.errors",
    "findings_extension": "neuronspec.snapshot",
    # analyses' entry points (Voita et al. 2023 §3-5)
    "dead_neurons": "neuronspec.analyses.dead",
    "dead_neurons_all_layers": "neuronspec.analyses.dead",
    "ngram_layer_from_stats": "neuronspec.analyses.ngram",
    "summarise_token_detectors": "neuronspec.analyses.ngram",
    "positional_layer_from_stats": "neuronspec.analyses.positional",
    # presentation of a results file
    "load_results": "neuronspec.report.results",
    "diff_results": "neuronspec.report.diff",
    "write_report": "neuronspec.report.html",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'neuronspec' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
