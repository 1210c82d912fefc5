"""A run's models, corpora, statistics and findings, loaded or computed once per process.

The pytest plugin holds one :class:`SpecSession`; it is plain Python so notebooks and
scripts can use the same caching::

    session = SpecSession(RunConfig(models=("tiny-mamba",)))
    stats = session.stats("tiny-mamba")
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from neuronspec.capture.config import StatsConfig
from neuronspec.capture.runner import cached_stats
from neuronspec.capture.stats import NeuronStats
from neuronspec.data.corpus import CorpusConfig, CorpusTexts, load_corpus_texts
from neuronspec.data.windows import TokenWindows, build_windows
from neuronspec.errors import LayerOutOfRangeError
from neuronspec.findings import to_plain
from neuronspec.models.registry import (
    LoadedModel,
    ModelFiles,
    checkpoint_layers,
    load_model,
    open_model,
    pick_dtype,
    resolve,
)
from neuronspec.options import REPORT_TOP_CONTEXTS, default, field_values


@dataclass(frozen=True)
class RunConfig:
    """Everything a run's numbers depend on, as given on the command line. Every default is
    the options table's (:data:`neuronspec.options.OPTIONS`)."""

    models: tuple[str, ...] = default("models")
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    cache_dir: Path | None = default("cache_dir")
    plots_dir: Path | None = default("plots_dir")
    device: str = default("device")
    dtype: str = default("dtype")
    batch_size: int = default("batch_size")
    fast_scan: bool = default("fast_scan")
    keep_malloc_heap: bool = default("keep_malloc_heap")
    layers: tuple[int, ...] | None = default("layers")  # per-layer analyses (None: all)
    top_k: int = default("top_k")  # neurons reported per ranking
    pruning_ratio: float = default("pruning_ratio")  # fraction of each layer pruned
    attention_methods: tuple[str, ...] = default("attention_methods")
    attention_aggregate: str = default("attention_aggregate")
    attention_prompts: int = default("attention_prompts")
    delta_prompts: int = default("delta_prompts")
    control_seeds: int = default("control_seeds")
    ig_steps: int = default("ig_steps")
    facts: str | None = default("facts")
    knowledge_facts_per_relation: int = default("knowledge_facts_per_relation")
    knowledge_templates: str = default("knowledge_templates")

    @classmethod
    def from_options(
        cls, values: Mapping[str, Any] | Any, *, for_report: bool = False
    ) -> RunConfig:
        """The run parsed options describe (pytest's ``config.option`` or an argparse
        namespace, keyed by the options' ``dest``). Raises :class:`NeuronSpecError` naming an
        option whose value is out of range. ``for_report``: the run writes a report or a card,
        so ``--top-contexts`` not given means :data:`~neuronspec.options.REPORT_TOP_CONTEXTS`
        (else 0)."""
        given = field_values(values if isinstance(values, Mapping) else vars(values))
        if given["stats.top_contexts"] is None:
            given["stats.top_contexts"] = REPORT_TOP_CONTEXTS if for_report else 0
        nested: dict[str, dict[str, Any]] = {"corpus": {}, "stats": {}}
        top: dict[str, Any] = {}
        for name, value in given.items():
            head, _, tail = name.partition(".")
            if tail:
                nested[head][tail] = value
            else:
                top[name] = value
        return cls(
            corpus=CorpusConfig(**nested["corpus"]), stats=StatsConfig(**nested["stats"]), **top
        )

    def check_models(self) -> None:
        """Every model id resolves and every ``--layers`` index exists in each model whose
        config is on disk; raises :class:`NeuronSpecError` naming what is wrong."""
        for model_id in self.models:
            resolve(model_id)
            n_layers = checkpoint_layers(model_id)
            if self.layers is not None and n_layers is not None:
                self.layers_of(n_layers, model=model_id)

    def layers_of(self, n_layers: int, *, model: str = "") -> list[int]:
        """The layers per-layer analyses run on for a model with ``n_layers`` layers.

        Raises :class:`LayerOutOfRangeError` naming the model and its valid range when
        ``--layers`` asks for a layer the model does not have.
        """
        if self.layers is None:
            return list(range(n_layers))
        outside = [layer for layer in self.layers if not 0 <= layer < n_layers]
        if outside:
            raise LayerOutOfRangeError(
                f"--layers asks for layer(s) {outside} but {model or 'the model'} has "
                f"{n_layers} layers (0..{n_layers - 1}); pass layers in that range"
            )
        return list(self.layers)


class SpecSession:
    """Per-process store of loaded models, token windows, statistics and recorded findings."""

    def __init__(self, config: RunConfig):
        self.config = config
        if config.keep_malloc_heap:
            from neuronspec.heap import keep_malloc_heap

            keep_malloc_heap()
        self._files: dict[str, ModelFiles] = {}
        self._models: dict[str, LoadedModel] = {}
        self._texts: CorpusTexts | None = None
        self._corpora: dict[str, TokenWindows] = {}
        self._stats: dict[str, NeuronStats] = {}
        self.findings: dict[str, dict[str, dict[str, Any]]] = {}
        self.model_info: dict[str, dict[str, Any]] = {}

    def files(self, model_id: str) -> ModelFiles:
        """The checkpoint on disk: weights hash and tokenizer, no model instantiated."""
        if model_id not in self._files:
            self._files[model_id] = open_model(model_id)
        return self._files[model_id]

    def model(self, model_id: str) -> LoadedModel:
        if model_id not in self._models:
            self._models[model_id] = load_model(
                model_id,
                device=self.config.device,
                dtype=self.config.dtype,
                fast_scan=self.config.fast_scan,
                files=self.files(model_id),
            )
        return self._models[model_id]

    def release_model(self, model_id: str) -> None:
        """Drop the loaded model (its weights), keeping its statistics and findings."""
        self._models.pop(model_id, None)

    def corpus(self, model_id: str) -> TokenWindows:
        if model_id not in self._corpora:
            if self._texts is None:
                self._texts = load_corpus_texts(self.config.corpus)
            self._corpora[model_id] = build_windows(
                self.files(model_id).tokenizer_ref,
                self.config.corpus,
                texts=self._texts,
                cache_dir=self.config.cache_dir,
            )
        return self._corpora[model_id]

    def stats(self, model_id: str) -> NeuronStats:
        if model_id not in self._stats:
            files, corpus = self.files(model_id), self.corpus(model_id)
            stats = cached_stats(
                lambda: self.model(model_id),  # only on a cache miss
                corpus,
                fingerprint=files.fingerprint,
                dtype=pick_dtype(self.config.dtype),
                config=self.config.stats,
                cache_dir=self.config.cache_dir,
                batch_size=self.config.batch_size,
                device=self.config.device,
                fast_scan=self.config.fast_scan,
                model_type=files.model_type,
            )
            self._stats[model_id] = stats
            self.model_info[model_id] = {
                "source": files.source,
                "model_type": files.model_type,
                "n_layers": stats.n_layers,
                "corpus": corpus.corpus,
                "corpus_fingerprint": corpus.fingerprint,
                "n_tokens": stats.n_tokens,
                "window": corpus.window,
                "stats_config": self.config.stats.to_json(),
                "dtype": self.config.dtype,
            }
        return self._stats[model_id]

    def record(
        self, model_id: str, analysis: str, finding: Any, *, layer: int | None = None
    ) -> None:
        """Keep a finding for the run's results file: model → analysis → layer → values."""
        per_analysis = self.findings.setdefault(model_id, {}).setdefault(analysis, {})
        per_analysis["all" if layer is None else str(layer)] = to_plain(
            finding.to_json() if hasattr(finding, "to_json") else finding
        )

    def record_neuron_set(
        self,
        model_id: str,
        kind: str,
        layer: int,
        neurons: Any,
        *,
        site: str = "mlp",
        evidence: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> None:
        """Record the neurons of one type that an analysis found in a layer (e.g. ``dead``,
        ``positional``, ``delta_sensitive``, ``knowledge``), for the neuron-type overlap and
        the neuron cards.

        Stored in the results under the analysis ``neuron_sets``: ``{layer: {kind: {"site":
        site, "neurons": sorted ids, "evidence": {id: {number name: value}}}}}``. ``evidence``
        holds the finding's own numbers for a neuron (its KL impact, IG attribution, Δ
        variance, ...), shown on its card. Any analysis joins the overlap by calling this.
        """
        layers = self.findings.setdefault(model_id, {}).setdefault("neuron_sets", {})
        entry: dict[str, Any] = {"site": site, "neurons": sorted(int(n) for n in neurons)}
        if evidence:
            entry["evidence"] = {
                str(int(n)): to_plain(dict(numbers)) for n, numbers in sorted(evidence.items())
            }
        layers.setdefault(str(layer), {})[kind] = entry

    def add_cards(self, results: dict[str, Any]) -> None:
        """Neuron cards (:mod:`neuronspec.cards`) of every neuron this process's neuron sets
        name, for the models whose statistics it holds, into ``results``."""
        from neuronspec.cards import cards_for_run

        for model_id, entry in results["models"].items():
            sets = entry["analyses"].get("neuron_sets")
            if not sets or model_id not in self._stats:
                continue
            stats, windows = self._stats[model_id], self._corpora[model_id].analysis
            entry["cards"] = cards_for_run(model_id, stats, windows, sets)

    def results(self) -> dict[str, Any]:
        return {
            "config": {
                "corpus": asdict(self.config.corpus),
                "stats": self.config.stats.to_json(),
                "dtype": self.config.dtype,
            },
            "models": {
                model_id: {"info": self.model_info.get(model_id, {}), "analyses": analyses}
                for model_id, analyses in sorted(self.findings.items())
            },
        }


def merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge results of several processes (xdist workers): union of models and analyses."""
    merged: dict[str, Any] = {"config": {}, "models": {}}
    for part in parts:
        merged["config"] = part.get("config") or merged["config"]
        for model_id, entry in part.get("models", {}).items():
            target = merged["models"].setdefault(model_id, {"info": {}, "analyses": {}})
            target["info"].update(entry.get("info", {}))
            if entry.get("cards"):
                target.setdefault("cards", {}).update(entry["cards"])
            for analysis, layers in entry.get("analyses", {}).items():
                merged_layers = target["analyses"].setdefault(analysis, {})
                if analysis == "neuron_sets":  # kinds of one layer may come from several workers
                    for layer, kinds in layers.items():
                        merged_layers.setdefault(layer, {}).update(kinds)
                else:
                    merged_layers.update(layers)
    return merged


def write_results(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(results, indent=1, sort_keys=True))
    os.replace(temporary, path)
