"""Ablation conditions batched into one forward vs one forward per condition (embedded models).

Workload per model: 16 conditions (baseline + 15 random sets of 10% of the ``mlp`` neurons
of every layer, mean ablation with the cached corpus means) on 8 held-out windows of 64
tokens: batched = :func:`condition_perplexities` with 128 rows per forward (all 16
conditions × 8 windows in one forward); one per condition = the same call once per
condition (8 rows, 16 forwards). The numbers are the same either way (tests/test_ablation_engine.py, tests/test_causal.py);
only the time differs. 5 rounds (2 with ``quick``) of :func:`time_side_by_side`.
"""

from __future__ import annotations

from neuronspec.bench import row as _row
from neuronspec.bench import time_side_by_side
from neuronspec.interventions.ablation import (
    AblationEngine,
    Condition,
    baseline_condition,
    corpus_means,
    random_condition,
)
from neuronspec.interventions.perplexity import condition_perplexities
from neuronspec.session import RunConfig, SpecSession

N_WINDOWS = 8
N_CONDITIONS = 16


def run(quick: bool = False) -> list[dict]:
    repeats = 2 if quick else 5
    session = SpecSession(RunConfig())
    rows = []
    for model_id in ("tiny-gpt2", "tiny-mamba"):
        loaded = session.model(model_id)
        windows = session.corpus(model_id).heldout[:N_WINDOWS]
        means = corpus_means(session.stats(model_id))
        width = loaded.adapter.width("mlp")
        share = Condition(
            "share", "mlp", {layer: range(width // 10) for layer in range(loaded.n_layers)}
        )
        conditions = [baseline_condition()] + [
            random_condition(share, width, seed) for seed in range(N_CONDITIONS - 1)
        ]
        batched = AblationEngine(loaded, method="mean", means=means, max_rows=128)
        single = AblationEngine(loaded, method="mean", means=means, max_rows=N_WINDOWS)
        t = time_side_by_side(
            {
                "batched": lambda e=batched, w=windows, c=conditions: condition_perplexities(
                    e, w, c
                ),
                "single": lambda e=single, w=windows, c=conditions: [
                    condition_perplexities(e, w, [one]) for one in c
                ],
            },
            repeats,
        )
        work = f"{N_CONDITIONS} conditions x {N_WINDOWS}x64 tokens"
        single_name = f"{model_id} ablation PPL, {work}, one forward per condition"
        rows += [
            _row(single_name, t["single"]),
            _row(
                f"{model_id} ablation PPL, {work}, batched (1 forward)",
                t["batched"],
                single_name,
                t["single"],
            ),
        ]
    return rows
