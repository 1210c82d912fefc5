"""A Mamba and a Transformer side by side on the same corpus (METHODS.md §11).

For each measure family (sparsity §9, dead §2, positional §4, token detectors §3), one
table: a row per (model, layer) with the relative depth l/(L−1) and the family's measures,
so layers of models of different depth line up by relative depth. Efficiency (§11) is one
row per model. The numbers are the findings of the per-model analyses, unchanged; this
module only lines them up (and the plots draw one figure per family), with each measure's
standard error where the finding has one (``x_se``, ``se_df``: the window-group bootstrap),
so that a spec compares two models or two layers at a stated level (:func:`mean_estimate`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from neuronspec.errors import NeuronSpecError
from neuronspec.findings import Finding
from neuronspec.uncertainty import NO_WINDOW_GROUPS, Estimate

FAMILIES: dict[str, tuple[str, ...]] = {
    "sparsity": (
        "tau",
        "threshold_sparsity",
        "entropy",
        "gini",
        "hoyer",
        "P50",
        "optimal_threshold",
    ),  # fmt: skip
    "dead": ("dead_fraction", "rare_fraction", "mean_alive_frequency"),
    "positional": ("positional_fraction",),
    "token_detectors": ("token_detector_fraction", "n_detected_tokens"),
}
"""The measures of each family (the figures' panels)."""
ERRORS: dict[str, tuple[str, ...]] = {
    "sparsity": ("threshold_sparsity_se", "entropy_se", "gini_se", "hoyer_se", "se_df"),
    "dead": ("dead_fraction_se", "rare_fraction_se", "mean_alive_frequency_se", "se_df"),
    "positional": (),
    "token_detectors": (),
}
"""The standard errors each family's table carries beside its measures (None where the
statistics kept no window groups), and their degrees of freedom."""


@dataclass(frozen=True)
class ComparisonTable(Finding):
    family: str
    columns: tuple[str, ...]  # "model", "layer", "relative_depth", then the measures
    rows: tuple[tuple, ...]


@dataclass(frozen=True)
class Comparison(Finding):
    models: tuple[str, ...]  # (mamba, transformer)
    tables: dict[str, ComparisonTable]
    efficiency: ComparisonTable


def _layer_rows(per_layer: Mapping[str, Sequence[dict]]) -> dict[int, dict]:
    """Merge the per-layer findings of several analyses of one model into one dict per layer."""
    rows: dict[int, dict] = {}
    for analysis, findings in per_layer.items():
        for finding in findings:
            row = rows.setdefault(finding["layer"], {"layer": finding["layer"]})
            if analysis == "sparsity":
                row.update({k: finding[k] for k in FAMILIES["sparsity"] if k != "P50"})
                row.update({k: finding.get(k) for k in ERRORS["sparsity"]})
                row["P50"] = finding["percentiles"]["P50"]
                row["relative_depth"] = finding["relative_depth"]
            elif analysis == "dead":
                row.update({k: finding[k] for k in FAMILIES["dead"]})
                row.update({k: finding.get(k) for k in ERRORS["dead"]})
                row["relative_depth"] = finding["relative_depth"]
            elif analysis == "positional":
                row["positional_fraction"] = finding["n_positional"] / finding["n_neurons"]
            elif analysis == "ngram":
                row["token_detector_fraction"] = finding["n_token_detectors"] / finding["n_neurons"]
                row["n_detected_tokens"] = len(finding["detected_tokens"])
            else:
                raise NeuronSpecError(f"comparison has no family for analysis {analysis!r}")
    return rows


def compare_models(
    findings: Mapping[str, Mapping[str, Sequence[dict]]],
    efficiency: Mapping[str, dict],
) -> Comparison:
    """``findings``: ``{model: {analysis: [per-layer finding JSON]}}`` for analyses
    ``sparsity``, ``dead``, ``positional``, ``ngram``; ``efficiency``: ``{model: JSON}``."""
    models = tuple(findings)
    if len(models) != 2:
        raise NeuronSpecError(f"a comparison needs two models, got {models}")
    per_model = {model: _layer_rows(findings[model]) for model in models}
    tables = {}
    for family, measures in FAMILIES.items():
        columns = ("model", "layer", "relative_depth", *measures, *ERRORS[family])
        rows = tuple(
            (model, *(row[column] for column in columns[1:]))
            for model in models
            for _, row in sorted(per_model[model].items())
        )
        tables[family] = ComparisonTable(family=family, columns=columns, rows=rows)
    eff_columns = ("model", "model_type", "n_parameters", "n_layers", "neurons_per_layer",
                   "firing_fraction_per_token", "matmul_flops_per_token",
                   "other_flops_per_token")  # fmt: skip
    eff_rows = tuple(
        tuple(model if c == "model" else efficiency[model][c] for c in eff_columns)
        for model in models
    )
    return Comparison(
        models=models,
        tables=tables,
        efficiency=ComparisonTable(family="efficiency", columns=eff_columns, rows=eff_rows),
    )


def mean_estimate(rows: Sequence[dict], measure: str) -> Estimate:
    """The mean of ``measure`` over ``rows`` (layers of one model) with its SE, the layers'
    SEs combined as independent (conservative where layers correlate positively)."""
    if not rows:
        raise NeuronSpecError(f"no rows to average {measure!r} over")
    if any(row.get(f"{measure}_se") is None for row in rows):
        raise NeuronSpecError(f"no standard error of {measure!r}: {NO_WINDOW_GROUPS}")
    n = len(rows)
    return Estimate(
        sum(row[measure] for row in rows) / n,
        math.sqrt(sum(row[f"{measure}_se"] ** 2 for row in rows)) / n,
        f"mean over {n} layers; SEs combined as independent",
        min(row["se_df"] for row in rows),
    )


def family_rows(table: ComparisonTable) -> dict[str, list[dict]]:
    """``{model: [row dict per layer]}`` of a table (for the figures and for specs)."""
    out: dict[str, list[dict]] = {}
    for row in table.rows:
        values = dict(zip(table.columns, row, strict=True))
        out.setdefault(values["model"], []).append(values)
    return out
