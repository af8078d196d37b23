"""Elementwise work over long 1-D buffers, chunk by chunk, on this thread and one helper thread.

The optimizer's update and the sum of the workers' gradients are a dozen passes
over buffers of all the parameters, run after the workers are done, while the
cores wait.  Two things make them cheaper:

* chunks: each pass runs over a piece small enough (65,536 numbers, 256 KB in
  float32) that the pieces of all the buffers stay in the core's L2 cache from
  one pass to the next, instead of streaming every buffer from memory per pass;
* two threads: NumPy releases the GIL inside a ufunc's loop, so a helper
  thread working through the second half of the chunks runs on the other core.
  Elementwise passes give the same numbers whoever runs them, so the split
  never changes a result.

Measured on 2 cores of an AMD EPYC (Zen 3), AdamW on nanoGPT's recipe (818,176
parameters): see docs/performance.md.
"""

import os

CHUNK = 65536  # numbers per piece

_helper = None  # the helper thread's pool, made on first use


def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def over_chunks(fn, n, chunk=None):
    """fn(start, stop) for the consecutive pieces of range(n), each at most ``chunk`` (default CHUNK) long.

    With two or more pieces and two or more cores, the first half of the
    pieces runs here and the second half on a helper thread, at the same time;
    fn must only touch its own piece.  An exception in either half is raised
    here, after both halves have stopped.
    """
    global _helper
    chunk = CHUNK if chunk is None else chunk
    pieces = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    if len(pieces) < 2 or _cores() < 2:
        for s, e in pieces:
            fn(s, e)
        return
    if _helper is None:  # imported here: the package's import (the sampler, the chat) stays without it
        from concurrent.futures import ThreadPoolExecutor
        _helper = ThreadPoolExecutor(1, thread_name_prefix="tinyllm-chunks")
    half = (len(pieces) + 1) // 2

    def run(part):
        for s, e in part:
            fn(s, e)

    later = _helper.submit(run, pieces[half:])
    try:
        run(pieces[:half])
    finally:
        later.result()
