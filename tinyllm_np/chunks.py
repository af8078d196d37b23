"""Elementwise work over long 1-D buffers, chunk by chunk, on this thread and one helper thread.

The optimizer's update and the sum of the workers' gradients are a dozen passes
over buffers of all the parameters, run after the workers are done, while the
cores wait.  Two things make them cheaper:

* two threads: NumPy releases the GIL inside a ufunc's loop, so a helper
  thread working through the second half of the pieces runs on the other core.
  Elementwise passes give the same numbers whoever runs them, so the split
  never changes a result.
* pieces: each pass runs over a piece of at most CHUNK numbers (1 MB in
  float32), so that a pass over one piece of every buffer still finds the
  pieces in cache from the pass before, instead of streaming whole buffers
  from memory; by default (piece_count) the fewest near-equal pieces of at
  most CHUNK, an even number of them, so both threads get the same share.  Fewer,
  larger pieces also mean fewer NumPy calls, and fewer hand-offs of the GIL
  between the two threads, which on an AMD EPYC (Zen 4, 1 MB L2, 32 MB L3)
  cost more than the cache misses: AdamW's update at nanoGPT's CPU recipe
  (818,176 parameters), timed inside training steps, 2.02 ms in pieces of
  65,536 numbers against 1.48 ms in 4 equal pieces (docs/performance.md).
"""

import os

CHUNK = 262144  # numbers per piece, at most

_helper = None  # the helper thread's pool, made on first use


def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def piece_count(n, chunk=None):
    """How many pieces over_chunks cuts range(n) into by default: the fewest of at most ``chunk`` (default CHUNK) numbers, made even (unless one)."""
    count = -(-n // (CHUNK if chunk is None else chunk))
    return max(1, count + (count > 1 and count % 2))  # even: the two threads' halves are equal


def over_chunks(fn, n, chunk=None):
    """fn(start, stop) for the consecutive pieces of range(n): piece_count(n) near-equal ones, or with ``chunk``, each that long but the last.

    With two or more pieces and two or more cores, the first half of the
    pieces runs here and the second half on a helper thread, at the same time;
    fn must only touch its own piece.  An exception in either half is raised
    here, after both halves have stopped.
    """
    global _helper
    if chunk is None:
        k = min(piece_count(n), n)  # no empty pieces (n = 0: none at all)
        parts = [(i * n // k, (i + 1) * n // k) for i in range(k)]
    else:
        parts = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    if len(parts) < 2 or _cores() < 2:
        for s, e in parts:
            fn(s, e)
        return
    if _helper is None:  # imported here: the package's import (the sampler, the chat) stays without it
        from concurrent.futures import ThreadPoolExecutor
        _helper = ThreadPoolExecutor(1, thread_name_prefix="tinyllm-chunks")
    half = (len(parts) + 1) // 2

    def run(part):
        for s, e in part:
            fn(s, e)

    later = _helper.submit(run, parts[half:])
    try:
        run(parts[:half])
    finally:
        later.result()
