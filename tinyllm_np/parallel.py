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

* Small micro-batches (``micro_batch``, by default auto_micro_batch: 8
  sequences at the original's shapes): a micro-batch's arrays, at most 2 MB
  each, stay in the caches through the dozen elementwise passes over each
  (softmax, layer norm, ...), where whole-batch arrays spill to memory.
  Measured on one core of an Intel Xeon: a forward and backward of 16
  sequences takes 110 ms as one batch and 95 ms as four micro-batches of 4.
* All cores at once: NumPy runs elementwise operations on one core, and BLAS's
  own threads help only inside the matmuls.  W worker processes, each working
  through its share of the micro-batches with BLAS on one thread, keep W cores
  busy for the whole step.  Processes rather than threads: NumPy holds Python's
  GIL while it sets up each call, and with two threads making ~2,000 such calls a
  step each, they kept waiting for each other -- the same micro-batches (without
  the optimizer step) took 105-106 ms in two threads, 95-101 ms in two processes.

When the workers fill the cores this process may run on (auto's choice: one
per core), each is pinned to its own core (worker_cpus), and a call wakes first
the workers whose core is not the caller's.  A worker woken on the caller's own
core preempts it there, and the next worker's wake-up waited for the caller to
run again: on 2 cores of an AMD EPYC (Zen 2), up to a third of the steps
(103 of 290 in one run, 6 in another) started their second worker 2-3 ms late.
Pinned and woken in that order, none did, and the step at nanoGPT's CPU recipe took 0.96-0.98 of its time
unpinned (three paired runs of 180 steps).

The parameters reach the workers through shared memory: each call copies
``model.flat`` (2.5 MB) into a buffer whose numbers the workers' models run on
directly (``TinyLLM(flat=)``, no copy of their own), so the optimizer keeps
updating ``model.flat`` in place as usual; the token ids go through a second
shared buffer.  Only a few numbers travel through the pipes, so a send
never blocks on a worker that does not read.

The sum is the same whatever the number of workers, bit for bit.  Micro-batch
k's weighted gradient w_k grad_k goes to its own slot k of a shared (K, n)
buffer (K micro-batches, n parameters: 4 x 2.5 MB for the original's batch of
32 in micro-batches of 8), whoever computes it; this process then adds the
slots left to right, slot 0 + slot 1 + ... + slot K-1, and the weighted losses
likewise in micro-batch order.  With one worker the same code runs in this
process, on a private (K, n) buffer.  Cost, measured in 6 paired runs of
``python -m tinyllm_np.bench`` against per-worker sums (2 shared EPYC cores,
noisy): a step on 2 workers 160 -> 161 ms with dropout, 148 -> 151 ms without
(median ratios 1.01, 1.02); on 1 worker no measurable change.  (BLAS's thread count, one in a worker and
the library's default here, was measured not to change a micro-batch's
gradient with this NumPy's OpenBLAS; tests/test_parallel.py checks the whole
sum bitwise, workers=1 against workers=2.)

Dropout: micro-batch k draws its masks from its own generator, seeded each
step from the model's generator (``model.rng``).  So a run depends on the seed
and ``micro_batch`` -- not on the number of workers, nor on timing -- and
``model.rng`` alone carries the random state (checkpoints stay as they are).

Faults: the caller waits on the workers' pipes and on their process sentinels
at once, with a timeout, so a worker that dies (a kill -9, the out-of-memory
killer) is reported at once and one that stops answering (SIGSTOP, a hang) after
``timeout`` seconds, each as a WorkerError naming the worker, its pid and what
happened.  While waiting it also polls ``stop`` (train.py's signal flag): once
that is set, the workers get ``stop_grace`` more seconds to finish the call,
then the call is abandoned with Interrupted.  Either way the caller's model is
untouched (the workers only read it) and this DataParallel is closed.
"""

import ctypes
import math
import multiprocessing
import os
import pickle
import signal
import time
from multiprocessing.connection import wait

import numpy as np

from . import alloc
from .blas import blas_threads
from .chunks import over_chunks, piece_count
from .model import TinyLLM, flat_views

def split_batch(B, parts):
    """Slices that cut range(B) into at most ``parts`` near-equal consecutive pieces."""
    bounds = np.linspace(0, B, min(parts, B) + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def micro_batches(B, micro_batch):
    """Slices that cut B sequences into ceil(B / micro_batch) near-equal micro-batches."""
    return split_batch(B, math.ceil(B / micro_batch))


ACTIVATION_BUDGET = 2 << 20  # bytes: the largest array of a micro-batch; measured best (auto_micro_batch)


def auto_micro_batch(config, B, itemsize=4):
    """Sequences per micro-batch for train.py's ``--micro-batch auto``: a function of the shapes alone.

    The largest activation of a micro-batch of b sequences is its FFN hidden
    array, b*T*F numbers, or attention's scores of one query block, about
    b*H*(T/2)*T; b is the largest size whose larger array fits
    ACTIVATION_BUDGET (2 MB), at least 1, at most B and at most half of it
    (rounded up: two micro-batches, so two workers share any batch of two or
    more), then evened out so the batch splits into near-equal micro-batches
    of at most that size (micro_batches).  It gives 8 at the seed's shape
    (B=32, T=128, F=512), 6 at nanoGPT's CPU recipe (B=12, T=64, F=512: 12
    would fit, half the batch is the cap) and 4 at the wide model (T=128,
    F=1024).

    Why 2 MB: fewer, larger micro-batches pay NumPy's per-call cost fewer
    times, until the arrays outgrow the caches.  Whole steps with AdamW, two
    workers, sizes taking turns in one process (AMD EPYC Zen 4, 1 MB L2 a
    core; median of the rounds' ratios): the seed's micro-batches of 8
    against 4 took 0.98 (dropout 0) and 0.99 (dropout 0.1), 16 against 8
    1.06; the wide model's 4 against 2 0.94, 8 against 4 1.13 (6 rounds,
    widely spread).  On
    an AMD EPYC Zen 3, in-process micro-batches: the seed's 8 against 4
    0.95-0.97, the wide model's 4 against 2 0.96; nanoGPT's recipe has no
    larger choice under the cap (3 and 4 against 6: 1.08 and 1.29).

    It depends on the model and batch shape only, never on the machine: the
    micro-batch size changes the numbers (dropout masks follow micro-batches),
    so the same command must give the same run anywhere.  A checkpoint records
    the size used; a resumed run takes it from there.
    """
    b = max(1, min(math.ceil(B / 2), budget_sequences(config, itemsize)))  # half the batch is never more than B
    n = math.ceil(B / b)
    return math.ceil(B / n)  # the same n micro-batches, as even as they go


def eval_micro_batches(config, B, itemsize=4):
    """Slices of an evaluation batch of B sequences (DataParallel.loss): sized by the budget alone, an even count.

    A forward keeps nothing for a backward, and an evaluation batch may be
    large (train.py sends all its windows in one call), so its micro-batches
    are the fewest near-equal ones within budget_sequences, not the training
    micro-batch: at nanoGPT's recipe, 16 of 15 sequences for its 240 against
    40 of 6.  At least two for a batch of two or more, and an even number
    (chunks.piece_count's rule), so that two workers get equal shares.  A function of the shapes alone: the
    number of workers never changes the loss.
    """
    return split_batch(B, min(B, max(2, piece_count(B, budget_sequences(config, itemsize)))))


def budget_sequences(config, itemsize=4):
    """The most sequences whose largest activation fits ACTIVATION_BUDGET, at least 1 (auto_micro_batch)."""
    T, H, F = config.context, config.n_heads, config.d_ff
    per_seq = T * max(F, H * ((T + 1) // 2)) * itemsize
    return max(1, ACTIVATION_BUDGET // per_seq)


def auto_workers(B, micro_batch, cores=None):
    """Worker processes for ``--workers auto``: one per core, but no more than there are micro-batches.

    More workers than cores only time-share a core (and each costs its own
    memory); more than micro-batches would sit idle.  The count never changes
    a run's numbers, so it may follow the machine (``os.cpu_count()``).
    """
    cores = cores or os.cpu_count() or 1
    return max(1, min(cores, len(micro_batches(B, micro_batch))))


def _allowed_cpus():
    """The CPUs this process may run on, or None where the system cannot say (not Linux)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def worker_cpus(workers, allowed=None):
    """The CPU to pin each of ``workers`` workers to, or None: leave them to the scheduler.

    One core each when the workers fill exactly the CPUs this process may run
    on (``allowed``, default: its affinity), two or more of them; then no two
    workers can share a core anyway, and a pinned one keeps its core.  With
    spare cores the scheduler may know better (other programs), so nothing is
    pinned.  Pinning never changes a number, only where the work runs.
    """
    allowed = _allowed_cpus() if allowed is None else sorted(allowed)
    if allowed is None or workers < 2 or workers != len(allowed):
        return None
    return allowed


def _pin(pids, cpus):
    """Pin process pids[i] to CPU cpus[i]; returns cpus, or None (all left unpinned) if cpus is None or it fails."""
    if cpus is None:
        return None
    try:
        for pid, cpu in zip(pids, cpus):
            os.sched_setaffinity(pid, {cpu})
    except OSError:  # not allowed after all (or a worker already gone): every worker back on every CPU
        for pid in pids:
            try:
                os.sched_setaffinity(pid, cpus)
            except OSError:
                pass
        return None
    return cpus


def _cpu_getter():
    """glibc's sched_getcpu (the CPU the calling thread is on) through ctypes, or None without it."""
    try:
        f = ctypes.CDLL(None).sched_getcpu
    except (OSError, AttributeError, TypeError):  # no such symbol, or no C library to ask (Windows)
        return None
    f.restype, f.argtypes = ctypes.c_int, []
    return f


_sched_getcpu = _cpu_getter()


def wake_order(n, cpus, here):
    """range(n), the workers with a call to make, in the order to send it: those pinned elsewhere than CPU ``here`` first.

    ``cpus``: each worker's CPU (worker_cpus); None (unpinned) or ``here`` None: 0, 1, ... as they are.
    """
    if cpus is None or here is None:
        return list(range(n))
    return sorted(range(n), key=lambda i: cpus[i] == here)  # stable: otherwise in their order


def _run(model, idx, targets, chunks, seeds, slots, train):
    """Weighted losses [w_k loss_k] of micro-batches ``chunks`` = [(slice, w_k)], in their order.

    With ``slots`` (one row per chunk), w_k grad_k goes to row k, the row
    zeroed first; slots None: evaluation-mode losses only.  The work of one
    worker; also the whole of a one-worker DataParallel.
    """
    if slots is None:
        return [w * model.loss(idx[s], targets[s]) for s, w in chunks]
    losses = []
    for (s, w), seed, slot in zip(chunks, seeds, slots):
        rng = None if seed is None else np.random.default_rng(seed)
        slot[...] = 0
        # slot = w_k grad_k, added into the zeros by the backward itself
        loss_k, _ = model.loss_and_grads(idx[s], targets[s], train=train, rng=rng, weight=w,
                                         grads=flat_views(model.shapes, slot))
        losses.append(w * loss_k)
    return losses


def sum_in_order(rows):
    """rows[0] + rows[1] + ... + rows[K-1], added left to right, as a fresh array.

    The one order the gradient slots are added in, whatever the number of
    workers (np.add.reduce might sum a short axis pairwise, an order that is
    not the documented one).  Piece by piece (chunks.over_chunks): each piece
    of the total stays in cache through the K - 1 additions, and half the pieces
    are added on a helper thread; every number is still the same left-to-right
    sum.
    """
    if len(rows) == 1:
        return rows[0].copy()
    total = np.empty_like(rows[0])

    def add(s, e):
        t = np.add(rows[0][s:e], rows[1][s:e], out=total[s:e])  # the first sum written, not copied then added
        for row in rows[2:]:
            t += row[s:e]

    over_chunks(add, total.size)
    return total


# Signals a terminal or a job manager sends to the whole process group: the parent handles them
# (train.py saves a checkpoint) and then stops its workers, which must not die first.
_PARENT_SIGNALS = (signal.SIGINT, signal.SIGTERM)

# BLAS's thread count for libraries that read it from the environment when they load: how the
# workers get one thread each where blas_threads cannot set it (no /proc/self/maps: macOS, Windows)
_ONE_THREAD_ENV = {name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                          "VECLIB_MAXIMUM_THREADS")}


STARTUP_TIMEOUT = 120.0  # seconds a worker may take to start (interpreter, NumPy, model) before its first call


def _send_error(conn, e):
    """Hand an exception to the parent, which raises it; its text in a RuntimeError if it would not unpickle."""
    try:
        pickle.loads(pickle.dumps(e))
    except Exception:
        e = RuntimeError(f"{type(e).__name__}: {e}")
    conn.send(("error", e))


class _Shared:
    """The buffers the workers share with the caller: ``capacity`` gradient slots, ``rows`` sequences of tokens."""

    def __init__(self, ctx, n_params, dtype, capacity, rows, context):
        self.capacity, self.rows, self.context = capacity, rows, context
        self.params_buf = ctx.RawArray(ctypes.c_byte, n_params * dtype.itemsize)
        self.slots_buf = ctx.RawArray(ctypes.c_byte, capacity * n_params * dtype.itemsize)
        self.tokens_buf = ctx.RawArray(ctypes.c_int64, 2 * self.rows * context)  # idx, then targets
        self.dtype, self.n_params = dtype, n_params
        self.views()

    def views(self):
        """(params (n,), slots (capacity, n), tokens (2, rows, context)) as arrays on the shared memory."""
        self.params = np.frombuffer(self.params_buf, dtype=self.dtype)
        self.slots = np.frombuffer(self.slots_buf, dtype=self.dtype).reshape(self.capacity, self.n_params)
        self.tokens = np.frombuffer(self.tokens_buf, dtype=np.int64).reshape(2, self.rows, self.context)
        return self

    def __getstate__(self):  # what a spawned worker receives: the buffers, not the views
        return {k: v for k, v in vars(self).items() if k not in ("params", "slots", "tokens")}

    def __setstate__(self, state):
        vars(self).update(state)
        self.views()


def _worker_main(conn, config, dtype, engine, shared, reuse_memory):
    """A worker process: wait for micro-batches, answer with their weighted losses; gradients go to shared memory."""
    for signum in _PARENT_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if reuse_memory:  # the parent's allocator setting (alloc.py): 112 -> 100 ms a step, measured
        alloc.reuse_freed_memory()
    blas_threads(1)  # one core each: the workers already fill the machine
    # the caller's engine (the same numbers), on the caller's parameters in shared memory: no copy per call
    model = TinyLLM(config, dtype=dtype, engine=engine, flat=shared.params)
    try:
        conn.send(("ready", None))  # start-up (an interpreter, NumPy, the model) is not a call's time
        while True:
            msg = conn.recv()
            if msg is None:
                return
            B, T, first, chunks, seeds, want_grads, train, err = msg
            try:
                idx, targets = shared.tokens[0, :B, :T], shared.tokens[1, :B, :T]
                slots = shared.slots[first:first + len(chunks)] if want_grads else None
                with np.errstate(**err):
                    losses = _run(model, idx, targets, chunks, seeds, slots, train)
            except Exception as e:
                _send_error(conn, e)
            else:
                conn.send(("ok", losses))
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


class WorkerError(RuntimeError):
    """A worker process died or gave no answer in time.  ``worker`` (its number), ``pid``, ``what``."""

    def __init__(self, worker, pid, what):
        self.worker, self.pid, self.what = worker, pid, what
        super().__init__(f"worker {worker} (pid {pid}) {what}")


class Interrupted(Exception):
    """The caller's ``stop()`` turned true and the workers had not answered ``stop_grace`` seconds later."""


# Seconds between looks at the caller's stop flag while waiting for the workers
_POLL = 0.05

EVAL_ROUND = 4  # evaluation micro-batches per worker per call to the workers, at most (DataParallel._eval_loss)


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
    bitwise the same results (see the module docstring).  The worker processes
    start in __init__ (each imports NumPy: about half a second) and stop in
    close().  They are started with multiprocessing's "spawn" method, so, as
    with any multiprocessing code, a script that makes a DataParallel must guard
    its entry point with ``if __name__ == "__main__":``.  The workers ignore
    SIGINT and SIGTERM, so that a Ctrl-C or a job manager's signal to the whole
    process group reaches the caller alone, which can finish its step and save
    (train.py does) before it closes them; they also end when the caller's
    process is gone.

    ``batch_size`` sizes the shared buffers (one gradient slot per micro-batch
    of a batch that large); a larger batch for loss_and_grads later restarts
    the workers with room for it, while loss takes a batch of any size in
    rounds.  ``timeout``: seconds a worker may take to answer before it counts
    as stuck (WorkerError); None: 120 s or 30 times the slowest call so far,
    whichever is longer -- a training step of the 626,560-parameter model takes
    0.1-0.3 s on 2 cores, so a worker silent for minutes is stuck, not slow.
    ``stop``: a function polled while waiting; once it returns true, the
    workers get ``stop_grace`` seconds (at most the timeout) to finish the
    call, after which it raises Interrupted.  After a WorkerError or
    Interrupted this DataParallel is closed; the model is untouched.
    """

    def __init__(self, model, workers=None, micro_batch=None, batch_size=32, timeout=None, stop=None, stop_grace=5.0):
        """workers / micro_batch None: auto_workers / auto_micro_batch for batches of ``batch_size``
        (with the model's itemsize; train.py's auto takes 4, float32's, whatever the dtype)."""
        if micro_batch is None:
            micro_batch = auto_micro_batch(model.config, batch_size, model.dtype.itemsize)
        if workers is None:
            workers = auto_workers(batch_size, micro_batch)
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be at least 1, got {micro_batch}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
        self.model, self.workers, self.micro_batch = model, workers, micro_batch
        self.timeout, self.stop, self.stop_grace = timeout, stop, stop_grace
        self._conns, self._procs, self.closed = [], [], False
        self._cpus = None  # each worker's CPU when they are pinned (worker_cpus)
        self._slowest = 0.0  # seconds, the longest call so far
        self.reuse_memory = alloc.in_effect()  # the workers follow this process's allocator setting
        self._start(len(micro_batches(max(1, batch_size), micro_batch)))

    def _start(self, capacity):
        """Make the buffers for ``capacity`` micro-batches and, with more than one worker, start the workers."""
        model = self.model
        self._ready = False  # the workers' "ready" is awaited before their first call (_on_workers)
        if self.workers == 1:
            self._slots = np.empty((capacity, model.n_params), model.dtype)
            return
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no fork of BLAS's threads
        # token rows for a training batch of ``capacity`` micro-batches, or EVAL_ROUND evaluation
        # micro-batches per worker (_eval_loss), whichever is more: a few hundred kB
        rows = max(capacity * self.micro_batch,
                   EVAL_ROUND * self.workers * budget_sequences(model.config, model.dtype.itemsize))
        self._shared = _Shared(ctx, model.n_params, model.dtype, capacity, rows, model.config.context)
        self._slots = self._shared.slots
        # The workers start with SIGINT and SIGTERM ignored (on POSIX a new interpreter keeps an
        # inherited SIG_IGN; each worker sets it again first thing), so that a Ctrl-C in the terminal,
        # sent to every process of the group, reaches only this one; and with BLAS told to use one thread.
        handlers = _ignore(_PARENT_SIGNALS)
        env_before = {name: os.environ.get(name) for name in _ONE_THREAD_ENV}
        os.environ.update(_ONE_THREAD_ENV)
        try:
            for slot in range(self.workers):
                conn, child = ctx.Pipe()
                p = ctx.Process(target=_worker_main, daemon=True, name=f"tinyllm-worker-{slot}",
                                args=(child, model.config, model.dtype.str, model.engine, self._shared,
                                      self.reuse_memory))
                p.start()
                child.close()
                self._conns.append(conn)
                self._procs.append(p)
            self._cpus = _pin([p.pid for p in self._procs], worker_cpus(self.workers))
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

    def _stop_workers(self, kill=False):
        """End the worker processes: asked to (and SIGKILLed after 5 s), or with kill, SIGKILLed at once."""
        for conn in self._conns:
            try:
                if not kill:
                    conn.send(None)
            except OSError:  # that worker is already gone
                pass
        for p in self._procs:
            if not kill:
                p.join(timeout=5)
            if p.is_alive():  # stuck, or kill: SIGKILL, as a worker ignores SIGTERM (and SIGSTOP cannot hold it)
                p.kill()
            p.join()
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []

    def close(self):
        """Stop the worker processes (a second call does nothing)."""
        self.closed = True
        self._stop_workers()

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

    def _dead(self, i):
        """The WorkerError for worker i, whose process has ended (or closed its pipe)."""
        p = self._procs[i]
        p.join(timeout=1)
        code = p.exitcode
        if code is None:
            what = "closed its pipe"
        elif code < 0:
            try:
                what = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                what = f"was killed by signal {-code}"
        else:
            what = f"exited with code {code}"
        return WorkerError(i, p.pid, what)

    def _wait_for(self, active, timeout=None):
        """Replies of workers ``active`` (numbers), in that order; WorkerError or Interrupted if they fail.

        ``timeout`` None: the call's, ``self.timeout`` or else max(120 s, 30 x the slowest call so far).
        """
        call = timeout is None
        if call:
            timeout = self.timeout if self.timeout is not None else max(120.0, 30 * self._slowest)
        t0 = time.monotonic()
        deadline, stopping = t0 + timeout, False
        replies = {}
        while len(replies) < len(active):
            waiting = [i for i in active if i not in replies]
            handles = [self._conns[i] for i in waiting] + [self._procs[i].sentinel for i in waiting]
            ready = set(wait(handles, timeout=max(0.0, min(_POLL, deadline - time.monotonic()))))
            for i in waiting:  # a reply first: a worker may answer and then end
                if self._conns[i] in ready:
                    try:
                        replies[i] = self._conns[i].recv()
                    except (EOFError, OSError):  # the pipe broke: its worker died in the middle of the call
                        raise self._dead(i) from None
            for i in waiting:
                if i not in replies and self._procs[i].sentinel in ready:
                    raise self._dead(i)
            now = time.monotonic()
            if not stopping and self.stop is not None and self.stop():
                stopping, deadline = True, min(deadline, now + self.stop_grace)
            if len(replies) < len(active) and now >= deadline:
                i = next(i for i in active if i not in replies)
                if stopping:
                    raise Interrupted(f"worker {i} (pid {self._procs[i].pid}) had not answered; call abandoned")
                raise WorkerError(i, self._procs[i].pid, f"gave no answer in {timeout:g} s")
        if call:
            self._slowest = max(self._slowest, time.monotonic() - t0)
        return [replies[i] for i in active]

    def _call(self, idx, targets, want_grads, train):
        """(loss, gradient buffer or None) over all micro-batches, on the workers if any."""
        if self.closed:
            raise RuntimeError("this DataParallel is closed")
        model = self.model
        idx = model._check_idx(idx)
        targets = model._check_targets(idx, targets)
        B, T = idx.shape
        if B == 0:
            raise ValueError("the batch is empty")
        if not want_grads:
            return self._eval_loss(idx, targets), None
        parts = micro_batches(B, self.micro_batch)
        chunks = [(s, (s.stop - s.start) / B) for s in parts]
        if train and model.config.dropout > 0:
            seeds = [int(s) for s in model.rng.integers(0, 2 ** 63, size=len(parts))]
        else:
            seeds = [None] * len(parts)
        if len(parts) > len(self._slots):  # a larger batch than the buffers were made for
            self._stop_workers()
            self._start(len(parts))
        slots = self._slots[:len(parts)]
        if not self._procs:
            losses = _run(model, idx, targets, chunks, seeds, slots, train)
        else:
            losses = self._on_workers(idx, targets, chunks, seeds, True, train)
        return sum(losses), sum_in_order(slots)  # the losses left to right, in micro-batch order

    def _eval_loss(self, idx, targets):
        """Evaluation-mode mean loss of any batch, in eval_micro_batches, run in rounds.

        No gradient slots are needed, so a batch of any size runs without
        restarting the workers: they take the micro-batches in rounds of at most
        EVAL_ROUND each, as many rows as the token buffer holds.
        """
        B = idx.shape[0]
        parts = eval_micro_batches(self.model.config, B, self.model.dtype.itemsize)
        chunks = [(s, (s.stop - s.start) / B) for s in parts]
        seeds = [None] * len(parts)
        if not self._procs:
            return sum(_run(self.model, idx, targets, chunks, seeds, None, False))
        losses, i = [], 0
        while i < len(parts):  # a round: the next micro-batches that fit the token buffer together
            a, j = parts[i].start, i + 1
            while j < len(parts) and parts[j].stop - a <= self._shared.rows:
                j += 1
            e = parts[j - 1].stop
            local = [(slice(s.start - a, s.stop - a), w) for s, w in chunks[i:j]]
            losses += self._on_workers(idx[a:e], targets[a:e], local, seeds[i:j], False, False)
            i = j
        return sum(losses)  # left to right, in micro-batch order

    def _on_workers(self, idx, targets, chunks, seeds, want_grads, train):
        """The weighted losses of all micro-batches, in order, their gradients in the shared slots."""
        for i, p in enumerate(self._procs):
            if not p.is_alive():
                error = self._dead(i)
                self._stop_workers(kill=True)
                self.closed = True
                raise error
        B, T = idx.shape
        err = np.geterr()
        shares = split_batch(len(chunks), self.workers)  # consecutive micro-batches per worker
        try:
            if not self._ready:  # their start-up gets STARTUP_TIMEOUT, whatever a call's timeout
                self._wait_for(range(len(self._procs)), max(STARTUP_TIMEOUT, self.timeout or 0))
                self._ready = True
            # the workers read these while they run a call, so they are written only between calls
            self._shared.params[...] = self.model.flat
            self._shared.tokens[0, :B, :T] = idx
            self._shared.tokens[1, :B, :T] = targets
            here = _sched_getcpu() if self._cpus is not None and _sched_getcpu is not None else None
            for i in wake_order(len(shares), self._cpus, here):  # the worker on this core last: it preempts us
                share = shares[i]
                try:
                    self._conns[i].send((B, T, share.start, chunks[share], seeds[share], want_grads, train, err))
                except OSError:  # its pipe is broken: the worker is gone
                    raise self._dead(i) from None
            replies = self._wait_for(range(len(shares)))
        except BaseException:  # a fault, Ctrl-C while waiting...: replies would be left in the pipes, out of step
            self._stop_workers(kill=True)
            self.closed = True
            raise
        for status, value in replies:
            if status == "error":
                raise value
        return [loss for _, losses in replies for loss in losses]

    def loss_and_grads(self, idx, targets, train=False, flat=False):
        """Same contract as TinyLLM.loss_and_grads: (mean loss, grads laid out like model.flat).

        With ``flat``, the gradient is the one 1-D array those views would be
        carved from, as AdamW.step and clip_grad_norm also take it (train.py).
        """
        loss, grads = self._call(idx, targets, True, train)
        return loss, (grads if flat else flat_views(self.model.shapes, grads))

    def loss(self, idx, targets):
        """Mean cross-entropy in evaluation mode (no dropout), the micro-batches spread over the workers.

        Any batch size, without restarting the workers; its micro-batches are
        eval_micro_batches' for this batch, not ``micro_batch``.
        """
        return self._call(idx, targets, False, False)[0]
