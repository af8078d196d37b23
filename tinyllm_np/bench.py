"""Benchmark: training step, matmul peak, generation speed, memory; PyTorch side by side if installed.

    python -m tinyllm_np.bench                 # the full run (about 25 s on 2 cores)
    python -m tinyllm_np.bench --steps 5 --no-torch

Everything is measured in this one run on this machine: the float32 matmul
peak, the training step at the original's configuration (B=32, T=128, AdamW,
dropout 0.1 and 0), generation with the KV cache, and, when PyTorch is
installed, the identical model and step in PyTorch.
"""

import os
import platform
import resource
import statistics
import sys
import time

import numpy as np

from .alloc import reuse_freed_memory
from .cli import OneLineParser
from .generate import Decoder, sample
from .layers import query_blocks
from .model import Config, TinyLLM
from .optim import AdamW
from .parallel import DataParallel, blas_threads


def median_time(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(n=2048, repeats=5):
    """Best float32 GFLOP/s of an n x n matmul (2 n^3 flops)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), np.float32)
    np.matmul(a, b, out=out)
    best = min(_timed(lambda: np.matmul(a, b, out=out)) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_flops(cfg, B, T):
    """Matmul flops of one training step: forward, plus twice that for the backward.

    Per token and layer: QKV 2*C*3C, out proj 2*C*C, FFN 2 * 2*C*F; then the
    head 2*C*V.  Attention's two products (q k^T and A v) count the scores the
    code computes: query block s..e-1 against keys 0..e-1 (layers.query_blocks),
    2*e*C flops a query for each product.
    """
    C, F, V, L = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_layers
    scores = sum((e - s) * e for s, e in query_blocks(T))  # (query, key) pairs computed per sequence and head
    per_seq_layer = T * (6 * C * C + 2 * C * C + 4 * C * F) + 4 * scores * C
    return 3 * B * (L * per_seq_layer + T * 2 * C * V)


def bench_numpy_step(cfg, B, T, steps, workers, micro_batch, seed=0):
    """(median seconds, workers' peak RSS in MB) of a training step as train.py runs it.

    The batch is cut into micro-batches of ``micro_batch`` sequences, run by
    ``workers`` processes; the optimizer step runs in this process.
    """
    model = TinyLLM(cfg, seed=seed)
    opt = AdamW(model.params, lr=3e-3, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, cfg.vocab_size, (B, T))
    y = rng.integers(0, cfg.vocab_size, (B, T))
    with DataParallel(model, workers, micro_batch) as dp:

        def step():
            _, grads = dp.loss_and_grads(x, y, train=True)
            opt.step(grads)

        t = median_time(step, steps)
        return t, sum(peak_rss_of(pid) for pid in dp.pids())


def bench_torch_step(cfg, B, T, steps, seed=0):
    import torch

    from .torch_ref import from_numpy

    tm = from_numpy(TinyLLM(cfg, seed=seed)).train()
    opt = torch.optim.AdamW(tm.parameters(), lr=3e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    y = torch.randint(0, cfg.vocab_size, (B, T), generator=g)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(tm(x).reshape(-1, cfg.vocab_size), y.reshape(-1))
        loss.backward()
        opt.step()

    return median_time(step, steps)


def bench_generation(model, prompt_len, n_chars, seed=0, repeats=3):
    """(chars/s over n_chars sampled tokens, seconds to the first token) with the KV cache.

    Each of ``repeats`` runs starts a fresh text from the same prompt; the median run is reported.
    """
    runs = []
    for _ in range(repeats):
        rng = np.random.default_rng(seed)
        ids = list(rng.integers(0, model.config.vocab_size, prompt_len))
        dec = Decoder(model)
        t0 = time.perf_counter()
        ids.append(sample(dec.logits(ids), 0.7, rng=rng))
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(n_chars):
            ids.append(sample(dec.logits(ids), 0.7, rng=rng))
        runs.append((n_chars / (time.perf_counter() - t0), first))
    return sorted(runs)[len(runs) // 2]


def bench_torch_generation(model, prompt_len, n_chars, seed=0):
    """The original's method: the whole last-128 window recomputed for every character."""
    import torch

    from .torch_ref import from_numpy

    tm = from_numpy(model).eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g)
    T = model.config.context
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(n_chars):
            logits = tm(ids[:, -T:])[0, -1] / 0.7
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)
            ids = torch.cat([ids, nxt[None]], dim=1)
    return n_chars / (time.perf_counter() - t0)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def peak_rss_of(pid):
    """Peak resident memory (MB) of a running process, from /proc (Linux); 0 where unavailable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def child_pids():
    """Process ids of this process's children, from /proc (Linux); none where unavailable."""
    pids = []
    try:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # after "pid (comm) state"
                except (OSError, IndexError, ValueError):
                    continue
                if ppid == os.getpid():
                    pids.append(int(entry))
    except OSError:
        pass
    return pids


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, NumPy {np.__version__}"


def main(argv=None):
    ap = OneLineParser(prog="python -m tinyllm_np.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per configuration (median)")
    ap.add_argument("--gen-chars", type=int, default=500, help="characters generated per generation test")
    ap.add_argument("--no-torch", action="store_true", help="skip PyTorch even if installed")
    ap.add_argument("--workers", type=int, default=2, help="worker processes of the training step (train.py's --workers)")
    ap.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch (train.py's --micro-batch)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's allocator settings alone, here and in the workers "
                         "(to see what reuse_freed_memory buys)")
    args = ap.parse_args(argv)
    B, T = 32, 128
    if args.steps < 1 or args.gen_chars < 1 or args.micro_batch < 1 or not 1 <= args.workers <= B:
        ap.error(f"--steps, --gen-chars and --micro-batch must be positive, --workers between 1 and {B}")
    print(f"machine: {machine()}")
    if args.default_malloc:
        print("allocator: glibc defaults (--default-malloc)")
    else:
        print(f"allocator: freed memory kept for reuse (alloc.reuse_freed_memory): {reuse_freed_memory()}")
    peak = matmul_peak()
    print(f"float32 matmul peak (2048^3): {peak:.1f} GFLOP/s")
    print(f"BLAS threads: {blas_threads()}")
    rows = []
    flops = step_flops(Config(vocab_size=59), B, T)
    print(f"training step: B={B}, T={T}, AdamW, {flops / 1e9:.1f} GFLOP of matmuls; median of {args.steps}")
    workers_rss = 0.0
    for p in (0.1, 0.0):
        cfg = Config(vocab_size=59, dropout=p)
        for workers in dict.fromkeys((args.workers, 1)):
            t, rss = bench_numpy_step(cfg, B, T, args.steps, workers, args.micro_batch)
            workers_rss = max(workers_rss, rss)
            rows.append((p, workers, t))
            how = (f"{workers} worker processes, BLAS 1 thread each" if workers > 1
                   else f"1 worker (this process), BLAS {blas_threads()} threads")
            print(f"numpy training step, dropout {p}, micro-batches of {args.micro_batch}, {how}: {t * 1e3:.1f} ms  "
                  f"({B * T / t:,.0f} tokens/s, {flops / t / 1e9:.1f} GFLOP/s = {100 * flops / t / 1e9 / peak:.1f}% of peak)")
    train_rss = peak_rss_mb()
    others_rss = sum(peak_rss_of(pid) for pid in child_pids())  # multiprocessing's resource tracker
    print(f"peak RSS of the training steps: {train_rss + workers_rss + others_rss:.0f} MB "
          f"(this process {train_rss:.0f} MB + its workers {workers_rss:.0f} MB + other child processes "
          f"{others_rss:.0f} MB)")
    model = TinyLLM(Config(vocab_size=59), seed=0)
    gen = {}
    for plen in (8, 128):
        cps, first = bench_generation(model, plen, args.gen_chars)
        gen[plen] = cps
        print(f"generation, {plen}-char prompt, KV cache: {cps:,.0f} chars/s, first char after {first * 1e3:.1f} ms")
    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            print("PyTorch: not installed; no comparison (pip install torch to add it)")
    if torch is not None:
        print(f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads:")
        for p in (0.1, 0.0):
            tt = bench_torch_step(Config(vocab_size=59, dropout=p), B, T, args.steps)
            ratios = ", ".join(f"{w} worker{'s' if w > 1 else ''} {t / tt:.2f}" for q, w, t in rows if q == p)
            print(f"torch training step, dropout {p}: {tt * 1e3:.1f} ms; numpy/torch time ratio: {ratios}")
        tg = bench_torch_generation(model, 8, min(args.gen_chars, 300))
        print(f"torch generation (original method, window recomputed per char): {tg:,.0f} chars/s; "
              f"numpy KV cache is {gen[8] / tg:.1f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
