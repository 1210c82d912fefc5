"""A corpus as fixed-length token windows, split into analysis and held-out windows, kept in
one store on disk.

Each document is prefixed with the tokenizer's BOS token (GPT-2 style ``<|endoftext|>``),
the token stream is concatenated and cut into windows of ``window`` tokens; the remainder is
dropped. Position 0 of every window therefore has no context and is treated like a
document start by n-gram counts. The analysis windows and the held-out windows never
overlap (METHODS §10: perplexity is measured on held-out text, never on the windows used
to select neurons).

Held-out windows: a corpus with a held-out split of its own (the toy world, wikitext-2)
tokenises it separately; for the others (a local file, a directory) the last
``heldout_fraction`` of the windows read are held out. With ``max_tokens`` reading stops
after the analysis windows it allows (and, without a held-out split, the held-out share
after them): ``ceil(max_tokens / window / (1 - heldout_fraction))`` windows.

The store, one for every corpus: ``<cache>/windows-<key>/`` with ``windows.i64`` (the
analysis windows, then the held-out ones, ``(n, window)`` int64 row-major) and
``meta.json``. Texts are tokenised in batches of :data:`TEXT_BATCH` documents and full
windows appended in chunks of :data:`CHUNK_WINDOWS`, so neither the texts of a directory
corpus nor its windows are ever held in memory together; the windows are read back through
a memory map. The store is written in a temporary directory and renamed into place once
complete, under a file lock (parallel workers and torchrun ranks tokenise once). The key
is the sha256 of the corpus configuration, the texts' digest and the tokenizer's
fingerprint, so a warm rerun neither loads a tokenizer nor tokenises. On load the file's
size is checked and its sha256 recomputed: it is the windows' fingerprint, a part of every
statistics cache key; a damaged store is rebuilt with a warning. Without a cache
directory (or for a tokenizer without a fingerprint) the store lives in a temporary
directory removed at exit.
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
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from filelock import FileLock

from neuronspec.capture.cache import CacheRecomputeWarning, cache_key
from neuronspec.data.corpus import CorpusConfig, CorpusTexts, load_corpus_texts
from neuronspec.errors import CorpusError

WINDOWS_FORMAT = 3  # bump when the stored windows or their meta change
TEXT_BATCH = 512  # documents tokenised per tokenizer call
CHUNK_WINDOWS = 4096  # windows appended to the file at a time


@dataclass(frozen=True)
class TokenWindows:
    """Tokenised corpus. ``analysis`` and ``heldout`` are ``(n_windows, window)`` int64."""

    corpus: str
    analysis: torch.Tensor
    heldout: torch.Tensor
    bos_id: int | None
    vocab_size: int
    fingerprint: str

    @property
    def n_tokens(self) -> int:
        return self.analysis.numel()

    @property
    def window(self) -> int:
        return self.analysis.shape[1]


def tokenizer_fingerprint(tokenizer) -> str | None:
    """sha256 of a fast tokenizer's full definition (vocab, merges, normaliser, special
    tokens); None for tokenizers without a serialisable backend (their windows are not
    cached)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    digest = hashlib.sha256(backend.to_str().encode())
    digest.update(f"|{tokenizer.bos_token_id}|{tokenizer.eos_token_id}|{len(tokenizer)}".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class TokenizerRef:
    """A tokenizer known by a fingerprint before it is loaded (``load()`` builds it).

    Windows stored under the fingerprint are read without loading the tokenizer: importing
    transformers and building a tokenizer take about 1.5 s, most of a warm rerun.
    ``fingerprint`` None: not cacheable.
    """

    fingerprint: str | None
    load: Callable[[], object]


def bos_id_of(tokenizer) -> int | None:
    """The token that starts every document: BOS, else EOS (GPT-2's ``<|endoftext|>``)."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None else tokenizer.eos_token_id


def build_windows(
    tokenizer,
    config: CorpusConfig,
    *,
    texts: CorpusTexts | None = None,
    cache_dir: Path | None = None,
) -> TokenWindows:
    """Tokenise corpus ``config.name`` into analysis and held-out windows (module docstring).

    ``tokenizer``: a loaded HF tokenizer, or a :class:`TokenizerRef` (loaded only when the
    windows are not stored yet). ``texts`` saves reloading documents shared by several
    models. With ``cache_dir`` the store is kept there, so a rerun does not tokenise again.
    """
    texts = load_corpus_texts(config) if texts is None else texts
    if not isinstance(tokenizer, TokenizerRef):
        loaded = tokenizer
        tokenizer = TokenizerRef(tokenizer_fingerprint(loaded), lambda: loaded)
    if cache_dir is None or tokenizer.fingerprint is None:
        root = Path(tempfile.mkdtemp(prefix="neuronspec-windows-"))
        atexit.register(shutil.rmtree, root, True)
    else:
        root = Path(cache_dir)
    key = cache_key(
        {
            "kind": "token-windows",
            "format": WINDOWS_FORMAT,
            "corpus": asdict(config),
            "texts": texts.digest,
            "tokenizer": tokenizer.fingerprint,
        }
    )
    store = root / f"windows-{key}"
    if (store / "meta.json").is_file():
        try:
            return _open(store, config.name)
        except _DamagedStore:
            pass  # rebuilt below, under the lock
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{store}.lock"):
        if (store / "meta.json").is_file():
            try:
                return _open(store, config.name)
            except _DamagedStore as error:
                warnings.warn(
                    f"token-window store {store} is damaged ({error}); tokenising again",
                    CacheRecomputeWarning,
                    stacklevel=2,
                )
        if store.exists():  # damaged, or a directory without its meta.json
            shutil.rmtree(store)
        _write_store(store, tokenizer.load(), config, texts)
    return _open(store, config.name)


def _write_store(store: Path, tokenizer, config: CorpusConfig, texts: CorpusTexts) -> None:
    """Tokenise ``texts`` into ``store`` (a temporary directory renamed into place)."""
    bos_id = bos_id_of(tokenizer)
    window = config.window
    analysis_limit = None if config.max_tokens is None else config.max_tokens // window
    temp = store.parent / f".{store.name}.{secrets.token_hex(8)}.tmp"
    temp.mkdir()
    try:
        with (temp / "windows.i64").open("wb") as out:
            if texts.stream is not None:  # a directory: no held-out split of its own
                heldout_texts: tuple[str, ...] = ()
                analysis_texts: Iterable[str] = texts.stream()
            else:
                heldout_texts, analysis_texts = texts.heldout, texts.analysis
            limit = analysis_limit
            if analysis_limit is not None and not heldout_texts:
                limit = math.ceil(analysis_limit / (1 - config.heldout_fraction))
            n = write_windows(iter(analysis_texts), tokenizer, bos_id, window, out, limit)
            if heldout_texts:
                n_analysis = n
                n_heldout = write_windows(iter(heldout_texts), tokenizer, bos_id, window, out)
                n += n_heldout
            else:
                n_heldout = int(n * config.heldout_fraction)
                n_analysis = n - n_heldout
                if analysis_limit is not None:
                    n_analysis = min(n_analysis, analysis_limit)
        if n_analysis == 0:
            raise CorpusError(
                f"corpus {config.name!r} is too short: fewer than one analysis window of "
                f"{window} tokens after tokenisation; give more or longer texts, or a "
                "smaller --window"
            )
        windows = np.memmap(temp / "windows.i64", dtype=np.int64, mode="r", shape=(n, window))
        meta = {
            "format": WINDOWS_FORMAT,
            "window": window,
            "n_windows": n,
            "n_analysis": n_analysis,
            "n_heldout": n_heldout,
            "bos_id": bos_id,
            "vocab_size": len(tokenizer),
            "fingerprint": _fingerprint(
                config.name,
                window,
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
    texts: Iterator[str],
    tokenizer,
    bos_id: int | None,
    window: int,
    out: BinaryIO,
    limit: int | None = None,
) -> int:
    """Tokenise ``texts`` into windows appended to ``out`` (int64, row-major) in chunks of
    :data:`CHUNK_WINDOWS`; stop after ``limit`` windows. Returns the windows written."""
    written, pending = 0, []  # pending: tokens of the windows not yet written
    chunk_tokens = CHUNK_WINDOWS * window
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
    """The windows' sha256 (a part of every statistics cache key), read in chunks."""
    digest = hashlib.sha256()
    digest.update(f"{name}|{window}|{bos_id}|{vocab_size}".encode())
    for start in range(0, len(analysis), CHUNK_WINDOWS):
        digest.update(memoryview(np.ascontiguousarray(analysis[start : start + CHUNK_WINDOWS])))
    digest.update(b"|heldout|")
    for start in range(0, len(heldout), CHUNK_WINDOWS):
        digest.update(memoryview(np.ascontiguousarray(heldout[start : start + CHUNK_WINDOWS])))
    return digest.hexdigest()


class _DamagedStore(Exception):
    """The store on disk does not hold what its meta.json says."""


def _open(store: Path, name: str) -> TokenWindows:
    try:
        meta = json.loads((store / "meta.json").read_text())
        window, n = meta["window"], meta["n_windows"]
    except (OSError, ValueError, KeyError) as error:
        raise _DamagedStore(f"unreadable meta.json: {error}") from None
    path = store / "windows.i64"
    if not path.is_file() or path.stat().st_size != n * window * 8:
        raise _DamagedStore("windows.i64 does not have the size meta.json gives")
    windows = np.memmap(path, dtype=np.int64, mode="c", shape=(n, window))  # (n, T)
    analysis = windows[: meta["n_analysis"]]
    heldout = windows[n - meta["n_heldout"] :]
    fingerprint = _fingerprint(name, window, meta["bos_id"], meta["vocab_size"], analysis, heldout)
    if fingerprint != meta["fingerprint"]:
        raise _DamagedStore("the windows were altered: their sha256 differs from meta.json")
    return TokenWindows(
        corpus=name,
        analysis=torch.from_numpy(analysis),
        heldout=torch.from_numpy(heldout),
        bos_id=meta["bos_id"],
        vocab_size=meta["vocab_size"],
        fingerprint=fingerprint,
    )
