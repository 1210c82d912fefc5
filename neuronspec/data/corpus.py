"""Corpora: which texts, how many, and their documents (:class:`CorpusTexts`).

Texts come through ``datasets``: the toy world (default), wikitext-2 when it is in the
local HF cache, local ``.txt`` / ``.jsonl`` files, or a directory
(:mod:`neuronspec.data.directory`, read as a stream). :mod:`neuronspec.data.windows` cuts
them into token windows.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import itertools
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from neuronspec.errors import CorpusError
from neuronspec.options import default


@dataclass(frozen=True)
class CorpusConfig:
    """Which texts, and how many. ``text_limit`` counts documents; ``max_tokens`` caps the
    analysis tokens (whole windows); ``None`` means no limit."""

    name: str = default("corpus.name")
    window: int = default("corpus.window")
    text_limit: int | None = None
    max_tokens: int | None = None
    heldout_fraction: float = 0.1  # used only when a corpus has no held-out split of its own

    def __post_init__(self) -> None:
        if self.text_limit is not None and self.text_limit < 1:
            raise CorpusError(
                f"text limit must be at least 1 document, got {self.text_limit}; leave "
                "--text-limit out to use every document"
            )
        if self.max_tokens is not None and self.max_tokens < self.window:
            raise CorpusError(
                f"max tokens ({self.max_tokens}) is less than one window of {self.window} "
                f"tokens; pass --max-tokens {self.window} or more, or a smaller --window"
            )
        if self.window < 2:
            raise CorpusError(f"window length must be at least 2 tokens, got {self.window}")


def load_texts(name: str, split: str) -> list[str]:
    """Texts of corpus ``name`` for ``split`` ("analysis" or "heldout"), via ``datasets``.

    For corpora without their own held-out split this returns all texts for "analysis"
    and an empty list for "heldout" (the caller then splits windows).
    """
    import datasets

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if name == "toyworld":
        from neuronspec.data.toyworld import toyworld_dataset

        dataset = toyworld_dataset("train" if split == "analysis" else "heldout")
    elif name in ("wikitext2", "wikitext-2"):
        hf_split = "train" if split == "analysis" else "validation"
        try:
            dataset = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)
        except Exception as error:  # datasets raises several types when offline
            raise CorpusError(
                "wikitext-2 is not available offline: on a machine with network run "
                "`python -c \"import datasets; datasets.load_dataset('wikitext', "
                "'wikitext-2-raw-v1')\"` and copy ~/.cache/huggingface here, or pass a "
                f"local .txt/.jsonl file to --corpus ({type(error).__name__}: {error})"
            ) from error
    else:
        path = Path(name).expanduser()
        if not path.is_file():
            raise CorpusError(
                f"unknown corpus {name!r}: use 'toyworld', 'wikitext2', a path to a local "
                ".txt (one document per blank-line-separated paragraph) or .jsonl file with a "
                "'text' field, or a directory: a `datasets` save_to_disk dataset or a folder of "
                ".parquet / .jsonl files with a 'text' column"
            )
        if split == "heldout":
            return []
        _check_text_file(path)
        if path.suffix == ".jsonl":
            dataset = datasets.load_dataset("json", data_files=str(path), split="train")
            if "text" not in dataset.column_names:
                raise CorpusError(f"{path} has no 'text' field; columns: {dataset.column_names}")
        else:
            dataset = datasets.load_dataset(
                "text", data_files=str(path), split="train", sample_by="paragraph"
            )
    return [text for text in dataset["text"] if text and text.strip()]


def _check_text_file(path: Path) -> None:
    """A local corpus must be UTF-8 text: no NUL byte, every byte sequence valid UTF-8.
    Read in blocks (memory independent of the file's size)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            nul = block.find(b"\0")
            if nul >= 0:
                raise CorpusError(
                    f"corpus file {path} is binary (a NUL byte at offset {offset + nul}); "
                    "pass a UTF-8 .txt or .jsonl text file to --corpus"
                )
            try:
                decoder.decode(block)
            except UnicodeDecodeError as error:
                raise CorpusError(
                    f"corpus file {path} is not UTF-8 (byte 0x{block[error.start]:02x} at offset "
                    f"{offset + error.start}); convert it, e.g. `iconv -f LATIN1 -t UTF-8`, "
                    "or pass another file to --corpus"
                ) from None
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise CorpusError(
            f"corpus file {path} is not UTF-8 (it ends inside a multi-byte character); "
            "convert it, e.g. `iconv -f LATIN1 -t UTF-8`, or pass another file to --corpus"
        ) from None


def is_streamed_corpus(name: str) -> bool:
    """Whether ``--corpus`` names a directory (its texts read as a stream)."""
    return name not in ("toyworld", "wikitext2", "wikitext-2") and Path(name).expanduser().is_dir()


class CorpusTexts:
    """The documents of a corpus config (``text_limit`` applied) and a ``digest`` naming them.

    For the toy world the digest is the sha256 of its generator's source (and of this
    module, which filters the documents), the Python
    version and the limit (the documents are a pure function of those), so the documents
    are generated only if someone reads them, i.e. when the windows are not cached. For
    other corpora the texts are loaded at once and the digest is their content's sha256.
    """

    def __init__(
        self,
        digest: str,
        load: Callable[[], tuple[list[str], list[str]]],
        *,
        stream: Callable[[], Iterator[str]] | None = None,
    ):
        self.digest = digest
        self._load = load
        self.stream = stream  # for directory corpora: the analysis texts one by one

    @functools.cached_property
    def _texts(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        analysis, heldout = self._load()
        return tuple(analysis), tuple(heldout)

    @property
    def analysis(self) -> tuple[str, ...]:
        return self._texts[0]

    @property
    def heldout(self) -> tuple[str, ...]:
        return self._texts[1]


def _limited_texts(config: CorpusConfig) -> tuple[list[str], list[str]]:
    texts = load_texts(config.name, "analysis")
    heldout_texts = load_texts(config.name, "heldout")
    if config.text_limit is not None:
        texts = texts[: config.text_limit]
        heldout_texts = heldout_texts[: max(1, config.text_limit // 10)]
    if not texts:
        raise CorpusError(
            f"corpus {config.name!r} has no non-empty texts; give a file with text (.txt: "
            "documents separated by blank lines; .jsonl: a 'text' field per line)"
        )
    return texts, heldout_texts


def load_corpus_texts(config: CorpusConfig) -> CorpusTexts:
    """Analysis and held-out documents of ``config.name``, limited by ``config.text_limit``.

    A directory (a ``datasets`` ``save_to_disk`` dataset, or a folder of ``.parquet`` /
    ``.jsonl`` files) is named by its files' content and read as a stream
    (:attr:`CorpusTexts.stream`); its texts are never loaded together."""
    if is_streamed_corpus(config.name):
        from neuronspec.data.directory import directory_digest, iter_directory_texts

        path = Path(config.name).expanduser()
        digest = hashlib.sha256(b"directory corpus|")
        digest.update(f"{directory_digest(path)}|limit {config.text_limit}".encode())

        def stream():
            texts = iter_directory_texts(path)
            return (
                texts if config.text_limit is None else itertools.islice(texts, config.text_limit)
            )

        return CorpusTexts(digest.hexdigest(), lambda: (list(stream()), []), stream=stream)
    if config.name == "toyworld":
        from neuronspec.data import toyworld

        digest = hashlib.sha256(b"toyworld generator|")
        for source in (toyworld.__file__, __file__):  # the generator and load_texts
            digest.update(Path(source).read_bytes())
        digest.update(f"|python {sys.version_info[:2]}|limit {config.text_limit}".encode())
        return CorpusTexts(digest.hexdigest(), lambda: _limited_texts(config))
    texts, heldout_texts = _limited_texts(config)
    digest = hashlib.sha256()
    for part in (texts, heldout_texts):
        digest.update(f"|{len(part)}|".encode())
        for text in part:
            encoded = text.encode("utf-8", "surrogatepass")
            digest.update(f"{len(encoded)}:".encode())
            digest.update(encoded)
    return CorpusTexts(digest.hexdigest(), lambda: (texts, heldout_texts))
