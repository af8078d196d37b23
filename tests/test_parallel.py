"""Data parallelism: micro-batches on worker processes give the full batch's loss and gradients."""

import os
import signal

import numpy as np
import pytest

from tinyllm_np import Config, TinyLLM, load_model
from tinyllm_np.parallel import DataParallel, Interrupted, WorkerError, blas_threads, micro_batches, split_batch
from tinyllm_np.train import main as train_main

SMALL = dict(vocab_size=11, d_model=16, n_heads=2, d_ff=24, n_layers=2, context=8)


def small_model(dtype=np.float64, dropout=0.1, seed=0):
    return TinyLLM(Config(dropout=dropout, **SMALL), seed=seed, dtype=dtype)


def batch(B, T=8, seed=1):
    rng = np.random.default_rng(seed)
    return rng.integers(0, SMALL["vocab_size"], (B, T)), rng.integers(0, SMALL["vocab_size"], (B, T))


def max_diff(g, h):
    return max(float(np.abs(g[k] - h[k]).max()) for k in g)


def test_split_batch_covers_every_sequence_once():
    for B in (1, 2, 5, 32):
        for parts in (1, 2, 3, 8):
            pieces = split_batch(B, parts)
            assert len(pieces) == min(B, parts)
            covered = np.concatenate([np.arange(B)[s] for s in pieces])
            assert covered.tolist() == list(range(B))
            sizes = [s.stop - s.start for s in pieces]
            assert max(sizes) - min(sizes) <= 1


def test_micro_batches_are_at_most_the_size_asked():
    assert [(s.start, s.stop) for s in micro_batches(32, 4)] == [(i, i + 4) for i in range(0, 32, 4)]
    assert [s.stop - s.start for s in micro_batches(10, 4)] == [3, 4, 3]  # ceil(10/4) = 3 near-equal pieces
    assert micro_batches(3, 8) == [slice(0, 3)]


@pytest.mark.parametrize("B,workers,micro_batch", [(4, 2, 1), (5, 2, 2), (7, 3, 2), (6, 2, 8), (3, 1, 2)])
def test_same_loss_and_gradients_as_one_batch(B, workers, micro_batch):
    """Without dropout the micro-batches change nothing but the order of float additions."""
    model = small_model()
    idx, tgt = batch(B)
    loss, grads = model.loss_and_grads(idx, tgt)
    with DataParallel(model, workers, micro_batch) as dp:
        loss_dp, grads_dp = dp.loss_and_grads(idx, tgt)
        assert dp.loss(idx, tgt) == pytest.approx(loss, rel=1e-13)
        loss_flat, flat = dp.loss_and_grads(idx, tgt, flat=True)  # the one array the views are carved from
    assert loss_dp == pytest.approx(loss, rel=1e-13)
    assert list(grads_dp) == list(grads)
    assert max_diff(grads, grads_dp) < 1e-13 * max(float(np.abs(g).max()) for g in grads.values())
    assert loss_flat == loss_dp and flat.shape == model.flat.shape
    assert np.array_equal(flat, np.concatenate([g.ravel() for g in grads_dp.values()]))


def test_workers_see_every_parameter_update():
    """The workers read the parameters afresh on each call: an in-place update must reach them."""
    model = small_model(dropout=0.0)
    idx, tgt = batch(4)
    with DataParallel(model, 2, 2) as dp:
        before = dp.loss(idx, tgt)
        model.flat *= 0.5
        after = dp.loss(idx, tgt)
    assert after != before
    assert after == pytest.approx(model.loss(idx, tgt), rel=1e-13)


def test_dropout_masks_come_from_generators_seeded_by_model_rng():
    """Micro-batch k uses default_rng(seed_k), the seeds drawn from model.rng: written out by hand here."""
    model = small_model()
    idx, tgt = batch(5)
    seeds = np.random.default_rng(0).integers(0, 2 ** 63, size=2)  # model.rng starts as default_rng(seed=0)
    parts = [slice(0, 2), slice(2, 5)]  # micro_batches(5, 3): two near-equal pieces
    ref = [model.loss_and_grads(idx[s], tgt[s], train=True, rng=np.random.default_rng(sd))
           for s, sd in zip(parts, seeds)]
    w = [2 / 5, 3 / 5]
    loss_ref = w[0] * ref[0][0] + w[1] * ref[1][0]
    grads_ref = {k: w[0] * ref[0][1][k] + w[1] * ref[1][1][k] for k in ref[0][1]}
    with DataParallel(model, 2, micro_batch=3) as dp:
        loss, grads = dp.loss_and_grads(idx, tgt, train=True)
    assert loss == pytest.approx(loss_ref, rel=1e-13)
    assert max_diff(grads, grads_ref) < 1e-12
    # and dropout really was on: evaluation mode gives another loss
    assert abs(loss - model.loss(idx, tgt)) > 1e-6


@pytest.mark.parametrize("workers", [2, 3])
def test_the_number_of_workers_does_not_change_the_numbers(workers):
    """With dropout on, float32, 4 micro-batches: the slots are added in micro-batch order, so bitwise."""
    results = []
    for w in (1, workers):
        model = small_model(dtype=np.float32)
        idx, tgt = batch(8)
        with DataParallel(model, w, micro_batch=2) as dp:
            results.append([dp.loss_and_grads(idx, tgt, train=True) for _ in range(2)] + [(dp.loss(idx, tgt), None)])
    for (l1, g1), (l2, g2) in zip(*results):
        assert l1 == l2
        assert g1 is None or all(np.array_equal(g1[k], g2[k]) for k in g1)
    # and the sum is not the one a per-worker accumulation would give, or this would prove little:
    # (g0 + g1) + (g2 + g3) differs from ((g0 + g1) + g2) + g3 in some bits
    model = small_model(dtype=np.float32)
    idx, tgt = batch(8)
    seeds = np.random.default_rng(0).integers(0, 2 ** 63, size=4)
    g = [model.loss_and_grads(idx[s], tgt[s], train=True, rng=np.random.default_rng(sd), weight=0.25)[1]
         for s, sd in zip(micro_batches(8, 2), seeds)]
    flat = [np.concatenate([v.ravel() for v in gk.values()]) for gk in g]
    ours = np.concatenate([v.ravel() for v in results[0][0][1].values()])
    assert np.array_equal(ours, ((flat[0] + flat[1]) + flat[2]) + flat[3])
    assert not np.array_equal(ours, (flat[0] + flat[1]) + (flat[2] + flat[3]))


def test_a_batch_larger_than_the_buffers_restarts_the_workers_with_room():
    model = small_model(dtype=np.float32)
    idx, tgt = batch(8)
    with DataParallel(model, 2, micro_batch=2, batch_size=4) as dp:
        before = dp.pids()
        loss, grads = dp.loss_and_grads(idx, tgt)
        assert dp.pids() != before and len(dp.pids()) == 2
    with DataParallel(model, 1, micro_batch=2) as dp:
        loss1, grads1 = dp.loss_and_grads(idx, tgt)
    assert loss == loss1 and all(np.array_equal(grads[k], grads1[k]) for k in grads)


def test_training_steps_are_reproducible():
    """Process timing must not matter: the same seed gives bitwise the same float32 losses and gradients."""
    runs = []
    for _ in range(2):
        model = small_model(dtype=np.float32, seed=3)
        idx, tgt = batch(6)
        with DataParallel(model, 2, micro_batch=2) as dp:
            out = [dp.loss_and_grads(idx, tgt, train=True) for _ in range(3)]
        runs.append(out)
    for (l1, g1), (l2, g2) in zip(*runs):
        assert l1 == l2
        assert all(np.array_equal(g1[k], g2[k]) for k in g1)


def test_one_micro_batch_on_one_worker_is_the_plain_model():
    a, b = small_model(), small_model()
    idx, tgt = batch(4)
    with DataParallel(a, 1, micro_batch=4) as dp:
        assert dp.pids() == []  # no processes: it all runs here
        la, ga = dp.loss_and_grads(idx, tgt, train=True)
    (seed,) = np.random.default_rng(0).integers(0, 2 ** 63, size=1)
    lb, gb = b.loss_and_grads(idx, tgt, train=True, rng=np.random.default_rng(seed))
    assert la == lb and max_diff(ga, gb) == 0.0


def test_close_stops_the_workers():
    dp = DataParallel(small_model(), 2)
    pids = dp.pids()
    assert len(pids) == 2
    dp.loss(*batch(4))
    dp.close()
    dp.close()  # a second close changes nothing
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read()
    with pytest.raises(RuntimeError, match="closed"):
        dp.loss(*batch(4))


def test_a_killed_worker_is_reported_not_waited_for():
    with DataParallel(small_model(), 2) as dp:
        dp.loss(*batch(4))
        dp._procs[1].kill()
        dp._procs[1].join()
        with pytest.raises(WorkerError, match=r"worker 1 \(pid \d+\) was killed by SIGKILL"):
            dp.loss(*batch(4))


def _gone(pids):
    return all(not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read()
               for pid in pids)


def test_a_worker_killed_while_it_is_awaited_is_reported_at_once():
    """Worker 0 SIGSTOPped (so the call surely waits for it), then SIGKILLed 0.3 s into the call."""
    import threading
    import time

    model = small_model()
    with DataParallel(model, 2, micro_batch=2, timeout=60) as dp:
        dp.loss(*batch(4))
        pids, flat = dp.pids(), model.flat.copy()
        os.kill(pids[0], signal.SIGSTOP)
        threading.Timer(0.3, os.kill, (pids[0], signal.SIGKILL)).start()
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match=rf"^worker 0 \(pid {pids[0]}\) was killed by SIGKILL$") as e:
            dp.loss_and_grads(*batch(4), train=True)
        assert time.monotonic() - t0 < 10  # the sentinel, not the 60 s timeout
        assert (e.value.worker, e.value.pid) == (0, pids[0])
        assert dp.closed and _gone(pids)
        assert np.array_equal(model.flat, flat)


def test_a_stuck_worker_times_out_with_its_name():
    import time

    # 3 s: far more than the healthy worker needs even on a loaded machine, so only the stopped one is named
    with DataParallel(small_model(), 2, micro_batch=2, timeout=3.0) as dp:
        dp.loss(*batch(4))
        pids = dp.pids()
        os.kill(pids[1], signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match=rf"^worker 1 \(pid {pids[1]}\) gave no answer in 3 s$"):
            dp.loss(*batch(4))
        assert 3.0 <= time.monotonic() - t0 < 15
        assert dp.closed and _gone(pids)  # SIGKILL ends a stopped process too


def test_the_stop_flag_is_polled_while_waiting():
    """A stop request ends the wait for a stuck worker after stop_grace; healthy workers may finish the call."""
    import time

    requested = []
    model = small_model()
    with DataParallel(model, 2, micro_batch=2, timeout=60, stop=lambda: bool(requested), stop_grace=2.0) as dp:  # room on a loaded machine
        dp.loss(*batch(4))
        requested.append(True)
        assert dp.loss(*batch(4)) == pytest.approx(model.loss(*batch(4)), rel=1e-13)  # answered in time
        pids = dp.pids()
        os.kill(pids[0], signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(Interrupted, match=rf"worker 0 \(pid {pids[0]}\) had not answered"):
            dp.loss(*batch(4))
        assert 2.0 <= time.monotonic() - t0 < 10  # the grace, not the 60 s timeout
        assert dp.closed and _gone(pids)


def test_a_worker_error_is_raised_here_and_the_workers_carry_on():
    """np.errstate reaches the workers; the FloatingPointError they raise comes back as itself."""
    model = small_model(dropout=0.0)
    idx, tgt = batch(4)
    with DataParallel(model, 2, micro_batch=2) as dp:
        good = dp.loss(idx, tgt)
        saved = model.flat.copy()
        model.flat[:] = 1e300  # overflows everywhere
        with np.errstate(over="raise", invalid="raise"):
            with pytest.raises(FloatingPointError):
                dp.loss_and_grads(idx, tgt)
        model.flat[:] = saved
        assert dp.loss(idx, tgt) == good


def test_bad_input_is_refused_before_reaching_the_workers():
    with DataParallel(small_model(), 2) as dp:
        with pytest.raises(ValueError, match="empty"):
            dp.loss_and_grads(np.zeros((0, 8), int), np.zeros((0, 8), int))
        with pytest.raises(ValueError, match="token ids"):
            dp.loss(np.full((2, 8), 99), np.zeros((2, 8), int))
        assert dp.loss(*batch(2)) > 0  # still in step with its workers


def test_blas_threads_can_be_set_and_restored():
    before = blas_threads()
    if before is None:
        pytest.skip("this BLAS's thread count cannot be controlled here")
    assert blas_threads(1) == before
    assert blas_threads() == 1
    blas_threads(before)
    assert blas_threads() == before


def test_workers_and_micro_batch_flags_are_checked(capsys, tmp_path):
    data = tmp_path / "t.txt"
    data.write_text("hello world, " * 200, encoding="utf-8")
    for args, message in ((["--workers", "0"], "--workers must be positive, got 0"),
                          (["--micro-batch", "0"], "--micro-batch must be positive, got 0"),
                          (["--workers", "many"], "argument --workers: expected 'auto' or an integer, got 'many'")):
        assert train_main(["--data", str(data), *args, "--out", str(tmp_path / "w.npz")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"train: error: {message}"]


class _RecvInterrupted:
    """A pipe end whose recv is interrupted, as by Ctrl-C while waiting for a worker."""

    def __init__(self, conn):
        self.conn = conn

    def send(self, obj):
        self.conn.send(obj)

    def recv(self):
        raise KeyboardInterrupt

    def fileno(self):  # waited on with multiprocessing.connection.wait
        return self.conn.fileno()

    def close(self):
        self.conn.close()


def test_an_interrupted_call_closes_instead_of_leaving_replies_behind():
    dp = DataParallel(small_model(), 2)
    pids = dp.pids()
    dp._conns[0] = _RecvInterrupted(dp._conns[0])
    with pytest.raises(KeyboardInterrupt):
        dp.loss(*batch(4))
    assert dp.closed
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read()


def test_workers_take_this_process_allocator_setting(monkeypatch):
    """alloc.reuse_freed_memory in the caller means the same in each worker; not calling it, neither."""
    from tinyllm_np import alloc

    for setting in (False, True):
        monkeypatch.setattr(alloc, "_in_effect", setting)
        with DataParallel(small_model(), 2) as dp:
            assert dp.reuse_memory == setting  # handed to each worker as it starts
            assert dp.loss(*batch(4)) > 0


def test_workers_start_with_one_blas_thread_in_their_environment():
    """Where blas_threads cannot reach the library (macOS, Windows), the environment still can."""
    before = dict(os.environ)
    with DataParallel(small_model(), 2) as dp:
        assert dict(os.environ) == before  # this process's environment is left as it was
        dp.loss(*batch(4))  # a finished call: the workers are past their exec (right after start
        # /proc/<pid>/environ can still be the empty one of the forked, not yet exec'd child)
        for pid in dp.pids():
            if not os.path.exists(f"/proc/{pid}/environ"):
                pytest.skip("no /proc here")
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
            assert b"OPENBLAS_NUM_THREADS=1" in env and b"MKL_NUM_THREADS=1" in env


class _TwoArgError(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")


def test_an_exception_that_would_not_unpickle_arrives_as_its_text():
    from multiprocessing import Pipe

    from tinyllm_np.parallel import _send_error

    here, there = Pipe()
    _send_error(there, _TwoArgError("this", "that"))
    status, e = here.recv()
    assert status == "error" and isinstance(e, RuntimeError) and str(e) == "_TwoArgError: this and that"
    _send_error(there, ValueError("plain"))
    assert isinstance(here.recv()[1], ValueError)


def test_more_workers_than_micro_batches_is_fine(capsys, tmp_path):
    """--batch-size 1 with two workers asked for: one micro-batch, so one worker (this process)."""
    data = tmp_path / "t.txt"
    data.write_text("hello world, " * 400, encoding="utf-8")
    out = tmp_path / "w.npz"
    assert train_main(["--data", str(data), "--batch-size", "1", "--context", "16", "--max-steps", "3",
                       "--workers", "2", "--micro-batch", "4",
                       "--d-model", "16", "--n-heads", "2", "--d-ff", "16", "--n-layers", "1", "--out", str(out),
                       "--checkpoint", str(tmp_path / "ck.npz"), "--log", str(tmp_path / "log.csv"),
                       "--plot", ""]) == 0
    assert "micro-batches of 4 on 1 worker(s)" in capsys.readouterr().err
    load_model(out)


def test_auto_micro_batch_follows_the_activation_budget():
    """The rule's values at the benchmark's shapes, measured best there (parallel.auto_micro_batch)."""
    from tinyllm_np.parallel import ACTIVATION_BUDGET, auto_micro_batch

    seed = Config(vocab_size=59)
    nanogpt = Config(vocab_size=65, n_layers=4, context=64, norm_first=True, activation="gelu")
    wide = Config(vocab_size=65, d_model=256, n_layers=4, d_ff=1024)
    assert ACTIVATION_BUDGET == 2 << 20
    assert auto_micro_batch(seed, 32) == 8  # 8 x 128 x 512 floats = 2 MB exactly
    assert auto_micro_batch(nanogpt, 12) == 6  # 16 would fit; at most half the batch
    assert auto_micro_batch(wide, 32) == 4  # 4 x 128 x 1024 floats
    assert auto_micro_batch(seed, 9) == 5  # half of 9, rounded up: micro-batches of 5 and 4
    assert auto_micro_batch(seed, 2) == 1 and auto_micro_batch(seed, 1) == 1  # two workers can share a batch of 2
    huge = Config(vocab_size=59, d_ff=1 << 16)  # one sequence alone is over the budget: still 1
    assert 128 * (1 << 16) * 4 > ACTIVATION_BUDGET and auto_micro_batch(huge, 32) == 1
    for B in range(1, 40):  # near-equal micro-batches, none above the budget's size
        mb = auto_micro_batch(seed, B)
        sizes = [s.stop - s.start for s in micro_batches(B, mb)]
        assert max(sizes) == mb and max(sizes) - min(sizes) <= 1 and mb <= 8
        assert len(sizes) >= 2 or B == 1


def test_eval_micro_batches_follow_the_budget_in_an_even_count():
    """Evaluation's micro-batches: the budget's size, not the training micro-batch's; at least 2, an even count."""
    from tinyllm_np.parallel import eval_micro_batches

    nanogpt = Config(vocab_size=65, n_layers=4, context=64, norm_first=True, activation="gelu")
    seed = Config(vocab_size=59)
    assert [s.stop - s.start for s in eval_micro_batches(nanogpt, 240)] == [15] * 16  # 15 would need 16 each
    assert [s.stop - s.start for s in eval_micro_batches(nanogpt, 12)] == [6, 6]  # one batch: both workers
    assert [s.stop - s.start for s in eval_micro_batches(seed, 256)] == [8] * 32
    assert eval_micro_batches(seed, 1) == [slice(0, 1)]
    for B in range(1, 200):
        sizes = [s.stop - s.start for s in eval_micro_batches(seed, B)]
        assert sum(sizes) == B and max(sizes) <= 8 and max(sizes) - min(sizes) <= 1
        assert len(sizes) == B or len(sizes) % 2 == 0 and len(sizes) >= 2 or B == 1


def test_a_large_evaluation_batch_runs_in_rounds_without_restarting_the_workers(monkeypatch):
    """Many evaluation micro-batches in rounds of the token buffer: the full batch's loss, whoever runs it."""
    from tinyllm_np import parallel

    monkeypatch.setattr(parallel, "ACTIVATION_BUDGET", 3 * 8 * 24 * 4)  # 3 of SMALL's sequences (T x d_ff floats)
    model = small_model(dtype=np.float32, dropout=0.1)
    idx, tgt = batch(50, seed=4)
    full = model.loss(idx, tgt)
    with DataParallel(model, 2, micro_batch=2, batch_size=4) as dp:
        pids, rows = dp.pids(), dp._shared.rows
        parts = parallel.eval_micro_batches(model.config, 50, 4)
        assert rows < 50 and len(parts) > 2 * parallel.EVAL_ROUND  # so it really takes several rounds
        loss = dp.loss(idx, tgt)
        assert dp.pids() == pids and len(dp._slots) == 2  # no restart, no new gradient slots
    with DataParallel(model, 1, micro_batch=2) as dp:
        assert dp.loss(idx, tgt) == loss  # the same micro-batches added in the same order
    assert loss == pytest.approx(full, rel=1e-5)
    weights = [(s.stop - s.start) / 50 for s in parts]
    by_hand = sum(w * model.loss(idx[s], tgt[s]) for s, w in zip(parts, weights))
    assert loss == by_hand


def test_auto_micro_batch_does_not_depend_on_the_machine(monkeypatch):
    """It changes the dropout masks, so the same command must pick the same size on any machine."""
    from tinyllm_np import parallel

    cfg = Config(vocab_size=65, n_layers=4, context=64)
    picks = set()
    for cores in (1, 2, 64):
        monkeypatch.setattr(parallel.os, "cpu_count", lambda: cores)
        picks.add(parallel.auto_micro_batch(cfg, 12))
    assert picks == {6}


def test_auto_workers_is_one_per_core_up_to_the_micro_batches(monkeypatch):
    from tinyllm_np import parallel

    assert parallel.auto_workers(32, 4, cores=2) == 2
    assert parallel.auto_workers(32, 4, cores=16) == 8  # 8 micro-batches
    assert parallel.auto_workers(3, 4, cores=2) == 1  # one micro-batch: this process
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 3)
    assert parallel.auto_workers(12, 2) == 3
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: None)  # unknown: one
    assert parallel.auto_workers(12, 2) == 1


def test_train_auto_picks_and_records_the_micro_batch_and_explicit_flags_win(capsys, tmp_path, monkeypatch):
    from tinyllm_np import parallel
    from tinyllm_np import train as T
    from tinyllm_np.parallel import auto_micro_batch

    data = tmp_path / "t.txt"
    data.write_text("hello world, " * 400, encoding="utf-8")
    shape = ["--batch-size", "6", "--context", "32", "--d-model", "16", "--n-heads", "2", "--d-ff", "8192",
             "--n-layers", "1", "--max-steps", "2", "--plot", "", "--log", str(tmp_path / "log.csv")]
    cfg = Config(vocab_size=len(set(data.read_text())), d_model=16, n_heads=2, d_ff=8192, n_layers=1, context=32)
    mb = auto_micro_batch(cfg, 6)
    assert mb == 2  # 32 x 8192 floats = 1 MB a sequence: 2 fit the budget
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 2)  # auto workers: 2 cores, 3 micro-batches
    for extra, want_mb, want_w in (([], mb, 2), (["--micro-batch", "3", "--workers", "1"], 3, 1)):
        ck = tmp_path / f"ck{len(extra)}.npz"
        assert train_main(["--data", str(data), *shape, *extra, "--out", str(tmp_path / "w.npz"),
                           "--checkpoint", str(ck)]) == 0
        assert f"micro-batches of {want_mb} on {want_w} worker(s)" in capsys.readouterr().err
        assert T.load_checkpoint(ck)[5]["hparams"]["micro_batch"] == want_mb  # resume takes this one


def test_worker_start_up_does_not_count_against_a_call_timeout():
    """Starting a worker (an interpreter, NumPy, the model) takes longer than a short --worker-timeout;
    the first call waits for the workers' "ready" under STARTUP_TIMEOUT, then times its own work only."""
    with DataParallel(small_model(), 2, micro_batch=2, timeout=0.1) as dp:  # a call: a few ms
        assert dp.loss(*batch(4)) > 0


def test_workers_are_pinned_one_per_core_only_when_they_fill_the_cores():
    from tinyllm_np.parallel import worker_cpus

    assert worker_cpus(2, {0, 1}) == [0, 1]
    assert worker_cpus(3, {5, 2, 7}) == [2, 5, 7]
    assert worker_cpus(2, {0, 1, 2, 3}) is None  # spare cores: the scheduler's choice
    assert worker_cpus(3, {0, 1}) is None  # more workers than cores: they must share
    assert worker_cpus(1, {0}) is None  # one worker runs in this process


def test_the_worker_on_this_core_is_woken_last():
    from tinyllm_np.parallel import wake_order

    assert wake_order(2, [0, 1], here=0) == [1, 0]
    assert wake_order(2, [0, 1], here=1) == [0, 1]
    assert wake_order(3, [4, 5, 6], here=5) == [0, 2, 1]
    assert wake_order(1, [0, 1], here=0) == [0]  # one share of the call: only worker 0 is sent one
    assert wake_order(2, None, here=0) == [0, 1]  # unpinned
    assert wake_order(2, [0, 1], here=None) == [0, 1]  # no sched_getcpu


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs CPU affinity and two or more allowed CPUs")
def test_workers_that_fill_the_cores_run_pinned_and_give_the_same_numbers():
    cpus = sorted(os.sched_getaffinity(0))
    model = small_model(dtype=np.float32)
    idx, tgt = batch(2 * len(cpus))
    with DataParallel(model, len(cpus), micro_batch=1) as dp:
        assert [os.sched_getaffinity(pid) for pid in dp.pids()] == [{c} for c in cpus]
        loss, grads = dp.loss_and_grads(idx, tgt, train=True)
    assert os.sched_getaffinity(0) == set(cpus)  # this process is left as it was
    with DataParallel(small_model(dtype=np.float32), 1, micro_batch=1) as one:
        loss1, grads1 = one.loss_and_grads(idx, tgt, train=True)
    assert loss == loss1 and all(np.array_equal(grads[k], grads1[k]) for k in grads)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs CPU affinity and two or more allowed CPUs")
def test_a_pinning_that_fails_leaves_every_worker_unpinned():
    import subprocess
    import sys

    from tinyllm_np.parallel import _pin

    cpus = sorted(os.sched_getaffinity(0))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid names no process
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert _pin([alive.pid, gone.pid], cpus) is None
        assert os.sched_getaffinity(alive.pid) == set(cpus)  # pinned first, then put back
        assert _pin([alive.pid], cpus[:1]) == cpus[:1]
        assert os.sched_getaffinity(alive.pid) == {cpus[0]}
    finally:
        alive.kill()
        alive.wait()
