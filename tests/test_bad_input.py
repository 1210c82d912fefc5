"""The bad-input table: each case gives the exact message a user sees, saying what was
wrong and what to do. Cache-directory cases (corrupt, truncated, foreign entries; read-only
directory; full disk; kill -9 mid-write) are in test_cache_hardening.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from builders import make_gpt2, wrap

from neuronspec.capture.runner import cached_stats, collect_stats
from neuronspec.data.corpus import CorpusConfig, load_corpus_texts
from neuronspec.data.windows import TokenWindows, build_windows
from neuronspec.errors import CheckpointError, CorpusError, NeuronSpecError
from neuronspec.models.registry import known_model_ids, open_model
from neuronspec.zoo import weights_dir

pytest_plugins = ["pytester"]

KNOWN = ", ".join(known_model_ids())
SPEC = "def test_spec(model_id, layer):\n    pass\n"


@pytest.fixture
def run(pytester: pytest.Pytester):
    """``pytest`` in-process in a neuronspec project holding one spec; returns stderr lines."""
    pytester.makeini("[pytest]\nneuronspec = true\n")
    pytester.makepyfile(test_spec=SPEC)

    def run_pytest(*args: str) -> list[str]:
        result = pytester.runpytest("-p", "no:cacheprovider", *args)
        assert result.ret == pytest.ExitCode.USAGE_ERROR, result.outlines
        return [line for line in result.errlines if line.strip()]

    return run_pytest


def test_unknown_model_suggests_close_ids(run):
    assert run("--models=mamba13m") == [
        f"ERROR: unknown model 'mamba13m'; did you mean 'mamba130m' or 'mamba370m' or "
        f"'mamba790m'? known: {KNOWN}, or a local directory holding an HF checkpoint and tokenizer"
    ]


def test_missing_directory(run):
    assert run("--models=./no/such/ckpt") == [
        f"ERROR: no directory './no/such/ckpt' (from --models); pass an existing checkpoint "
        f"directory or a model id: {KNOWN}"
    ]


def test_directory_that_is_not_a_checkpoint(run, tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    assert run(f"--models={tmp_path}") == [
        f"ERROR: {tmp_path} is not a checkpoint directory: it has no config.json; pass a "
        "directory written by save_pretrained() (config.json, weights, tokenizer)"
    ]


def test_damaged_config_json_is_an_error_naming_the_file_not_a_skip(run, tmp_path):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(weights_dir("tiny-gpt2"), checkpoint)
    (checkpoint / "config.json").write_text('{"n_layer": 4,')  # cut off mid-write
    assert run(f"--models={checkpoint}") == [
        f"ERROR: {checkpoint / 'config.json'} is not valid JSON (Expecting property name "
        "enclosed in double quotes at line 1 column 15); the checkpoint is damaged: write it "
        "again with save_pretrained() or download the model again"
    ]
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        open_model(str(checkpoint))


def test_layer_out_of_range(run):
    assert run("--models=tiny-gpt2", "--layers=1,7") == [
        "ERROR: --layers asks for layer(s) [7] but tiny-gpt2 has 4 layers (0..3); pass "
        "layers in that range"
    ]


def test_layers_that_are_not_numbers(run):
    assert run("--layers=first") == [
        "ERROR: --layers must be comma-separated layer indices such as 0,2,3; got 'first'"
    ]


def test_text_limit_zero(run):
    assert run("--text-limit=0") == [
        "ERROR: text limit must be at least 1 document, got 0; leave --text-limit out to use "
        "every document"
    ]


def test_max_tokens_below_one_window(run):
    assert run("--max-tokens=100", "--window=128") == [
        "ERROR: max tokens (100) is less than one window of 128 tokens; pass --max-tokens 128 "
        "or more, or a smaller --window"
    ]


def test_negative_batch_size(run):
    assert run("--batch-size=-3") == ["ERROR: --batch-size must be at least 1, got -3"]


# -- corpora: raised when the corpus is first needed (shown as `test id: CorpusError: ...`,
# see test_plugin.py::test_too_short_corpus_is_a_one_line_error)


def _texts(path):
    return load_corpus_texts(CorpusConfig(name=str(path))).analysis


def test_empty_corpus_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n   \n")
    with pytest.raises(CorpusError) as error:
        _texts(path)
    assert str(error.value) == (
        f"corpus {str(path)!r} has no non-empty texts; give a file with text (.txt: documents "
        "separated by blank lines; .jsonl: a 'text' field per line)"
    )


def test_corpus_shorter_than_one_window(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("Ada lives in Paris.\n")
    config = CorpusConfig(name=str(path))
    tokenizer = open_model("tiny-gpt2").tokenizer
    with pytest.raises(CorpusError) as error:
        build_windows(tokenizer, config)
    assert str(error.value) == (
        f"corpus {str(path)!r} is too short: fewer than one analysis window of 64 tokens "
        "after tokenisation; give more or longer texts, or a smaller --window"
    )


def test_binary_corpus_file(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_bytes(b"PK\x03\x04" + bytes(range(256)))
    with pytest.raises(CorpusError) as error:
        _texts(path)
    assert str(error.value) == (
        f"corpus file {path} is binary (a NUL byte at offset 4); pass a UTF-8 .txt or .jsonl "
        "text file to --corpus"
    )


def test_non_utf8_corpus_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Zoë lives in Montréal.\n".encode("latin-1"))
    with pytest.raises(CorpusError) as error:
        _texts(path)
    assert str(error.value) == (
        f"corpus file {path} is not UTF-8 (byte 0xeb at offset 2); convert it, e.g. "
        "`iconv -f LATIN1 -t UTF-8`, or pass another file to --corpus"
    )


# -- activations


def test_nan_weight_stops_the_pass_and_caches_nothing(tmp_path):
    model = make_gpt2()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 5] = float("nan")
    loaded = wrap(model, "nan-gpt2")
    windows = torch.randint(1, 97, (4, 16), generator=torch.Generator().manual_seed(0))
    corpus = TokenWindows("toy", windows, windows[:0], bos_id=0, vocab_size=97, fingerprint="c")
    message = (
        "non-finite activations (NaN or inf) in 4 (window, neuron) pairs of one batch; check "
        "the model's weights and dtype"
    )
    for backend in ("native", "torch"):
        with pytest.raises(NeuronSpecError) as error:
            collect_stats(loaded, windows, bos_id=0, batch_size=4, backend=backend)
        assert str(error.value) == message
    with pytest.raises(NeuronSpecError, match="non-finite activations"):
        cached_stats(
            lambda: loaded,
            corpus,
            fingerprint=loaded.fingerprint,
            dtype=torch.float32,
            cache_dir=tmp_path,
            batch_size=4,
        )
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob(".*.tmp"))


def test_results_of_a_failed_run_are_not_half_written(tmp_path):
    """Sanity for the table's promise: the results file is written whole or not at all."""
    from neuronspec.session import write_results

    target = tmp_path / "results.json"
    write_results({"models": {}}, target)
    assert json.loads(target.read_text()) == {"models": {}}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
