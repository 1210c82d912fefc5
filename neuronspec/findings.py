"""Findings: frozen dataclasses with named fields, serialisable to plain JSON.

Every analysis returns a finding. ``to_json`` turns it into plain Python
(floats, ints, strings, lists, dicts with string keys) so it can be written to the
run's results file and compared by the tolerant snapshot extension.
"""

from __future__ import annotations

import dataclasses
import math
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
