"""TensorCache under bad conditions: file modes, copies, unwritable or full directories, a
writer killed mid-write, and corrupt, truncated or foreign files (exact messages)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from neuronspec.capture import cache as cache_module
from neuronspec.capture.cache import (
    CacheRecomputeWarning,
    CacheUnwritableWarning,
    TensorCache,
    cache_key,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
KEY = cache_key({"model": "hardening"})


def bundle() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {
        "counts": torch.arange(12, dtype=torch.int64).reshape(3, 4),
        "sums": torch.linspace(-1, 1, 5, dtype=torch.float64),
        "flags": torch.tensor([True, False, True]),
    }
    return tensors, {"n_tokens": 12}


class Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return bundle()


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """The once-per-directory warning memory starts empty in every test."""
    monkeypatch.setattr(cache_module, "_warned_unwritable", set())


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_entry_mode_is_0666_minus_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        TensorCache(tmp_path).save(KEY, *bundle())
    finally:
        os.umask(previous)
    assert (tmp_path / f"{KEY}.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_save_writes_the_tensors_own_memory(tmp_path, monkeypatch):
    """No copy of a contiguous CPU tensor: the bytes written are the tensor's memory."""
    tensors, meta = bundle()
    addresses = []
    real_write = os.write

    def recording_write(fd, view):
        if len(view):
            addresses.append(np.frombuffer(view, dtype=np.uint8).ctypes.data)
        return real_write(fd, view)

    monkeypatch.setattr(cache_module, "_write", recording_write)
    TensorCache(tmp_path).save(KEY, tensors, meta)
    assert {t.data_ptr() for t in tensors.values()} <= set(addresses)


def test_load_views_one_buffer_of_the_file(tmp_path, monkeypatch):
    """Loading copies once: every tensor views the one buffer the file was read into."""
    cache = TensorCache(tmp_path)
    cache.save(KEY, *bundle())
    buffers = []
    real_read = cache_module._read_file

    def recording_read(path):
        buffers.append(real_read(path))
        return buffers[-1]

    monkeypatch.setattr(cache_module, "_read_file", recording_read)
    tensors, _ = cache.load(KEY)
    (buffer,) = buffers
    start = np.frombuffer(buffer, dtype=np.uint8).ctypes.data
    for tensor in tensors.values():
        first, nbytes = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        assert start <= first and first + nbytes <= start + len(buffer)
    expected, _ = bundle()
    for name, tensor in expected.items():
        assert torch.equal(tensors[name], tensor)
    tensors["counts"] += 1  # writable, and the views do not overlap
    assert torch.equal(tensors["sums"], expected["sums"])


def _read_only(monkeypatch, root: Path) -> None:
    """Make ``root`` unwritable: chmod for an ordinary user; root ignores modes, so there a
    write under ``root`` fails as on a read-only mount (EROFS)."""
    root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        root.chmod(0o555)  # pytest's tmp_path cleanup restores the mode to remove it
        return
    real_open = os.open

    def open_read_only(path, flags, *args, **kwargs):
        writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writes and Path(path).resolve().is_relative_to(root.resolve()):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_read_only)


def test_read_only_directory_computes_with_one_warning(tmp_path, monkeypatch):
    root = tmp_path / "shared-cache"
    _read_only(monkeypatch, root)
    compute = Counter()
    cache = TensorCache(root)
    with pytest.warns(CacheUnwritableWarning) as caught:
        tensors, meta = cache.get_or_compute(KEY, compute)
    reason = os.strerror(errno.EROFS if os.geteuid() == 0 else errno.EACCES)
    assert [str(w.message) for w in caught] == [
        f"neuronspec cache directory {root} cannot be written ({reason}); computing "
        "without caching, so the next run computes again: make it writable, or pass "
        "--neuronspec-cache DIR (another directory) or --neuronspec-cache none"
    ]
    assert torch.equal(tensors["counts"], bundle()[0]["counts"]) and meta == {"n_tokens": 12}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per directory and process
        cache.get_or_compute(KEY, compute)
    assert compute.calls == 2
    assert list(root.iterdir()) == []


def test_read_only_directory_still_serves_its_entries(tmp_path, monkeypatch):
    root = tmp_path / "shared-cache"
    TensorCache(root).save(KEY, *bundle())
    _read_only(monkeypatch, root)
    compute = Counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensors, _ = TensorCache(root).get_or_compute(KEY, compute)
    assert compute.calls == 0 and torch.equal(tensors["counts"], bundle()[0]["counts"])


def test_full_disk_during_a_write_leaves_nothing_and_warns_once(tmp_path, monkeypatch):
    real_write = os.write

    def fill_the_disk(fd, view):
        real_write(fd, view[: len(view) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache_module, "_write", fill_the_disk)
    cache, compute = TensorCache(tmp_path), Counter()
    with pytest.warns(CacheUnwritableWarning) as caught:
        tensors, _ = cache.get_or_compute(KEY, compute)
    assert [str(w.message) for w in caught] == [
        f"neuronspec cache directory {tmp_path} cannot be written (No space left on device); "
        "computing without caching, so the next run computes again: free space on that disk, "
        "or pass --neuronspec-cache DIR (another directory) or --neuronspec-cache none"
    ]
    assert torch.equal(tensors["counts"], bundle()[0]["counts"])
    assert [p.name for p in tmp_path.iterdir()] == [f"{KEY}.safetensors.lock"]
    monkeypatch.setattr(cache_module, "_write", real_write)  # space freed: the next run saves
    cache.get_or_compute(KEY, compute)
    assert compute.calls == 2 and cache.load(KEY) is not None


KILLED_WRITER = """
    import sys, time
    from pathlib import Path
    import torch
    from neuronspec.capture import cache as cache_module

    root, key, marker = sys.argv[1:]
    real_write = cache_module._write

    def write_then_hang(fd, view):
        real_write(fd, view[: len(view) // 2])
        Path(marker).touch()  # half of the first block is on disk
        time.sleep(120)

    cache_module._write = write_then_hang
    tensors = {"big": torch.arange(1 << 20, dtype=torch.int64)}
    cache_module.TensorCache(Path(root)).get_or_compute(key, lambda: (tensors, {"n": 1}))
"""


def test_kill_9_during_a_write_and_the_next_run_recomputes(tmp_path):
    script, marker, root = tmp_path / "writer.py", tmp_path / "writing", tmp_path / "cache"
    script.write_text(textwrap.dedent(KILLED_WRITER))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    child = subprocess.Popen([sys.executable, str(script), str(root), KEY, str(marker)], env=env)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert child.poll() is None, "the writer exited before it wrote"
        assert time.monotonic() < deadline, "the writer never started writing"
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL
    cache = TensorCache(root)
    temps = list(root.glob(".*.tmp"))
    assert len(temps) == 1 and temps[0].stat().st_size > 0  # the partial write, never an entry
    assert cache.load(KEY) is None
    compute = Counter()
    tensors, meta = cache.get_or_compute(KEY, compute)
    assert compute.calls == 1 and meta == {"n_tokens": 12}
    assert not list(root.glob(".*.tmp"))  # the killed writer's temp file is removed
    assert cache.load(KEY)[1] == {"n_tokens": 12}


def _entry(tmp_path) -> tuple[TensorCache, Path]:
    cache = TensorCache(tmp_path)
    cache.save(KEY, *bundle())
    return cache, cache.path_for(KEY)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _flip_a_data_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))


def _foreign(path: Path) -> None:
    safetensors.torch.save_file({"x": torch.zeros(2)}, path)


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (
            _truncate,
            "truncated or not a safetensors file (header of {header} bytes but the file has 92 "
            "after its length)",
        ),
        (_flip_a_data_bit, "sha256 mismatch, the file was altered or damaged"),
        (
            _foreign,
            "not a neuronspec cache entry (no neuronspec.cache_format_version, "
            "neuronspec.cache_key, neuronspec.meta, neuronspec.sha256)",
        ),
        (
            _garbage,
            "truncated or not a safetensors file (header of 727905341920923785 bytes but the "
            "file has 64 after its length)",
        ),
    ],
    ids=["truncated", "corrupt", "foreign", "not-safetensors"],
)
def test_damaged_entry_is_recomputed_with_one_warning(tmp_path, damage, reason):
    cache, path = _entry(tmp_path)
    header = int.from_bytes(path.read_bytes()[:8], "little")
    damage(path)
    compute = Counter()
    with pytest.warns(CacheRecomputeWarning) as caught:
        cache.get_or_compute(KEY, compute)
    assert [str(w.message) for w in caught] == [
        f"neuronspec cache: {path}: {reason.format(header=header)}; recomputing the entry and "
        "replacing it"
    ]
    assert compute.calls == 1 and cache.load(KEY)[1] == {"n_tokens": 12}
