"""neuronspec.heap: glibc keeps the activations' heap instead of faulting it in anew."""

import os
import platform
import subprocess
import sys

import pytest

from neuronspec import heap

PROBE = """
import ctypes, sys
from neuronspec.heap import keep_malloc_heap

FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
          "fordblks", "keepcost")
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "keep":
    assert keep_malloc_heap()
size = int(sys.argv[2])
before = libc.mallinfo2()
block = libc.malloc(size)
during = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
# mmapped bytes while held; heap (arena) growth while held; heap growth kept after free
print(during.hblkhd - before.hblkhd, during.arena - before.arena, after.arena - before.arena)
"""
BLOCK = 16 * 2**20  # an activation-sized block: above glibc's initial 128 KiB threshold


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in heap._USER_SETTINGS}


def _allocate_and_free(mode: str) -> tuple[int, int, int]:
    """In a fresh interpreter: (mmapped, heap growth while held, heap growth kept after
    free) in bytes, for one malloc/free of BLOCK bytes, read from glibc's mallinfo2."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode, str(BLOCK)],
        env=_clean_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    mmapped, held, kept = (int(n) for n in done.stdout.split())
    return mmapped, held, kept


glibc = pytest.mark.skipif(
    platform.system() != "Linux"
    or platform.libc_ver()[0] != "glibc"
    or tuple(int(n) for n in platform.libc_ver()[1].split(".")[:2]) < (2, 33),
    reason="glibc >= 2.33 (mallinfo2)",
)


@glibc
def test_default_heap_maps_a_large_block_and_returns_it():
    """Without the setting, a fresh process's 16 MiB block is its own mmap, unmapped on
    free: each such activation is faulted in anew."""
    mmapped, held, kept = _allocate_and_free("default")
    assert mmapped >= BLOCK and held < BLOCK and kept < BLOCK


@glibc
def test_kept_heap_serves_a_large_block_from_the_heap_and_keeps_it():
    """With the setting, the block comes from the heap (no mmap) and stays there after free
    (below the trim threshold), so the next op's tensors reuse pages already faulted in."""
    mmapped, held, kept = _allocate_and_free("keep")
    assert mmapped == 0 and held >= BLOCK and kept >= BLOCK


@glibc
def test_user_allocator_settings_are_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert heap.keep_malloc_heap() is False


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("musl", "1.2"))
    assert heap.keep_malloc_heap() is False
