"""Keep glibc's malloc heap between forwards, so activations do not page-fault anew.

A CPU forward allocates and frees activation tensors of a few to tens of MB in every op.
glibc serves them from its heap once its mmap threshold has grown past their size (it grows
to at most 32 MiB as such blocks are freed), but it hands the top of the heap back to the
OS whenever twice that threshold lies free there ("trim"), so the next op's tensors fault
their pages in again, each page zeroed by the kernel. On these machines the default
trimming cost a plain GPT-2-small forward up to 100k page faults per 4 batches of 4×256
tokens, and a statistics pass, whose counting buffers shift the heap's layout, up to 490k
(1.1 to 1.5 s of system time over a 5 s forward), in a profile of one process; the README's
performance section has the numbers.

:func:`keep_malloc_heap` fixes the threshold at glibc's own maximum (32 MiB) and trims only
past :data:`TRIM_THRESHOLD` of free memory at the top of the heap. It is opt-in: a run
asks for it with ``--keep-malloc-heap`` (the plugin's option, honoured by ``collect`` and
by ``python -m neuronspec.bench``), and :class:`~neuronspec.session.SpecSession` applies it.
No side-by-side benchmark of the whole suite has shown the gain yet, only the profile
above. It changes speed and resident memory (freed memory up to that amount stays with the
process), never a result.
"""

from __future__ import annotations

import ctypes
import os
import platform

MMAP_THRESHOLD = 32 * 2**20  # glibc's largest dynamic threshold on 64-bit (4 MiB · 8)
TRIM_THRESHOLD = 512 * 2**20  # free memory kept at the heap's top before it is trimmed
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_USER_SETTINGS = (
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_ARENA_MAX",
    "GLIBC_TUNABLES",
    "LD_PRELOAD",  # e.g. jemalloc or tcmalloc: another allocator, not glibc's heap
)


def keep_malloc_heap() -> bool:
    """Set glibc's mmap and trim thresholds for the whole process (see the module docstring).

    Returns whether they were set: not on a C library other than glibc, and not when the
    environment already configures the allocator (``MALLOC_*_``, ``GLIBC_TUNABLES``,
    ``LD_PRELOAD``), which is left as it is. Idempotent.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in _USER_SETTINGS):
        return False
    libc = ctypes.CDLL(None)
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; the trim setting alone would also freeze the threshold
    # at its initial 128 KiB, so both are set
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
