"""A Mamba and a Transformer side by side on the same corpus (METHODS.md §11).

For each measure family (sparsity §9, dead §2, positional §4, token detectors §3), one
table: a row per (model, layer) with the relative depth l/(L−1) and the family's measures,
so layers of models of different depth line up by relative depth. Efficiency (§11) is one
row per model. The numbers are the findings of the per-model analyses, unchanged; this
module only lines them up (and the plots draw one figure per family).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from neuronspec.errors import NeuronSpecError
from neuronspec.findings import Finding

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
                row["P50"] = finding["percentiles"]["P50"]
                row["relative_depth"] = finding["relative_depth"]
            elif analysis == "dead":
                row.update({k: finding[k] for k in FAMILIES["dead"]})
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
        columns = ("model", "layer", "relative_depth", *measures)
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


def family_rows(table: ComparisonTable) -> dict[str, list[dict]]:
    """``{model: [row dict per layer]}`` of a table (for the figures and for specs)."""
    out: dict[str, list[dict]] = {}
    for row in table.rows:
        values = dict(zip(table.columns, row, strict=True))
        out.setdefault(values["model"], []).append(values)
    return out
