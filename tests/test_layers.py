"""Layer helpers that are not gradients: softmax's shift."""

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
