"""Token ids of a run's findings as text, recorded into the results file by the plugin so
that the report needs no tokenizer.

Decoding reads the checkpoint's ``tokenizer.json`` with the ``tokenizers`` library (cheap:
no transformers import); only a checkpoint without one loads its tokenizer with
transformers.
"""

from __future__ import annotations

from typing import Any

from neuronspec.report.results import token_ids_in


def decode_tokens(model_id: str, ids: set[int]) -> dict[str, str]:
    """``{str(id): text}`` of ``ids`` with ``model_id``'s tokenizer, one id at a time."""
    if not ids:
        return {}
    from neuronspec.models.registry import _local_files, resolve

    directory = _local_files(resolve(model_id))
    path = directory / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(path))
        decode = lambda i: tokenizer.decode([i], skip_special_tokens=False)  # noqa: E731
    else:
        from transformers import AutoTokenizer

        loaded = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        decode = lambda i: loaded.decode([i])  # noqa: E731
    return {str(i): decode(i) for i in sorted(ids)}


def record_tokens(results: dict[str, Any]) -> None:
    """Add ``tokens`` (id → text of every token id in its findings and neuron cards) to each
    model's entry."""
    for model_id, entry in results.get("models", {}).items():
        ids: set[int] = set()
        for layers in entry.get("analyses", {}).values():  # names of analyses, layers: not fields
            for finding in layers.values():
                ids |= token_ids_in(finding)
        for card in entry.get("cards", {}).values():
            ids |= token_ids_in(card)
        entry["tokens"] = decode_tokens(model_id, ids)
