"""The fast engine: the layers of reference.py, rewritten where rewriting was measured to pay.

Every function here computes what the function of the same name in
``reference.py`` (the textbook engine, which a learner reads first) computes,
with the same CS231n convention::

    out, cache = op_forward(x, ...)
    dx, (dparams...) = op_backward(dout, cache)

and the same numbers to float rounding (tests/test_reference.py checks every
pair, forward and backward, with and without dropout).  Each function's
docstring says what it computes in reference terms and what its trick buys,
measured on one micro-batch (B=4, T=128, C=128) unless it says otherwise.
Where there is no trick to play, the reference's own function is used
(the dropout mask).  Shapes use the same short names everywhere:

    B batch, T time (sequence length), C model width (d_model), H heads,
    D head size (C // H), F feed-forward width (d_ff), V vocabulary size.

All ops are vectorized: no Python loop runs over batch or heads, and the only
one over time is attention's over two blocks of query positions (query_blocks).  They work
in whatever float dtype the inputs have (float32 for training, float64 for the
gradient checks) and never upcast.
"""

from functools import lru_cache

import numpy as np

from .reference import (LN_EPS, DROPOUT_BITS, GELU_A, GELU_K, dropout_mask, dropout_threshold,  # noqa: F401
                        keep_prob)  # (no trick to play)


@lru_cache(maxsize=64)
def _ones(n, dtype):
    v = np.ones(n, dtype=dtype)
    v.flags.writeable = False
    return v


def row_sums(x2):
    """Sum of each row of a 2-D array (N,n) -> (N,), computed as x2 @ ones(n): x2.sum(axis=1) in the reference.

    BLAS's matrix-vector product runs this 4-5x faster than np.add.reduce(x2,
    axis=1) on rows as short as ours (n = 128): NumPy reduces a short row with
    little vectorization.  Column sums are row_sums(x2.T), 2-3x faster than
    x2.sum(axis=0) at our sizes.
    """
    return np.dot(x2, _ones(x2.shape[1], x2.dtype))


def row_dots(a, b):
    """sum_c a[..., c] * b[..., c], one number per row of two C-contiguous arrays (..., C) -> (...).

    NumPy 2's np.vecdot, a generalized ufunc: less call overhead than
    np.einsum("nc,nc->n") and a faster loop, measured on one AMD EPYC core
    (float32): (4,128) 2.55 -> 1.11 us, (384,128) 11.9 -> 8.1 us, (512,512)
    55.8 -> 27.3 us.  On older NumPy, the einsum.
    """
    return np.vecdot(a, b) if _HAVE_VECDOT else np.einsum("...c,...c->...", a, b)


_HAVE_VECDOT = hasattr(np, "vecdot")


# ---------------------------------------------------------------- embedding

def embedding_forward(idx, weight):
    """out[b, t] = weight[idx[b, t]]:  (B,T) ints, (V,C) -> (B,T,C).  As reference.embedding_forward."""
    return weight[idx], (idx, weight.shape)


def embedding_backward(dout, cache):
    """reference.embedding_backward (a scatter-add, np.add.at) as one matmul.

    Forward:  out[b, t, :] = W[idx[b, t], :]
    Backward: dW[v, :] = sum over all (b, t) with idx[b, t] == v of dout[b, t, :]
    Rows of W that were never looked up get zero gradient.

    Computed as a matmul: with the one-hot matrix O[n, v] = [idx[n] == v] (N,V),
    the forward is out = O @ W, so dW = O^T @ dout.  For a vocabulary as small
    as ours (V = 59) that one BLAS call is about 4x faster than the scatter-add
    np.add.at(dW, idx, dout).
    """
    idx, (V, C) = cache
    flat = idx.reshape(-1)  # (N,)
    onehot = np.zeros((flat.size, V), dtype=dout.dtype)
    onehot[np.arange(flat.size), flat] = 1
    return onehot.T @ dout.reshape(-1, C)  # (V,N) @ (N,C) -> (V,C)


# ------------------------------------------------------------------- linear

def linear_forward(x, w, b=None):
    """y = x @ w.T + b, PyTorch's nn.Linear layout: w is (out, in).  reference.linear_forward.

    (..., in) -> (..., out); the matmul runs on the flattened (N, in) view
    with np.dot, and the bias is added in place.  With linear_backward, a C->F
    layer's forward and backward on a micro-batch: 6.5 -> 5.6 ms.
    """
    y = np.dot(x.reshape(-1, x.shape[-1]), w.T)  # (N,in) @ (in,out) -> (N,out); np.dot: least call overhead
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], w.shape[0]), (x, w, b is not None)


def linear_backward(dout, cache):
    """reference.linear_backward, with db's column sums as a matrix-vector product (row_sums).

    Each output y[n, o] = sum_i x[n, i] w[o, i] + b[o], so
        dx[n, i] = sum_o dout[n, o] w[o, i]     ->  dx = dout @ w
        dw[o, i] = sum_n dout[n, o] x[n, i]     ->  dw = dout.T @ x
        db[o]    = sum_n dout[n, o]
    where n runs over every leading position (all of B and T).
    Returns (dx, dw, db); db is None for a bias-free layer.
    """
    x, w, has_bias = cache
    d2 = dout.reshape(-1, dout.shape[-1])  # (N,out)
    x2 = x.reshape(-1, x.shape[-1])  # (N,in)
    dx = np.dot(d2, w).reshape(x.shape)
    dw = np.dot(d2.T, x2)
    db = row_sums(d2.T) if has_bias else None  # column sums, in BLAS: 2-3x faster than d2.sum(axis=0)
    return dx, dw, db


# ---------------------------------------------------------------- layernorm

def layernorm_forward(x, w, b, eps=LN_EPS):
    """reference.layernorm_forward: y = w * (x - mu) / sqrt(var + eps) + b, mu and var over the last axis.

    The sums over C as matrix-vector products (row_sums) or row_dots, and xhat
    built in place: with layernorm_backward, 0.38 -> 0.25 ms a micro-batch.
    """
    C = x.shape[-1]
    x2 = x.reshape(-1, C)  # (N,C): one row per position
    xhat = x2 - (row_sums(x2) / C)[:, None]  # x - mu
    var = row_dots(xhat, xhat) / C  # mean((x - mu)^2), without an (N,C) temporary
    rstd = (1.0 / np.sqrt(var + eps))[:, None]  # (N,1)
    xhat *= rstd
    y = xhat * w
    y += b
    return y.reshape(x.shape), (xhat, rstd, w)


def layernorm_backward(dout, cache):
    """reference.layernorm_backward (derived there), every sum over rows or features a matrix-vector product.

    Gradients of y = w * xhat + b with xhat = (x - mu) * rstd.

        db = sum over rows of dout
        dw = sum over rows of dout * xhat
    For x, let g = dout * w (the gradient reaching xhat).  Differentiating
    through both mu and var of the same row (C entries) gives
        dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
    The mean(g) term comes from mu; the xhat * mean(g * xhat) term from var.

    Both means come from matrix-vector products, without g: mean(g) =
    (dout @ w) / C, and with t = dout * xhat (whose column sums are dw),
    mean(g * xhat) = (t @ w) / C; t then holds the correction
    mean(g) + xhat * mean(g * xhat).  Six elementwise passes over (N,C) (and
    four matrix-vector products) with two fresh arrays, where an einsum for
    dw, row dots for mean(g * xhat) and a third fresh array took longer: a
    (6,64,128) forward and backward 212 -> 204 us (one AMD EPYC Zen 4 core,
    median of 15 paired rounds, ratio 0.94).
    """
    xhat, rstd, w = cache  # xhat (N,C), rstd (N,1): the rows of the forward
    C = xhat.shape[-1]
    d2 = dout.reshape(-1, C)  # (N,C)
    db = row_sums(d2.T)  # column sums
    t = np.multiply(d2, xhat)  # dout * xhat
    dw = row_sums(t.T)
    mean_g = np.dot(d2, w) / C  # mean(g), g = dout * w
    gx = np.dot(t, w) / C  # mean(g * xhat)
    corr = np.multiply(xhat, gx[:, None], out=t)  # xhat * mean(g * xhat), in t
    corr += mean_g[:, None]  # + mean(g)
    dx = np.multiply(d2, w)  # g
    dx -= corr
    dx *= rstd
    return dx.reshape(dout.shape), dw, db


# -------------------------------------------------------------- activations

def relu_forward(x, keep=None, out=None):
    """y = x * [x > 0], reference.relu_forward (= max(x, 0) but at x = -inf, NaN there).  The cache is the mask, one byte an entry.

    With ``keep`` (a dropout mask) the cache is [x > 0] & keep and y = relu(x) * keep:
    ReLU's mask and dropout's in one, so the feed-forward applies both with a
    single multiply forward and backward.  ``out`` may be x itself when nothing
    else reads x (the feed-forward's hidden layer).  This is the ReLU the model
    runs (ffn_forward calls it) and the one gradcheck checks; decode_step, which
    needs no mask, uses np.maximum and is tested equal to forward instead.

    Keeping the mask (rather than rebuilding it from y in the backward) makes
    the backward a single multiply: 150 -> 100 us on a (512,512) array.
    """
    mask = x > 0
    if keep is not None:
        mask &= keep
    return np.multiply(x, mask, out=out), mask


def relu_backward(dout, cache, out=None):
    """dy/dx is 1 where x > 0 (and kept) and 0 elsewhere, so dx = dout * mask (reference.relu_backward); ``out`` may be dout."""
    return np.multiply(dout, cache, out=out)


def gelu_gate(x):
    """s = sigmoid(2u) = 1 / (1 + exp(-2u)), u = sqrt(2/pi) * x * (1 + 0.044715 x^2), as a fresh array.

    GELU's gate: gelu(x) = x * s.  In-place passes over s, with x^3 as x * x^2
    (a float32 x ** 3 is a general power call, 34 ms on a (6,64,512) array
    against 0.1 ms a multiply).  For x below about -9, exp(-2u) overflows to
    inf and s to 0, the limit: the caller silences that warning (gelu_forward
    does; the decoder's loop already runs under one errstate, and a second
    costs it 2 us a layer).
    """
    f = x.dtype.type
    s = np.multiply(x, x)
    s *= f(GELU_A)
    s += 1
    s *= x
    s *= f(-2 * GELU_K)  # -2u
    np.exp(s, out=s)
    s += 1
    return np.divide(1, s, out=s)


def gelu_forward(x):
    """reference.gelu_forward, GELU's tanh form (GPT-2's; PyTorch's ``gelu(x, approximate="tanh")``).

        u = sqrt(2/pi) * (x + 0.044715 x^3)
        y = 0.5 x (1 + tanh(u)) = x * s,   s = sigmoid(2u) = 1 / (1 + exp(-2u))   (gelu_gate)

    The same function, through 0.5 (1 + tanh(u)) = sigmoid(2u): this NumPy's
    float32 exp is faster than its tanh (0.51 against 0.83 ms on a (6,64,512)
    array, 2 shared AMD EPYC cores), and y = x * s needs no 0.5 (1 + t) passes.
    The cache keeps s, from which the backward needs no transcendental at all.
    Forward 0.84 -> 0.54 ms, backward 0.33 -> 0.26 ms on that array (best of 5 x 50).
    """
    with np.errstate(over="ignore"):  # exp(-2u) = inf for x < -9: s = 0, y = -0, the limit
        s = gelu_gate(x)
    return np.multiply(x, s), (x, s)


def gelu_backward(dout, cache):
    """reference.gelu_backward, with 0.5 (1 + t) = s and 0.5 (1 - t^2) = 2 s (1 - s) (t = tanh(u) = 2s - 1):

        dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx = s + s (1 - s) * 2 x du/dx
        du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    with s saved from the forward.  dx = dout * dy/dx, accumulated in one fresh
    array with one scratch array (in-place passes, as the forward).
    """
    x, s = cache
    f = x.dtype.type
    g = np.multiply(x, x)  # 2 x du/dx, then dy/dx, accumulated in g
    g *= f(3 * GELU_A)
    g += 1
    g *= x
    g *= f(2 * GELU_K)
    h = np.subtract(1, s)
    h *= s  # s (1 - s)
    g *= h
    g += s
    g *= dout
    return g


ACTIVATIONS = {"relu": (relu_forward, relu_backward), "gelu": (gelu_forward, gelu_backward)}


# ------------------------------------------------------------------ dropout

def dropout_scale(p, dtype):
    """1 / reference.keep_prob(p), in ``dtype``: what the survivors of dropout_mask are multiplied by.

    Multiplying by this costs less than reference.dropout_forward's division
    (the numbers differ by float rounding only).  Ops that can fold the scale
    into a smaller array (attention's v, the feed-forward's second weight)
    take dropout_mask's bare 0/1 mask and this scale separately.
    """
    return np.dtype(dtype).type(1.0 / keep_prob(p))


def dropout_forward(x, p, rng):
    """reference.dropout_forward, x * mask / keep_prob(p), as x * mask * (1 / keep_prob(p)).

        y = x * keep / (1 - p)       keep[i] = 1 with probability 1 - p, else 0
                                     (p the mask's own, see reference.keep_prob)

    Scaling at training time keeps E[y] = x, so evaluation needs no change.
    With p == 0 or rng None (evaluation) it is the identity.  The random draws
    come only from ``rng``, so a fixed seed gives a fixed mask (dropout_mask).
    """
    if rng is None or p == 0.0:
        return x, None
    keep, scale = dropout_mask(x.shape, p, rng), dropout_scale(p, x.dtype)
    y = np.multiply(x, keep)
    y *= scale
    return y, (keep, scale)


def dropout_backward(dout, cache):
    """y = x * m with the fixed mask m = keep / (1 - p), so dx = dout * m (identity when no mask).

    reference.dropout_backward.  This pair and the reference's take the same
    time (0.17 ms a (B,T,C) micro-batch): the mask's draw dominates.
    """
    if cache is None:
        return dout
    keep, scale = cache
    dx = np.multiply(dout, keep)
    dx *= scale
    return dx


# ---------------------------------------------------------------- attention

@lru_cache(maxsize=32)
def causal_mask(T, dtype):
    """(T,T) additive mask: 0 where key j <= query i, -inf where j > i (the future).

    reference.causal_mask, made once per (T, dtype) and kept read-only.
    """
    m = np.triu(np.full((T, T), -np.inf, dtype=dtype), k=1)
    m.flags.writeable = False
    return m


def softmax(x):
    """Numerically stable softmax over the last axis, as a new array: reference.softmax_forward's output.

    softmax(x) = softmax(x - c) for any constant c per row; the textbook c is
    the row's max, so that exp cannot overflow.  NumPy finds the maxima of many
    short rows slowly, one row at a time, and most rows do not need a shift at
    all: exp(x) is exact enough as long as it neither overflows nor underflows
    over the whole row.  So exp runs on x as it is, and the row sums show which
    rows went wrong: an infinite sum (overflow) or one below 1e-20 (every entry
    below about -46, so the row lost precision).  Only those rows are redone
    with their own max.  Each row's result depends on that row alone, as with
    the textbook shift (a causal model's past stays bitwise unchanged when the
    future changes).  Softmax of a (4,4,64,128) block of masked scores: 0.19 ->
    0.09 ms; of the full (4,4,128,128) masked scores, against the
    reference's: 0.58 -> 0.28 ms.
    """
    n = x.shape[-1]
    with np.errstate(over="ignore", under="ignore"):  # overflow is expected here, and handled below
        e = np.exp(x)
    sums = row_sums(e.reshape(-1, n))
    redo = ~((sums >= 1e-20) & (sums < np.inf))  # NaN sums land here too
    if redo.any():
        rows = x.reshape(-1, n)[redo]
        rows = np.exp(rows - np.fmax.reduce(rows, axis=1, keepdims=True))  # fmax.reduce: faster than max
        e.reshape(-1, n)[redo] = rows
        sums[redo] = row_sums(rows)
    e *= (1.0 / sums).reshape(e.shape[:-1] + (1,))  # / sum_j e_j
    return e


@lru_cache(maxsize=64)
def query_blocks(T, n_blocks=2):
    """(s, e) bounds of n_blocks near-equal blocks of query positions, in order.

    Causal attention lets query i see keys 0..i only, so the queries s..e-1
    need scores against keys 0..e-1 alone: the (T,T) score matrix is computed
    block by block, skipping the top-right part that the mask would zero.
    With 2 blocks that skips a quarter of attention's work.
    """
    bounds = np.linspace(0, T, min(n_blocks, T) + 1).round().astype(int)
    return tuple(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def attention_forward(x, w_in, b_in, w_out, b_out, n_heads, p_drop=0.0, rng=None, n_blocks=2):
    """reference.attention_forward: causal multi-head self-attention, nn.MultiheadAttention's layout.

        q, k, v = split(x @ w_in.T + b_in)               fused projection, w_in is (3C, C)
        per head h:  A_h = softmax(q_h k_h^T / sqrt(D) + mask)   mask hides the future
                     y_h = dropout(A_h) v_h = (A_h * keep) (v_h / (1-p))
        out = concat_h(y_h) @ w_out.T + b_out

    Heads are a batch axis: (B,T,C) is viewed as (B,H,T,D), so one batched
    matmul serves every head at once.  q is scaled by 1/sqrt(D) before the
    product (fewer entries than the (T,T) scores).  The queries are taken in
    ``n_blocks`` blocks (``query_blocks``): block s..e-1 scores only keys
    0..e-1, since the mask hides the rest from it.

    Layouts: each batched product reads C-contiguous (T,D) or (D,T) blocks, so
    k is stored transposed, as kT (B,H,D,T).  BLAS multiplies a contiguous
    block about 1.6x faster than a transposed view when D is as short as 32.
    The backward's dq = dS (k / sqrt(D)) needs k the other way round: the
    forward keeps that too, ks, gathered from the projection's output (12 us
    at (6,64,128)) instead of transposed back from kT in the backward (27 us);
    with the backward's row dots on (B,T,H,D) rows (below), attention's
    forward and backward at (6,64,128) 3.32 -> 3.15 ms (one AMD EPYC Zen 4
    core, median of 15 paired rounds, ratio 0.96).  The heads' outputs are
    written straight into (B,T,C) order.  Dropout's 1/(1-p) multiplies v,
    (T,D) per head, rather than the (T,T) weights; the cache keeps A, the
    mask and A * keep, so the backward rebuilds nothing
    (A * keep costs 0.8 MB a layer for a micro-batch of 4; rebuilding it was
    slower).

    Dropout's mask is the reference's: one (B,H,T,T) draw from dropout_mask,
    each query block taking its part, so both engines drop the same weights.
    Drawing the whole mask costs a third more random bits than the blocks'
    parts alone: attention's forward and backward with dropout, 1.01x the
    time of drawing per block (paired, 400 runs).  Forward and backward on a
    micro-batch, against the reference's: 30.1 -> 16.4 ms with dropout 0.1,
    18.8 -> 15.0 ms without.
    """
    B, T, C = x.shape
    H = n_heads
    D = C // H
    qkv, qkv_cache = linear_forward(x, w_in, b_in)  # (B,T,C) -> (B,T,3C)
    q, k, v = qkv.reshape(B, T, 3, H, D).transpose(2, 0, 3, 1, 4)  # 3 x (B,H,T,D), views
    scale = x.dtype.type(1.0 / np.sqrt(D))
    q = np.multiply(q, scale, order="C")  # q / sqrt(D), contiguous (B,H,T,D)
    kT = np.ascontiguousarray(k.transpose(0, 1, 3, 2))  # (B,H,D,T)
    ks = np.multiply(k, scale, order="C")  # k / sqrt(D), contiguous (B,H,T,D): the backward's dq = dS ks
    drop = rng is not None and p_drop > 0
    drop_scale = dropout_scale(p_drop, x.dtype) if drop else x.dtype.type(1)
    # dropout(A) v = (A * keep) (v / (1-p)): the scale goes on v, (T,D), not on the (T,T) scores
    vs = np.multiply(v, drop_scale, order="C")  # v / (1-p), contiguous (B,H,T,D)
    y = np.empty((B, T, C), dtype=x.dtype)
    yh = y.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B,H,T,D) view of y: the heads land side by side
    # the reference's mask: all (T,T) entries drawn at once, whatever the blocks (each takes its part)
    keep_all = dropout_mask((B, H, T, T), p_drop, rng) if drop else None
    blocks = []
    for s, e in query_blocks(T, n_blocks):
        att = q[:, :, s:e] @ kT[:, :, :, :e]  # (B,H,Tb,D) @ (B,H,D,e) -> (B,H,Tb,e)
        att += causal_mask(T, x.dtype)[s:e, :e]
        att = softmax(att)
        keep = keep_all[:, :, s:e, :e] if drop else None
        att_k = np.multiply(att, keep) if drop else att  # A * keep
        np.matmul(att_k, vs[:, :, :e], out=yh[:, :, s:e])  # (B,H,Tb,e) @ (B,H,e,D) -> (B,H,Tb,D)
        blocks.append((s, e, att, keep, att_k))
    out, out_cache = linear_forward(y, w_out, b_out)  # (B,T,C) -> (B,T,C)
    return out, (qkv_cache, q, ks, vs, blocks, out_cache, drop_scale, H)


def attention_cached_forward(x, w_in, b_in, w_out, b_out, n_heads, k_cache, v_cache, pos, last=False):
    """reference.attention_cached_forward: attention for new tokens, reusing earlier keys and values (KV cache).

    x (B,Tn,C) holds the tokens at positions pos .. pos+Tn-1.  Their keys and
    values are written into k_cache, v_cache (B,H,Tmax,D), which already hold
    positions 0 .. pos-1; each new query then attends to every cached position
    up to its own.  Same math as attention_forward (evaluation mode), without
    recomputing the past: generating one token costs O(T) instead of O(T^2).
    Returns out (B,Tn,C); with ``last``, only the last new position's output,
    (B,1,C): every new key and value is still cached, but only one query is
    asked (the model's last layer, whose other outputs nothing reads).
    """
    B, Tn, C = x.shape
    H = n_heads
    D = C // H
    qkv, _ = linear_forward(x, w_in, b_in)  # (B,Tn,C) -> (B,Tn,3C)
    q, k, v = qkv.reshape(B, Tn, 3, H, D).transpose(2, 0, 3, 1, 4)  # 3 x (B,H,Tn,D)
    end = pos + Tn
    k_cache[:, :, pos:end] = k
    v_cache[:, :, pos:end] = v
    if last:
        q = q[:, :, -1:]  # (B,H,1,D): the last position, which may see every cached one
    Tq = q.shape[2]
    att = q @ k_cache[:, :, :end].transpose(0, 1, 3, 2)  # (B,H,Tq,D) @ (B,H,D,end) -> (B,H,Tq,end)
    att *= x.dtype.type(1.0 / np.sqrt(D))
    if Tq > 1:  # a single query is the last position: it may see every cached one
        att += causal_mask(end, x.dtype)[pos:end]  # rows of the full mask for these query positions
    y = softmax(att) @ v_cache[:, :, :end]  # (B,H,Tq,end) @ (B,H,end,D) -> (B,H,Tq,D)
    y = y.transpose(0, 2, 1, 3).reshape(B, Tq, C)
    return linear_forward(y, w_out, b_out)[0]


def attention_backward(dout, cache):
    """reference.attention_backward (derived there), block by block and without the (T,T) row sums.

    The forward applies dropout as y_h = (A_h * keep) (v_h / (1-p)); write K for
    the 0/1 mask keep and vs = v / (1-p) (without dropout K = 1 and vs = v).

    out = y @ w_out.T + b_out     ->  linear backward gives dy, dw_out, db_out
    y_h = (A_h * K) vs_h          ->  d(A*K) = dy_h vs_h^T,   dvs_h = (A_h * K)^T dy_h
    vs = v / (1-p)                ->  dv = dvs / (1-p)
    A * K                         ->  dA = d(A*K) * K
    A = softmax(S) row-wise       ->  dS = A * (dA - sum_j(dA * A))
        (softmax Jacobian: dA_i/dS_j = A_i (delta_ij - A_j); masked entries have
         A = 0, so they get zero gradient automatically; the row sums come from
         the identity sum_j(dA * A) = dy . y, see below)
    S = q k^T / sqrt(D)           ->  dq = dS k / sqrt(D),  dk = dS^T q / sqrt(D)
    q, k, v = split(x @ w_in.T + b_in)
                                  ->  stack (dq, dk, dv) back into (B,T,3C), linear backward
    Block by block as in the forward: query block s..e-1 gives its own rows of
    dq, and adds into dk and dv for keys 0..e-1.  Returns (dx, dw_in, db_in, dw_out, db_out).
    """
    qkv_cache, q, k, vs, blocks, out_cache, drop_scale, H = cache  # q and k are already scaled
    B, _, T, D = q.shape
    C = H * D
    dy, dw_out, db_out = linear_backward(dout, out_cache)
    # The softmax backward's row sums, sum_j dA_ij A_ij, equal dy_i . y_i: with dA = d(A*K) * K,
    # sum_j dA_ij A_ij = sum_j (dy_i . vs_j) (A*K)_ij = dy_i . (sum_j (A*K)_ij vs_j) = dy_i . y_i.
    # Rows of D numbers instead of T (FlashAttention's trick); y is the out projection's cached input.
    # Both are (B,T,H,D) in memory: the row dots of contiguous rows, then viewed as (B,H,T,1).
    rowdot = row_dots(dy.reshape(B, T, H, D), out_cache[0].reshape(B, T, H, D)).transpose(0, 2, 1)[..., None]
    dy = dy.reshape(B, T, H, D).transpose(0, 2, 1, 3).copy()  # (B,T,C) -> contiguous (B,H,T,D)
    vsT = np.ascontiguousarray(vs.transpose(0, 1, 3, 2))  # (B,H,D,T): contiguous operands, as in the forward
    # dq, dk, dv are written straight into x's (B,T,3,H,D) layout, ready for the linear backward
    dqkv = np.empty((B, T, 3 * C), dtype=dy.dtype)
    dq, dk, dv = dqkv.reshape(B, T, 3, H, D).transpose(2, 0, 3, 1, 4)  # 3 x (B,H,T,D), views
    for s, e, att, keep, att_k in reversed(blocks):  # the last block sees every key: it writes dk, dv first
        dyb = dy[:, :, s:e]  # (B,H,Tb,D)
        datt = dyb @ vsT[:, :, :, :e]  # d(A*K) = dy vs^T: (B,H,Tb,D) @ (B,H,D,e) -> (B,H,Tb,e)
        dv_b = np.matmul(att_k.transpose(0, 1, 3, 2), dyb, out=dv if e == T else None)  # dvs = (A*K)^T dy
        if keep is not None:
            np.multiply(datt, keep, out=datt)  # dA = d(A*K) * K
        datt -= rowdot[:, :, s:e]  # dA - sum_j(dA * A)
        datt *= att  # now dS, the gradient of the pre-softmax scores
        np.matmul(datt, k[:, :, :e], out=dq[:, :, s:e])  # dq = dS (k / sqrt(D))
        dk_b = np.matmul(datt.transpose(0, 1, 3, 2), q[:, :, s:e], out=dk if e == T else None)  # dS^T (q/sqrt(D))
        if e != T:  # keys 0..e-1 also got gradient from the later blocks
            dv[:, :, :e] += dv_b
            dk[:, :, :e] += dk_b
    if drop_scale != 1:
        dv *= drop_scale  # dv = dvs / (1-p)
    dx, dw_in, db_in = linear_backward(dqkv, qkv_cache)
    return dx, dw_in, db_in, dw_out, db_out


# ------------------------------------------------------ softmax cross-entropy

def cross_entropy_forward(logits, targets):
    """reference.cross_entropy_forward: mean negative log-likelihood of the targets under softmax(logits).

        loss = -(1/N) sum_n log softmax(logits[n])[targets[n]]
    logits (..., V) and integer targets (...) are flattened to N rows.
    log-softmax is computed as z - max - log(sum(exp(z - max))) for stability.
    """
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    t = targets.reshape(-1)
    N = z.shape[0]
    shifted = z - np.fmax.reduce(z, axis=1, keepdims=True)
    e = np.exp(shifted)
    s = e.sum(axis=1, keepdims=True)
    logp_t = shifted[np.arange(N), t] - np.log(s[:, 0])
    loss = -logp_t.mean()
    probs = e / s
    return float(loss), (probs, t, logits.shape)


def cross_entropy_backward(dloss, cache):
    """d loss / d logits = (softmax(logits) - onehot(target)) / N: reference.cross_entropy_backward.

    The softmax and the log cancel neatly: d(-log p_t)/dz_j = p_j - [j == t].
    The -1 goes straight into the target entries, in place, with no one-hot
    array; with the forward (fmax.reduce for the max), against the
    reference's: 0.14 -> 0.12 ms a micro-batch.
    """
    probs, t, shape = cache
    N = probs.shape[0]
    dz = probs.copy()
    dz[np.arange(N), t] -= 1.0
    dz *= probs.dtype.type(dloss / N)
    return dz.reshape(shape)


# ------------------------------------------------------------- feed-forward

def ffn_forward(x, w1, b1, w2, b2, activation="relu", p_drop=0.0, rng=None):
    """reference.ffn_forward: the position-wise feed-forward network of nn.TransformerEncoderLayer,

        y = linear2(dropout(act(linear1(x))))      (B,T,C) -> (B,T,F) -> (B,T,C)

    Dropout is applied as dropout(a) @ w2.T = (a * keep) @ (w2 / (1-p)).T: the
    scale multiplies w2's (C,F) numbers instead of the (B,T,F) activations.
    ReLU is applied as relu(h) = h * [h > 0], and with dropout
    relu(h) * keep = h * ([h > 0] & keep): ReLU's mask and dropout's combine
    into one, a single multiply forward and backward.  That multiply writes
    into h, as nothing else reads it (with GELU, dropout's multiplies GELU's
    fresh output): writing into a fresh 1 MB array instead costs more than the
    multiply (measured: 0.5 ms of a 25 ms micro-batch).  h * [h > 0] differs
    from max(h, 0) only at h = -inf (NaN instead of 0), where training has
    already diverged.  Forward and backward with ReLU on a micro-batch,
    against the reference's: 21.1 -> 11.9 ms with dropout 0.1, 15.9 -> 9.2 ms
    without.  The ReLU is relu_forward/relu_backward themselves (with
    ``keep`` and ``out``), so the gradient-checked functions are the ones run.
    """
    act_forward, _ = ACTIVATIONS[activation]
    h, c1 = linear_forward(x, w1, b1)  # (B,T,C) -> (B,T,F)
    drop = rng is not None and p_drop > 0
    keep = dropout_mask(h.shape, p_drop, rng) if drop else None
    if activation == "relu":
        a, ca = relu_forward(h, keep, out=h)  # ReLU's mask and dropout's in one, written into h
        keep = None
    else:
        a, ca = act_forward(h)
        if drop:
            np.multiply(a, keep, out=a)
    scale = dropout_scale(p_drop, x.dtype) if drop else None
    y, c2 = linear_forward(a, w2 if scale is None else w2 * scale, b2)  # (B,T,F) -> (B,T,C)
    return y, (c1, ca, keep, c2, scale, activation)


def ffn_backward(dout, cache):
    """reference.ffn_backward: the chain rule back through linear2, dropout, the activation and linear1.

    y = (a * keep) @ (w2 s).T + b2,  s = 1/(1-p)  ->  linear backward with w2 s gives
                                         d(a * keep) and dw2 / s, so dw2 is rescaled
    a * keep                             ->  da = d(a * keep) * keep
    a = act(h)                           ->  dh = act'(h) da  (for ReLU keep is already in its mask)
    Returns (dx, dw1, db1, dw2, db2).
    """
    c1, ca, keep, c2, scale, activation = cache
    _, act_backward = ACTIVATIONS[activation]
    da, dw2, db2 = linear_backward(dout, c2)
    if scale is not None:
        dw2 *= scale
    if keep is not None:
        np.multiply(da, keep, out=da)
    if activation == "relu":
        dh = relu_backward(da, ca, out=da)  # in place: da is ours alone
    else:
        dh = act_backward(da, ca)
    dx, dw1, db1 = linear_backward(dh, c1)
    return dx, dw1, db1, dw2, db2
