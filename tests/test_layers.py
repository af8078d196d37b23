"""Layer behaviour that gradient checks cannot see: softmax's shift, and dropout inside attention and the FFN."""

import numpy as np
import pytest

from tinyllm_np import layers as L


def reference_softmax(x):
    """Each row shifted by its own max, in float64."""
    z = np.asarray(x, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_matches_the_per_row_shift(dtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 4, 16, 16)) * 5).astype(dtype)
    x += L.causal_mask(16, dtype)  # -inf above the diagonal, as in attention
    out = L.softmax(x)
    assert out.dtype == dtype and out is not x
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(out, reference_softmax(x), rtol=tol, atol=tol)
    assert np.all(out[..., 0, 1:] == 0)  # masked entries are exactly 0


def test_softmax_rows_far_below_the_global_max_fall_back_to_their_own_shift():
    """A global shift would underflow the second row (all its exps 0): the per-row shift must take over."""
    x = np.array([[100.0, 90.0, 95.0], [-100.0, -101.0, -99.5]], np.float32)
    out = L.softmax(x)
    np.testing.assert_allclose(out, reference_softmax(x), rtol=1e-6)
    assert np.isfinite(out).all()


def test_softmax_does_not_overflow():
    x = np.array([[1000.0, 999.0, -np.inf], [3.0, 2.0, 1.0]], np.float32)
    np.testing.assert_allclose(L.softmax(x), reference_softmax(x), rtol=1e-6)


def test_softmax_redoes_only_the_rows_that_need_a_shift():
    """Rows are independent: a row's result does not depend on whether another row overflowed."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 7)).astype(np.float32)
    plain = L.softmax(x)
    x2 = x.copy()
    x2[3] += 200.0  # this row alone overflows exp
    out = L.softmax(x2)
    assert np.array_equal(np.delete(out, 3, axis=0), np.delete(plain, 3, axis=0))  # bitwise
    np.testing.assert_allclose(out[3], reference_softmax(x2[3]), rtol=1e-6)


def test_softmax_keeps_nan_where_the_textbook_one_does():
    x = np.array([[np.nan, 1.0], [1.0, 2.0]], np.float32)
    out = L.softmax(x)
    assert np.isnan(out[0]).all() and np.allclose(out[1], reference_softmax(x[1:])[0])


def test_decode_softmax_redoes_a_row_that_underflowed_beside_large_ones():
    """decode_step's few-row softmax: one head's scores far below exp's range, the others large."""
    from tinyllm_np.model import _softmax_rows
    x = np.array([[-100.0, -101.0, -102.0, -99.0], [10.0, 9.0, 8.0, 11.0],
                  [10.5, 9.0, 8.0, 11.0], [10.0, 9.5, 8.0, 11.0]], np.float32)
    with np.errstate(over="ignore"):
        out = _softmax_rows(x)
        np.testing.assert_allclose(out, reference_softmax(x), rtol=1e-6)
        big = x + np.float32(100.0)  # the last three rows overflow exp
        np.testing.assert_allclose(_softmax_rows(big), reference_softmax(big), rtol=1e-6)


# ------------------------------------- dropout where the backward cannot see it
# Attention and the feed-forward fold dropout's scale into v and w2 and apply its mask themselves.
# A gradient check only shows the backward agrees with the forward; these check the forward itself
# against the textbook formula with the same mask (same seed, same draws in the same order).

def test_ffn_forward_applies_dropout_as_the_textbook():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4))
    w1, b1 = rng.standard_normal((6, 4)), rng.standard_normal(6)
    w2, b2 = rng.standard_normal((4, 6)), rng.standard_normal(4)
    p = 0.3
    for activation in ("relu", "gelu"):
        out, _ = L.ffn_forward(x, w1, b1, w2, b2, activation, p, np.random.default_rng(5))
        keep = L.dropout_mask((2, 3, 6), p, np.random.default_rng(5))
        assert 0 < keep.mean() < 1
        a = L.ACTIVATIONS[activation][0](x @ w1.T + b1)[0]
        want = (a * keep * L.dropout_scale(p, x.dtype)) @ w2.T + b2
        np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)


def test_attention_forward_applies_dropout_as_the_textbook():
    rng = np.random.default_rng(1)
    B, T, C, H = 2, 5, 8, 2
    D = C // H
    x, w_in, b_in = rng.standard_normal((B, T, C)), rng.standard_normal((3 * C, C)), rng.standard_normal(3 * C)
    w_out, b_out = rng.standard_normal((C, C)), rng.standard_normal(C)
    p = 0.3
    out, _ = L.attention_forward(x, w_in, b_in, w_out, b_out, H, p, np.random.default_rng(5), n_blocks=1)
    keep = L.dropout_mask((B, H, T, T), p, np.random.default_rng(5))  # one block: one (T,T) mask per head
    q, k, v = (x @ w_in.T + b_in).reshape(B, T, 3, H, D).transpose(2, 0, 3, 1, 4)
    A = reference_softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(D) + L.causal_mask(T, np.float64))
    y = (A * keep * L.dropout_scale(p, x.dtype)) @ v  # (B,H,T,D)
    want = y.transpose(0, 2, 1, 3).reshape(B, T, C) @ w_out.T + b_out
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)


# ------------------------------------- dropout against p itself, not against the code's own helpers
# N Bernoulli(p) drops: the drop fraction has standard deviation sqrt(p(1-p)/N), and the mean of
# dropout(1) = keep/(1-p) has sqrt(p/((1-p)N)).  Each check allows Z = 5 of them (a false alarm once
# in ~1.7 million runs for a correct p; the seeds are fixed anyway).  The masks really drop at
# round(p*65536)/65536, within 7.7e-6 of p: far inside these tolerances.  A drop rate of p/3 is off
# by hundreds of standard deviations, a scale of 1 by (1-p)/(1-p) * p / sd, likewise.

Z = 5.0
P_DROP = (0.1, 0.5)


def _drop_stats(out, expected_kept, p, where=None):
    """Assert: zeros among ``where`` ~ p, survivors == expected_kept / (1-p), mean ~ expected_kept."""
    kept = np.broadcast_to(expected_kept, out.shape)
    out, kept = (out[where], kept[where]) if where is not None else (out.ravel(), kept.ravel())
    N = out.size
    dropped = out == 0
    frac = dropped.mean()
    assert abs(frac - p) < Z * np.sqrt(p * (1 - p) / N), f"drop fraction {frac:.5f} for p = {p}, N = {N}"
    np.testing.assert_allclose(out[~dropped], kept[~dropped] / (1 - p), rtol=1e-5)  # the survivors' scale
    ratio = (out / kept).mean()  # E[keep / (1-p)] = 1
    assert abs(ratio - 1) < Z * np.sqrt(p / ((1 - p) * N)), f"E[dropout(x)]/x = {ratio:.5f} for p = {p}"


def test_dropout_drops_at_rate_p_and_keeps_the_mean():
    """dropout_forward on 2^20 entries: drop fraction ~ p, survivors x/(1-p), E[dropout(x)] ~ x."""
    rng = np.random.default_rng(11)
    x = rng.uniform(0.5, 2.0, (1024, 1024)).astype(np.float32)
    for p in P_DROP:
        out, _ = L.dropout_forward(x, p, np.random.default_rng(int(p * 100)))
        _drop_stats(out, x, p)


def test_attention_dropout_drops_attention_weights_at_rate_p():
    """Attention as the model calls it (query blocks, folded scale).  With zero q/k weights every query
    attends uniformly, A[i, j] = 1/(i+1) for j <= i, and with one-hot inputs, v = identity rows and an
    identity output projection, the output row i IS dropout(A)[i, :]: its zeros are the dropped weights."""
    B, T, H = 4096, 8, 1
    C = T
    x = np.broadcast_to(np.eye(T), (B, T, C)).copy()  # token t is e_t
    w_in = np.zeros((3 * C, C))
    w_in[2 * C:] = np.eye(C)  # v_t = e_t; q = k = 0
    b_in, w_out, b_out = np.zeros(3 * C), np.eye(C), np.zeros(C)
    A = np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]
    plain, _ = L.attention_forward(x[:1], w_in, b_in, w_out, b_out, H)
    np.testing.assert_allclose(plain[0], A, rtol=1e-12)  # the construction does expose A
    causal = np.broadcast_to(np.tril(np.ones((T, T), bool)), (B, T, T))
    for p in P_DROP:
        out, _ = L.attention_forward(x, w_in, b_in, w_out, b_out, H, p, np.random.default_rng(int(p * 100)))
        assert np.all(out[~causal] == 0)  # the future stays hidden
        _drop_stats(out, np.broadcast_to(A, out.shape), p, where=causal)


def test_ffn_dropout_drops_hidden_units_at_rate_p():
    """The FFN as the model calls it (merged ReLU/dropout mask, scale folded into w2).  w1 = 0 and
    b1 = +-1 make the hidden layer +-1; with w2 = identity the output is dropout(act(h)): ReLU units
    (h = -1) always 0, the others dropped at rate p and scaled by 1/(1-p)."""
    B, T, C = 64, 128, 64
    x = np.zeros((B, T, C))
    w1, w2, b2 = np.zeros((C, C)), np.eye(C), np.zeros(C)
    b1 = np.where(np.arange(C) % 2 == 0, 1.0, -1.0)
    on = np.broadcast_to(b1 > 0, (B, T, C))
    for activation in ("relu", "gelu"):
        act = L.ACTIVATIONS[activation][0](b1.copy())[0]
        plain, _ = L.ffn_forward(x[:1, :1], w1, b1, w2, b2, activation)
        np.testing.assert_allclose(plain[0, 0], act, rtol=1e-12)
        for p in P_DROP:
            out, _ = L.ffn_forward(x, w1, b1, w2, b2, activation, p, np.random.default_rng(int(p * 100)))
            if activation == "relu":
                assert np.all(out[~on] == 0)  # ReLU's zeros are not dropout's to count
                _drop_stats(out, np.broadcast_to(act, out.shape), p, where=on)
            else:  # gelu(-1) = -0.159 is not zero: every unit can be dropped
                _drop_stats(out, np.broadcast_to(act, out.shape), p)


def test_model_ffn_calls_the_checked_relu(monkeypatch):
    """The FFN's ReLU is relu_forward/relu_backward, the functions gradcheck's "relu" row checks."""
    from tinyllm_np import Config, TinyLLM
    calls = []
    fwd, bwd = L.relu_forward, L.relu_backward
    monkeypatch.setattr(L, "relu_forward", lambda *a, **k: calls.append("f") or fwd(*a, **k))
    monkeypatch.setattr(L, "relu_backward", lambda *a, **k: calls.append("b") or bwd(*a, **k))
    model = TinyLLM(Config(vocab_size=11, d_model=8, n_layers=3, n_heads=2, d_ff=16, context=8, dropout=0.2))
    idx = np.zeros((2, 5), np.int64)
    model.loss_and_grads(idx, idx, train=True)
    assert calls == ["f"] * 3 + ["b"] * 3  # one forward and one backward per layer


def test_row_dots_with_and_without_vecdot(monkeypatch):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 3, 5, 7)).astype(np.float32)
    want = (a.astype(np.float64) * b).sum(-1)
    for have in (L._HAVE_VECDOT, False):  # NumPy 2's np.vecdot, and the einsum older NumPy uses
        monkeypatch.setattr(L, "_HAVE_VECDOT", have)
        got = L.row_dots(a, b)
        assert got.shape == (3, 5) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
