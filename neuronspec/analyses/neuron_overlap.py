"""Neuron-type overlap (intersections between neuron types).

Input: the neuron sets a run recorded with ``SpecSession.record_neuron_set`` (results
analysis ``neuron_sets``: ``{layer: {kind: {"site", "neurons"}}}``), whatever kinds were
recorded (dead, rarely firing, token-detecting, positional, and any other analysis that
records its set); no analysis is listed here. Per layer: each set's size, and for every
pair of kinds the intersection |A ∩ B| and Jaccard |A ∩ B| / |A ∪ B| (0 when both are
empty); and the exact UpSet partition: for every combination of kinds, the neurons that
belong to exactly those kinds. Sets of different sites (e.g. ``mlp`` and ``dt``) index
different neurons and are compared only within a site.

When it runs: the overlap needs every set of a model, so the plugin computes it at
``pytest_sessionfinish`` from the merged results of all workers (under xdist each worker
records only its own sets) and adds it to the results under ``neuron_overlap`` (and
draws its figure with ``--plots-dir``); specs that want overlap numbers compute it from the
sets their fixtures found (``neuron_overlap_layer``).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any

from neuronspec.findings import Finding


@dataclass(frozen=True)
class OverlapLayerFinding(Finding):
    layer: int
    site: str
    kinds: tuple[str, ...]  # sorted
    sizes: dict[str, int]
    intersections: dict[str, int]  # "a&b" -> |a ∩ b| for kinds a < b
    jaccard: dict[str, float]  # "a&b" -> Jaccard
    exclusive: dict[str, int]  # "a&b&c" -> neurons in exactly these kinds (UpSet bars)


def neuron_overlap_layer(
    layer: int, sets: dict[str, Any], *, site: str = "mlp"
) -> OverlapLayerFinding:
    """Overlap of ``{kind: neuron ids}`` of one layer and site."""
    members = {kind: frozenset(int(n) for n in neurons) for kind, neurons in sets.items()}
    kinds = tuple(sorted(members))
    intersections, jaccard = {}, {}
    for a, b in combinations(kinds, 2):
        common = len(members[a] & members[b])
        union = len(members[a] | members[b])
        intersections[f"{a}&{b}"] = common
        jaccard[f"{a}&{b}"] = common / union if union else 0.0
    membership: dict[tuple[str, ...], int] = {}
    for neuron in frozenset().union(*members.values()):
        key = tuple(kind for kind in kinds if neuron in members[kind])
        membership[key] = membership.get(key, 0) + 1
    return OverlapLayerFinding(
        layer=layer,
        site=site,
        kinds=kinds,
        sizes={kind: len(members[kind]) for kind in kinds},
        intersections=intersections,
        jaccard=jaccard,
        exclusive={"&".join(key): count for key, count in sorted(membership.items())},
    )


def neuron_overlap_from_sets(neuron_sets: dict[str, Any]) -> dict[str, Any]:
    """Overlap findings of every layer (and site) of one model's recorded ``neuron_sets``:
    ``{layer: OverlapLayerFinding JSON}``; key ``"<layer>/<site>"`` for sites other than mlp."""
    out: dict[str, Any] = {}
    for layer, kinds in sorted(neuron_sets.items(), key=lambda item: int(item[0])):
        by_site: dict[str, dict[str, Any]] = {}
        for kind, entry in kinds.items():
            by_site.setdefault(entry["site"], {})[kind] = entry["neurons"]
        for site, sets in sorted(by_site.items()):
            key = str(layer) if site == "mlp" else f"{layer}/{site}"
            out[key] = neuron_overlap_layer(int(layer), sets, site=site).to_json()
    return out


def add_neuron_overlap(results: dict[str, Any]) -> dict[str, Any]:
    """Add ``neuron_overlap`` to every model of merged ``results`` that recorded neuron sets."""
    for entry in results.get("models", {}).values():
        sets = entry.get("analyses", {}).get("neuron_sets")
        if sets:
            entry["analyses"]["neuron_overlap"] = neuron_overlap_from_sets(sets)
    return results
