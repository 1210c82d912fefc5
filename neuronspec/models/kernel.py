"""Build, cache and call the C selective-scan kernel (``scan_kernel.c``) through ctypes.

The kernel is the no-gradient forward of :func:`neuronspec.models.scan.selective_scan`:
one pass over the positions per block of 16 (float32) or 8 (float64) channels, the
state kept in registers, ``exp`` inline, the skip ``D·x`` and the gate ``SiLU(z)`` fused.
It needs no torch headers: the system C compiler (``$CC``, else Python's, else ``cc``)
builds a shared library once per (source, flags, compiler, CPU) into
``$NEURONSPEC_KERNEL_DIR`` (default ``~/.cache/neuronspec/kernels``). The library is
written under a temporary name and renamed into place, so a crash mid-build never
leaves a file that loads; concurrent builders (xdist workers) race harmlessly.

Calls release the GIL (ctypes), so the channel range is split across
``torch.get_num_threads()`` Python threads, each running the kernel on its own slice.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from neuronspec.errors import NeuronSpecError

__all__ = ["KernelUnavailableError", "kernel_scan", "load_kernel"]

SOURCE = Path(__file__).with_name("scan_kernel.c")
FLAGS = ("-O3", "-march=native", "-std=c11", "-fPIC", "-shared")
ABI_VERSION = 1
LANES = {torch.float32: 16, torch.float64: 8}
"""Channels per vector block in the kernel (``CB``); thread slices are multiples of it."""


class KernelUnavailableError(NeuronSpecError, RuntimeError):
    """The C scan kernel could not be built or loaded on this machine."""


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
    target = directory / f"scan-{key}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".scan-{key}-", suffix=".so", dir=directory)
    os.close(fd)
    try:
        result = subprocess.run(
            [*cc, *FLAGS, "-o", temporary, str(SOURCE)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise KernelUnavailableError(
                f"compiling {SOURCE.name} with {shlex.join(cc)} failed "
                f"(exit {result.returncode}):\n{result.stderr.strip()}"
            )
        os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return target


def _open(path: Path) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(str(path))
        abi = lib.neuronspec_scan_abi()
    except (OSError, AttributeError) as error:
        raise KernelUnavailableError(f"cannot load the scan kernel {path}: {error}") from error
    if abi != ABI_VERSION:
        raise KernelUnavailableError(
            f"the scan kernel {path} has calling convention {abi}, expected {ABI_VERSION}"
        )
    return lib


_ARGS = (
    [ctypes.c_int64] * 6  # c0, c1, B, L, d, N
    + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] * 2  # delta, x (+ strides)
    + [ctypes.c_void_p]  # At
    + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] * 2  # B, C (+ strides)
    + [ctypes.c_void_p]  # D
    + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] * 2  # z, out (+ strides)
    + [ctypes.c_void_p]  # h_last
)


@functools.cache
def load_kernel() -> dict[torch.dtype, ctypes._CFuncPtr]:
    """The kernel's entry points per dtype; builds the library on first use.

    Raises :class:`KernelUnavailableError` when no compiler is found, the build fails,
    or the library does not speak this module's calling convention.
    """
    cc = _compiler()
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, check=False)
    ident = "\n".join(
        [SOURCE.read_text(), " ".join(FLAGS), version.stdout, _cpu_fingerprint()]
    ).encode()
    key = hashlib.sha256(ident).hexdigest()[:16]
    path = _build(cc, key)
    try:
        lib = _open(path)
    except KernelUnavailableError as error:  # damaged by hand or by a disk error: rebuild once
        warnings.warn(f"neuronspec: {error}; rebuilding it", RuntimeWarning, stacklevel=2)
        path.unlink(missing_ok=True)
        lib = _open(_build(cc, key))
    entries = {}
    for dtype, name in (
        (torch.float32, "neuronspec_scan_f32"),
        (torch.float64, "neuronspec_scan_f64"),
    ):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = _ARGS, ctypes.c_int
        entries[dtype] = fn
    return entries


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:  # only called with workers >= 1
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="neuronspec-scan")


def _strided(t: torch.Tensor) -> list:
    return [t.data_ptr(), t.stride(0), t.stride(1)]


def kernel_scan(
    delta: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, h_L)`` of the selective scan, no autograd; see ``scan_kernel.c``.

    Shapes: delta (Δ after softplus), x, z ``(B, L, d)``; A ``(d, N)``; B, C ``(B, L, N)``;
    D ``(d,)``; all of one dtype (float32 or float64) on the CPU. Returns ``y``
    ``(B, L, d)`` = ``(C·h + D·x) · SiLU(z)`` and ``h_L`` ``(B, d, N)``.
    """
    fn = load_kernel()[x.dtype]
    b, L, d = x.shape
    N = A.shape[1]

    def rows(t: torch.Tensor) -> torch.Tensor:  # unit stride along the last dim
        return t if t.stride(-1) == 1 else t.contiguous()

    delta, x, B, C = rows(delta), rows(x), rows(B), rows(C)
    z = None if z is None else rows(z)
    At = A.t().contiguous()  # (N, d)
    D = None if D is None else D.contiguous()
    y = x.new_empty(b, L, d)
    h_last = x.new_empty(b, d, N)
    no_gate = [None, 0, 0]

    def run(c0: int, c1: int) -> None:
        status = fn(
            c0, c1, b, L, d, N,
            *_strided(delta), *_strided(x), At.data_ptr(), *_strided(B), *_strided(C),
            None if D is None else D.data_ptr(),
            *(no_gate if z is None else _strided(z)), *_strided(y), h_last.data_ptr(),
        )  # fmt: skip
        if status != 0:
            raise KernelUnavailableError(f"scan kernel rejected its arguments (status {status})")

    lanes = LANES[x.dtype]
    blocks = -(-d // lanes)
    workers = max(1, min(torch.get_num_threads(), blocks))
    bounds = [min(d, lanes * (blocks * i // workers)) for i in range(workers + 1)]
    slices = list(zip(bounds[:-1], bounds[1:], strict=True))
    # the calling thread runs the last slice itself; the pool runs the others
    futures = [_pool(workers - 1).submit(run, lo, hi) for lo, hi in slices[:-1]]
    run(*slices[-1])
    for future in futures:
        future.result()
    return y, h_last
