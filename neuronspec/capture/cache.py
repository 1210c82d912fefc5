"""Content-addressed disk cache of tensor bundles (streamed neuron statistics).

One entry is one safetensors file ``<root>/<key>.safetensors``: the tensors, plus in the
safetensors metadata header the caller's JSON ``meta``, the entry's key, the cache format
version and a sha256 over all of them (tensor names, dtypes, shapes and bytes included).
No pickle is involved in writing or reading.

Guarantees:
- an entry that loads is the one that was saved under its key: a truncated, bit-flipped,
  wrong-version or wrong-key file raises :class:`~neuronspec.errors.CacheCorruptError`;
- a write is atomic (temp file in the same directory, fsync, ``os.replace``), so a crash
  leaves either the previous entry or none, never a partial file under the final name;
- :meth:`TensorCache.get_or_compute` holds a file lock on ``<entry>.lock`` while it
  computes, so concurrent processes compute each entry once;
- files are created with mode 0666 minus the umask (a team can share the directory);
- a directory that cannot be written (read-only, full disk) costs the caching, not the
  result: :meth:`TensorCache.get_or_compute` computes, warns once per directory with a
  :class:`CacheUnwritableWarning`, and leaves no partial file.

The file is written and read here, not by ``safetensors.torch``, so that the tensors are
copied once at most: saving writes each CPU tensor's own memory to the file (a tensor
on another device or not contiguous is copied to the CPU once); loading reads the file
into one buffer that the returned tensors view (they share it, without overlapping).
The layout is plain safetensors: an 8-byte little-endian header length, a JSON header
(``dtype``, ``shape``, ``data_offsets`` per tensor, ``__metadata__``) padded with spaces to
8 bytes, then the tensors' bytes, largest alignment first, each at an aligned offset.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import secrets
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from neuronspec.errors import CacheCorruptError

CACHE_FORMAT_VERSION = 1  # bump when the entry layout or the meaning of a stored statistic changes

_VERSION_PART = "cache_format_version"  # the name cache_key gives CACHE_FORMAT_VERSION
_KEY_PATTERN = re.compile(r"[0-9a-f]{64}")
_SUFFIX = ".safetensors"
# safetensors metadata fields written by this module
_META_VERSION = "neuronspec.cache_format_version"
_META_KEY = "neuronspec.cache_key"
_META_JSON = "neuronspec.meta"
_META_SHA256 = "neuronspec.sha256"

Tensors = dict[str, torch.Tensor]


class CacheRecomputeWarning(UserWarning):
    """A cache entry was corrupt and is being recomputed."""


class CacheUnwritableWarning(UserWarning):
    """The cache directory cannot be written; results are computed without caching."""


# safetensors dtype names (safetensors/src/tensor.rs)
_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
_write = os.write  # module level, so a test can simulate a full disk
_WRITE_BLOCK = 1 << 26  # bytes per write call
_warned_unwritable: set[Path] = set()


def cache_key(parts: Mapping[str, object]) -> str:
    """sha256 hex digest of a canonical JSON of ``parts`` plus :data:`CACHE_FORMAT_VERSION`.

    Values must be JSON data (dicts with str keys, lists/tuples, str, int, finite float,
    bool, None); anything else raises TypeError, so a key never depends on a ``repr``.
    """
    if _VERSION_PART in parts and parts[_VERSION_PART] != CACHE_FORMAT_VERSION:
        raise ValueError(
            f"cache_key: parts[{_VERSION_PART!r}] is {parts[_VERSION_PART]!r}, but this is "
            f"cache format {CACHE_FORMAT_VERSION}; leave it out, cache_key adds it"
        )
    _check_json(parts, "parts")
    canonical = json.dumps(
        {**parts, _VERSION_PART: CACHE_FORMAT_VERSION},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        allow_nan=False,
    )
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _check_json(value: object, path: str) -> None:
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError(f"{path}: non-finite float {value!r} is not canonical JSON")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_json(item, f"{path}[{index}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{path}: key {key!r} is a {type(key).__name__}, not a str")
            _check_json(item, f"{path}[{key!r}]")
        return
    raise TypeError(
        f"{path}: {type(value).__name__} is not JSON data; pass a fingerprint string or "
        "the plain-JSON form (e.g. config.to_json())"
    )


class TensorCache:
    """A directory of cache entries, one safetensors file per key (see module docstring)."""

    def __init__(self, root: Path, *, lock_timeout: float = -1) -> None:
        """``lock_timeout``: seconds to wait for another process's computation (-1: forever)."""
        self.root = Path(root)
        self.lock_timeout = lock_timeout

    def path_for(self, key: str) -> Path:
        """The entry's file. ``key`` must be a :func:`cache_key` digest (64 lowercase hex)."""
        if not isinstance(key, str) or _KEY_PATTERN.fullmatch(key) is None:
            raise ValueError(
                f"cache key must be 64 lowercase hex digits from cache_key(); got {key!r}"
            )
        return self.root / f"{key}{_SUFFIX}"

    def load(self, key: str) -> tuple[Tensors, dict] | None:
        """The entry's tensors and meta; None if absent; CacheCorruptError if it fails a check.

        The tensors view one buffer holding the file (read once: the file may be replaced
        while we look), so loading copies the data once.
        """
        path = self.path_for(key)
        try:
            data = _read_file(path)
        except FileNotFoundError:
            return None
        try:
            metadata, tensors = _parse(data)
        except ValueError as error:
            raise CacheCorruptError(
                f"{path}: truncated or not a safetensors file ({error})"
            ) from error
        missing = [
            f for f in (_META_VERSION, _META_KEY, _META_JSON, _META_SHA256) if f not in metadata
        ]
        if missing:
            raise CacheCorruptError(
                f"{path}: not a neuronspec cache entry (no {', '.join(missing)})"
            )
        if metadata[_META_VERSION] != str(CACHE_FORMAT_VERSION):
            raise CacheCorruptError(
                f"{path}: written by cache format {metadata[_META_VERSION]}, "
                f"this is format {CACHE_FORMAT_VERSION}"
            )
        if metadata[_META_KEY] != key:
            raise CacheCorruptError(f"{path}: holds key {metadata[_META_KEY]!r}, not {key!r}")
        digest = _digest(key, metadata[_META_JSON], tensors)
        if metadata[_META_SHA256] != digest:
            raise CacheCorruptError(f"{path}: sha256 mismatch, the file was altered or damaged")
        try:
            meta = json.loads(metadata[_META_JSON])
        except ValueError as error:  # unreachable unless sha256 collides; checked anyway
            raise CacheCorruptError(f"{path}: meta is not JSON ({error})") from error
        return tensors, meta

    def save(self, key: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Write the entry atomically, replacing any previous one.

        ``tensors`` are written from their own memory (copied only if on another device or
        not contiguous); ``meta`` must be JSON data (it comes back through ``json.loads``:
        tuples as lists). Raises OSError when the directory cannot be written; then no
        file is left behind and a previous entry stays as it was.
        """
        path = self.path_for(key)
        tensors = _cpu_tensors(tensors)
        meta_json = _meta_json(meta)
        metadata = {
            _META_VERSION: str(CACHE_FORMAT_VERSION),
            _META_KEY: key,
            _META_JSON: meta_json,
            _META_SHA256: _digest(key, meta_json, tensors),
        }
        header, order = _header(tensors, metadata)
        self.root.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            # O_EXCL: a fresh file, mode 0o666 minus the umask like any other output file
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                _write_all(fd, header)
                for name in order:
                    _write_all(fd, _bytes_of(tensors[name]))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)  # gone after os.replace; removes it after a failure
        _fsync_dir(self.root)

    def get_or_compute(
        self, key: str, compute: Callable[[], tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]]
    ) -> tuple[Tensors, dict]:
        """The entry for ``key``, computed by ``compute()`` and saved if absent or corrupt.

        Concurrent callers (threads or processes) compute a key once: the computation runs
        under ``<entry>.lock`` and the entry is looked up again after acquiring it. A corrupt
        entry is reported with a :class:`CacheRecomputeWarning` and overwritten.
        """
        path = self.path_for(key)
        try:
            hit = self.load(key)  # fast path: no lock for an entry that is already there
        except CacheCorruptError:
            hit = None  # decided again under the lock, where it is reported and replaced
        if hit is not None:
            return hit
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            lock = FileLock(f"{path}.lock", timeout=self.lock_timeout)
            lock.acquire()
        except OSError as error:  # read-only or full: compute, without the cache
            self._warn_unwritable(error)
            return _computed(compute)
        try:
            try:
                hit = self.load(key)
            except CacheCorruptError as error:
                warnings.warn(
                    f"neuronspec cache: {error}; recomputing the entry and replacing it",
                    CacheRecomputeWarning,
                    stacklevel=2,
                )
            if hit is not None:
                return hit
            self._remove_stale_temps(path)
            tensors, meta = _computed(compute)
            try:
                self.save(key, tensors, meta)
            except OSError as error:
                self._warn_unwritable(error)
            return tensors, meta
        finally:
            lock.release()

    def _warn_unwritable(self, error: OSError) -> None:
        """One warning per directory and process: the run goes on without caching."""
        root = self.root.resolve()
        if root in _warned_unwritable:
            return
        _warned_unwritable.add(root)
        reason = error.strerror or str(error)
        if error.errno == errno.ENOSPC:
            remedy = "free space on that disk"
        else:
            remedy = "make it writable"
        warnings.warn(
            f"neuronspec cache directory {self.root} cannot be written ({reason}); "
            f"computing without caching, so the next run computes again: {remedy}, or "
            "pass --neuronspec-cache DIR (another directory) or --neuronspec-cache none",
            CacheUnwritableWarning,
            stacklevel=3,
        )

    @staticmethod
    def _remove_stale_temps(path: Path) -> None:
        """Temp files of this entry left by a writer that was killed (we hold its lock)."""
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)


def _computed(
    compute: Callable[[], tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]],
) -> tuple[Tensors, dict]:
    tensors, meta = compute()
    return _cpu_tensors(tensors), json.loads(_meta_json(meta))  # what a later load returns


def _cpu_tensors(tensors: Mapping[str, torch.Tensor]) -> Tensors:
    """Detached, contiguous CPU tensors: the given ones where they are such, else one copy."""
    if not isinstance(tensors, Mapping):
        raise TypeError(
            f"cache tensors must be a dict of name -> tensor, got {type(tensors).__name__}"
        )
    out: Tensors = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise TypeError(f"cache tensor name {name!r} must be a str other than '__metadata__'")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"cache tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor"
            )
        if tensor.dtype not in _DTYPE_NAMES:
            raise TypeError(f"cache tensor {name!r} has dtype {tensor.dtype}, not storable")
        out[name] = tensor.detach().cpu().contiguous()  # no copy when already so
    return out


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    if tensor.numel() == 0:
        return memoryview(b"")
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _header(tensors: Tensors, metadata: dict[str, str]) -> tuple[bytes, list[str]]:
    """The safetensors length field and header, and the order of the tensors' bytes."""
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    entries: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name in order:
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        entries[name] = {
            "dtype": _DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
    return len(header).to_bytes(8, "little") + header, order


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        written = _write(fd, view[:_WRITE_BLOCK])
        view = view[written:]


def _read_file(path: Path) -> bytearray:
    """The whole file in one writable buffer (the tensors view it)."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        data = bytearray(size)
        view = memoryview(data)
        done = 0
        while done < size:
            got = handle.readinto(view[done:])
            if not got:
                raise OSError(f"{path} shrank while it was read")
            done += got
    return data


def _parse(data: bytearray) -> tuple[dict[str, str], Tensors]:
    """``__metadata__`` and the tensors (views of ``data``) of a safetensors file."""
    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes, shorter than the safetensors header length field")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError(
            f"header of {size} bytes but the file has {len(data) - 8} after its length"
        )
    try:
        header = json.loads(bytes(data[8 : 8 + size]))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("safetensors __metadata__ is not a str -> str map")
    start, available = 8 + size, len(data) - 8 - size
    tensors: Tensors = {}
    for name, entry in header.items():
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = [int(n) for n in entry["shape"]]
            begin, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {name!r} has a malformed header entry") from None
        numel = math.prod(shape)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= available:
            raise ValueError(f"tensor {name!r} lies outside the file")
        if end - begin != numel * itemsize or (start + begin) % itemsize:
            raise ValueError(f"tensor {name!r}: its bytes do not match its dtype and shape")
        if numel == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            flat = torch.frombuffer(data, dtype=dtype, count=numel, offset=start + begin)
            tensors[name] = flat.reshape(shape)
    return metadata, tensors


def _meta_json(meta: Mapping[str, Any]) -> str:
    if not isinstance(meta, Mapping):
        raise TypeError(f"cache meta must be a dict, got {type(meta).__name__}")
    _check_json(meta, "meta")
    return json.dumps(meta, sort_keys=True, allow_nan=False)


def _digest(key: str, meta_json: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over version, key, meta and each tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()

    def field(data: bytes | memoryview) -> None:
        h.update(len(data).to_bytes(8, "little"))  # length-prefixed: fields cannot run together
        h.update(data)

    field(str(CACHE_FORMAT_VERSION).encode())
    field(key.encode())
    field(meta_json.encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        field(name.encode())
        field(str(tensor.dtype).encode())
        field(json.dumps(list(tensor.shape)).encode())
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # (nbytes,)
        field(memoryview(raw.numpy()))
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (POSIX); directories cannot be opened for fsync on Windows."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
