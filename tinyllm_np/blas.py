"""BLAS's thread count, read and set at run time (the library NumPy loaded, found in /proc/self/maps).

parallel.py gives each worker one thread (the workers already fill the
cores); the sampler runs on one thread, since its decode steps multiply a few
rows, which OpenBLAS keeps on one thread anyway, while the threads its
prefills wake spin on the other core for a while afterwards.
"""

import ctypes
import os

import numpy as np


# (set, get) C functions that control a BLAS library's thread count, by library
_BLAS_THREAD_FUNCS = [
    ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),  # NumPy >= 2 wheels
    ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
    ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
    ("openblas_set_num_threads", "openblas_get_num_threads"),  # NumPy 1.x wheels, system OpenBLAS
    ("MKL_Set_Num_Threads", "MKL_Get_Max_Threads"),  # conda's MKL builds
]


def _blas_controls():
    """(set, get) ctypes functions of the BLAS loaded in this process, or None.

    The library is found among the shared objects mapped into the process
    (Linux's /proc/self/maps); elsewhere this returns None.
    """
    try:
        with open("/proc/self/maps") as f:  # address, perms, offset, device, inode[, path]
            paths = {fields[5].strip() for fields in (line.split(None, 5) for line in f) if len(fields) == 6}
    except OSError:
        return None
    for path in sorted(p for p in paths if "blas" in os.path.basename(p).lower() or "mkl" in p.lower()):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for set_name, get_name in _BLAS_THREAD_FUNCS:
            if hasattr(lib, set_name) and hasattr(lib, get_name):
                setter, getter = getattr(lib, set_name), getattr(lib, get_name)
                setter.argtypes, setter.restype, getter.restype = [ctypes.c_int], None, ctypes.c_int
                return setter, getter
    return None


_controls = None


def blas_threads(n=None):
    """Set BLAS's thread count to n (if given); return the count before, or None if unknown.

    None also means the count cannot be controlled from here.
    """
    global _controls
    if _controls is None:
        np.dot(np.ones((2, 2)), np.ones((2, 2)))  # make sure the BLAS library is loaded
        _controls = _blas_controls() or False
    if not _controls:
        return None
    setter, getter = _controls
    before = int(getter())
    if n is not None:
        setter(int(n))
    return before
