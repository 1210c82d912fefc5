"""Corpora as fixed-length token windows, split into an analysis part and a held-out part.

Texts come through ``datasets``: the toy world (default), wikitext-2 when it is in the
local HF cache, or local ``.txt`` / ``.jsonl`` files. Each document is prefixed with the
tokenizer's BOS token (GPT-2 style ``<|endoftext|>``), the token stream is concatenated
and cut into windows of ``window`` tokens; the remainder is dropped. Position 0 of every
window therefore has no context and is treated like a document start by n-gram counts.

The analysis windows and the held-out windows never overlap (METHODS §10: perplexity is
measured on held-out text, never on the windows used to select neurons).
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import itertools
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from neuronspec.errors import CorpusError
from neuronspec.options import default

WINDOWS_FORMAT = 2  # bump when tokenisation into windows or the entry's meta changes


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
    """Whether ``--corpus`` names a directory (read as a stream, windows stored in chunks)."""
    return name not in ("toyworld", "wikitext2", "wikitext-2") and Path(name).expanduser().is_dir()


def _tokenize_stream(texts: list[str], tokenizer, bos_id: int | None) -> list[int]:
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for ids in encoded:
        if bos_id is not None:
            stream.append(bos_id)
        stream.extend(ids)
    return stream


def _to_windows(stream: list[int], window: int) -> torch.Tensor:
    n = len(stream) // window
    return torch.tensor(stream[: n * window], dtype=torch.long).view(n, window)


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
        from neuronspec.data.stream import directory_digest, iter_directory_texts

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

    Windows cached under the fingerprint are read without loading the tokenizer: importing
    transformers and building a tokenizer take about 1.5 s, most of a warm rerun.
    ``fingerprint`` None: not cacheable.
    """

    fingerprint: str | None
    load: Callable[[], object]


def _bos_id(tokenizer) -> int | None:
    bos = tokenizer.bos_token_id
    return bos if bos is not None else tokenizer.eos_token_id


def build_windows(
    tokenizer,
    config: CorpusConfig,
    *,
    texts: CorpusTexts | None = None,
    cache_dir: Path | None = None,
) -> TokenWindows:
    """Tokenise corpus ``config.name`` into analysis and held-out windows.

    ``tokenizer``: a loaded HF tokenizer, or a :class:`TokenizerRef` (loaded only when the
    windows are not cached). ``texts`` saves reloading documents shared by several models.
    With ``cache_dir`` the windows are kept in the disk cache, keyed by the texts' and the
    tokenizer's sha256, so a rerun does not tokenise again.
    """
    texts = load_corpus_texts(config) if texts is None else texts
    if not isinstance(tokenizer, TokenizerRef):
        loaded = tokenizer
        tokenizer = TokenizerRef(tokenizer_fingerprint(loaded), lambda: loaded)
    if texts.stream is not None:
        from neuronspec.data.stream import streamed_windows

        return streamed_windows(tokenizer, config, texts, cache_dir)

    def compute():
        loaded = tokenizer.load()
        bos_id = _bos_id(loaded)
        analysis, heldout = _split_windows(texts, loaded, bos_id, config)
        meta = {"corpus": config.name, "bos_id": bos_id, "vocab_size": len(loaded)}
        return {"analysis": analysis, "heldout": heldout}, meta

    if cache_dir is None or tokenizer.fingerprint is None:
        tensors, meta = compute()
    else:
        from neuronspec.capture.cache import TensorCache, cache_key

        key = cache_key(
            {
                "kind": "token-windows",
                "format": WINDOWS_FORMAT,
                "corpus": asdict(config),
                "texts": texts.digest,
                "tokenizer": tokenizer.fingerprint,
            }
        )
        tensors, meta = TensorCache(Path(cache_dir)).get_or_compute(key, compute)
    analysis, heldout = tensors["analysis"], tensors["heldout"]
    bos_id, vocab_size = meta["bos_id"], meta["vocab_size"]
    digest = hashlib.sha256()
    digest.update(f"{config.name}|{config.window}|{bos_id}|{vocab_size}".encode())
    digest.update(analysis.numpy().tobytes())
    digest.update(b"|heldout|")
    digest.update(heldout.numpy().tobytes())
    return TokenWindows(
        corpus=config.name,
        analysis=analysis,
        heldout=heldout,
        bos_id=bos_id,
        vocab_size=vocab_size,
        fingerprint=digest.hexdigest(),
    )


def _split_windows(
    texts: CorpusTexts, tokenizer, bos_id: int | None, config: CorpusConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(analysis, heldout) windows, ``(n, window)`` int64, from the texts."""
    analysis = _to_windows(_tokenize_stream(list(texts.analysis), tokenizer, bos_id), config.window)
    if texts.heldout:
        heldout = _to_windows(
            _tokenize_stream(list(texts.heldout), tokenizer, bos_id), config.window
        )
    else:
        n_heldout = int(len(analysis) * config.heldout_fraction)
        heldout = analysis[len(analysis) - n_heldout :]
        analysis = analysis[: len(analysis) - n_heldout]
    if config.max_tokens is not None:
        analysis = analysis[: config.max_tokens // config.window]
    if len(analysis) == 0:
        raise CorpusError(
            f"corpus {config.name!r} is too short: fewer than one analysis window of "
            f"{config.window} tokens after tokenisation; give more or longer texts, or a "
            "smaller --window"
        )
    return analysis.contiguous(), heldout.contiguous()
