"""Let freed memory be reused instead of handed back to the OS (glibc malloc, Linux).

A training step allocates a few hundred MB of short-lived activations, in arrays of
2 to 8 MB.  By default glibc serves blocks that large with fresh mmap()s and
unmaps them on free, so every step touches brand-new pages and the kernel must
zero each one: measured here, that page-fault work was about a quarter of the step
time.  Raising malloc's mmap threshold above our largest array and its trim
threshold above a step's working set keeps those blocks in the heap, where the
next step reuses them.  Nothing else changes: same arrays, same results.

The worker processes of parallel.py make the same call for themselves when the
process that starts them has made it (``in_effect``).

This is a process-wide allocator setting made through ctypes; where glibc is not
the C library (macOS, Windows, musl), it does nothing.
"""

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # glibc mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3


_in_effect = False


def _glibc(name):
    """The C library's function ``name`` through ctypes, or None where there is no such function."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def reuse_freed_memory(mmap_threshold=32 << 20, trim_threshold=1 << 30):
    """Ask glibc to keep freed blocks for reuse; returns True if the setting took effect."""
    global _in_effect
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = all(mallopt(param, value) for param, value in
             ((M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold)))
    _in_effect = _in_effect or ok
    return ok


def release_freed_memory():
    """Hand the heap's free memory back to the OS now (glibc malloc_trim(0)); True if it released any.

    With reuse_freed_memory in effect, memory freed by a phase that never
    comes back stays in this process for good.  train.py calls this once,
    after building a text's ids file: the build's freed 4 MB pieces were
    64 MB of a 100 MB text's 104 MB peak in the training process.  A no-op
    (False) where glibc is not the C library.
    """
    trim = _glibc("malloc_trim")
    if trim is None:
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))


def in_effect():
    """True once reuse_freed_memory has taken effect in this process."""
    return _in_effect
