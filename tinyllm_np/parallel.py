"""Data parallelism on one machine: the batch split in micro-batches, run on all cores at once.

The loss of a batch is the mean over its B sequences (of T positions each).  Split
the batch into K micro-batches of B_k sequences; then

    loss = sum_k (B_k / B) * loss_k          grad = sum_k (B_k / B) * grad_k

where loss_k and grad_k are the mean loss and its gradient on micro-batch k alone.
Without dropout these are the numbers of one big batch, up to the order of float
additions; with dropout, the masks are drawn per micro-batch (below).  This is
what data-parallel training does across GPUs; here the workers are threads.

Why it pays on a CPU: NumPy's elementwise operations (softmax, layer norm,
dropout, ...) run on one core, and BLAS's own threads help only inside the
matmuls -- least in attention's many small (T,D) @ (D,T) products.  NumPy
releases the GIL inside its loops and BLAS calls, so K threads, each working
through its own micro-batch, keep K cores busy for the whole step.  Their
matmuls then run single-threaded: BLAS threads on top of ours would fight over
the same cores.  ``blas_threads`` sets that through the BLAS library's own
C function (OpenBLAS, as NumPy's wheels bundle, or MKL); where it cannot, the
micro-batches run one after another, with the same results.

Dropout: micro-batch k draws its masks from its own generator, seeded each step
from the model's generator (``model.rng``).  So a run depends only on the seed
and K, not on thread timing, and ``model.rng`` alone carries the random state
(checkpoints stay as they are).
"""

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .optim import flat_base

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


def split_batch(B, workers):
    """Slices that cut B sequences into at most ``workers`` near-equal micro-batches."""
    bounds = np.linspace(0, B, min(workers, B) + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


_single_thread_users = 0  # open DataParallel objects that need BLAS on one thread
_single_thread_lock = threading.Lock()
_threads_before = None  # BLAS's thread count before the first of them opened


def _hold_single_threaded_blas():
    """Put BLAS on one thread for one more user; False if its thread count cannot be set."""
    global _single_thread_users, _threads_before
    with _single_thread_lock:
        if _single_thread_users == 0:
            _threads_before = blas_threads(1)
            if _threads_before is None:
                return False
        _single_thread_users += 1
        return True


def _release_single_threaded_blas():
    """One user fewer; the last one gives BLAS back its earlier thread count."""
    global _single_thread_users
    with _single_thread_lock:
        _single_thread_users -= 1
        if _single_thread_users == 0:
            blas_threads(_threads_before)


class DataParallel:
    """model's loss and gradients with the batch split over ``workers`` threads.

        dp = DataParallel(model, workers=2)
        loss, grads = dp.loss_and_grads(idx, targets, train=True)   # as model.loss_and_grads
        dp.close()                                                  # or use it as a context manager

    While one is open, BLAS runs single-threaded (its earlier setting comes back
    when the last one closes).  With workers=1 it is exactly model.loss_and_grads.
    """

    def __init__(self, model, workers=2):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.model, self.workers = model, workers
        self.threaded = workers > 1 and _hold_single_threaded_blas()
        self._pool = ThreadPoolExecutor(workers) if self.threaded else None

    def close(self):
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
            _release_single_threaded_blas()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _map(self, fn, idx, targets, extra):
        """[(B_k / B, fn(idx_k, targets_k, extra_k)) for each micro-batch k], on the threads if any.

        The caller's np.errstate settings are carried into the worker threads.
        """
        idx, targets = np.asarray(idx), np.asarray(targets)
        B = idx.shape[0]
        if B == 0:
            raise ValueError("the batch is empty")
        parts = split_batch(B, self.workers)
        extra = extra(len(parts))
        err = np.geterr()

        def job(s, e):
            with np.errstate(**err):
                return fn(idx[s], targets[s], e)

        if self._pool is None:
            results = [job(s, e) for s, e in zip(parts, extra)]
        else:
            results = [f.result() for f in [self._pool.submit(job, s, e) for s, e in zip(parts, extra)]]
        return [((s.stop - s.start) / B, r) for s, r in zip(parts, results)]

    def _rngs(self, train, n):
        """One dropout generator per micro-batch, seeded from model.rng (None: no dropout)."""
        if not train or self.model.config.dropout == 0:
            return [None] * n
        return [np.random.default_rng(s) for s in self.model.rng.integers(0, 2 ** 63, size=n)]

    def loss_and_grads(self, idx, targets, train=False):
        """Same contract as TinyLLM.loss_and_grads: (mean loss, grads laid out like model.flat)."""
        if self.workers == 1:
            return self.model.loss_and_grads(idx, targets, train=train)
        results = self._map(lambda x, y, rng: self.model.loss_and_grads(x, y, train=train, rng=rng),
                            idx, targets, lambda n: self._rngs(train, n))
        loss, grads = 0.0, results[0][1][1]
        total = flat_base(grads)  # the flat buffer behind the first micro-batch's gradients: the sum goes here
        for k, (w, (loss_k, grads_k)) in enumerate(results):
            loss += w * loss_k
            g = flat_base(grads_k)
            g *= g.dtype.type(w)
            if k:
                total += g  # grad = sum_k w_k grad_k
        return loss, grads

    def loss(self, idx, targets):
        """Mean cross-entropy in evaluation mode (no dropout), the batch split over the workers."""
        if self.workers == 1:
            return self.model.loss(idx, targets)
        results = self._map(lambda x, y, _: self.model.loss(x, y), idx, targets, lambda n: [None] * n)
        return sum(w * loss_k for w, loss_k in results)
