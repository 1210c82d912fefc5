"""TensorCache: keys, round trips, integrity checks, atomic writes and the compute-once lock."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch

from neuronspec.capture import cache as cache_module
from neuronspec.capture.cache import (
    CACHE_FORMAT_VERSION,
    CacheRecomputeWarning,
    TensorCache,
    cache_key,
)
from neuronspec.errors import CacheCorruptError

REPO_ROOT = Path(__file__).resolve().parents[1]
KEY = cache_key({"model": "tiny-gpt2@abc", "corpus": "toy@123", "config": {"bins": 64}})
OTHER_KEY = cache_key({"model": "tiny-mamba@def"})


def bundle() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {
        "counts": torch.arange(12, dtype=torch.int64).reshape(3, 4),
        "sums": torch.linspace(-1, 1, 5, dtype=torch.float64),
        "maxima": torch.tensor([[0.5, -2.0], [3.25, 0.0]], dtype=torch.float32),
        "alive": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 7),
        "scalar": torch.tensor(4.5),
    }
    return tensors, {"n_tokens": 4096, "layers": [0, 1], "site": "mlp"}


def assert_same(tensors, expected):
    assert tensors.keys() == expected.keys()
    for name, tensor in expected.items():
        assert tensors[name].dtype == tensor.dtype, name
        assert torch.equal(tensors[name], tensor), name


class Counter:
    """A compute function that counts its calls."""

    def __init__(self, value=None):
        self.calls = 0
        self.value = value or bundle()

    def __call__(self):
        self.calls += 1
        return self.value


# --- cache_key --------------------------------------------------------------------------


def test_cache_key_is_sha256_of_canonical_json_with_the_format_version():
    expected = f'{{"a":[1,2.5],"b":"x","cache_format_version":{CACHE_FORMAT_VERSION}}}'
    assert cache_key({"b": "x", "a": (1, 2.5)}) == hashlib.sha256(expected.encode()).hexdigest()
    assert cache_key({"a": [1, 2.5], "b": "x"}) == cache_key({"b": "x", "a": [1, 2.5]})
    explicit = {"b": "x", "a": [1, 2.5], "cache_format_version": CACHE_FORMAT_VERSION}
    assert cache_key(explicit) == cache_key({"b": "x", "a": [1, 2.5]})


def test_cache_key_changes_with_the_format_version(monkeypatch):
    before = cache_key({"a": 1})
    monkeypatch.setattr(cache_module, "CACHE_FORMAT_VERSION", CACHE_FORMAT_VERSION + 1)
    assert cache_key({"a": 1}) != before


@pytest.mark.parametrize(
    ("parts", "error", "match"),
    [
        ({"config": object()}, TypeError, r"parts\['config'\]: object is not JSON data"),
        ({"x": float("nan")}, TypeError, "non-finite float"),
        ({"x": {1: 2}}, TypeError, "key 1 is a int"),
        ({"cache_format_version": -1}, ValueError, "leave it out"),
    ],
)
def test_cache_key_rejects_what_has_no_canonical_json(parts, error, match):
    with pytest.raises(error, match=match):
        cache_key(parts)


# --- round trip -------------------------------------------------------------------------


def test_round_trip_keeps_dtypes_shapes_values_and_meta(tmp_path):
    cache = TensorCache(tmp_path / "cache")
    tensors, meta = bundle()
    assert cache.load(KEY) is None
    cache.save(KEY, tensors, meta)
    loaded, loaded_meta = cache.load(KEY)
    assert_same(loaded, tensors)
    assert loaded_meta == meta
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f"{KEY}.safetensors"]


def test_many_tensors_and_an_empty_bundle(tmp_path):
    cache = TensorCache(tmp_path)
    many = {f"layer{i}.hist": torch.full((i % 5,), float(i)) for i in range(300)}
    cache.save(KEY, many, {})
    assert_same(cache.load(KEY)[0], many)
    cache.save(OTHER_KEY, {}, {"n_tokens": 0})
    assert cache.load(OTHER_KEY) == ({}, {"n_tokens": 0})


def test_file_is_plain_safetensors_with_the_meta_in_its_header(tmp_path):
    cache = TensorCache(tmp_path)
    cache.save(KEY, *bundle())
    with safetensors.safe_open(cache.path_for(KEY), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["neuronspec.cache_key"] == KEY
    assert metadata["neuronspec.cache_format_version"] == str(CACHE_FORMAT_VERSION)
    assert metadata["neuronspec.meta"] == '{"layers": [0, 1], "n_tokens": 4096, "site": "mlp"}'
    assert len(metadata["neuronspec.sha256"]) == 64


@pytest.mark.parametrize("key", ["abc", KEY.upper(), f"../{KEY[3:]}", KEY + "0"])
def test_path_for_accepts_only_cache_key_digests(tmp_path, key):
    with pytest.raises(ValueError, match="64 lowercase hex"):
        TensorCache(tmp_path).path_for(key)


@pytest.mark.parametrize(
    ("tensors", "meta", "match"),
    [
        ({"a": [1, 2]}, {}, "'a' is a list, not a torch.Tensor"),
        ({"__metadata__": torch.zeros(1)}, {}, "other than '__metadata__'"),
        ({}, {"mean": float("nan")}, r"meta\['mean'\]: non-finite float"),
        ({}, {"stats": object()}, "object is not JSON data"),
    ],
)
def test_save_rejects_what_cannot_round_trip_and_writes_nothing(tmp_path, tensors, meta, match):
    with pytest.raises(TypeError, match=match):
        TensorCache(tmp_path).save(KEY, tensors, meta)
    assert list(tmp_path.iterdir()) == []


def test_get_or_compute_computes_once_and_returns_what_load_returns(tmp_path):
    cache = TensorCache(tmp_path)
    tensors, _ = bundle()
    compute = Counter((tensors, {"shape": (3, 4)}))
    first = cache.get_or_compute(KEY, compute)
    second = cache.get_or_compute(KEY, compute)
    assert compute.calls == 1
    assert first[1] == second[1] == {"shape": [3, 4]}  # JSON form either way
    assert_same(first[0], tensors)
    assert_same(second[0], tensors)


# --- integrity --------------------------------------------------------------------------


def saved_entry(tmp_path) -> tuple[TensorCache, Path, bytes]:
    cache = TensorCache(tmp_path)
    tensors = {"counts": torch.tensor([3, 1, 4]), "mean": torch.tensor([0.25, -1.5])}
    cache.save(KEY, tensors, {"n": 3})
    path = cache.path_for(KEY)
    return cache, path, path.read_bytes()


def assert_recomputed(cache, path):
    """get_or_compute warns naming the file, recomputes once, and leaves a valid entry."""
    compute = Counter()
    with pytest.warns(CacheRecomputeWarning, match=rf"{path}.*recomputing"):
        tensors, meta = cache.get_or_compute(KEY, compute)
    assert compute.calls == 1
    assert_same(tensors, bundle()[0])
    assert_same(cache.load(KEY)[0], bundle()[0])


@pytest.mark.parametrize("keep", [0, 4, 8, 100, -1])
def test_truncated_file_is_corrupt_and_recomputed(tmp_path, keep):
    cache, path, data = saved_entry(tmp_path)
    path.write_bytes(data[: keep if keep >= 0 else len(data) - 1])
    with pytest.raises(CacheCorruptError, match=str(path)):
        cache.load(KEY)
    assert_recomputed(cache, path)


@pytest.mark.parametrize("bit", [0, 6])
def test_every_single_bit_flip_is_detected(tmp_path, bit):
    cache, path, data = saved_entry(tmp_path)
    undetected = []
    for position in range(len(data)):
        flipped = bytearray(data)
        flipped[position] ^= 1 << bit
        path.write_bytes(flipped)
        try:
            cache.load(KEY)
        except CacheCorruptError:
            continue
        undetected.append(position)
    assert undetected == [], f"{len(data)}-byte file, flips at these offsets went unnoticed"
    assert_recomputed(cache, path)


def test_wrong_version_is_corrupt_and_recomputed(tmp_path, monkeypatch):
    cache = TensorCache(tmp_path)
    monkeypatch.setattr(cache_module, "CACHE_FORMAT_VERSION", CACHE_FORMAT_VERSION + 1)
    cache.save(KEY, *bundle())
    monkeypatch.undo()
    path = cache.path_for(KEY)
    with pytest.raises(CacheCorruptError, match=f"cache format {CACHE_FORMAT_VERSION + 1}"):
        cache.load(KEY)
    assert_recomputed(cache, path)


def test_entry_under_the_wrong_key_is_corrupt_and_recomputed(tmp_path):
    cache = TensorCache(tmp_path)
    cache.save(OTHER_KEY, *bundle())
    path = cache.path_for(KEY)
    path.write_bytes(cache.path_for(OTHER_KEY).read_bytes())
    with pytest.raises(CacheCorruptError, match=f"holds key '{OTHER_KEY}'"):
        cache.load(KEY)
    assert_recomputed(cache, path)


def test_foreign_safetensors_file_is_corrupt(tmp_path):
    cache = TensorCache(tmp_path)
    safetensors.torch.save_file({"x": torch.zeros(2)}, cache.path_for(KEY))
    with pytest.raises(CacheCorruptError, match="not a neuronspec cache entry"):
        cache.load(KEY)


# --- atomic writes ----------------------------------------------------------------------


def test_leftover_temp_file_is_ignored(tmp_path):
    """A crash before the rename leaves only a temp file: the entry still reads as absent."""
    cache, path, data = saved_entry(tmp_path)
    path.rename(path.with_name(f".{path.name}.0123456789abcdef.tmp"))
    assert cache.load(KEY) is None
    compute = Counter()
    cache.get_or_compute(KEY, compute)
    assert compute.calls == 1


@pytest.mark.parametrize("fail_in", ["write", "replace"])
def test_failed_write_keeps_the_previous_entry_and_no_temp_file(tmp_path, monkeypatch, fail_in):
    cache, path, data = saved_entry(tmp_path)
    real_write = os.write

    def write_half_then_crash(fd, view):
        real_write(fd, view[: len(view) // 2])
        raise OSError("disk full")

    def crash(*args):
        raise OSError("disk full")

    if fail_in == "write":
        monkeypatch.setattr(cache_module, "_write", write_half_then_crash)
    else:
        monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        cache.save(KEY, *bundle())
    assert path.read_bytes() == data
    assert sorted(tmp_path.iterdir()) == [path]


# --- concurrency ------------------------------------------------------------------------

WORKER = """
    import json, sys, time
    from pathlib import Path

    import safetensors.torch
    import torch

    from neuronspec.capture.cache import TensorCache

    root, key, counter, ready, name, out = sys.argv[1:]
    Path(ready, name).touch()
    deadline = time.monotonic() + 60
    while len(list(Path(ready).iterdir())) < 2:  # start get_or_compute together
        if time.monotonic() > deadline:
            sys.exit("the other worker never started")
        time.sleep(0.005)

    def compute():
        with open(counter, "a") as f:
            f.write(name + "\\n")
        time.sleep(1.0)  # the other worker arrives while this one computes
        tensors = {"counts": torch.arange(6), "mean": torch.linspace(0, 1, 4, dtype=torch.float64)}
        return tensors, {"computed_by": name}

    tensors, meta = TensorCache(Path(root)).get_or_compute(key, compute)
    safetensors.torch.save_file(tensors, out, metadata={"meta": json.dumps(meta)})
"""


def test_two_processes_compute_an_entry_once_and_get_identical_tensors(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    (tmp_path / "ready").mkdir()
    counter = tmp_path / "computations.txt"
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    args = [str(tmp_path / "cache"), KEY, str(counter), str(tmp_path / "ready")]
    workers = [
        subprocess.Popen(
            [sys.executable, str(script), *args, name, str(tmp_path / f"{name}.safetensors")],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("w1", "w2")
    ]
    for worker in workers:
        _, stderr = worker.communicate(timeout=120)
        assert worker.returncode == 0, stderr
    assert len(counter.read_text().splitlines()) == 1
    with safetensors.safe_open(tmp_path / "w1.safetensors", framework="pt") as f1:
        with safetensors.safe_open(tmp_path / "w2.safetensors", framework="pt") as f2:
            assert f1.metadata() == f2.metadata()
            for name in ("counts", "mean"):
                assert torch.equal(f1.get_tensor(name), f2.get_tensor(name))
