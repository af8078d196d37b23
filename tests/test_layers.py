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
