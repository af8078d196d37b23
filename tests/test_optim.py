"""AdamW against the formula written out by hand, gradient clipping and schedules."""

import math

import numpy as np
import pytest

from tinyllm_np import AdamW, Config, TinyLLM, clip_grad_norm, lr_at
from tinyllm_np.model import flat_views


def adamw_by_formula(p, grads, lr, b1, b2, eps, wd):
    """The AdamW update, scalar by scalar, straight from the paper / torch docs."""
    p = p.astype(np.float64).copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        p = p - lr * wd * p  # decoupled weight decay acts on the parameter itself
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** t)
        v_hat = v / (1 - b2 ** t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


def test_adamw_matches_formula():
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    start = {k: v.copy() for k, v in params.items()}
    grads_seq = [{k: rng.standard_normal(v.shape) for k, v in params.items()} for _ in range(5)]
    opt = AdamW(params, lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    for g in grads_seq:
        opt.step(g)
    for k in params:
        want = adamw_by_formula(start[k], [g[k] for g in grads_seq], 0.01, 0.8, 0.95, 1e-6, 0.1)
        np.testing.assert_allclose(params[k], want, rtol=1e-12, atol=1e-14)
    assert opt.t == 5


def test_adamw_chunks_cover_every_entry(monkeypatch):
    """step updates in chunks of AdamW.CHUNK entries: a buffer of several chunks and a ragged end
    gets the same update as the formula, entry by entry."""
    monkeypatch.setattr(AdamW, "CHUNK", 7)
    rng = np.random.default_rng(1)
    params = {"w": rng.standard_normal((5, 6)), "b": rng.standard_normal(3)}  # 30 = 4*7 + 2, 3 < 7
    start = {k: v.copy() for k, v in params.items()}
    grads_seq = [{k: rng.standard_normal(v.shape) for k, v in params.items()} for _ in range(3)]
    opt = AdamW(params, lr=0.01, weight_decay=0.1)
    for g in grads_seq:
        opt.step(g)
    for k in params:
        want = adamw_by_formula(start[k], [g[k] for g in grads_seq], 0.01, 0.9, 0.999, 1e-8, 0.1)
        np.testing.assert_allclose(params[k], want, rtol=1e-12, atol=1e-14)


def test_first_step_moves_each_weight_by_lr():
    """At t=1, m_hat/sqrt(v_hat) = g/|g|: every weight moves by lr (plus tiny decay)."""
    params = {"w": np.zeros(4)}
    AdamW(params, lr=0.5, eps=0.0, weight_decay=0.0).step({"w": np.array([3.0, -2.0, 1e-3, -7.0])})
    np.testing.assert_allclose(params["w"], [-0.5, 0.5, -0.5, 0.5])


def test_flat_path_equals_per_parameter_path():
    """The model's flat buffer takes the one-pass update; plain dicts take the loop; same result."""
    cfg = Config(vocab_size=11, d_model=8, n_layers=1, n_heads=2, d_ff=16, context=6)
    model = TinyLLM(cfg, dtype=np.float64)
    copy = {k: v.copy() for k, v in model.params.items()}  # separate arrays: per-parameter path
    idx = np.random.default_rng(0).integers(0, 11, (2, 6))
    opt_flat = AdamW(model.params, lr=0.01)
    opt_loop = AdamW(copy, lr=0.01)
    assert opt_flat._flat is not None and opt_loop._flat is None
    for _ in range(3):
        _, grads = model.loss_and_grads(idx, idx)
        loop_grads = {k: g.copy() for k, g in grads.items()}
        opt_flat.step(grads)
        opt_loop.step(loop_grads)
    for k in copy:
        np.testing.assert_allclose(model.params[k], copy[k], rtol=1e-13, atol=1e-15)


def test_adamw_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3))
    params = {"w": w.copy()}
    tw = torch.nn.Parameter(torch.from_numpy(w.copy()))
    topt = torch.optim.AdamW([tw], lr=3e-3, weight_decay=0.01)
    opt = AdamW(params, lr=3e-3, weight_decay=0.01)
    for _ in range(4):
        g = rng.standard_normal(w.shape)
        tw.grad = torch.from_numpy(g.copy())
        topt.step()
        opt.step({"w": g})
    np.testing.assert_allclose(params["w"], tw.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(2)
    a = {"w": rng.standard_normal(6)}
    b = {"w": a["w"].copy()}
    gs = [{"w": rng.standard_normal(6)} for _ in range(4)]
    opt_a = AdamW(a, lr=0.1)
    for g in gs:
        opt_a.step(g)
    opt_b = AdamW(b, lr=0.1)
    for g in gs[:2]:
        opt_b.step(g)
    state = opt_b.state_dict()
    opt_c = AdamW(b, lr=0.1)
    opt_c.load_state_dict(state)
    for g in gs[2:]:
        opt_c.step(g)
    np.testing.assert_array_equal(a["w"], b["w"])


def test_clip_grad_norm():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    norm = clip_grad_norm(grads, 1.0)
    assert norm == pytest.approx(5.0)
    total = math.sqrt(sum(float((g ** 2).sum()) for g in grads.values()))
    assert total == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(grads["a"], [0.6, 0.0], rtol=1e-5)
    small = {"a": np.array([0.1])}
    clip_grad_norm(small, 1.0)
    assert small["a"][0] == 0.1  # under the limit: untouched


def test_a_flat_gradient_gives_the_same_update_and_clip_as_its_views():
    """AdamW.step and clip_grad_norm take the model's gradient as one 1-D array (DataParallel's flat=True) too."""
    cfg = Config(vocab_size=7, d_model=8, n_layers=1, n_heads=2, d_ff=16, context=5)
    models = [TinyLLM(cfg, seed=0) for _ in range(2)]
    opts = [AdamW(m.params, lr=0.01, weight_decay=0.1) for m in models]
    g = np.random.default_rng(0).standard_normal(models[0].n_params).astype(np.float32)
    g_views = flat_views(models[0].shapes, g.copy())  # as model.loss_and_grads returns them
    assert clip_grad_norm(g, 1.0) == clip_grad_norm(g_views, 1.0)
    assert np.array_equal(g, np.concatenate([v.ravel() for v in g_views.values()]))
    opts[0].step(g)
    opts[1].step(g_views)
    assert np.array_equal(models[0].flat, models[1].flat)
    for bad in (g[:-1], g.astype(np.float64), g.reshape(1, -1)):
        with pytest.raises(ValueError, match="flat gradient"):
            opts[0].step(bad)


def test_lr_schedules():
    assert lr_at(0, 1.0, 100, warmup=10) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 100, warmup=10) == pytest.approx(1.0)
    assert lr_at(50, 1.0, 100) == 1.0
    assert lr_at(10, 1.0, 110, warmup=10, schedule="cosine") == pytest.approx(1.0)
    assert lr_at(60, 1.0, 110, warmup=10, schedule="cosine", min_lr=0.0) == pytest.approx(0.5)
    assert lr_at(110, 1.0, 110, warmup=10, schedule="cosine", min_lr=0.1) == pytest.approx(0.1)
    assert lr_at(60, 1.0, 110, warmup=10, schedule="linear") == pytest.approx(0.5)
    with pytest.raises(ValueError):
        lr_at(5, 1.0, 10, schedule="bogus")
