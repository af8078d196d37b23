"""Data parallelism on one machine: the batch cut into micro-batches, run by worker processes on all cores.

The loss of a batch is the mean over its B sequences (of T positions each).  Cut
the batch into K micro-batches of B_k sequences; then

    loss = sum_k (B_k / B) * loss_k          grad = sum_k (B_k / B) * grad_k

where loss_k and grad_k are the mean loss and its gradient on micro-batch k alone.
Without dropout these are the numbers of one big batch, up to the order of float
additions; with dropout, the masks are drawn per micro-batch (below).  This is
gradient accumulation, and what data-parallel training does across GPUs; here
the workers are processes on the cores of one machine.

Two things make it pay on a CPU:

* Small micro-batches (``micro_batch``, default 4 sequences): a micro-batch's
  activations, about 1 MB an array, stay in the core's 2 MB L2 cache through
  the dozen elementwise passes over each (softmax, layer norm, ...), where the
  16-sequence arrays of a half batch spill to memory.  Measured on one core: a
  forward and backward of 16 sequences takes 110 ms as one batch and 95 ms as
  four micro-batches of 4.
* All cores at once: NumPy runs elementwise operations on one core, and BLAS's
  own threads help only inside the matmuls.  W worker processes, each working
  through its share of the micro-batches with BLAS on one thread, keep W cores
  busy for the whole step.  Processes rather than threads: NumPy holds Python's
  GIL while it sets up each call, and with two threads making ~2,000 such calls a
  step each, they kept waiting for each other -- the same micro-batches (without
  the optimizer step) took 105-106 ms in two threads, 95-101 ms in two processes.

The parameters reach the workers through shared memory: each call copies
``model.flat`` (2.5 MB) into a buffer every worker reads, so the optimizer
keeps updating ``model.flat`` in place as usual.  Each worker writes its
weighted gradient sum into its own slot of a second shared buffer, and the
caller adds the slots.  Only the token ids and a few numbers travel through
the pipes.

Dropout: micro-batch k draws its masks from its own generator, seeded each
step from the model's generator (``model.rng``).  So a run depends on the seed
and ``micro_batch`` -- not on the number of workers, nor on timing -- and
``model.rng`` alone carries the random state (checkpoints stay as they are).
"""

import ctypes
import math
import multiprocessing
import os
import pickle
import signal

import numpy as np

from . import alloc
from .model import TinyLLM, flat_views

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


def split_batch(B, parts):
    """Slices that cut range(B) into at most ``parts`` near-equal consecutive pieces."""
    bounds = np.linspace(0, B, min(parts, B) + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def micro_batches(B, micro_batch):
    """Slices that cut B sequences into ceil(B / micro_batch) near-equal micro-batches."""
    return split_batch(B, math.ceil(B / micro_batch))


ACTIVATION_BUDGET = 1 << 20  # bytes: half a core's 2 MB L2, the rest left for weights and the other operands


def auto_micro_batch(config, B, itemsize=4):
    """Sequences per micro-batch for train.py's ``--micro-batch auto``: a function of the shapes alone.

    The largest activation of a micro-batch of b sequences is its FFN hidden
    array, b*T*F numbers, or attention's scores of one query block, about
    b*H*(T/2)*T; b is the largest size whose larger array fits
    ACTIVATION_BUDGET (1 MB), at least 1 and at most B, then evened out so the
    batch splits into near-equal micro-batches of at most that size
    (micro_batches).  It gives 4 at the seed's shape (T=128, F=512; the
    hand-tuned default before), 6 at nanoGPT's CPU recipe (B=12, T=64,
    F=512), 2 at the wide model (T=128, F=1024).  Measured there (2 shared
    cores, AMD EPYC, median ms of a step with AdamW, auto workers):
    nanoGPT's recipe, micro-batches of 3/4/6/12: 88/80/93/575 (12 is one
    micro-batch, so one process); wide, 2/4/8: 1319/1317/1604.  Sizes at or
    under the budget are all about equally fast; the budget keeps clear of
    the slow side.

    It depends on the model and batch shape only, never on the machine: the
    micro-batch size changes the numbers (dropout masks follow micro-batches),
    so the same command must give the same run anywhere.  A checkpoint records
    the size used; a resumed run takes it from there.
    """
    T, H, F = config.context, config.n_heads, config.d_ff
    per_seq = T * max(F, H * ((T + 1) // 2)) * itemsize
    b = max(1, min(B, ACTIVATION_BUDGET // per_seq))
    n = math.ceil(B / b)
    return math.ceil(B / n)  # the same n micro-batches, as even as they go


def auto_workers(B, micro_batch, cores=None):
    """Worker processes for ``--workers auto``: one per core, but no more than there are micro-batches.

    More workers than cores only time-share a core (and each costs its own
    memory); more than micro-batches would sit idle.  The count never changes
    a run's numbers, so it may follow the machine (``os.cpu_count()``).
    """
    cores = cores or os.cpu_count() or 1
    return max(1, min(cores, len(micro_batches(B, micro_batch))))


def _run(model, idx, targets, chunks, seeds, grads_out, train):
    """Weighted loss (and gradient, into grads_out) of micro-batches ``chunks`` = [(slice, weight)].

    The work of one worker; also the whole of a one-worker DataParallel.
    grads_out None: evaluation-mode loss only.
    """
    if grads_out is None:
        return sum(w * model.loss(idx[s], targets[s]) for s, w in chunks)
    grads_out[...] = 0
    grads = flat_views(model.shapes, grads_out)
    loss = 0.0
    for (s, w), seed in zip(chunks, seeds):
        rng = None if seed is None else np.random.default_rng(seed)
        # grad += w_k grad_k, added by the backward itself
        loss_k, _ = model.loss_and_grads(idx[s], targets[s], train=train, rng=rng, weight=w, grads=grads)
        loss += w * loss_k
    return loss


# Signals a terminal or a job manager sends to the whole process group: the parent handles them
# (train.py saves a checkpoint) and then stops its workers, which must not die first.
_PARENT_SIGNALS = (signal.SIGINT, signal.SIGTERM)

# BLAS's thread count for libraries that read it from the environment when they load: how the
# workers get one thread each where blas_threads cannot set it (no /proc/self/maps: macOS, Windows)
_ONE_THREAD_ENV = {name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                          "VECLIB_MAXIMUM_THREADS")}


def _send_error(conn, e):
    """Hand an exception to the parent, which raises it; its text in a RuntimeError if it would not unpickle."""
    try:
        pickle.loads(pickle.dumps(e))
    except Exception:
        e = RuntimeError(f"{type(e).__name__}: {e}")
    conn.send(("error", e))


def _worker_main(conn, config, dtype, params_buf, grads_buf, slot, reuse_memory):
    """A worker process: wait for micro-batches, answer with their weighted loss; gradients go to shared memory."""
    for signum in _PARENT_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if reuse_memory:  # the parent's allocator setting (alloc.py): 112 -> 100 ms a step, measured
        alloc.reuse_freed_memory()
    blas_threads(1)  # one core each: the workers already fill the machine
    model = TinyLLM(config, dtype=dtype)
    params = np.frombuffer(params_buf, dtype=model.dtype)
    grads = np.frombuffer(grads_buf, dtype=model.dtype).reshape(-1, params.size)[slot]
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                return
            idx, targets, chunks, seeds, want_grads, train, err = msg
            try:
                model.flat[...] = params
                with np.errstate(**err):
                    loss = _run(model, idx, targets, chunks, seeds, grads if want_grads else None, train)
            except Exception as e:
                _send_error(conn, e)
            else:
                conn.send(("ok", loss))
    except (EOFError, OSError):  # the parent is gone
        return


def _ignore(signums):
    """Ignore these signals; return {signum: handler before}, empty where they cannot be set (not the main thread)."""
    before = {}
    try:
        for signum in signums:
            before[signum] = signal.signal(signum, signal.SIG_IGN)
    except ValueError:
        pass
    return before


class DataParallel:
    """model's loss and gradients, the batch cut into micro-batches run by ``workers`` processes.

    The public fast path for a training step, and the one train.py uses:
    model.loss_and_grads on a whole batch runs in one process on big arrays;
    this runs cache-sized micro-batches on every core (``tinyllm_np.DataParallel``).

        dp = DataParallel(model)            # workers and micro_batch: auto, as train.py's flags
        dp = DataParallel(model, workers=2, micro_batch=4)
        loss, grads = dp.loss_and_grads(idx, targets, train=True)   # as model.loss_and_grads
        dp.close()                                                  # or use it as a context manager

    workers=1 runs the micro-batches one after another in this process, with
    the same results up to float rounding (the workers' sums are added in
    another order).  The worker processes start in __init__ (each imports
    NumPy: about half a second) and stop in close().  They are started with
    multiprocessing's "spawn" method, so, as with any multiprocessing code, a
    script that makes a DataParallel must guard its entry point with
    ``if __name__ == "__main__":``.  The workers ignore SIGINT and SIGTERM, so
    that a Ctrl-C or a job manager's signal to the whole process group reaches
    the caller alone, which can finish its step and save (train.py does) before
    it closes them; they also end when the caller's process is gone.
    """

    def __init__(self, model, workers=None, micro_batch=None, batch_size=32):
        """workers / micro_batch None: auto_workers / auto_micro_batch for batches of ``batch_size``."""
        if micro_batch is None:
            micro_batch = auto_micro_batch(model.config, batch_size, model.dtype.itemsize)
        if workers is None:
            workers = auto_workers(batch_size, micro_batch)
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be at least 1, got {micro_batch}")
        self.model, self.workers, self.micro_batch = model, workers, micro_batch
        self._conns, self._procs, self.closed = [], [], False
        self.reuse_memory = alloc.in_effect()  # the workers follow this process's allocator setting
        if workers == 1:
            return
        n, itemsize = model.n_params, model.dtype.itemsize
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no fork of BLAS's threads
        self._params_buf = ctx.RawArray(ctypes.c_byte, n * itemsize)
        self._grads_buf = ctx.RawArray(ctypes.c_byte, workers * n * itemsize)
        self._params = np.frombuffer(self._params_buf, dtype=model.dtype)
        self._grads = np.frombuffer(self._grads_buf, dtype=model.dtype).reshape(workers, n)
        # The workers start with SIGINT and SIGTERM ignored (on POSIX a new interpreter keeps an
        # inherited SIG_IGN; each worker sets it again first thing), so that a Ctrl-C in the terminal,
        # sent to every process of the group, reaches only this one; and with BLAS told to use one thread.
        handlers = _ignore(_PARENT_SIGNALS)
        env_before = {name: os.environ.get(name) for name in _ONE_THREAD_ENV}
        os.environ.update(_ONE_THREAD_ENV)
        try:
            for slot in range(workers):
                conn, child = ctx.Pipe()
                p = ctx.Process(target=_worker_main, daemon=True, name=f"tinyllm-worker-{slot}",
                                args=(child, model.config, model.dtype.str, self._params_buf, self._grads_buf,
                                      slot, self.reuse_memory))
                p.start()
                child.close()
                self._conns.append(conn)
                self._procs.append(p)
        except BaseException:
            self.close()
            raise
        finally:
            for name, value in env_before.items():
                if value is None:
                    del os.environ[name]
                else:
                    os.environ[name] = value
            for signum, handler in handlers.items():
                signal.signal(signum, handler)

    def close(self):
        """Stop the worker processes (a second call does nothing)."""
        self.closed = True
        for conn in self._conns:
            try:
                conn.send(None)
            except OSError:  # that worker is already gone
                pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():  # stuck: SIGKILL, as a worker ignores SIGTERM
                p.kill()
                p.join()
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # at interpreter exit, half torn down; the daemon workers end with it anyway
            pass

    def pids(self):
        """Process ids of the worker processes (none with one worker)."""
        return [p.pid for p in self._procs]

    def _call(self, idx, targets, want_grads, train):
        """(loss, gradient buffer or None) over all micro-batches, on the workers if any."""
        if self.closed:
            raise RuntimeError("this DataParallel is closed")
        model = self.model
        idx = model._check_idx(idx)
        targets = model._check_targets(idx, targets)
        B = idx.shape[0]
        if B == 0:
            raise ValueError("the batch is empty")
        parts = micro_batches(B, self.micro_batch)
        chunks = [(s, (s.stop - s.start) / B) for s in parts]
        if train and want_grads and model.config.dropout > 0:
            seeds = [int(s) for s in model.rng.integers(0, 2 ** 63, size=len(parts))]
        else:
            seeds = [None] * len(parts)
        if not self._procs:
            grads = np.empty_like(model.flat) if want_grads else None
            return _run(model, idx, targets, chunks, seeds, grads, train), grads
        if not all(p.is_alive() for p in self._procs):
            raise RuntimeError("a DataParallel worker process has stopped (killed?)")
        self._params[...] = model.flat
        err = np.geterr()
        shares = split_batch(len(parts), self.workers)  # consecutive micro-batches per worker
        try:
            for conn, share in zip(self._conns, shares):
                conn.send((idx, targets, chunks[share], seeds[share], want_grads, train, err))
            replies = [conn.recv() for conn in self._conns[:len(shares)]]
        except (EOFError, OSError):  # a pipe broke: its worker died in the middle of the call
            self.close()
            raise RuntimeError("a DataParallel worker process exited unexpectedly") from None
        except BaseException:  # e.g. Ctrl-C while waiting: replies would be left in the pipes, out of step
            self.close()
            raise
        for status, value in replies:
            if status == "error":
                raise value
        loss = sum(value for _, value in replies)
        if not want_grads:
            return loss, None
        grads = np.add.reduce(self._grads[:len(shares)], axis=0)  # the workers' sums, a fresh buffer
        return loss, grads

    def loss_and_grads(self, idx, targets, train=False):
        """Same contract as TinyLLM.loss_and_grads: (mean loss, grads laid out like model.flat)."""
        loss, grads = self._call(idx, targets, True, train)
        return loss, flat_views(self.model.shapes, grads)

    def loss(self, idx, targets):
        """Mean cross-entropy in evaluation mode (no dropout), the micro-batches spread over the workers."""
        return self._call(idx, targets, False, False)[0]
