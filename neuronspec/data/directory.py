"""Directory corpora: texts of any number of files, read one record batch at a time.

``--corpus DIR`` takes a ``datasets`` dataset saved with ``save_to_disk`` (its ``train``
split if it is a ``DatasetDict``), or a folder of ``.parquet`` / ``.jsonl`` files (sorted
by path, searched recursively) whose ``text`` column holds one document per row. Texts are
read one record batch at a time (Arrow memory maps, parquet row batches, jsonl lines), so
the texts of the corpus are never in memory together; :mod:`neuronspec.data.windows`
tokenises them as a stream. A directory is named by its files' content
(:func:`directory_digest`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from neuronspec.errors import CorpusError

READ_BATCH = 512  # records read at a time
_DATA_SUFFIXES = (".parquet", ".jsonl")


def _data_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _DATA_SUFFIXES)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def directory_digest(path: Path) -> str:
    """sha256 over the relative names, sizes and bytes of the directory's data files."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.endswith(".lock"))
    for file in files:
        digest.update(f"{file.relative_to(path)}|{file.stat().st_size}|".encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def iter_directory_texts(path: Path) -> Iterator[str]:
    """The non-blank texts of a directory corpus, in order, one at a time."""
    if _is_saved_dataset(path):
        yield from _iter_saved_dataset(path)
        return
    files = _data_files(path)
    if not files:
        raise CorpusError(
            f"{path} holds no .parquet or .jsonl files and is not a `datasets` save_to_disk "
            "directory; give a folder of .parquet/.jsonl files with a 'text' column"
        )
    for file in files:
        texts = _iter_parquet(file) if file.suffix == ".parquet" else _iter_jsonl(file)
        for text in texts:
            if text and text.strip():
                yield text


def _iter_saved_dataset(path: Path) -> Iterator[str]:
    import datasets

    dataset = datasets.load_from_disk(str(path))  # memory-mapped Arrow files
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise CorpusError(f"{path}: a DatasetDict without a 'train' split ({list(dataset)})")
        dataset = dataset["train"]
    if "text" not in dataset.column_names:
        raise CorpusError(f"{path} has no 'text' column; columns: {dataset.column_names}")
    for batch in dataset.select_columns(["text"]).iter(batch_size=READ_BATCH):
        for text in batch["text"]:
            if text and text.strip():
                yield text


def _iter_parquet(file: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    handle = pq.ParquetFile(file)
    if "text" not in handle.schema_arrow.names:
        raise CorpusError(f"{file} has no 'text' column; columns: {handle.schema_arrow.names}")
    for batch in handle.iter_batches(batch_size=READ_BATCH, columns=["text"]):
        yield from batch.column(0).to_pylist()


def _iter_jsonl(file: Path) -> Iterator[str]:
    with file.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "text" not in record:
                raise CorpusError(f"{file}:{number} has no 'text' field")
            yield record["text"]
