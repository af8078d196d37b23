"""Benchmark: training steps over a matrix of shapes, PyTorch side by side if installed; matmul peak, generation, memory.

    python -m tinyllm_np.bench                      # the whole matrix (a few minutes on 2 cores)
    python -m tinyllm_np.bench --configs nanogpt --steps 5
    python -m tinyllm_np.bench --steps 5 --no-torch

Everything is measured in this one run on this machine: the float32 matmul
peak; a training step (forward, backward, AdamW) at each configuration of
CONFIGS -- the seed's (B=32, T=128, dropout 0.1 and 0), nanoGPT's CPU recipe
(B=12, T=64, 4 x 128, pre-norm GELU) and a wider model (B=32, T=128, 4 x 256,
d_ff 1024) -- ours as train.py runs it (parallel.DataParallel, --workers and
--micro-batch auto) and, when PyTorch is installed, the same model written two
ways a PyTorch user would: nanoGPT's block on F.scaled_dot_product_attention
(torch_ref.TorchGPT) and nn.TransformerEncoderLayer (torch_ref.TorchTinyLLM),
the ratio taken against the faster; model.loss_and_grads called directly; and
generation with the KV cache.
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
from .parallel import DataParallel, auto_micro_batch, auto_workers, blas_threads


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


# name -> (what, Config, B): the benchmark's matrix (issue 13)
CONFIGS = {
    "seed": ("the seed: 3 x 128, post-norm ReLU, dropout 0.1",
             Config(vocab_size=59, dropout=0.1), 32),
    "seed-p0": ("the seed, dropout 0",
                Config(vocab_size=59, dropout=0.0), 32),
    "nanogpt": ("nanoGPT's CPU recipe: 4 x 128, 4 heads, pre-norm GELU, dropout 0",
                Config(vocab_size=65, n_layers=4, context=64, dropout=0.0, norm_first=True, activation="gelu"), 12),
    "wide": ("wider: 4 x 256, 4 heads, d_ff 1024, pre-norm GELU, dropout 0.1",
             Config(vocab_size=65, d_model=256, n_layers=4, d_ff=1024, dropout=0.1, norm_first=True,
                    activation="gelu"), 32),
}


# Timed steps per configuration by default (--steps sets them all), in rounds of 4 (--rounds): about 10-50 s
# each on 2 cores.  The short step of nanoGPT's recipe gets more: its ratio in a round of 4 steps moved by
# +-0.05 from round to round on the shared 2-core machine, more than a change to the code usually buys.
STEPS = {"seed": 20, "seed-p0": 60, "nanogpt": 100, "wide": 20}  # seed-p0 sits nearest the 0.8 line: 15 rounds
STEPS_PER_ROUND = 4


def random_batch(cfg, B, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.vocab_size, (B, cfg.context)), rng.integers(0, cfg.vocab_size, (B, cfg.context))


def numpy_stepper(cfg, B, workers, micro_batch, seed=0):
    """(step, DataParallel): a training step as train.py runs it, and the workers it runs on (close them).

    The batch is cut into micro-batches of ``micro_batch`` sequences, run by
    ``workers`` processes (parallel.DataParallel); the AdamW step runs in this process.
    """
    model = TinyLLM(cfg, seed=seed)
    opt = AdamW(model.params, lr=3e-3, weight_decay=0.01)
    x, y = random_batch(cfg, B, seed)
    dp = DataParallel(model, workers, micro_batch, batch_size=B)

    def step():
        _, grads = dp.loss_and_grads(x, y, train=True)
        opt.step(grads)

    return step, dp


def plain_stepper(cfg, B, seed=0):
    """model.loss_and_grads on the whole batch in this process, plus the AdamW step, as a function."""
    model = TinyLLM(cfg, seed=seed)
    opt = AdamW(model.params, lr=3e-3, weight_decay=0.01)
    x, y = random_batch(cfg, B, seed)
    return lambda: opt.step(model.loss_and_grads(x, y, train=True)[1])


def torch_stepper(cfg, B, module="gpt", seed=0):
    """A PyTorch training step (forward, backward, AdamW), as a function.

    module "gpt": torch_ref.TorchGPT, nanoGPT's block on F.scaled_dot_product_attention;
    "encoder": torch_ref.TorchTinyLLM, nn.TransformerEncoderLayer, as the original.
    """
    import torch

    from .torch_ref import TorchGPT, from_numpy

    torch.manual_seed(seed)
    tm = (TorchGPT(cfg) if module == "gpt" else from_numpy(TinyLLM(cfg, seed=seed))).train()
    opt = torch.optim.AdamW(tm.parameters(), lr=3e-3, weight_decay=0.01)
    x, y = (torch.from_numpy(a) for a in random_batch(cfg, B, seed))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(tm(x).reshape(-1, cfg.vocab_size), y.reshape(-1))
        loss.backward()
        opt.step()

    return step


def paired_rounds(step_fns, steps, rounds):
    """(median seconds of each function's step over all its timed steps, [each round's medians]).

    The functions take turns, round after round, so that a drift in the
    machine's speed reaches all of them alike (on the shared 2-core machine a
    step of nanoGPT's recipe ranged from 29.5 to 46.8 ms within one run): in
    each round every function runs one untimed step (its caches warm up, and
    the threads of the one before it -- PyTorch's spin for a few ms after its
    work, OpenBLAS's for about 0.1 s -- go to sleep), then its share of
    ``steps`` timed ones.  ``rounds`` (at most ``steps``) is their number.
    Ratios are then taken within each round (round_ratio).
    """
    times = [[] for _ in step_fns]
    per_round = []
    for r in range(rounds):
        n = steps // rounds + (r < steps % rounds)
        medians = []
        for fn, ts in zip(step_fns, times):
            fn()
            mine = [_timed(fn) for _ in range(n)]
            ts.extend(mine)
            medians.append(statistics.median(mine))
        per_round.append(medians)
    return [statistics.median(ts) for ts in times], per_round


def round_ratios(per_round, i, others):
    """Function i's median / the fastest of ``others``' in the same round, one ratio a round.

    Not the ratio of the overall medians: each round's ratio compares steps
    timed seconds apart, on the same machine state.
    """
    return [m[i] / min(m[j] for j in others) for m in per_round]


def round_ratio(per_round, i, others):
    """The median over rounds of round_ratios: the figure the benchmark reports."""
    return statistics.median(round_ratios(per_round, i, others))


def middle_half(values):
    """(first quartile, third quartile) of values: how far the rounds' ratios spread."""
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else list(values) * 3
    return q[0], q[2]


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


def _count(text):
    """--workers / --micro-batch value: "auto" (None) or a positive integer."""
    if text == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"expected 'auto' or a positive integer, got {text!r}")
    return n


def main(argv=None):
    ap = OneLineParser(prog="python -m tinyllm_np.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma-separated configurations of the matrix, from {', '.join(CONFIGS)} "
                         "(default: all)")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed training steps per configuration (default: "
                         + ", ".join(f"{n} {k}" for n, k in STEPS.items()) + ")")
    ap.add_argument("--rounds", type=int, default=None,
                    help=f"rounds the steps are spread over, ours and PyTorch's taking turns "
                         f"(default: one per {STEPS_PER_ROUND} steps)")
    ap.add_argument("--gen-chars", type=int, default=500, help="characters generated per generation test")
    ap.add_argument("--no-torch", action="store_true", help="skip PyTorch even if installed")
    ap.add_argument("--torch-threads", type=int, default=2, help="PyTorch's intra-op threads (default: 2)")
    ap.add_argument("--workers", default="auto",
                    help="worker processes of our step, as train.py's --workers (default: auto)")
    ap.add_argument("--micro-batch", default="auto",
                    help="sequences per micro-batch, as train.py's --micro-batch (default: auto)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's allocator settings alone, here and in the workers "
                         "(to see what reuse_freed_memory buys)")
    args = ap.parse_args(argv)
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    try:
        workers, micro_batch = _count(args.workers), _count(args.micro_batch)
    except ValueError as e:
        ap.error(f"--workers/--micro-batch: {e}")
    if unknown or not names:
        ap.error(f"--configs: unknown configuration {unknown[0] if unknown else ''!r}; "
                 f"choose from {', '.join(CONFIGS)}")
    if min(v for v in (args.steps, args.rounds, args.gen_chars, args.torch_threads, 1) if v is not None) < 1:
        ap.error("--steps, --rounds, --gen-chars and --torch-threads must be positive")
    print(f"machine: {machine()}")
    if args.default_malloc:
        print("allocator: glibc defaults (--default-malloc)")
    else:
        print(f"allocator: freed memory kept for reuse (alloc.reuse_freed_memory): {reuse_freed_memory()}")
    peak = matmul_peak()
    print(f"float32 matmul peak (2048^3): {peak:.1f} GFLOP/s (measured again after each configuration)")
    print(f"BLAS threads: {blas_threads()}")
    torch = None
    if not args.no_torch:
        try:
            import torch

            torch.set_num_threads(args.torch_threads)
        except ImportError:
            print("PyTorch: not installed; no comparison (pip install torch to add it)")
    if torch is not None:
        print(f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads; 'gpt': nanoGPT's block on "
              "F.scaled_dot_product_attention (torch_ref.TorchGPT), 'encoder': nn.TransformerEncoderLayer")
    print("training steps (forward, backward, AdamW), median of each configuration's steps, spread over rounds "
          "in which ours and PyTorch's take turns; ratio = median over the rounds of ours / the faster PyTorch "
          "in that round, with the middle half of the rounds' ratios")
    workers_rss, table, library, shares = 0.0, [], None, []
    for name in names:
        what, cfg, B = CONFIGS[name]
        T = cfg.context
        mb = micro_batch or auto_micro_batch(cfg, B)
        w = workers or auto_workers(B, mb)
        flops = step_flops(cfg, B, T)
        steps = args.steps or STEPS[name]
        rounds = min(args.rounds or max(1, steps // STEPS_PER_ROUND), steps)
        step, dp = numpy_stepper(cfg, B, w, mb)
        try:
            fns = [step]
            if torch is not None:
                fns += [torch_stepper(cfg, B, "gpt"), torch_stepper(cfg, B, "encoder")]
            if name == "seed-p0":  # what a library caller gets without DataParallel, in the same rounds
                fns.append(plain_stepper(cfg, B))
            medians, per_round = paired_rounds(fns, steps, rounds)
            t, torch_times = medians[0], medians[1:3] if torch is not None else []
            if name == "seed-p0":
                library = (medians[-1], round_ratio(per_round, len(fns) - 1, [1, 2]) if torch is not None else None)
            workers_rss = max(workers_rss, sum(peak_rss_of(pid) for pid in dp.pids()))
        finally:
            dp.close()
        # measured again after each configuration, the best of all kept for the shares of it printed
        # at the end: one measurement in a slow moment of a shared machine (half the peak, once) put
        # every step above 100 % of it
        peak = max(peak, matmul_peak())
        shares.append((name, flops / t / 1e9))
        print(f"[{name}] {what}; B={B}, T={T}, {TinyLLM(cfg).n_params:,} parameters, {flops / 1e9:.2f} GFLOP")
        print(f"  numpy training step, dropout {cfg.dropout}, micro-batches of {mb}, {w} worker(s): "
              f"{t * 1e3:.1f} ms ({B * T / t:,.0f} tokens/s, {flops / t / 1e9:.1f} GFLOP/s)")
        row = [name, t]
        if torch is not None:
            tg, te = torch_times
            ratios = round_ratios(per_round, 0, [1, 2])
            ratio, (lo, hi) = statistics.median(ratios), middle_half(ratios)
            print(f"  torch gpt {tg * 1e3:.1f} ms, torch encoder {te * 1e3:.1f} ms; numpy/torch: {ratio:.2f} "
                  f"(median of {rounds} rounds' ratios, {steps} steps each side; middle half {lo:.2f}-{hi:.2f})")
            row += [tg, te, ratio]
        table.append(row)
    print(f"float32 matmul peak, the best of {len(names) + 1} measurements: {peak:.1f} GFLOP/s; our steps' share "
          "of it: " + ", ".join(f"{name} {100 * gf / peak:.1f}% of peak" for name, gf in shares))
    train_rss = peak_rss_mb()
    others_rss = sum(peak_rss_of(pid) for pid in child_pids())  # multiprocessing's resource tracker
    print(f"peak RSS of the training steps: {train_rss + workers_rss + others_rss:.0f} MB "
          f"(this process {train_rss:.0f} MB + its workers {workers_rss:.0f} MB + other child processes "
          f"{others_rss:.0f} MB)")
    if torch is not None:
        print("| config | numpy ms | torch gpt ms | torch encoder ms | numpy/torch |")
        for name, t, tg, te, r in table:
            print(f"| {name} | {t * 1e3:.1f} | {tg * 1e3:.1f} | {te * 1e3:.1f} | {r:.2f} |")
    if library is not None:
        tp, ratio = library
        line = f"library: model.loss_and_grads on the whole (32,128) batch, dropout 0, in one process: {tp * 1e3:.1f} ms"
        if ratio is not None:
            line += f"; numpy/torch: {ratio:.2f} (in seed-p0's rounds; DataParallel, the public fast path, is its row)"
        print(line)
    model = TinyLLM(Config(vocab_size=59), seed=0)
    gen = {}
    for plen in (8, 128):
        cps, first = bench_generation(model, plen, args.gen_chars)
        gen[plen] = cps
        print(f"generation, {plen}-char prompt, KV cache: {cps:,.0f} chars/s, first char after {first * 1e3:.1f} ms")
    if torch is not None:
        tg = bench_torch_generation(model, 8, min(args.gen_chars, 300))
        print(f"torch generation (original method, window recomputed per char): {tg:,.0f} chars/s; "
              f"numpy KV cache is {gen[8] / tg:.1f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
