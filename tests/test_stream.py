"""Directory corpora (save_to_disk, .parquet, .jsonl) tokenised as a stream into chunked,
memory-mapped windows equal to the in-memory path's."""

from __future__ import annotations

import json

import pytest
import torch

from neuronspec.capture.cache import CacheRecomputeWarning
from neuronspec.data import windows as window_store
from neuronspec.data.corpus import CorpusConfig, load_corpus_texts
from neuronspec.data.toyworld import toyworld_documents
from neuronspec.data.windows import build_windows
from neuronspec.errors import CorpusError
from neuronspec.zoo import weights_dir

DOCS = toyworld_documents("train", n_docs=150)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(weights_dir("tiny-gpt2"), local_files_only=True)


@pytest.fixture(scope="module")
def jsonl_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("file") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return path


def _directory(kind: str, root):
    import datasets

    root.mkdir(parents=True, exist_ok=True)
    if kind == "save_to_disk":
        datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(root))
    elif kind == "parquet":  # split over two files: read in sorted order
        datasets.Dataset.from_dict({"text": DOCS[:70]}).to_parquet(str(root / "a.parquet"))
        datasets.Dataset.from_dict({"text": DOCS[70:]}).to_parquet(str(root / "b.parquet"))
    else:
        (root / "sub").mkdir(parents=True)
        (root / "sub" / "x.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return root


@pytest.mark.parametrize("kind", ["save_to_disk", "parquet", "jsonl"])
def test_directory_windows_equal_the_in_memory_windows(
    kind, tokenizer, jsonl_file, tmp_path, monkeypatch
):
    monkeypatch.setattr(window_store, "CHUNK_WINDOWS", 7)  # several chunks, a partial last one
    monkeypatch.setattr(window_store, "TEXT_BATCH", 16)
    directory = _directory(kind, tmp_path / "corpus" if kind != "save_to_disk" else tmp_path / "ds")
    reference = build_windows(tokenizer, CorpusConfig(name=str(jsonl_file)))
    config = CorpusConfig(name=str(directory))
    streamed = build_windows(tokenizer, config, cache_dir=tmp_path / "cache")
    assert torch.equal(streamed.analysis, reference.analysis)
    assert torch.equal(streamed.heldout, reference.heldout)
    # the same windows of the same name give the same fingerprint formula
    again = build_windows(tokenizer, config, cache_dir=tmp_path / "cache")  # from the store
    assert again.fingerprint == streamed.fingerprint
    (store,) = (tmp_path / "cache").glob("windows-*[0-9a-f]")  # the windows live on disk
    assert (store / "windows.i64").stat().st_size == 8 * 64 * (
        len(reference.analysis) + len(reference.heldout)
    )


def test_texts_are_streamed_not_loaded(tmp_path, tokenizer, monkeypatch):
    directory = _directory("jsonl", tmp_path / "c")
    texts = load_corpus_texts(CorpusConfig(name=str(directory)))
    monkeypatch.setattr(texts, "_load", lambda: pytest.fail("texts loaded together"))
    windows = build_windows(tokenizer, CorpusConfig(name=str(directory)), texts=texts)
    assert windows.n_tokens > 0


def test_max_tokens_stops_the_stream_and_text_limit_counts_documents(tmp_path, tokenizer):
    directory = _directory("jsonl", tmp_path / "c")
    config = CorpusConfig(name=str(directory), max_tokens=640, window=64)
    windows = build_windows(tokenizer, config, cache_dir=tmp_path / "cache")
    assert windows.analysis.shape == (10, 64) and windows.heldout.shape == (1, 64)
    limited = load_corpus_texts(CorpusConfig(name=str(directory), text_limit=5))
    assert list(limited.stream()) == DOCS[:5]


def test_damaged_store_is_rebuilt_and_an_empty_directory_is_a_clear_error(tmp_path, tokenizer):
    directory = _directory("jsonl", tmp_path / "c")
    config = CorpusConfig(name=str(directory))
    build_windows(tokenizer, config, cache_dir=tmp_path / "cache")
    (store,) = (tmp_path / "cache").glob("windows-*[0-9a-f]")
    data = bytearray((store / "windows.i64").read_bytes())
    data[8] ^= 1
    (store / "windows.i64").write_bytes(bytes(data))
    with pytest.warns(CacheRecomputeWarning, match="windows were altered"):
        rebuilt = build_windows(tokenizer, config, cache_dir=tmp_path / "cache")
    assert torch.equal(rebuilt.analysis, build_windows(tokenizer, config).analysis)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no .parquet or .jsonl"):
        build_windows(tokenizer, CorpusConfig(name=str(tmp_path / "empty")))
