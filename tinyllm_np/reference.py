"""The textbook engine: every layer of TinyLLM as a plain forward/backward pair.  Read this file first.

Every op follows the CS231n convention::

    out, cache = op_forward(x, ...)
    dx, (dparams...) = op_backward(dout, cache)

``dout`` is dL/d(out), the gradient of the scalar loss L with respect to the
op's output, and the backward returns dL/d(input) for each input.  Each
backward's docstring derives it from its forward.  Shapes use short names:

    B batch, T time (sequence length), C model width (d_model), H heads,
    D head size (C // H), F feed-forward width (d_ff), V vocabulary size.

This is the plainest vectorized NumPy that computes the model: the full (T,T)
causal mask, softmax shifted by each row's max, dropout as x * mask / (1 - p),
ReLU as max(x, 0) with its own backward; no loop over batch, heads or time, no
in-place tricks.  ``layers.py`` is the fast engine: the same functions, names
and numbers (tests/test_reference.py holds it to this file), rewritten where
rewriting was measured to pay.  ``TinyLLM(cfg, engine="reference")`` runs the
model on this file.

Dropout draws its mask with ``dropout_mask`` (below), the one random function
both engines share, so that both draw identical masks from the same generator
and can be compared number for number.
"""

import math

import numpy as np

LN_EPS = 1e-5  # PyTorch's nn.LayerNorm / TransformerEncoderLayer default


# ---------------------------------------------------------------- embedding

def embedding_forward(idx, weight):
    """out[b, t] = weight[idx[b, t]]:  (B,T) ints, (V,C) -> (B,T,C)."""
    return weight[idx], (idx, weight.shape)


def embedding_backward(dout, cache):
    """A lookup copies rows, so its gradient adds them back.

    Forward:  out[b, t, :] = W[idx[b, t], :]
    Each entry W[v, c] appears in every output row whose token is v, so
        dW[v, :] = sum over all (b, t) with idx[b, t] == v of dout[b, t, :]
    Rows of W that were never looked up get zero.  np.add.at adds every
    occurrence; ``dW[idx] += dout`` would not: with repeated indices NumPy's
    fancy assignment keeps only one of them (try ``--break embedding_duplicates``).
    """
    idx, shape = cache
    dW = np.zeros(shape, dtype=dout.dtype)
    np.add.at(dW, idx, dout)
    return dW


# ------------------------------------------------------------------- linear

def linear_forward(x, w, b=None):
    """y = x @ w.T + b, PyTorch's nn.Linear layout: w is (out, in).  (..., in) -> (..., out)."""
    y = x @ w.T
    if b is not None:
        y = y + b
    return y, (x, w, b is not None)


def linear_backward(dout, cache):
    """Gradients of y = x @ w.T + b.

    Each output is y[n, o] = sum_i x[n, i] w[o, i] + b[o], where n runs over
    every leading position (all of B and T).  Differentiating:
        dy[n, o]/dx[n, i] = w[o, i]   ->  dx[n, i] = sum_o dout[n, o] w[o, i]   dx = dout @ w
        dy[n, o]/dw[o, i] = x[n, i]   ->  dw[o, i] = sum_n dout[n, o] x[n, i]   dw = dout.T @ x
        dy[n, o]/db[o]    = 1         ->  db[o]    = sum_n dout[n, o]
    The weight and bias are used at every position, so their gradients sum
    over all of them.  Returns (dx, dw, db); db is None without a bias.
    """
    x, w, has_bias = cache
    d2 = dout.reshape(-1, dout.shape[-1])  # (N,out): every position a row
    x2 = x.reshape(-1, x.shape[-1])  # (N,in)
    dx = dout @ w
    dw = d2.T @ x2
    db = d2.sum(axis=0) if has_bias else None
    return dx, dw, db


# ---------------------------------------------------------------- layernorm

def layernorm_forward(x, w, b, eps=LN_EPS):
    """Normalize each position's C features, then scale and shift:

        mu   = mean(x)                  over the last axis (C)
        var  = mean((x - mu)^2)         biased, as PyTorch
        xhat = (x - mu) / sqrt(var + eps)
        y    = w * xhat + b
    """
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mu) * rstd
    return w * xhat + b, (xhat, rstd, w)


def layernorm_backward(dout, cache):
    """Gradients of y = w * xhat + b, xhat = (x - mu) * rstd, rstd = 1 / sqrt(var + eps).

    The scale and shift are used at every position:
        db = sum over positions of dout,   dw = sum over positions of dout * xhat
    For x, write g = dout * w, the gradient reaching xhat.  Within one row of C
    entries, x_j reaches xhat_i three ways: directly, through mu and through var:
        d xhat_i / d x_j = rstd * (delta_ij - 1/C - xhat_i * xhat_j / C)
    (d mu/d x_j = 1/C; d var/d x_j = 2 (x_j - mu) / C, and d rstd/d var =
    -rstd^3 / 2, which together give the last term).  Summing g_i times that over i:
        dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
    The mean(g) term is the path through mu, the xhat * mean(g * xhat) term the
    path through var (``--break layernorm_mean``, ``--break layernorm_variance``).
    """
    xhat, rstd, w = cache
    lead = tuple(range(dout.ndim - 1))  # every axis but the features
    db = dout.sum(axis=lead)
    dw = (dout * xhat).sum(axis=lead)
    g = dout * w
    dx = rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    return dx, dw, db


# -------------------------------------------------------------- activations

def relu_forward(x):
    """y = max(x, 0).  The cache is x."""
    return np.maximum(x, 0), x


def relu_backward(dout, cache):
    """dy/dx is 1 where x > 0 and 0 elsewhere (at 0 we take 0), so dx = dout * [x > 0]."""
    x = cache
    return dout * (x > 0)


GELU_K = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715


def gelu_forward(x):
    """GELU, tanh form (GPT-2's; PyTorch's ``gelu(x, approximate="tanh")``):

        u = sqrt(2/pi) * (x + 0.044715 x^3)
        y = 0.5 x (1 + tanh(u))
    """
    t = np.tanh(GELU_K * (x + GELU_A * x ** 3))
    return 0.5 * x * (1 + t), (x, t)


def gelu_backward(dout, cache):
    """Product and chain rule on y = 0.5 x (1 + t), t = tanh(u), u = sqrt(2/pi)(x + 0.044715 x^3):

        dy/dx = 0.5 (1 + t) + 0.5 x * dt/dx
        dt/dx = (1 - t^2) * du/dx = (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    with t saved from the forward.  dx = dout * dy/dx.
    """
    x, t = cache
    dydx = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * GELU_K * (1 + 3 * GELU_A * x * x)
    return dout * dydx


ACTIVATIONS = {"relu": (relu_forward, relu_backward), "gelu": (gelu_forward, gelu_backward)}


# ------------------------------------------------------------------ dropout

DROPOUT_BITS = 65536  # dropout masks compare 16-bit random integers with a threshold


def dropout_threshold(p):
    """t = round(p * 65536): dropout_mask drops an entry when its 16 random bits are below t.

    The drop probability is then t / 65536, so only p = 0 or 1 <= t <= 65535,
    i.e. 0.5/65536 < p < 65535.5/65536 (7.6294e-6 to 0.99999237), is represented: a smaller p would silently
    mean no dropout, a larger one would drop everything (scale 1/0).  Any
    other p is a ValueError naming that range.
    """
    if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)) or not math.isfinite(p):
        raise ValueError(f"dropout must be a finite number, got {p!r}")
    t = round(p * DROPOUT_BITS)
    if p != 0 and not 1 <= t < DROPOUT_BITS:
        why = ("" if not 0 < p < 1 else ": masks are 16-bit (an entry drops when its bits < round(p * 65536)), "
               "so this p would mean " + ("no dropout" if t < 1 else "dropping everything"))
        raise ValueError(f"dropout must be 0 or in (7.6294e-06, 0.99999237), i.e. 0.5/65536 < p < 65535.5/65536, "
                         f"got {p!r}{why}")
    return t


def keep_prob(p):
    """The probability dropout_mask keeps an entry: 1 - round(p * 65536) / 65536.

    The mask is drawn from 16 random bits an entry (dropout_mask), so the drop
    probability it really uses is p rounded to a multiple of 1/65536:
    0.100006 for p = 0.1, keep probability 0.899994.  Dropout divides by this
    number, not by 1 - p, so that E[x * mask / keep_prob(p)] = x holds exactly.
    """
    return 1.0 - dropout_threshold(p) / DROPOUT_BITS


def dropout_mask(shape, p, rng):
    """A bool mask, each entry True (kept) with probability keep_prob(p), drawn from ``rng`` alone.

    Both engines draw every mask here, so the same generator gives both the
    same masks.  How: 16 random bits an entry (raw bits are several times
    cheaper to draw than floats), the entry dropped when its bits fall below
    round(p * 65536).  The bits are drawn as full-range 64-bit integers, each
    cut into four 16-bit ones: a full-range draw is the generator's raw output,
    with no bounding work, which halves the cost of drawing 16-bit integers.
    """
    n = math.prod(shape)
    bits = rng.integers(0, 2 ** 64, size=-(-n // 4), dtype=np.uint64).view(np.uint16)
    return bits[:n].reshape(shape) >= dropout_threshold(p)


def dropout_forward(x, p, rng):
    """Inverted dropout: zero each entry with probability p, scale the survivors up.

        y = x * mask / keep_prob(p)      mask[i] = 1 with probability keep_prob(p) (~ 1 - p), else 0

    Scaling at training time keeps E[y] = x, so evaluation needs no change:
    with p == 0 or rng None (evaluation) it is the identity.
    """
    if rng is None or p == 0.0:
        return x, None
    mask = dropout_mask(x.shape, p, rng)
    return x * mask / keep_prob(p), (mask, p)


def dropout_backward(dout, cache):
    """y = x * m with m = mask / keep_prob(p) fixed by the forward, so dy/dx = m and dx = dout * m.

    A dropped entry passed nothing forward, so it gets no gradient
    (``--break dropout_mask`` forgets that).
    """
    if cache is None:
        return dout
    mask, p = cache
    return dout * mask / keep_prob(p)


# ------------------------------------------------------------------ softmax

def softmax_forward(x):
    """softmax(x)_i = exp(x_i - m) / sum_j exp(x_j - m) over the last axis, m = max_j x_j.

    Subtracting the row's max changes nothing mathematically (it cancels
    between numerator and denominator) but keeps exp from overflowing: the
    largest term becomes exp(0) = 1.  -inf entries (masked) become exactly 0.
    The cache is the output y.
    """
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    y = e / e.sum(axis=-1, keepdims=True)
    return y, y


def softmax_backward(dout, cache):
    """Gradient of y = softmax(x) along the last axis.

    For one row, y_i = exp(x_i) / sum_k exp(x_k), so (quotient rule)
        dy_i/dx_j = y_i (delta_ij - y_j)
    Every output depends on every input through the shared sum: the Jacobian
    is not diagonal.  Then
        dx_j = sum_i dout_i y_i (delta_ij - y_j) = y_j (dout_j - sum_i dout_i y_i)
    Entries with y = 0 (masked) get dx = 0: no gradient flows to the future.
    (``--break softmax_diagonal`` keeps only the diagonal, dx_j = dout_j y_j (1 - y_j).)
    """
    y = cache
    return y * (dout - (dout * y).sum(axis=-1, keepdims=True))


# ---------------------------------------------------------------- attention

def causal_mask(T, dtype=np.float64):
    """(T,T) additive mask: 0 where key j <= query i, -inf where j > i (the future)."""
    return np.triu(np.full((T, T), -np.inf, dtype=dtype), k=1)


def split_heads(x, H):
    """(B,T,C) -> (B,H,T,D): head h is features h*D .. (h+1)*D - 1 of every position."""
    B, T, C = x.shape
    return x.reshape(B, T, H, C // H).transpose(0, 2, 1, 3)


def merge_heads(y):
    """(B,H,T,D) -> (B,T,C), the heads side by side: the inverse of split_heads."""
    B, H, T, D = y.shape
    return y.transpose(0, 2, 1, 3).reshape(B, T, H * D)


def attention_forward(x, w_in, b_in, w_out, b_out, n_heads, p_drop=0.0, rng=None):
    """Causal multi-head self-attention, PyTorch's nn.MultiheadAttention layout:

        q, k, v = split(x @ w_in.T + b_in)          (B,T,C) -> 3 x (B,H,T,D); w_in is (3C, C)
        S = q @ k^T / sqrt(D) + mask                (B,H,T,T): how well query t matches key s
        A = softmax(S)                              over the keys s: weights summing to 1
        A = dropout(A)
        y = A @ v                                   (B,H,T,D): a weighted mean of the values
        out = merge(y) @ w_out.T + b_out            (B,T,C)

    The mask is -inf above the diagonal, so A is 0 there: position t mixes
    the values of positions 0..t only.  Heads are a batch axis.
    """
    B, T, C = x.shape
    H = n_heads
    D = C // H
    qkv, c_in = linear_forward(x, w_in, b_in)  # (B,T,C) -> (B,T,3C)
    q, k, v = (split_heads(a, H) for a in np.split(qkv, 3, axis=-1))  # 3 x (B,H,T,D)
    scale = 1.0 / math.sqrt(D)
    S = (q @ k.transpose(0, 1, 3, 2)) * scale + causal_mask(T, x.dtype)  # (B,H,T,D) @ (B,H,D,T) -> (B,H,T,T)
    A, c_soft = softmax_forward(S)
    Ad, c_drop = dropout_forward(A, p_drop, rng)
    y = Ad @ v  # (B,H,T,T) @ (B,H,T,D) -> (B,H,T,D)
    out, c_out = linear_forward(merge_heads(y), w_out, b_out)  # (B,T,C) -> (B,T,C)
    return out, (c_in, q, k, v, scale, c_soft, Ad, c_drop, c_out, H)


def attention_backward(dout, cache):
    """Backward of attention_forward, its lines undone in reverse order:

        out = merge(y) @ w_out.T + b_out  ->  linear backward: d merge(y), dw_out, db_out; split the heads
        y = Ad @ v                        ->  dAd = dy @ v^T,   dv = Ad^T @ dy
        Ad = dropout(A)                   ->  dA = dropout_backward(dAd)
        A = softmax(S)                    ->  dS = softmax_backward(dA)
        S = q @ k^T * scale + mask        ->  dq = dS @ k * scale,   dk = dS^T @ q * scale
                                              (the mask is a constant: no gradient)
        q, k, v = split(x @ w_in.T + b_in) -> merge dq, dk, dv side by side into (B,T,3C), linear backward

    The matmul rules are linear_backward's: for Y = P @ Q, dP = dY @ Q^T and
    dQ = P^T @ dY, here batched over (B,H).  scale = 1/sqrt(D) sits in the
    forward's S, so it multiplies both dq and dk (``--break attention_scale``).
    Returns (dx, dw_in, db_in, dw_out, db_out).
    """
    c_in, q, k, v, scale, c_soft, Ad, c_drop, c_out, H = cache
    dy, dw_out, db_out = linear_backward(dout, c_out)
    dy = split_heads(dy, H)  # (B,T,C) -> (B,H,T,D)
    dAd = dy @ v.transpose(0, 1, 3, 2)  # (B,H,T,D) @ (B,H,D,T) -> (B,H,T,T)
    dv = Ad.transpose(0, 1, 3, 2) @ dy  # (B,H,T,T) @ (B,H,T,D) -> (B,H,T,D)
    dA = dropout_backward(dAd, c_drop)
    dS = softmax_backward(dA, c_soft)
    dq = (dS @ k) * scale  # (B,H,T,T) @ (B,H,T,D) -> (B,H,T,D)
    dk = (dS.transpose(0, 1, 3, 2) @ q) * scale
    dqkv = np.concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], axis=-1)  # (B,T,3C)
    dx, dw_in, db_in = linear_backward(dqkv, c_in)
    return dx, dw_in, db_in, dw_out, db_out


def attention_cached_forward(x, w_in, b_in, w_out, b_out, n_heads, k_cache, v_cache, pos, last=False):
    """Attention for new tokens only, reusing the keys and values of earlier ones (KV cache).

    x (B,Tn,C) holds the tokens at positions pos .. pos+Tn-1.  Their keys and
    values are written into k_cache, v_cache (B,H,Tmax,D), which already hold
    positions 0 .. pos-1; then each new query attends to the cached keys up to
    its own position: attention_forward's rows pos .. pos+Tn-1, in evaluation
    mode.  With ``last``, only the last new position's output, (B,1,C).
    """
    B, Tn, C = x.shape
    H = n_heads
    D = C // H
    end = pos + Tn
    qkv, _ = linear_forward(x, w_in, b_in)  # (B,Tn,C) -> (B,Tn,3C)
    q, k, v = (split_heads(a, H) for a in np.split(qkv, 3, axis=-1))  # 3 x (B,H,Tn,D)
    k_cache[:, :, pos:end] = k
    v_cache[:, :, pos:end] = v
    S = (q @ k_cache[:, :, :end].transpose(0, 1, 3, 2)) / math.sqrt(D)  # (B,H,Tn,end)
    S = S + causal_mask(end, x.dtype)[pos:end]  # the full mask's rows for these query positions
    y = softmax_forward(S)[0] @ v_cache[:, :, :end]  # (B,H,Tn,end) @ (B,H,end,D) -> (B,H,Tn,D)
    y = merge_heads(y)
    if last:
        y = y[:, -1:]
    return linear_forward(y, w_out, b_out)[0]


# ------------------------------------------------------------- feed-forward

def ffn_forward(x, w1, b1, w2, b2, activation="relu", p_drop=0.0, rng=None):
    """Position-wise feed-forward network, as in nn.TransformerEncoderLayer:

        h = x @ w1.T + b1           (B,T,C) -> (B,T,F)
        a = dropout(act(h))
        y = a @ w2.T + b2           (B,T,F) -> (B,T,C)
    """
    act_forward, _ = ACTIVATIONS[activation]
    h, c1 = linear_forward(x, w1, b1)
    a, c_act = act_forward(h)
    a, c_drop = dropout_forward(a, p_drop, rng)
    y, c2 = linear_forward(a, w2, b2)
    return y, (c1, c_act, c_drop, c2, activation)


def ffn_backward(dout, cache):
    """The chain rule through the forward's four lines in reverse:

        y = a @ w2.T + b2   ->  da, dw2, db2 = linear_backward(dout)
        a = dropout(a')     ->  da' = dropout_backward(da)
        a' = act(h)         ->  dh = act_backward(da')
        h = x @ w1.T + b1   ->  dx, dw1, db1 = linear_backward(dh)
    Returns (dx, dw1, db1, dw2, db2).
    """
    c1, c_act, c_drop, c2, activation = cache
    _, act_backward = ACTIVATIONS[activation]
    da, dw2, db2 = linear_backward(dout, c2)
    da = dropout_backward(da, c_drop)
    dh = act_backward(da, c_act)
    dx, dw1, db1 = linear_backward(dh, c1)
    return dx, dw1, db1, dw2, db2


# ------------------------------------------------------ softmax cross-entropy

def cross_entropy_forward(logits, targets):
    """Mean negative log-likelihood of the targets under softmax(logits):

        loss = -(1/N) sum_n log softmax(z_n)[t_n]        z (N,V), N = every position
    log softmax(z)_j = z_j - m - log(sum_k exp(z_k - m)), m = max_k z_k, so that
    neither exp overflows nor log meets a probability rounded to 0.
    """
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    t = targets.reshape(-1)
    N = z.shape[0]
    shifted = z - z.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))  # (N,V) log-probabilities
    loss = -logp[np.arange(N), t].mean()
    return float(loss), (np.exp(logp), t, logits.shape)


def cross_entropy_backward(dloss, cache):
    """d loss / d logits = dloss * (softmax(z) - onehot(t)) / N.

    With p = softmax(z), -log p_t = -z_t + log sum_k exp(z_k), so
        d(-log p_t)/dz_j = -[j == t] + exp(z_j) / sum_k exp(z_k) = p_j - [j == t]
    The softmax's Jacobian and the log cancel: no (V,V) matrix is needed.  Each
    of the N positions enters the mean with weight 1/N.  (``--break
    cross_entropy_minus_one`` forgets the - [j == t].)
    """
    probs, t, shape = cache
    N = probs.shape[0]
    onehot = np.zeros_like(probs)
    onehot[np.arange(N), t] = 1
    return (dloss / N * (probs - onehot)).reshape(shape)
