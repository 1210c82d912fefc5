"""Finding fixtures: one session-scoped fixture per analysis, in every opted-in project.

The plugin registers this module when a project opts in (``neuronspec = "true"``). Each
fixture is named after the analysis's results name, computes its finding once per model
and worker from the cached statistics (or the model, for interventions), records it in
the run's results file and its neuron sets for the overlap, and is lazy: a spec that asks
for ``dead`` computes nothing else. Per-layer findings are a
:class:`~neuronspec.findings.LayerFindings`, indexed by layer number::

    def test_few_dead(model_id, layer, dead):
        assert dead[layer].dead_fraction < 0.05

| fixture | value | METHODS |
|---|---|---|
| ``dead``, ``ngram``, ``positional``, ``sparsity`` | ``LayerFindings`` of the layer findings | §2–§4, §9 |
| ``delta_sensitive_sets`` | the ``top_k`` Δ (Mamba) / high-variance (GPT-2) channels per layer | §5 |
| ``delta_sensitive`` | :class:`DeltaSensitiveRun`: findings per layer and both scores | §5 |
| ``hidden_attention`` | the :class:`~neuronspec.analyses.attention_neurons.AttentionRun` | §7 |
| ``attention_neurons`` | ``LayerFindings`` of ``{method: AttentionNeuronFinding}`` | §7 |
| ``knowledge_neurons`` | ``(KnowledgeNeuronsFinding, [KnowledgeOverlapFinding])`` | §8 |
| ``ablation``, ``pruning`` | the ablation study and the pruning study | §10 |
| ``causal``, ``causal_delta_sensitive`` | causal sweeps of the top candidates / the Δ channels | §6 |
| ``efficiency`` | ``(EfficiencyFinding, ThroughputFinding)`` | §11 |
| ``comparison`` | the first Mamba against the first Transformer of ``--models`` | §11 |
| ``neuron_overlap`` | overlap of dead, rarely firing, token-detecting and positional sets | — |

``default_selection`` skips a snapshot spec when the run selects other layers, top-k or
pruning ratio than the defaults its snapshot was taken with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from neuronspec.findings import LayerFindings
from neuronspec.options import BY_FIELD, default
from neuronspec.plots.of_findings import draw_figures

SELECTION_FIELDS = (  # RunConfig fields that change what a snapshot spec's findings hold
    "layers",
    "top_k",
    "pruning_ratio",
    "control_seeds",
    "attention_methods",
    "attention_aggregate",
    "attention_prompts",
    "delta_prompts",
    "ig_steps",
    "facts",
    "knowledge_facts_per_relation",
    "knowledge_templates",
)
RARE_CUTOFF = 0.05  # METHODS §2: rarely firing is freq_cutoff < frequency < 0.05
VOITA_KINDS = ("dead", "rarely_firing", "token_detecting", "positional")  # neuron_overlap's sets


@pytest.fixture(scope="session")
def default_selection(neuronspec_session):
    """Skip a snapshot spec when the run selects other layers, top-k, pruning ratio or
    analysis settings than the defaults its snapshot was taken with (its findings would
    differ by construction). Name it first among a spec's fixtures, so the skip comes before
    the costly ones."""
    config = neuronspec_session.config
    changed = [
        BY_FIELD[name].flag for name in SELECTION_FIELDS if getattr(config, name) != default(name)
    ]
    if changed:
        pytest.skip(f"the snapshot holds the default selection; run without {', '.join(changed)}")


def _record_layers(session, model_id: str, analysis: str, findings) -> LayerFindings:
    for finding in findings:
        session.record(model_id, analysis, finding, layer=finding.layer)
    return LayerFindings(analysis, findings)


# -- from the cached statistics (METHODS §2–§4, §9) ----------------------------------------------


@pytest.fixture(scope="session")
def dead(neuronspec_session, model_id, neuron_stats) -> LayerFindings:
    """Voita et al. 2023 §3 dead neurons of every layer (``DeadLayerFinding``); records the
    sets ``dead`` and ``rarely_firing``."""
    from neuronspec.analyses.dead import dead_neurons_all_layers

    findings = dead_neurons_all_layers(neuron_stats, rare_cutoff=RARE_CUTOFF)
    for finding in findings:
        layer = finding.layer
        neuronspec_session.record_neuron_set(model_id, "dead", layer, finding.dead_neurons)
        frequency = neuron_stats.layer(layer).fire_count.double() / neuron_stats.n_tokens
        rare = ((frequency > 0) & (frequency < RARE_CUTOFF)).nonzero().flatten().tolist()
        neuronspec_session.record_neuron_set(model_id, "rarely_firing", layer, rare)
    found = _record_layers(neuronspec_session, model_id, "dead", findings)
    draw_figures(neuronspec_session, "dead", model_id, found)
    return found


@pytest.fixture(scope="session")
def ngram(neuronspec_session, model_id, neuron_stats) -> LayerFindings:
    """Voita et al. §4 n-gram findings of every layer (``NgramFindings``: per layer an
    ``NgramLayerFinding``, and their ``summary``); records the
    ``token_detector_summary`` and the sets ``token_detecting`` (and ``trigram_detecting``
    with ``--trigrams``)."""
    from neuronspec.analyses.ngram import NgramFindings, ngram_layer_from_stats

    findings = [
        ngram_layer_from_stats(neuron_stats, layer, model=model_id)
        for layer in range(neuron_stats.n_layers)
    ]
    found = NgramFindings(findings)
    neuronspec_session.record(model_id, "token_detector_summary", found.summary)
    for finding in findings:
        neuronspec_session.record_neuron_set(
            model_id,
            "token_detecting",
            finding.layer,
            finding.detector_tokens,
            evidence={n: {"detected_tokens": t} for n, t in finding.detector_tokens.items()},
        )
        if finding.detector_trigrams is not None:  # --trigrams
            neuronspec_session.record_neuron_set(
                model_id,
                "trigram_detecting",
                finding.layer,
                finding.detector_trigrams,
                evidence={n: {"trigram_keys": t} for n, t in finding.detector_trigrams.items()},
            )
    for finding in findings:
        neuronspec_session.record(model_id, "ngram", finding, layer=finding.layer)
    draw_figures(neuronspec_session, "ngram", model_id, found)
    return found


@pytest.fixture(scope="session")
def positional(neuronspec_session, model_id, neuron_stats) -> LayerFindings:
    """Voita et al. §5 positional findings of every layer (``PositionalLayerFinding``)."""
    from neuronspec.analyses.positional import positional_layer_from_stats

    findings = [
        positional_layer_from_stats(neuron_stats, layer, model=model_id)
        for layer in range(neuron_stats.n_layers)
    ]
    for finding in findings:
        numbers = {"mutual_information": finding.mutual_information}
        if finding.mean_abs_pearson is not None:
            numbers["mean_abs_pearson"] = finding.mean_abs_pearson
        neuronspec_session.record_neuron_set(
            model_id,
            "positional",
            finding.layer,
            finding.positional_neurons,
            evidence={
                n: {name: values[i] for name, values in numbers.items()}
                for i, n in enumerate(finding.positional_neurons)
            },
        )
    found = _record_layers(neuronspec_session, model_id, "positional", findings)
    draw_figures(neuronspec_session, "positional", model_id, found, neuron_stats=neuron_stats)
    return found


@pytest.fixture(scope="session")
def sparsity(neuronspec_session, model_id, model_files, neuron_stats) -> LayerFindings:
    """METHODS §9 sparsity of every layer with the family τ (``SparsityLayerFinding``)."""
    from neuronspec.analyses.sparsity import default_tau, sparsity_all_layers

    findings = sparsity_all_layers(neuron_stats, tau=default_tau(model_files.model_type))
    found = _record_layers(neuronspec_session, model_id, "sparsity", findings)
    draw_figures(neuronspec_session, "sparsity", model_id, found)
    return found


@pytest.fixture(scope="session")
def neuron_overlap(neuronspec_session, model_id, dead, ngram, positional) -> LayerFindings:
    """Per layer, the overlap of the dead, rarely firing, token-detecting and positional sets
    (``NeuronOverlapLayerFinding``). The run-wide overlap, over every set any analysis
    recorded, is computed at the end of the session into the results file."""
    from neuronspec.analyses.neuron_overlap import neuron_overlap_layer

    sets = neuronspec_session.findings[model_id]["neuron_sets"]
    return LayerFindings(
        "neuron_overlap",
        [
            neuron_overlap_layer(
                int(layer),
                {kind: entry["neurons"] for kind, entry in kinds.items() if kind in VOITA_KINDS},
            )
            for layer, kinds in sets.items()
        ],
    )


# -- Δ and hidden attention (METHODS §5, §7) -------------------------------------------------------


@pytest.fixture(scope="session")
def delta_sensitive_sets(neuronspec_session, model_id, neuron_stats):
    """The ``--top-k`` delta-sensitive Δ channels (``dt`` site, Mamba) or high-variance
    ``mlp`` neurons (GPT-2) of each layer of the run, by the streamed variance score
    (:func:`~neuronspec.analyses.delta_sensitive.delta_sensitive_sets`)."""
    from neuronspec.analyses.delta_sensitive import delta_sensitive_sets as sets_of

    config = neuronspec_session.config
    layers = config.layers_of(neuron_stats.n_layers, model=model_id)
    return sets_of(neuron_stats, top_k=config.top_k, layers=layers)


@dataclass(frozen=True)
class DeltaSensitiveRun:
    """``findings[layer]`` (``DeltaSensitiveFinding``) and both scores per layer, each
    float64 ``(W,)``: ``variance[layer]``, ``perturbation[layer]``."""

    findings: LayerFindings
    variance: dict[int, np.ndarray]
    perturbation: dict[int, np.ndarray]

    def __getitem__(self, layer: int):
        return self.findings[layer]


@pytest.fixture(scope="session")
def delta_sensitive(
    neuronspec_session, model_id, neuron_stats, delta_sensitive_sets, loaded_model, corpus
) -> DeltaSensitiveRun:
    """METHODS §5 per layer: variance and perturbation (``--delta-prompts`` windows) scores,
    recorded under ``delta_sensitive`` and as neuron sets."""
    from neuronspec.analyses.delta_sensitive import (
        DEFAULT_SEED,
        DEFAULT_SUBSTITUTIONS,
        delta_sensitive_layer,
        perturbation_scores,
        variance_scores,
    )

    sets = delta_sensitive_sets
    layers = list(sets.by_layer)
    prompts = corpus.analysis[: neuronspec_session.config.delta_prompts]
    perturbation = perturbation_scores(
        loaded_model,
        prompts,
        site=sets.site,
        layers=layers,
        substitutions=DEFAULT_SUBSTITUTIONS,
        bos_id=corpus.bos_id,
        seed=DEFAULT_SEED,
        vocab_size=min(corpus.vocab_size, int(loaded_model.model.config.vocab_size)),
    )
    variance = {layer: variance_scores(neuron_stats, layer, sets.site) for layer in layers}
    findings = []
    for layer in layers:
        finding = delta_sensitive_layer(
            neuron_stats,
            perturbation[layer],
            layer,
            model=model_id,
            top_k=neuronspec_session.config.top_k,
            n_prompts=len(prompts),
            substitutions=DEFAULT_SUBSTITUTIONS,
            seed=DEFAULT_SEED,
        )
        findings.append(finding)
        neuronspec_session.record(model_id, "delta_sensitive", finding, layer=layer)
        neuronspec_session.record_neuron_set(
            model_id,
            sets.kind,
            layer,
            sets.by_layer[layer],
            site=sets.site,
            evidence={
                n: {
                    "variance_score": float(variance[layer][n]),
                    "perturbation_score": float(perturbation[layer][n]),
                }
                for n in sets.by_layer[layer]
            },
        )
    run = DeltaSensitiveRun(LayerFindings("delta_sensitive", findings), variance, perturbation)
    draw_figures(neuronspec_session, "delta_sensitive", model_id, run)
    return run


@pytest.fixture(scope="session")
def hidden_attention(neuronspec_session, model_id, loaded_model, corpus):
    """Hidden attention (Mamba), rollouts and attention neurons on the first
    ``--attention-prompts`` corpus windows, plus rollout relevance on the run's fact prompts
    (``--facts``, else the toy world or the English set): an
    :class:`~neuronspec.analyses.attention_neurons.AttentionRun`. Recorded under
    ``hidden_attention`` (per layer; ``all``: rollouts and fact relevance) and
    ``attention_neurons`` (per layer)."""
    from neuronspec.analyses.attention_neurons import analyse_attention, fact_relevance
    from neuronspec.data.facts import run_facts
    from neuronspec.models.registry import EMBEDDED_MODELS

    config = neuronspec_session.config
    layers = config.layers_of(loaded_model.n_layers, model=model_id)
    run = analyse_attention(
        loaded_model,
        corpus.analysis[: config.attention_prompts],
        model=model_id,
        layers=layers,
        methods=config.attention_methods,
        top_k=config.top_k,
        aggregate=config.attention_aggregate,
    )
    facts = run_facts(config.facts, embedded=model_id in EMBEDDED_MODELS)
    run.fact_relevance = fact_relevance(
        loaded_model, facts, model=model_id, aggregate=config.attention_aggregate
    )
    record = neuronspec_session.record
    for finding in run.layer_findings:
        record(model_id, "hidden_attention", finding, layer=finding.layer)
    record(
        model_id,
        "hidden_attention",
        {
            "rollout": {f.method: f.to_json() for f in run.rollout_findings},
            "fact_relevance": {f.method: f.to_json() for f in run.fact_relevance},
        },
    )
    for layer in layers:
        per_method = {f.method: f.to_json() for f in run.neuron_findings if f.layer == layer}
        if per_method:
            record(model_id, "attention_neurons", per_method, layer=layer)
            first = next(f for f in run.neuron_findings if f.layer == layer)
            importance: dict[int, dict[str, float]] = {n: {} for n in first.top_neurons}
            for f in run.neuron_findings:  # every method's mean importance of the first's top set
                if f.layer == layer:
                    per_prompt = run.scores[f.method, layer].importance  # (P, W)
                    for n in first.top_neurons:
                        importance[n][f"{f.method}_importance"] = float(per_prompt[:, n].mean())
            neuronspec_session.record_neuron_set(
                model_id, "attention", layer, first.top_neurons, site="mlp", evidence=importance
            )
    draw_figures(
        neuronspec_session, "hidden_attention", model_id, run, tokenizer=loaded_model.tokenizer
    )
    return run


@dataclass(frozen=True)
class _MethodFindings:
    layer: int
    by_method: dict

    def __getitem__(self, method: str):
        return self.by_method[method]


@pytest.fixture(scope="session")
def attention_neurons(hidden_attention) -> LayerFindings:
    """METHODS §7 attention neurons per layer: ``attention_neurons[layer][method]`` is the
    ``AttentionNeuronFinding`` of that method (``--attention-methods``)."""
    layers = sorted({f.layer for f in hidden_attention.neuron_findings})
    return LayerFindings(
        "attention_neurons",
        [
            _MethodFindings(
                layer, {f.method: f for f in hidden_attention.neuron_findings if f.layer == layer}
            )
            for layer in layers
        ],
    )


# -- interventions (METHODS §6, §8, §10) -----------------------------------------------------------


@pytest.fixture(scope="session")
def ablation(
    neuronspec_session, model_id, loaded_model, corpus, neuron_stats, dead, positional,
    delta_sensitive_sets,
):  # fmt: skip
    """METHODS §10 ablation study: baseline, dead, positional, the Δ / high-variance set and
    dead ∪ positional, each next to its random control, on the held-out windows."""
    from neuronspec.analyses.ablation import ablation_study, standard_conditions
    from neuronspec.interventions.ablation import Condition, corpus_means

    sets = delta_sensitive_sets
    sensitive = Condition(sets.kind, sets.site, sets.by_layer)  # ablated at its own site
    conditions = standard_conditions(list(dead), list(positional), sensitive=sensitive)
    means = corpus_means(neuron_stats)  # mlp, and dt (the Δ channels) for Mamba
    study = ablation_study(
        loaded_model,
        corpus.heldout,
        conditions,
        means=means,
        n_seeds=neuronspec_session.config.control_seeds,
    )
    neuronspec_session.record(model_id, "ablation", study)
    draw_figures(neuronspec_session, "ablation", model_id, study)
    return study


@pytest.fixture(scope="session")
def pruning(
    neuronspec_session, model_id, loaded_model, corpus, neuron_stats, dead, positional,
    delta_sensitive_sets,
):  # fmt: skip
    """METHODS §10 pruning by priority (dead > positional > other) to ``--pruning-ratio``,
    never removing the Δ / high-variance set (Mamba's Δ channel c is ``mlp`` neuron c)."""
    from neuronspec.analyses.ablation import pruning_study

    protected = {layer: tuple(ids) for layer, ids in delta_sensitive_sets.by_layer.items()}
    finding = pruning_study(
        loaded_model,
        corpus.heldout,
        neuron_stats,
        list(dead),
        list(positional),
        ratio=neuronspec_session.config.pruning_ratio,
        protected=protected,
        n_seeds=neuronspec_session.config.control_seeds,
    )
    neuronspec_session.record(model_id, "pruning", finding)
    draw_figures(neuronspec_session, "pruning", model_id, finding)
    return finding


@pytest.fixture(scope="session")
def causal_cache(loaded_model, corpus):
    """The causal sweeps' KL screens and exact measurements (METHODS §6), each run once."""
    from neuronspec.analyses.causal import DEFAULT_N_PROMPTS, CausalCache, causal_prompts

    return CausalCache(loaded_model, *causal_prompts(corpus.heldout, DEFAULT_N_PROMPTS))


@pytest.fixture(scope="session")
def causal(neuronspec_session, model_id, loaded_model, neuron_stats, causal_cache):
    """METHODS §6 causal sweep: every neuron screened, the ``--top-k`` candidates of each
    layer measured exactly on the first held-out windows; records the set ``causal``."""
    from neuronspec.analyses.causal import causal_neurons

    config = neuronspec_session.config
    finding = causal_neurons(
        loaded_model,
        causal_cache.prompts,
        neuron_stats,
        layers=config.layers_of(neuron_stats.n_layers, model=model_id),
        top_k=config.top_k,
        n_controls=config.control_seeds,
        cache=causal_cache,
    )
    neuronspec_session.record(model_id, "causal", finding)
    for layer in finding.layers:
        neuronspec_session.record_neuron_set(
            model_id, "causal", layer.layer, layer.causal_neurons, evidence=layer.evidence()
        )
    draw_figures(neuronspec_session, "causal", model_id, finding)
    return finding


@pytest.fixture(scope="session")
def causal_delta_sensitive(
    neuronspec_session, model_id, loaded_model, neuron_stats, delta_sensitive_sets, causal_cache
):
    """The causal sweep of the Δ (or high-variance) channels at their own site."""
    from neuronspec.analyses.causal import causal_neurons

    finding = causal_neurons(
        loaded_model,
        causal_cache.prompts,
        neuron_stats,
        top_k=neuronspec_session.config.top_k,
        neuron_sets=delta_sensitive_sets,
        n_controls=neuronspec_session.config.control_seeds,
        cache=causal_cache,
    )
    neuronspec_session.record(model_id, "causal_delta_sensitive", finding)
    for layer in finding.layers:  # joins the neuron-type overlap, within its site
        neuronspec_session.record_neuron_set(
            model_id,
            "causal_delta_sensitive",
            layer.layer,
            layer.causal_neurons,
            site=finding.site,
            evidence=layer.evidence(),
        )
    draw_figures(neuronspec_session, "causal_delta_sensitive", model_id, finding)
    return finding


def _knowledge_facts(config, model_id: str):
    from neuronspec.data.facts import run_facts, select_per_relation
    from neuronspec.models.registry import EMBEDDED_MODELS

    facts = run_facts(
        config.facts, embedded=model_id in EMBEDDED_MODELS, templates=config.knowledge_templates
    )
    per_relation = config.knowledge_facts_per_relation
    return select_per_relation(facts, per_relation if per_relation > 0 else None)


@pytest.fixture(scope="session")
def knowledge_neurons(neuronspec_session, model_id, loaded_model):
    """METHODS §8: a :class:`~neuronspec.analyses.knowledge.KnowledgeResult`
    ``(KnowledgeNeuronsFinding, [KnowledgeOverlapFinding per layer..., overall])``, recorded under ``knowledge_neurons`` and ``knowledge_overlap``; refined sets
    join the neuron-type overlap as ``knowledge`` (union over facts, per layer)."""
    from neuronspec.analyses.knowledge import knowledge_neurons as analyse

    result = analyse(
        loaded_model.model,
        loaded_model.adapter,
        loaded_model.tokenizer,
        _knowledge_facts(neuronspec_session.config, model_id),
        steps=neuronspec_session.config.ig_steps,
        top_k=neuronspec_session.config.top_k,
    )
    summary, overlaps = result
    neuronspec_session.record(model_id, "knowledge_neurons", summary)
    for overlap in overlaps:
        neuronspec_session.record(model_id, "knowledge_overlap", overlap, layer=overlap.layer)
    for j, layer in enumerate(summary.facts[0].layers):
        evidence = summary.evidence(j)  # keyed by the union of the facts' refined sets
        neuronspec_session.record_neuron_set(
            model_id, "knowledge", layer, sorted(evidence), evidence=evidence
        )
    draw_figures(neuronspec_session, "knowledge_neurons", model_id, result)
    return result


# -- efficiency and comparison (METHODS §11) -------------------------------------------------------


@pytest.fixture(scope="session")
def efficiency(neuronspec_session, model_id, loaded_model, corpus, neuron_stats):
    """``(EfficiencyFinding, ThroughputFinding)``; tokens/s of the plain LM forward over (at
    most) the first 16 analysis windows."""
    from neuronspec.analyses.efficiency import efficiency as efficiency_of
    from neuronspec.analyses.efficiency import measure_throughput

    finding = efficiency_of(loaded_model.model, neuron_stats)
    throughput = measure_throughput(loaded_model.model, corpus.analysis[:16])
    neuronspec_session.record(
        model_id, "efficiency", finding.to_json() | {"throughput": throughput.to_json()}
    )
    draw_figures(neuronspec_session, "efficiency", model_id, (finding, throughput))
    return finding, throughput


def _comparison_pair(session) -> tuple[str, str]:
    """The first Mamba and the first Transformer of the run's models (skip if there are none)."""
    from neuronspec.errors import ModelNotAvailableError

    found: dict[str, str] = {}
    for model_id in session.config.models:
        try:
            family = "mamba" if session.files(model_id).model_type == "mamba" else "transformer"
        except ModelNotAvailableError as error:
            pytest.skip(str(error).splitlines()[0])
        found.setdefault(family, model_id)
    if len(found) < 2:
        pytest.skip(f"the comparison needs a Mamba and a Transformer in --models, got {found}")
    return found["mamba"], found["transformer"]


@pytest.fixture(scope="session")
def comparison(neuronspec_session):
    """The first Mamba and the first Transformer of ``--models`` side by side (skips unless
    the run has both; one fixture, two models: under xdist the cache's file lock makes a
    worker wait for a pass another worker is computing): a ``ComparisonFinding`` recorded
    for both models, with its figures in ``--plots-dir``."""
    from neuronspec.analyses.comparison import compare_models
    from neuronspec.analyses.dead import dead_neurons_all_layers
    from neuronspec.analyses.efficiency import efficiency as efficiency_of
    from neuronspec.analyses.ngram import ngram_layer_from_stats
    from neuronspec.analyses.positional import positional_layer_from_stats
    from neuronspec.analyses.sparsity import default_tau, sparsity_all_layers

    session = neuronspec_session
    models = _comparison_pair(session)
    findings, efficiencies = {}, {}
    for model_id in models:
        stats = session.stats(model_id)
        layers = range(stats.n_layers)
        per_analysis = {
            "sparsity": sparsity_all_layers(
                stats, tau=default_tau(session.files(model_id).model_type)
            ),
            "dead": dead_neurons_all_layers(stats),
            "positional": [positional_layer_from_stats(stats, i, model=model_id) for i in layers],
            "ngram": [ngram_layer_from_stats(stats, i, model=model_id) for i in layers],
        }
        findings[model_id] = {
            analysis: [f.to_json() for f in per_layer]
            for analysis, per_layer in per_analysis.items()
        }
        efficiencies[model_id] = efficiency_of(session.model(model_id).model, stats).to_json()
    result = compare_models(findings, efficiencies)
    for model_id in models:
        session.record(model_id, "comparison", result)
    draw_figures(session, "comparison", " vs ".join(models), result, models=models)
    return result
