"""Findings: frozen dataclasses with named fields, serialisable to plain JSON.

Every analysis returns a finding. ``to_json`` turns it into plain Python
(floats, ints, strings, lists, dicts with string keys) so it can be written to the
run's results file and compared by the tolerant snapshot extension.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np


def to_plain(value: Any) -> Any:
    """Recursively convert dataclasses, numpy/torch values and tuples into plain JSON types."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return [to_plain(v) for v in value.tolist()]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # torch tensors
        return to_plain(value.tolist())
    return value


class Finding:
    """Mixin for frozen finding dataclasses: ``finding.to_json()`` gives plain JSON data."""

    def to_json(self) -> dict[str, Any]:
        return to_plain(self)

    def snapshot_view(self) -> Any:
        """What a snapshot spec compares: ``assert finding.snapshot_view() == findings_snapshot``.
        Every field by default; a finding type narrows it where a field is not a finding."""
        return self.to_json()


class LayerFindings(Sequence):
    """Per-layer findings of one model, indexed by layer number: ``dead[2].dead_fraction``.

    Iterating yields the findings in layer order; ``layers`` lists the layers analysed
    (all, or those of ``--layers``). A layer that was not analysed raises a ``KeyError``
    that says which were."""

    def __init__(self, analysis: str, findings: Iterable[Any]):
        self.analysis = analysis
        self._by_layer = {int(f.layer): f for f in findings}
        self.layers = sorted(self._by_layer)

    def __getitem__(self, layer: int) -> Any:  # type: ignore[override]
        try:
            return self._by_layer[layer]
        except KeyError:
            raise KeyError(
                f"{self.analysis} has no finding for layer {layer}; analysed layers: {self.layers}"
            ) from None

    def __iter__(self) -> Iterator[Any]:
        return (self._by_layer[layer] for layer in self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def to_json(self) -> list[Any]:
        return [to_plain(f.to_json() if hasattr(f, "to_json") else f) for f in self]

    def snapshot_view(self) -> list[Any]:
        return [f.snapshot_view() if hasattr(f, "snapshot_view") else to_plain(f) for f in self]
