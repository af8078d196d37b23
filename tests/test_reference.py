"""The fast engine (layers.py) held to the reference engine (reference.py): forward, backward, a training step, a run.

Tolerances.  Both engines compute the same formulas in another order (the fast
one multiplies where the reference divides, folds dropout's scale into v and
w2, skips the masked scores, ...), so they agree to float rounding, not bit for
bit.  An array a is compared with the reference's r by the largest difference
relative to r's largest entry, max|a - r| / max|r|: at most 1e-5 in float32
(about 100 units in the last place of float32's 6e-8), 1e-12 in float64.
Measured on these shapes the differences are about 1e-6 and 1e-15.
"""

import numpy as np
import pytest

from tinyllm_np import layers as L
from tinyllm_np import reference as R
from tinyllm_np.model import Config, TinyLLM
from tinyllm_np.optim import AdamW
from tinyllm_np.parallel import DataParallel

TOL = {np.float32: 1e-5, np.float64: 1e-12}

# (B, T, C, H, F, dtype): the model's micro-batch in float32, and small odd shapes
SHAPES = [(4, 128, 128, 4, 512, np.float32), (3, 7, 12, 3, 20, np.float32), (2, 5, 6, 2, 10, np.float64)]
IDS = ["model-shapes-f32", "odd-f32", "odd-f64"]


def assert_same(fast, ref, dtype, what=""):
    fast, ref = np.asarray(fast), np.asarray(ref)
    assert fast.shape == ref.shape and fast.dtype == ref.dtype == dtype, (what, fast.shape, ref.shape, fast.dtype)
    err = np.abs(fast.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30)
    assert err <= TOL[dtype], f"{what}: max|fast - ref| / max|ref| = {err:.2e} > {TOL[dtype]:g}"


def assert_all_same(fast, ref, dtype, what):
    assert len(fast) == len(ref), what
    for i, (a, b) in enumerate(zip(fast, ref)):
        if b is None:
            assert a is None, (what, i)
        else:
            assert_same(a, b, dtype, f"{what}[{i}]")


def both(op, *args, dout=None, seed=None, fwd_kwargs=None):
    """Run op's forward (and backward with dout) in each engine; dropout masks from the same seed."""
    results = []
    for lib in (L, R):
        kwargs = dict(fwd_kwargs or {})
        if seed is not None:
            kwargs["rng"] = np.random.default_rng(seed)
        out, cache = getattr(lib, op + "_forward")(*args, **kwargs)
        back = None if dout is None else getattr(lib, op + "_backward")(dout, cache)
        results.append((out, back))
    return results


def _data(B, T, C, H, F, dtype, seed=0):
    rng = np.random.default_rng(seed)

    def r(*shape, s=1.0):
        return (rng.standard_normal(shape) * s).astype(dtype)

    return dict(x=r(B, T, C), dout=r(B, T, C), w_in=r(3 * C, C, s=C ** -0.5), b_in=r(3 * C, s=0.1),
                w_out=r(C, C, s=C ** -0.5), b_out=r(C, s=0.1), w1=r(F, C, s=C ** -0.5), b1=r(F, s=0.1),
                w2=r(C, F, s=F ** -0.5), b2=r(C, s=0.1), ln_w=1 + r(C, s=0.1), ln_b=r(C, s=0.1), dh=r(B, T, F))


@pytest.mark.parametrize("B,T,C,H,F,dtype", SHAPES, ids=IDS)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_attention_matches_reference(B, T, C, H, F, dtype, p):
    d = _data(B, T, C, H, F, dtype)
    (of, bf), (orf, br) = both("attention", d["x"], d["w_in"], d["b_in"], d["w_out"], d["b_out"], H,
                               dout=d["dout"], seed=5, fwd_kwargs={"p_drop": p})
    assert_same(of, orf, dtype, "attention out")
    assert_all_same(bf, br, dtype, "attention grads")


@pytest.mark.parametrize("B,T,C,H,F,dtype", SHAPES, ids=IDS)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_ffn_matches_reference(B, T, C, H, F, dtype, activation, p):
    d = _data(B, T, C, H, F, dtype)
    (of, bf), (orf, br) = both("ffn", d["x"], d["w1"], d["b1"], d["w2"], d["b2"], activation, p,
                               dout=d["dout"], seed=5)
    assert_same(of, orf, dtype, "ffn out")
    assert_all_same(bf, br, dtype, "ffn grads")


@pytest.mark.parametrize("B,T,C,H,F,dtype", SHAPES, ids=IDS)
def test_small_layers_match_reference(B, T, C, H, F, dtype):
    d = _data(B, T, C, H, F, dtype)
    x, dout = d["x"], d["dout"]
    for bias in (d["b1"], None):
        (of, bf), (orf, br) = both("linear", x, d["w1"], bias, dout=d["dh"])
        assert_same(of, orf, dtype, "linear out")
        assert_all_same(bf, br, dtype, "linear grads")
    (of, bf), (orf, br) = both("layernorm", x, d["ln_w"], d["ln_b"], dout=dout)
    assert_same(of, orf, dtype, "layernorm out")
    assert_all_same(bf, br, dtype, "layernorm grads")
    for act in ("relu", "gelu"):
        (of, bf), (orf, br) = both(act, x, dout=dout)
        assert_same(of, orf, dtype, act)
        assert_same(bf, br, dtype, act + " grad")
    (of, bf), (orf, br) = both("dropout", x, 0.1, dout=dout, seed=5)
    assert 0 < np.mean(orf == 0) < 0.2  # some entries dropped, the same ones in both engines
    assert_same(of, orf, dtype, "dropout")
    assert_same(bf, br, dtype, "dropout grad")
    idx = np.random.default_rng(1).integers(0, 11, (B, T))  # repeated tokens
    weight = np.random.default_rng(2).standard_normal((11, C)).astype(dtype)
    (of, bf), (orf, br) = both("embedding", idx, weight, dout=dout)
    assert_same(of, orf, dtype, "embedding")
    assert_same(bf, br, dtype, "embedding grad")
    logits = d["dh"] * 3
    lf, cf = L.cross_entropy_forward(logits, idx % F)
    lr, cr = R.cross_entropy_forward(logits, idx % F)
    assert abs(lf - lr) <= TOL[dtype] * abs(lr)
    assert_same(L.cross_entropy_backward(0.7, cf), R.cross_entropy_backward(0.7, cr), dtype, "cross-entropy grad")


def test_softmax_matches_reference():
    x = np.random.default_rng(0).standard_normal((4, 4, 16, 16)).astype(np.float32) * 30
    x += R.causal_mask(16, np.float32)
    x[0, 0, 5] += 200  # exp would overflow without a shift
    assert_same(L.softmax(x), R.softmax_forward(x)[0], np.float32, "softmax")


def test_cached_attention_matches_reference():
    B, T, C, H, F, dtype = 2, 9, 12, 3, 20, np.float64
    d = _data(B, T, C, H, F, dtype)
    w = (d["w_in"], d["b_in"], d["w_out"], d["b_out"], H)
    full, _ = R.attention_forward(d["x"], *w)
    for lib in (L, R):
        kc, vc = np.zeros((B, H, T, C // H)), np.zeros((B, H, T, C // H))
        first = lib.attention_cached_forward(d["x"][:, :5], *w, kc, vc, 0)
        rest = lib.attention_cached_forward(d["x"][:, 5:], *w, kc, vc, 5)
        assert_same(np.concatenate([first, rest], axis=1), full, dtype, f"{lib.__name__} cached")
        kc[:], vc[:] = 0, 0
        last = lib.attention_cached_forward(d["x"], *w, kc, vc, 0, last=True)
        assert_same(last, full[:, -1:], dtype, f"{lib.__name__} cached, last")


def test_dropout_keeps_what_the_reference_says():
    """reference.keep_prob is the probability dropout_mask really keeps, and the scale both divide by."""
    assert R.keep_prob(0.1) == 1 - 6554 / 65536 and R.keep_prob(0.0) == 1.0
    mask = R.dropout_mask((1000, 1000), 0.1, np.random.default_rng(0))
    assert abs(mask.mean() - R.keep_prob(0.1)) < 1e-3
    assert L.dropout_scale(0.1, np.float64) == pytest.approx(1 / R.keep_prob(0.1), rel=1e-15)


# ----------------------------------------------------------- the whole model

def _step(engine, cfg, dtype, seed=0):
    model = TinyLLM(cfg, seed=0, dtype=dtype, engine=engine)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, cfg.vocab_size, (4, cfg.context))
    y = rng.integers(0, cfg.vocab_size, (4, cfg.context))
    return model.loss_and_grads(x, y, train=True, rng=np.random.default_rng(7))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_training_step_matches_reference(dtype):
    """loss_and_grads of the shipped configuration (dropout 0.1) on a micro-batch of 4: same loss and gradients."""
    cfg = Config()
    lf, gf = _step("fast", cfg, dtype)
    lr, gr = _step("reference", cfg, dtype)
    assert abs(lf - lr) <= TOL[dtype] * lr
    for name in gr:
        assert_same(gf[name], gr[name], dtype, name)


@pytest.mark.parametrize("norm_first,activation", [(True, "gelu"), (False, "gelu"), (True, "relu")])
def test_other_configurations_match_reference(norm_first, activation):
    cfg = Config(vocab_size=13, d_model=12, n_layers=2, n_heads=3, d_ff=20, context=9, norm_first=norm_first,
                 activation=activation)
    lf, gf = _step("fast", cfg, np.float64)
    lr, gr = _step("reference", cfg, np.float64)
    assert abs(lf - lr) <= 1e-12 * lr
    for name in gr:
        assert_same(gf[name], gr[name], np.float64, name)


def test_engines_share_parameters_and_reject_unknown_names():
    a, b = TinyLLM(Config(), engine="fast"), TinyLLM(Config(), engine="reference")
    assert np.array_equal(a.flat, b.flat) and a.L is L and b.L is R and b.engine == "reference"
    with pytest.raises(ValueError, match="engine"):
        TinyLLM(Config(), engine="slow")


def _train(engine, dtype, steps=30):
    cfg = Config(vocab_size=17, d_model=32, n_layers=2, n_heads=4, d_ff=64, context=32, dropout=0.1)
    model = TinyLLM(cfg, seed=0, dtype=dtype, engine=engine)
    opt = AdamW(model.params, lr=3e-3)
    text = np.random.default_rng(0).integers(0, 4, 2000) * 4 + np.arange(2000) % 4  # a little structure to learn
    data_rng = np.random.default_rng(1)
    losses = []
    for _ in range(steps):
        starts = data_rng.integers(0, len(text) - 33, 8)
        w = text[starts[:, None] + np.arange(33)]
        loss, grads = model.loss_and_grads(w[:, :-1], w[:, 1:], train=True)
        opt.step(grads)
        losses.append(loss)
    return np.array(losses)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-4), (np.float64, 1e-12)])
def test_short_training_run_matches_reference(dtype, tol):
    """30 AdamW steps with dropout on a small model: the same losses on both engines, within 2e-4 in float32.

    The engines' rounding differences (~1e-7 in float32) grow through the
    updates, fastest where Adam divides a tiny gradient by its tiny running
    scale; measured over 30 steps: float32 at most 4e-5 apart (5e-5 over 60
    steps), float64 at most 1e-15.
    """
    fast, ref = _train("fast", dtype), _train("reference", dtype)
    assert ref[-1] < ref[0] - 0.3  # it learned something
    assert np.abs(fast - ref).max() < tol, np.abs(fast - ref).max()


def test_workers_build_the_callers_engine():
    """A worker process runs the model on the caller's engine: its gradients are bit for bit the caller's own."""
    cfg = Config(vocab_size=13, d_model=12, n_layers=2, n_heads=3, d_ff=20, context=9)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 13, (2, 9)), rng.integers(0, 13, (2, 9))
    results = {}
    for engine in ("fast", "reference"):
        model = TinyLLM(cfg, dtype=np.float64, engine=engine)
        with DataParallel(model, workers=1, micro_batch=2) as dp:
            here = dp.loss_and_grads(x, y)
        with DataParallel(model, workers=2, micro_batch=2) as dp:  # one micro-batch: one worker does it all
            there = dp.loss_and_grads(x, y)
        assert here[0] == there[0] and np.array_equal(here[1]["tok_emb.weight"], there[1]["tok_emb.weight"])
        results[engine] = here
    assert not np.array_equal(results["fast"][1]["tok_emb.weight"], results["reference"][1]["tok_emb.weight"])
