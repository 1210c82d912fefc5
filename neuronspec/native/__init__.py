"""Native C kernels: built once per machine with the system C compiler, called via ctypes.

Sources: ``scan.c`` (the Mamba selective scan and causal conv + SiLU, no autograd; wrapped by
:mod:`neuronspec.models.kernel`) and ``stats.c`` (one layer of the streamed statistics
pass, and the final (neuron, token) table; used by :mod:`neuronspec.capture.native_stats`).
Both are compiled into one shared library without torch headers: the compiler is ``$CC``,
else Python's, else ``cc``; the library is cached per (sources, flags, compiler, CPU) in
``$NEURONSPEC_KERNEL_DIR`` (default ``~/.cache/neuronspec/kernels``). It is written under a temporary name and renamed into
place, so a crash mid-build never leaves a file that loads; concurrent builders (xdist
workers) race harmlessly; a library that does not load is rebuilt once.

A failure (no compiler, a failing build, a kernel directory that cannot be created or
written, a library that does not load) is remembered for the process: the compiler runs
once, not once per layer and batch, and :func:`kernels_available` warns once, naming the
cause, before callers fall back to the torch forms.

The kernels parallelise with OpenMP (``-fopenmp``). The library needs libgomp by soname,
and the dynamic linker resolves that to the libgomp torch has already loaded, so the
kernels run on torch's own OpenMP thread pool, which is awake after torch's matmuls; a
separate pool (Python threads, a second OpenMP runtime) would compete with torch's
spinning workers for the cores. Callers pass ``torch.get_num_threads()``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
import warnings
from pathlib import Path

import torch  # noqa: F401  (loads torch, and its libgomp, before the kernels need libgomp)

from neuronspec.errors import NeuronSpecError

__all__ = ["KernelUnavailableError", "kernels_available", "load_library"]

SOURCES = tuple(Path(__file__).with_name(name) for name in ("scan.c", "stats.c", "sparsity.c"))
HEADERS = (Path(__file__).with_name("fastmath.h"),)  # included by the sources: in the build key
FLAGS = ("-O3", "-march=native", "-std=c11", "-fPIC", "-shared", "-fopenmp")
ABI_VERSIONS = {"neuronspec_scan_abi": 4, "neuronspec_stats_abi": 13, "neuronspec_sparsity_abi": 1}

_i64, _ptr, _f32, _f64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_double
_SCAN_ARGS = (
    [_i64] * 5  # threads, B, L, d, N
    + [_ptr, _i64, _i64]  # dt (+ batch and time strides)
    + [_ptr, ctypes.c_int]  # delta_bias, softplus
    + [_ptr, _i64, _i64]  # x (+ strides)
    + [_ptr]  # At
    + [_ptr, _i64, _i64] * 2  # B, C (+ strides)
    + [_ptr]  # D
    + [_ptr, _i64, _i64] * 2  # z, out (+ strides)
    + [_ptr] * 2  # h_last, delta_sum
)
_STATS_ARGS = (
    [_i64] * 4  # threads, B, T, W
    + [_ptr, _i64, _i64] * 2  # pre, act (+ batch and time strides)
    + [_f32, _ptr, _ptr, _ptr]  # threshold, zpos, row_offset, row_bits
    + [_ptr] * 3  # arena, fires, fire_by_pos
    + [_ptr] * 2  # window_group, fire_by_pos_groups
    + [_ptr, _i64, _i64, _ptr, _ptr]  # tail_tokens, V, n_tail, tail_keys, tail_spans
    + [_ptr] * 5  # act_sum, act_sumsq, act_absmax, pearson_abs_sum, window_sums
    + [_f64]  # constant_variance
)
_NNZ_ARGS = [_i64] * 3 + [_ptr] * 4  # threads, D, W, arena, row_offset, row_bits, nnz
# threads, D, W, V; arena, row_offset, row_bits, tokens, tail (keys, counts, starts), out..
_TABLE_ARGS = [_i64] * 4 + [_ptr] * 10
_CONV_ARGS = [_i64] * 5 + [_ptr, _i64, _i64] + [_ptr] * 3  # threads, B, L, d, K, x.., wt, b, out
# threads, B, T, W, act (+ strides), sketch, n_bins, lo, hi, per_log2, offset, sums
_SPARSITY_ARGS = [_i64] * 4 + [_ptr, _i64, _i64] + [_ptr, _i64] + [_f32] * 4 + [_ptr]
ENTRY_POINTS = {
    "neuronspec_conv_silu_f32": (_CONV_ARGS, ctypes.c_int),
    "neuronspec_conv_silu_f64": (_CONV_ARGS, ctypes.c_int),
    "neuronspec_scan_f32": (_SCAN_ARGS, ctypes.c_int),
    "neuronspec_scan_f64": (_SCAN_ARGS, ctypes.c_int),
    "neuronspec_layer_stats_f32": (_STATS_ARGS, _i64),
    "neuronspec_unigram_dense_nnz": (_NNZ_ARGS, None),
    "neuronspec_unigram_table": (_TABLE_ARGS, ctypes.c_int),
    "neuronspec_token_sparsity_f32": (_SPARSITY_ARGS, ctypes.c_int),
}


class KernelUnavailableError(NeuronSpecError, RuntimeError):
    """The native kernels could not be built or loaded on this machine."""


def _compiler() -> list[str]:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    argv = shlex.split(cc)
    if not argv or shutil.which(argv[0]) is None:
        raise KernelUnavailableError(
            f"no C compiler found (tried {cc!r}); install gcc or clang, or set CC"
        )
    return argv


def _cpu_fingerprint() -> str:
    """-march=native code is only valid on CPUs with the same instruction set extensions."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _kernel_dir() -> Path:
    configured = os.environ.get("NEURONSPEC_KERNEL_DIR")
    if configured:
        return Path(configured)
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "neuronspec" / "kernels"


def _build(cc: list[str], key: str) -> Path:
    directory = _kernel_dir()
    target = directory / f"neuronspec-{key}.so"
    if target.exists():
        return target
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=f".neuronspec-{key}-", suffix=".so", dir=directory)
    except OSError as error:
        raise KernelUnavailableError(
            f"the kernel directory {directory} is unusable ({error.strerror or error}); "
            "set NEURONSPEC_KERNEL_DIR to a writable directory"
        ) from error
    os.close(fd)
    try:
        result = subprocess.run(
            [*cc, *FLAGS, "-o", temporary, *map(str, SOURCES), "-lm"],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise KernelUnavailableError(
                f"compiling the native kernels with {shlex.join(cc)} failed "
                f"(exit {result.returncode}):\n{result.stderr.strip()}"
            )
        os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return target


def _open(path: Path) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(str(path))
        abis = {name: getattr(lib, name)() for name in ABI_VERSIONS}
    except (OSError, AttributeError) as error:
        raise KernelUnavailableError(f"cannot load the native kernels {path}: {error}") from error
    if abis != ABI_VERSIONS:
        raise KernelUnavailableError(
            f"the native kernels {path} have calling conventions {abis}, expected {ABI_VERSIONS}"
        )
    return lib


_loaded: ctypes.CDLL | None = None
_failure: KernelUnavailableError | None = None
_warned = False


def load_library() -> ctypes.CDLL:
    """The native library with typed entry points; built on first use.

    Raises :class:`KernelUnavailableError` when no compiler is found, the build fails,
    the kernel directory is unusable, or the library does not speak this module's calling
    conventions. Success and failure are both remembered for the process: a failing
    compiler runs once.
    """
    global _loaded, _failure
    if _loaded is not None:
        return _loaded
    if _failure is not None:
        raise KernelUnavailableError(str(_failure))
    try:
        _loaded = _load()
    except KernelUnavailableError as error:
        _failure = error
        raise
    except OSError as error:  # the compiler cannot run, the kernel directory misbehaves
        _failure = KernelUnavailableError(f"cannot build the native kernels: {error}")
        raise _failure from error
    return _loaded


def kernels_available() -> bool:
    """Whether the native kernels load; on the first failure in the process, one
    RuntimeWarning names the cause (callers then use the torch forms)."""
    global _warned
    try:
        load_library()
    except KernelUnavailableError as error:
        if not _warned:
            _warned = True
            warnings.warn(
                f"neuronspec: the native kernels are unavailable ({error}); using the torch "
                "forms instead (same definitions, slower)",
                RuntimeWarning,
                stacklevel=3,
            )
        return False
    return True


def forget() -> None:
    """Forget the remembered library or failure (tests; after installing a compiler)."""
    global _loaded, _failure, _warned
    _loaded, _failure, _warned = None, None, False


def _load() -> ctypes.CDLL:
    cc = _compiler()
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, check=False)
    ident = "\n".join(
        [
            *(s.read_text() for s in (*SOURCES, *HEADERS)),
            " ".join(FLAGS),
            version.stdout,
            _cpu_fingerprint(),
        ]
    ).encode()
    key = hashlib.sha256(ident).hexdigest()[:16]
    path = _build(cc, key)
    try:
        lib = _open(path)
    except KernelUnavailableError as error:  # damaged by hand or by a disk error: rebuild once
        warnings.warn(f"neuronspec: {error}; rebuilding it", RuntimeWarning, stacklevel=2)
        path.unlink(missing_ok=True)
        lib = _open(_build(cc, key))
    for name, (argtypes, restype) in ENTRY_POINTS.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib
