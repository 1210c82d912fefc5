"""The statistics cache key holds everything that can change a number: weights, dtype,
corpus, configuration, device, statistics backend and Mamba scan path."""

from __future__ import annotations

import pytest
import torch
from builders import make_mamba, wrap

from neuronspec import native
from neuronspec.capture.config import StatsConfig
from neuronspec.capture.runner import cached_stats, computation_path, stats_cache_key
from neuronspec.data.windows import TokenWindows

WINDOWS = torch.randint(1, 97, (4, 12), generator=torch.Generator().manual_seed(1))
CORPUS = TokenWindows("toy", WINDOWS, WINDOWS[:0], bos_id=0, vocab_size=97, fingerprint="c1")
BASE = {"device": "cpu", "stats": "native", "scan": "kernel"}


def key(path=BASE, dtype=torch.float32, fingerprint="w1", corpus=CORPUS, config=StatsConfig()):
    return stats_cache_key(fingerprint, dtype, corpus, config, path)


@pytest.mark.parametrize(
    "change",
    [
        {"scan": "hf"},  # --no-fast-scan
        {"scan": "chunked"},  # fast scan without the C kernel
        {"device": "cuda"},
        {"stats": "torch"},  # the stats kernel did not build
    ],
    ids=["scan-hf", "scan-chunked", "device", "stats-backend"],
)
def test_each_part_of_the_computation_path_changes_the_key(change):
    assert key({**BASE, **change}) != key()


def test_weights_dtype_corpus_and_config_change_the_key():
    other = TokenWindows("toy", WINDOWS, WINDOWS[:0], 0, 97, fingerprint="c2")
    variants = [
        key(fingerprint="w2"),
        key(dtype=torch.float64),
        key(corpus=other),
        key(config=StatsConfig(trigrams=True)),
    ]
    assert len({key(), *variants}) == 5


def test_computation_path_follows_the_options(monkeypatch):
    assert computation_path(model_type="mamba", fast_scan=False)["scan"] == "hf"
    assert computation_path(model_type="gpt2", fast_scan=False)["scan"] is None
    assert computation_path(dtype=torch.float64)["stats"] == "torch"  # native is float32 only
    assert computation_path(device="cpu")["device"] == "cpu"
    native_path = computation_path(model_type="mamba")
    monkeypatch.setattr(native, "kernels_available", lambda: False)
    torch_path = computation_path(model_type="mamba")
    if native_path["stats"] == "native":  # a machine with a C compiler
        assert native_path == {"device": "cpu", "stats": "native", "scan": "kernel"}
    assert torch_path == {"device": "cpu", "stats": "torch", "scan": "chunked"}


def test_no_fast_scan_after_a_fast_run_computes_again(tmp_path, monkeypatch):
    """The reported defect: ``--no-fast-scan`` after a normal run reused the fast entry."""
    loaded = wrap(make_mamba(), "random-mamba")
    loads = []

    def load():
        loads.append(1)
        return loaded

    def stats(fast_scan):
        return cached_stats(
            load,
            CORPUS,
            fingerprint=loaded.fingerprint,
            dtype=torch.float32,
            cache_dir=tmp_path,
            fast_scan=fast_scan,
            model_type="mamba",
        )

    stats(True)
    stats(True)
    assert len(loads) == 1  # the second run is a hit
    stats(False)
    assert len(loads) == 2
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
