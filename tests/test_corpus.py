"""Corpora: local files through ``datasets``, windows, the held-out split, limits, errors,
and the disk cache of token windows."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoTokenizer

from neuronspec.capture.cache import CacheRecomputeWarning
from neuronspec.data import windows as window_store
from neuronspec.data.corpus import CorpusConfig, load_corpus_texts
from neuronspec.data.windows import TokenizerRef, build_windows, tokenizer_fingerprint
from neuronspec.errors import CorpusError
from neuronspec.models.registry import open_model, resolve, tokenizer_files_fingerprint


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve("tiny-gpt2").local_dir)


def _paragraphs(n: int) -> str:
    return "\n\n".join(
        f"Document {i}: the capital of Arvenia is Lumen and the river Oster runs by {i}."
        for i in range(n)
    )


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text(_paragraphs(60))
    return path


def _stores(cache):
    """The token-window stores in ``cache`` (one directory per corpus, tokenizer, config)."""
    return [p for p in cache.glob("windows-*") if p.is_dir()]


def _stream(tokenizer, texts, bos_id):
    stream = []
    for text in texts:
        stream += [bos_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    return stream


def test_txt_paragraphs_become_bos_separated_windows_with_a_disjoint_heldout(tokenizer, text_file):
    config = CorpusConfig(name=str(text_file), window=16, heldout_fraction=0.25)
    windows = build_windows(tokenizer, config)
    texts = text_file.read_text().split("\n\n")
    expected = torch.tensor(_stream(tokenizer, texts, windows.bos_id))
    n = len(expected) // 16
    everything = expected[: n * 16].view(n, 16)
    n_heldout = int(n * 0.25)
    assert torch.equal(windows.analysis, everything[: n - n_heldout])
    assert torch.equal(windows.heldout, everything[n - n_heldout :])
    assert windows.bos_id == tokenizer.eos_token_id  # GPT-2: <|endoftext|> starts documents
    assert windows.n_tokens == (n - n_heldout) * 16


def test_jsonl_reads_the_text_field_and_rejects_files_without_one(tokenizer, tmp_path):
    good = tmp_path / "docs.jsonl"
    good.write_text("\n".join(json.dumps({"text": f"fact {i} " * 20}) for i in range(10)))
    windows = build_windows(tokenizer, CorpusConfig(name=str(good), window=8))
    assert windows.analysis.shape[1] == 8 and len(windows.analysis) > 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "no text here"}))
    with pytest.raises(CorpusError, match="no 'text' field"):
        load_corpus_texts(CorpusConfig(name=str(bad)))


def test_limits_cut_documents_and_tokens(tokenizer, text_file):
    full = build_windows(tokenizer, CorpusConfig(name=str(text_file), window=16))
    capped = build_windows(tokenizer, CorpusConfig(name=str(text_file), window=16, max_tokens=40))
    assert torch.equal(capped.analysis, full.analysis[:2])  # whole windows only
    assert capped.fingerprint != full.fingerprint
    few = load_corpus_texts(CorpusConfig(name=str(text_file), text_limit=3))
    assert len(few.analysis) == 3


def test_toyworld_has_its_own_heldout_split(tokenizer):
    windows = build_windows(tokenizer, CorpusConfig(text_limit=200, window=32))
    texts = load_corpus_texts(CorpusConfig(text_limit=200))
    assert len(texts.heldout) == 20 and not set(texts.heldout) & set(texts.analysis)
    assert len(windows.heldout) > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text_limit": 0}, "text limit must be at least 1"),
        ({"max_tokens": 10, "window": 16}, "less than one window"),
        ({"window": 1}, "at least 2 tokens"),
    ],
)
def test_bad_limits_are_rejected_with_the_reason(kwargs, message):
    with pytest.raises(CorpusError, match=message):
        CorpusConfig(**kwargs)


def test_empty_and_too_short_corpora_say_so(tokenizer, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(CorpusError, match="no non-empty texts"):
        build_windows(tokenizer, CorpusConfig(name=str(empty)))
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    with pytest.raises(CorpusError, match="too short"):
        build_windows(tokenizer, CorpusConfig(name=str(short), window=64))


def test_unknown_corpus_and_offline_wikitext_explain_what_to_do(monkeypatch):
    with pytest.raises(CorpusError, match="unknown corpus 'nope.txt'"):
        load_corpus_texts(CorpusConfig(name="nope.txt"))

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr("datasets.load_dataset", offline)
    with pytest.raises(CorpusError, match="wikitext-2 is not available offline"):
        load_corpus_texts(CorpusConfig(name="wikitext2"))


def test_cached_windows_equal_fresh_ones_and_skip_tokenisation(tokenizer, text_file, tmp_path):
    config = CorpusConfig(name=str(text_file), window=16)
    fresh = build_windows(tokenizer, config)
    first = build_windows(tokenizer, config, cache_dir=tmp_path / "cache")
    assert len(_stores(tmp_path / "cache")) == 1

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised although the windows were cached")

    original = window_store.write_windows
    window_store.write_windows = no_tokenising
    try:
        second = build_windows(tokenizer, config, cache_dir=tmp_path / "cache")
    finally:
        window_store.write_windows = original
    for windows in (first, second):
        assert torch.equal(windows.analysis, fresh.analysis)
        assert torch.equal(windows.heldout, fresh.heldout)
        assert windows.fingerprint == fresh.fingerprint


def test_windows_cache_key_follows_texts_config_and_tokenizer(tokenizer, text_file, tmp_path):
    cache = tmp_path / "cache"
    config = CorpusConfig(name=str(text_file), window=16)
    build_windows(tokenizer, config, cache_dir=cache)
    build_windows(tokenizer, replace(config, window=8), cache_dir=cache)
    text_file.write_text(_paragraphs(61))
    changed = build_windows(tokenizer, config, cache_dir=cache)
    assert len(_stores(cache)) == 3
    assert torch.equal(changed.analysis, build_windows(tokenizer, config).analysis)
    other = AutoTokenizer.from_pretrained(resolve("tiny-gpt2").local_dir)
    other.add_tokens(["<extra>"])
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer)


@pytest.mark.parametrize("damage", ["truncated", "flipped", "meta"])
def test_damaged_windows_store_is_rebuilt_with_a_warning(tokenizer, text_file, tmp_path, damage):
    config = CorpusConfig(name=str(text_file), window=16)
    good = build_windows(tokenizer, config)  # in a store of its own
    build_windows(tokenizer, config, cache_dir=tmp_path)
    (store,) = _stores(tmp_path)
    data = bytearray((store / "windows.i64").read_bytes())
    if damage == "truncated":
        (store / "windows.i64").write_bytes(bytes(data[:-7]))
    elif damage == "flipped":
        data[8] ^= 1
        (store / "windows.i64").write_bytes(bytes(data))
    else:
        (store / "meta.json").write_text("{not json")
    with pytest.warns(CacheRecomputeWarning, match="damaged"):
        again = build_windows(tokenizer, config, cache_dir=tmp_path)
    assert torch.equal(again.analysis, good.analysis)
    assert torch.equal(again.heldout, good.heldout) and again.fingerprint == good.fingerprint


def test_windows_cached_under_a_tokenizer_ref_are_read_without_loading_it(
    tokenizer, text_file, tmp_path
):
    """A warm rerun must not import transformers to tokenise: the ref's ``load`` runs only
    on a cache miss, and the cached windows (and their fingerprint) equal fresh ones."""
    config = CorpusConfig(name=str(text_file), window=16)
    loads = []

    def load():
        loads.append(1)
        return tokenizer

    ref = TokenizerRef(fingerprint="f" * 64, load=load)
    fresh = build_windows(tokenizer, config)
    first = build_windows(ref, config, cache_dir=tmp_path)
    second = build_windows(ref, config, cache_dir=tmp_path)
    assert len(loads) == 1
    for windows in (first, second):
        assert torch.equal(windows.analysis, fresh.analysis)
        assert torch.equal(windows.heldout, fresh.heldout)
        assert (windows.bos_id, windows.vocab_size) == (fresh.bos_id, fresh.vocab_size)
        assert windows.fingerprint == fresh.fingerprint
    uncached = build_windows(TokenizerRef(None, load), config, cache_dir=tmp_path)
    assert len(loads) == 2 and uncached.fingerprint == fresh.fingerprint


def test_tokenizer_files_fingerprint_follows_tokenizer_files_not_weights(tmp_path):
    source = resolve("tiny-gpt2").local_dir
    for path in source.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    before = tokenizer_files_fingerprint(tmp_path)
    assert open_model(str(tmp_path)).tokenizer_ref.fingerprint == before
    (tmp_path / "model.safetensors").write_bytes(b"other weights")
    (tmp_path / "README.md").write_text("other docs")
    assert tokenizer_files_fingerprint(tmp_path) == before
    settings = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**settings, "x": 1}))
    assert tokenizer_files_fingerprint(tmp_path) != before
