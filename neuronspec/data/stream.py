"""Corpora of any size from a directory, tokenised as a stream into windows stored in chunks.

``--corpus DIR`` takes a ``datasets`` dataset saved with ``save_to_disk`` (its ``train``
split if it is a ``DatasetDict``), or a folder of ``.parquet`` / ``.jsonl`` files (sorted
by path, searched recursively) whose ``text`` column holds one document per row. Texts are
read one record batch at a time (Arrow memory maps, parquet row batches, jsonl lines), and
tokenised in batches of :data:`TEXT_BATCH` documents; each document is prefixed with BOS and
the token stream is cut into windows as in :mod:`neuronspec.data.corpus`. Full windows are
appended to one flat int64 file in chunks of :data:`CHUNK_WINDOWS`; neither the texts nor
the windows of the corpus are ever held in memory together. The windows are then read back
through a memory map (pages the OS may drop again), so the statistics pass streams them
from disk.

Store: ``<cache>/windows-<key>/`` with ``windows.i64`` and ``meta.json``, written in a
temporary directory and renamed into place once complete (under a file lock, so parallel
workers and torchrun ranks tokenise once). The key is the sha256 of the corpus
configuration, the directory's file contents and the tokenizer's files. On load the file's
size is checked and its sha256 recomputed (it is the windows' fingerprint, a part of every
statistics cache key).

Held-out windows: directories have no held-out split, so (as for a single local file) the
last ``heldout_fraction`` of the windows are held out. Deviation from the in-memory path:
with ``max_tokens``, reading stops after ``ceil(max_tokens / window / (1 - heldout_fraction))``
windows (the in-memory path tokenises the whole corpus first), so the held-out windows are
the ones right after the analysis windows.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import math
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from neuronspec.errors import CorpusError

STREAM_FORMAT = 1  # bump when the stored windows or their meta change
TEXT_BATCH = 512  # documents tokenised per tokenizer call
CHUNK_WINDOWS = 4096  # windows appended to the file at a time
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
    for batch in dataset.select_columns(["text"]).iter(batch_size=TEXT_BATCH):
        for text in batch["text"]:
            if text and text.strip():
                yield text


def _iter_parquet(file: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    handle = pq.ParquetFile(file)
    if "text" not in handle.schema_arrow.names:
        raise CorpusError(f"{file} has no 'text' column; columns: {handle.schema_arrow.names}")
    for batch in handle.iter_batches(batch_size=TEXT_BATCH, columns=["text"]):
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


def _batches(texts: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_windows(
    texts: Iterator[str], tokenizer, bos_id: int | None, window: int, path: Path, limit: int | None
) -> int:
    """Tokenise ``texts`` into windows appended to ``path`` (int64, row-major) in chunks of
    :data:`CHUNK_WINDOWS`; stop after ``limit`` windows. Returns the windows written."""
    written, pending = 0, []  # pending: tokens of the windows not yet written
    chunk_tokens = CHUNK_WINDOWS * window
    with path.open("wb") as out:
        for batch in _batches(texts, TEXT_BATCH):
            for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                if bos_id is not None:
                    pending.append(bos_id)
                pending.extend(ids)
            while len(pending) >= chunk_tokens or (pending and limit is not None):
                n = min(len(pending) // window, CHUNK_WINDOWS)
                if limit is not None:
                    n = min(n, limit - written)
                if n == 0:
                    break
                out.write(np.asarray(pending[: n * window], dtype=np.int64).tobytes())
                del pending[: n * window]
                written += n
                if limit is not None and written >= limit:
                    return written
        n = len(pending) // window
        if limit is not None:
            n = min(n, limit - written)
        out.write(np.asarray(pending[: n * window], dtype=np.int64).tobytes())
        return written + n


def _fingerprint(name: str, window: int, bos_id, vocab_size: int, analysis, heldout) -> str:
    """The windows' sha256, exactly as :func:`~neuronspec.data.corpus.build_windows` forms it."""
    digest = hashlib.sha256()
    digest.update(f"{name}|{window}|{bos_id}|{vocab_size}".encode())
    for start in range(0, len(analysis), CHUNK_WINDOWS):
        digest.update(memoryview(np.ascontiguousarray(analysis[start : start + CHUNK_WINDOWS])))
    digest.update(b"|heldout|")
    for start in range(0, len(heldout), CHUNK_WINDOWS):
        digest.update(memoryview(np.ascontiguousarray(heldout[start : start + CHUNK_WINDOWS])))
    return digest.hexdigest()


def _open(store: Path, name: str):
    from neuronspec.data.corpus import TokenWindows

    meta = json.loads((store / "meta.json").read_text())
    window, n = meta["window"], meta["n_windows"]
    path = store / "windows.i64"
    if path.stat().st_size != n * window * 8:
        raise CorpusError(f"{path}: size does not match its meta.json; delete {store}")
    if n == 0:
        raise CorpusError(f"corpus {name!r} gives no windows of {window} tokens")
    windows = np.memmap(path, dtype=np.int64, mode="c", shape=(n, window))  # (n, T)
    analysis = windows[: meta["n_analysis"]]
    heldout = windows[n - meta["n_heldout"] :]
    fingerprint = _fingerprint(name, window, meta["bos_id"], meta["vocab_size"], analysis, heldout)
    if fingerprint != meta["fingerprint"]:
        raise CorpusError(f"{store}: the windows were altered or damaged; delete {store}")
    return TokenWindows(
        corpus=name,
        analysis=torch.from_numpy(analysis),
        heldout=torch.from_numpy(heldout),
        bos_id=meta["bos_id"],
        vocab_size=meta["vocab_size"],
        fingerprint=fingerprint,
    )


def streamed_windows(tokenizer_ref, config, texts, cache_dir: Path | None):
    """:class:`TokenWindows` of a directory corpus, memory-mapped from the chunked store."""
    from filelock import FileLock

    from neuronspec.capture.cache import cache_key
    from neuronspec.data.corpus import _bos_id

    if cache_dir is None or tokenizer_ref.fingerprint is None:
        root = Path(tempfile.mkdtemp(prefix="neuronspec-windows-"))
        atexit.register(shutil.rmtree, root, True)
    else:
        root = Path(cache_dir)
    key = cache_key(
        {
            "kind": "token-windows-stream",
            "format": STREAM_FORMAT,
            "corpus": asdict(config),
            "texts": texts.digest,
            "tokenizer": tokenizer_ref.fingerprint,
        }
    )
    store = root / f"windows-{key}"
    if (store / "meta.json").is_file():
        return _open(store, config.name)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{store}.lock"):
        if (store / "meta.json").is_file():
            return _open(store, config.name)
        tokenizer = tokenizer_ref.load()
        bos_id = _bos_id(tokenizer)
        limit = None
        if config.max_tokens is not None:
            limit = math.ceil(config.max_tokens // config.window / (1 - config.heldout_fraction))
        temp = root / f".windows-{key}.{secrets.token_hex(8)}.tmp"
        temp.mkdir()
        try:
            n = write_windows(
                texts.stream(), tokenizer, bos_id, config.window, temp / "windows.i64", limit
            )
            n_heldout = int(n * config.heldout_fraction)
            n_analysis = n - n_heldout
            if config.max_tokens is not None:
                n_analysis = min(n_analysis, config.max_tokens // config.window)
            if n_analysis == 0:
                raise CorpusError(
                    f"corpus {config.name!r} is too short: fewer than one analysis window of "
                    f"{config.window} tokens after tokenisation; give more or longer texts"
                )
            windows = np.memmap(temp / "windows.i64", dtype=np.int64, mode="r")
            windows = windows.reshape(n, config.window)
            meta = {
                "format": STREAM_FORMAT,
                "window": config.window,
                "n_windows": n,
                "n_analysis": n_analysis,
                "n_heldout": n_heldout,
                "bos_id": bos_id,
                "vocab_size": len(tokenizer),
                "fingerprint": _fingerprint(
                    config.name,
                    config.window,
                    bos_id,
                    len(tokenizer),
                    windows[:n_analysis],
                    windows[n - n_heldout :],
                ),  # fmt: skip
            }
            del windows
            (temp / "meta.json").write_text(json.dumps(meta))
            os.replace(temp, store)
        finally:
            shutil.rmtree(temp, ignore_errors=True)
    return _open(store, config.name)
