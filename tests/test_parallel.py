"""Data parallelism: the batch split over threads gives the full batch's loss and gradients."""

import numpy as np
import pytest

from tinyllm_np import Config, TinyLLM
from tinyllm_np.parallel import DataParallel, blas_threads, split_batch
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
        for workers in (1, 2, 3, 8):
            parts = split_batch(B, workers)
            assert len(parts) == min(B, workers)
            covered = np.concatenate([np.arange(B)[s] for s in parts])
            assert covered.tolist() == list(range(B))
            sizes = [s.stop - s.start for s in parts]
            assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("B,workers", [(4, 2), (5, 2), (7, 3)])
def test_same_loss_and_gradients_as_one_batch(B, workers):
    """Without dropout the split changes nothing but the order of float additions."""
    model = small_model()
    idx, tgt = batch(B)
    loss, grads = model.loss_and_grads(idx, tgt)
    with DataParallel(model, workers) as dp:
        loss_dp, grads_dp = dp.loss_and_grads(idx, tgt)
        assert dp.loss(idx, tgt) == pytest.approx(loss, rel=1e-13)
    assert loss_dp == pytest.approx(loss, rel=1e-13)
    assert list(grads_dp) == list(grads)
    assert max_diff(grads, grads_dp) < 1e-13 * max(float(np.abs(g).max()) for g in grads.values())


def test_dropout_masks_come_from_generators_seeded_by_model_rng():
    """Micro-batch k uses default_rng(seed_k), the seeds drawn from model.rng: written out by hand here."""
    model = small_model()
    idx, tgt = batch(5)
    seeds = np.random.default_rng(0).integers(0, 2 ** 63, size=2)  # model.rng starts as default_rng(seed=0)
    parts = [slice(0, 2), slice(2, 5)]
    ref = [model.loss_and_grads(idx[s], tgt[s], train=True, rng=np.random.default_rng(sd))
           for s, sd in zip(parts, seeds)]
    w = [2 / 5, 3 / 5]
    loss_ref = w[0] * ref[0][0] + w[1] * ref[1][0]
    grads_ref = {k: w[0] * ref[0][1][k] + w[1] * ref[1][1][k] for k in ref[0][1]}
    with DataParallel(model, 2) as dp:
        loss, grads = dp.loss_and_grads(idx, tgt, train=True)
    assert loss == pytest.approx(loss_ref, rel=1e-13)
    assert max_diff(grads, grads_ref) < 1e-12
    # and dropout really was on: evaluation mode gives another loss
    assert abs(loss - model.loss(idx, tgt)) > 1e-6


def test_training_steps_are_reproducible():
    """Thread timing must not matter: the same seed gives bitwise the same float32 losses and gradients."""
    runs = []
    for _ in range(2):
        model = small_model(dtype=np.float32, seed=3)
        idx, tgt = batch(6)
        with DataParallel(model, 2) as dp:
            out = [dp.loss_and_grads(idx, tgt, train=True) for _ in range(3)]
        runs.append(out)
    for (l1, g1), (l2, g2) in zip(*runs):
        assert l1 == l2
        assert all(np.array_equal(g1[k], g2[k]) for k in g1)


def test_one_worker_is_the_plain_model():
    a, b = small_model(), small_model()
    idx, tgt = batch(4)
    with DataParallel(a, 1) as dp:
        la, ga = dp.loss_and_grads(idx, tgt, train=True)
    lb, gb = b.loss_and_grads(idx, tgt, train=True)
    assert la == lb and max_diff(ga, gb) == 0.0


def test_blas_threads_single_while_open_and_restored_after():
    before = blas_threads()
    if before is None:
        pytest.skip("this BLAS's thread count cannot be controlled here")
    with DataParallel(small_model(), 2) as dp:
        assert dp.threaded
        assert blas_threads() == 1
    assert blas_threads() == before


def test_blas_setting_survives_overlapping_objects():
    """BLAS stays single-threaded until the last open DataParallel closes, in any order."""
    before = blas_threads()
    if before is None:
        pytest.skip("this BLAS's thread count cannot be controlled here")
    a, b = DataParallel(small_model(), 2), DataParallel(small_model(), 2)
    a.close()
    assert blas_threads() == 1  # b is still running micro-batches on single-threaded BLAS
    b.close()
    b.close()  # a second close changes nothing
    assert blas_threads() == before


def test_errstate_reaches_the_workers():
    model = small_model(dropout=0.0)
    model.flat[:] = 1e300  # overflows everywhere
    idx, tgt = batch(4)
    with DataParallel(model, 2) as dp, np.errstate(over="raise", invalid="raise"):
        with pytest.raises(FloatingPointError):
            dp.loss_and_grads(idx, tgt)


def test_empty_batch_is_refused():
    with DataParallel(small_model(), 2) as dp:
        with pytest.raises(ValueError, match="empty"):
            dp.loss_and_grads(np.zeros((0, 8), int), np.zeros((0, 8), int))


def test_workers_flag_is_checked(capsys, tmp_path):
    data = tmp_path / "t.txt"
    data.write_text("hello world, " * 200, encoding="utf-8")
    for workers in ("0", "33"):
        assert train_main(["--data", str(data), "--workers", workers, "--out", str(tmp_path / "w.npz")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"train: error: --workers must be between 1 and --batch-size (32), got {workers}"]
