"""Per-model findings shared by several specs: computed once per worker from the cached
statistics, and recorded for the run's results file (``--neuronspec-results``) and overlays.

The fixtures also record the neuron sets they find (``record_neuron_set``: dead, rarely
firing, token-detecting, positional) for the neuron-type overlap, which the plugin computes
at the end of the session from every set recorded by any worker."""

from __future__ import annotations

import pytest

from neuronspec.analyses.dead import dead_neurons_all_layers
from neuronspec.analyses.efficiency import efficiency, measure_throughput
from neuronspec.analyses.ngram import ngram_layer_from_stats, summarise_token_detectors
from neuronspec.analyses.positional import positional_layer_from_stats
from neuronspec.analyses.sparsity import default_tau, sparsity_all_layers
from neuronspec.session import RunConfig

SELECTION_OPTIONS = {"layers": "--layers", "top_k": "--top-k", "pruning_ratio": "--pruning-ratio"}


@pytest.fixture(scope="session")
def default_selection(neuronspec_session):
    """Skip a snapshot spec when the run selects other layers, top-k or pruning ratio than
    the defaults its snapshot was taken with (its findings would differ by construction).
    Name it first among a spec's fixtures, so the skip comes before the costly ones."""
    config = neuronspec_session.config
    changed = [
        option
        for field, option in SELECTION_OPTIONS.items()
        if getattr(config, field) != RunConfig.__dataclass_fields__[field].default
    ]
    if changed:
        pytest.skip(f"the snapshot holds the default selection; run without {', '.join(changed)}")


RARE_CUTOFF = 0.05  # METHODS §2: rarely firing is 0 < frequency < 0.05


def _record(session, model_id, analysis, findings):
    for finding in findings:
        session.record(model_id, analysis, finding, layer=finding.layer)
    return findings


@pytest.fixture(scope="session")
def dead_findings(neuronspec_session, model_id, neuron_stats):
    """Voita §3 dead neurons of every layer: ``[DeadLayerFinding]``."""
    findings = dead_neurons_all_layers(neuron_stats, rare_cutoff=RARE_CUTOFF)
    for finding in findings:
        layer = finding.layer
        neuronspec_session.record_neuron_set(model_id, "dead", layer, finding.dead_neurons)
        frequency = neuron_stats.layer(layer).fire_count.double() / neuron_stats.n_tokens
        rare = ((frequency > 0) & (frequency < RARE_CUTOFF)).nonzero().flatten().tolist()
        neuronspec_session.record_neuron_set(model_id, "rarely_firing", layer, rare)
    return _record(neuronspec_session, model_id, "dead", findings)


@pytest.fixture(scope="session")
def ngram_findings(neuronspec_session, model_id, neuron_stats):
    """Voita §4 n-gram findings of every layer: ``[NgramLayerFinding]``."""
    findings = [
        ngram_layer_from_stats(neuron_stats, layer, model=model_id)
        for layer in range(neuron_stats.n_layers)
    ]
    neuronspec_session.record(
        model_id, "token_detector_summary", summarise_token_detectors(findings)
    )
    for finding in findings:
        neuronspec_session.record_neuron_set(
            model_id, "token_detecting", finding.layer, finding.detector_tokens
        )
        if finding.detector_trigrams is not None:  # --trigrams
            neuronspec_session.record_neuron_set(
                model_id, "trigram_detecting", finding.layer, finding.detector_trigrams
            )
    return _record(neuronspec_session, model_id, "ngram", findings)


@pytest.fixture(scope="session")
def positional_findings(neuronspec_session, model_id, neuron_stats):
    """Voita §5 positional findings of every layer: ``[PositionalLayerFinding]``."""
    findings = [
        positional_layer_from_stats(neuron_stats, layer, model=model_id)
        for layer in range(neuron_stats.n_layers)
    ]
    for finding in findings:
        neuronspec_session.record_neuron_set(
            model_id, "positional", finding.layer, finding.positional_neurons
        )
    return _record(neuronspec_session, model_id, "positional", findings)


# -- hidden attention, attention neurons, delta-sensitive neurons (METHODS §5, §7) ----------------


@pytest.fixture(scope="session")
def attention_run(neuronspec_session, model_id, loaded_model, corpus, request):
    """Hidden attention (Mamba), rollouts and attention neurons on the first
    ``--attention-prompts`` corpus windows, plus rollout relevance on the run's fact
    prompts (``--facts``, else the toy world or the English set, as knowledge neurons): an :class:`~neuronspec.analyses.attention_neurons.AttentionRun` whose
    ``fact_relevance`` attribute holds the fact findings. Recorded under ``hidden_attention``
    (per layer; ``all``: rollouts and fact relevance) and ``attention_neurons`` (per layer)."""
    from neuronspec.analyses.attention_neurons import analyse_attention, fact_relevance
    from neuronspec.data.facts import run_facts
    from neuronspec.models.registry import EMBEDDED_MODELS

    option = request.config.option
    layers = neuronspec_session.config.layers_of(loaded_model.n_layers, model=model_id)
    methods = option.attention_methods
    prompts = corpus.analysis[: option.attention_prompts]
    run = analyse_attention(
        loaded_model,
        prompts,
        model=model_id,
        layers=layers,
        methods=methods,
        top_k=neuronspec_session.config.top_k,
        aggregate=option.attention_aggregate,
    )
    # every fact of the run's set (--facts, the toy world, or the English set), first prompt
    facts = run_facts(option.facts, embedded=model_id in EMBEDDED_MODELS)
    run.fact_relevance = fact_relevance(
        loaded_model, facts, model=model_id, aggregate=option.attention_aggregate
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
            neuronspec_session.record_neuron_set(
                model_id, "attention", layer, first.top_neurons, site="mlp"
            )
    return run


@pytest.fixture(scope="session")
def sensitive_sets(neuronspec_session, model_id, neuron_stats):
    """The ``--top-k`` delta-sensitive Δ channels (``dt`` site, Mamba) or high-variance
    ``mlp`` neurons (GPT-2) of each layer of the run, by the streamed variance score
    (:func:`~neuronspec.analyses.delta_sensitive.delta_sensitive_sets`)."""
    from neuronspec.analyses.delta_sensitive import delta_sensitive_sets

    config = neuronspec_session.config
    layers = config.layers_of(neuron_stats.n_layers, model=model_id)
    return delta_sensitive_sets(neuron_stats, top_k=config.top_k, layers=layers)


@pytest.fixture(scope="session")
def delta_run(
    neuronspec_session, model_id, neuron_stats, sensitive_sets, loaded_model, corpus, request
):
    """Delta-sensitive (Mamba ``dt``) or high-variance (GPT-2 ``mlp``) channels per layer:
    ``{"findings": [DeltaSensitiveFinding], "variance": {layer: (W,)}, "perturbation":
    {layer: (W,)}}``; recorded under ``delta_sensitive`` and as neuron sets."""
    from neuronspec.analyses.delta_sensitive import (
        DEFAULT_SEED,
        DEFAULT_SUBSTITUTIONS,
        delta_sensitive_layer,
        perturbation_scores,
        variance_scores,
    )

    config = neuronspec_session.config
    sets = sensitive_sets
    layers = list(sets.by_layer)
    prompts = corpus.analysis[: request.config.option.delta_prompts]
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
    findings = []
    for layer in layers:
        finding = delta_sensitive_layer(
            neuron_stats,
            perturbation[layer],
            layer,
            model=model_id,
            top_k=config.top_k,
            n_prompts=len(prompts),
            substitutions=DEFAULT_SUBSTITUTIONS,
            seed=DEFAULT_SEED,
        )
        findings.append(finding)
        neuronspec_session.record(model_id, "delta_sensitive", finding, layer=layer)
        neuronspec_session.record_neuron_set(
            model_id, sets.kind, layer, sets.by_layer[layer], site=sets.site
        )
    return {
        "findings": findings,
        "variance": {layer: variance_scores(neuron_stats, layer, sets.site) for layer in layers},
        "perturbation": perturbation,
    }


@pytest.fixture(scope="session")
def sparsity_findings(neuronspec_session, model_id, model_files, neuron_stats):
    """METHODS §9 sparsity of every layer, τ = the family default: ``[SparsityLayerFinding]``."""
    tau = default_tau(model_files.model_type)
    findings = sparsity_all_layers(neuron_stats, tau=tau)
    return _record(neuronspec_session, model_id, "sparsity", findings)


@pytest.fixture(scope="session")
def efficiency_finding(neuronspec_session, model_id, loaded_model, corpus, neuron_stats):
    """METHODS §11 efficiency: ``(EfficiencyFinding, ThroughputFinding)``; tokens/s of the
    plain LM forward over (at most) the first 16 analysis windows."""
    finding = efficiency(loaded_model.model, neuron_stats)
    throughput = measure_throughput(loaded_model.model, corpus.analysis[:16])
    neuronspec_session.record(
        model_id, "efficiency", finding.to_json() | {"throughput": throughput.to_json()}
    )
    return finding, throughput
