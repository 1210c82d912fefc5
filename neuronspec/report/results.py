"""Reading a run's results file (``--neuronspec-results``) for the report, the diff and the
terminal summary, without models, torch or the statistics cache.

The file holds ``config``, ``models`` → model id → ``info``, ``analyses`` (analysis →
layer key → finding) and ``tokens`` (token id → text, see :func:`is_token_field`), and, from
the pytest plugin, ``run`` (versions, command, options), ``specs`` (every spec's outcome)
and ``snapshot_drift`` (the snapshot comparisons of the run).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from neuronspec.errors import NeuronSpecError


class ResultsFileError(NeuronSpecError):
    """A results file is missing, not JSON, or not shaped like a neuronspec results file."""


def load_results(path: str | Path) -> dict[str, Any]:
    """Parse a results file and check its shape; raises :class:`ResultsFileError`."""
    path = Path(path)
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultsFileError(
            f"results file {path} does not exist; write one with "
            "`pytest specs/ --neuronspec-results FILE`"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ResultsFileError(f"cannot read results file {path}: {error}") from None
    if not isinstance(results, dict) or not isinstance(results.get("models"), dict):
        raise ResultsFileError(
            f"{path} is not a neuronspec results file (no 'models' object at the top); "
            "give the file written by `pytest specs/ --neuronspec-results FILE`"
        )
    for model_id, entry in results["models"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("analyses", {}), dict):
            raise ResultsFileError(f"{path}: model {model_id!r} has no 'analyses' object")
    return results


def iter_findings(results: dict[str, Any]) -> Iterator[tuple[str, str, str, Any]]:
    """``(model, analysis, layer key, finding)`` of every finding, sorted."""
    for model_id, entry in sorted(results.get("models", {}).items()):
        for analysis, layers in sorted(entry.get("analyses", {}).items()):
            for layer in sorted(layers, key=layer_sort_key):
                yield model_id, analysis, layer, layers[layer]


def layer_sort_key(layer: str) -> tuple[int, int | str]:
    """Layer keys ("0", "1", …, "all") in numeric order, non-numeric keys last."""
    return (0, int(layer)) if layer.lstrip("-").isdigit() else (1, layer)


# Token ids in findings: a field whose name is "token(s)"/"token_id(s)" or ends in
# "_token(s)"/"_token_id(s)" holds token ids in its leaf ints (dict keys are not token ids:
# ``detector_tokens`` maps neuron -> token ids). Counts (n_tokens, max_tokens) are not.
_TOKEN_FIELD = re.compile(r"(?:^|_)tokens?(?:_ids?)?$")
_COUNT_PREFIXES = ("n_", "num_", "max_", "min_", "total_")
EXTRA_TOKEN_FIELDS: set[str] = set()  # other field names holding token ids (one entry each)


def is_token_field(name: str) -> bool:
    """Whether a finding field named ``name`` holds token ids (shown as their text)."""
    if name in EXTRA_TOKEN_FIELDS:
        return True
    return bool(_TOKEN_FIELD.search(name)) and not name.startswith(_COUNT_PREFIXES)


_NEURON_FIELD = re.compile(r"(?:^|_)neurons?$|^top_by_[a-z]+$")


def is_neuron_field(name: str) -> bool:
    """Whether a finding field named ``name`` holds neuron ids of its finding's layer and site
    (``dead_neurons``, ``top_neurons``, ``neuron``, ``top_by_variance``; not ``n_neurons``)."""
    return bool(_NEURON_FIELD.search(name)) and not name.startswith(_COUNT_PREFIXES)


def token_ids_in(data: Any, *, inside: bool = False) -> set[int]:
    """The token ids held by token fields anywhere in ``data`` (findings of one model)."""
    found: set[int] = set()
    if isinstance(data, dict):
        for key, value in data.items():
            found |= token_ids_in(value, inside=inside or is_token_field(str(key)))
    elif isinstance(data, list):
        for item in data:
            found |= token_ids_in(item, inside=inside)
    elif inside and isinstance(data, int) and not isinstance(data, bool) and data >= 0:
        found.add(data)
    return found
