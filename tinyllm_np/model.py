"""The TinyLLM transformer: forward and backward, top-down like the paper.

    x = tok_emb[idx] + pos_emb[0..T-1]                      (B,T) -> (B,T,C)
    n_layers x encoder layer (PyTorch's nn.TransformerEncoderLayer):
        post-norm (norm_first=False, the original):
            x = norm1(x + dropout(self_attn(x)))
            x = norm2(x + dropout(ffn(x)))
        pre-norm (norm_first=True, GPT-2 style):
            x = x + dropout(self_attn(norm1(x)))
            x = x + dropout(ffn(norm2(x)))
    logits = ln(x) @ head.T                                 (B,T,C) -> (B,T,V)

The layers come from an engine: ``layers`` (fast, the default) or ``reference``
(the textbook forms, which read like the math); ``TinyLLM(cfg, engine="reference")``.
Both compute the same numbers to float rounding; the engine changes nothing else.

Parameters carry the names and shapes of the original's PyTorch state_dict and
live as views into one flat buffer (``model.flat``), so the optimizer can update
all 626,560 of them with a handful of vectorized operations.
"""

import dataclasses
import json
import math
import operator
from functools import lru_cache
import numpy as np

from . import layers as L
from . import reference
from .fileio import atomic_savez


@dataclasses.dataclass
class Config:
    vocab_size: int = 59
    d_model: int = 128
    n_layers: int = 3
    n_heads: int = 4
    d_ff: int = 512
    context: int = 128
    dropout: float = 0.1
    norm_first: bool = False
    activation: str = "relu"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "context"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"Config.{name} must be a positive integer, got {v!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        try:
            reference.dropout_threshold(self.dropout)  # 0, or a p the 16-bit masks represent
        except ValueError as e:
            raise ValueError(f"Config.{e}") from None
        if self.activation not in L.ACTIVATIONS:
            raise ValueError(f"Config.activation must be one of {sorted(L.ACTIVATIONS)}, got {self.activation!r}")

    def param_shapes(self):
        """Name -> shape, in the original state_dict's order."""
        V, C, F, T = self.vocab_size, self.d_model, self.d_ff, self.context
        shapes = {"tok_emb.weight": (V, C), "pos_emb.weight": (T, C)}
        for i in range(self.n_layers):
            p = f"layers.{i}."
            shapes.update({
                p + "self_attn.in_proj_weight": (3 * C, C),
                p + "self_attn.in_proj_bias": (3 * C,),
                p + "self_attn.out_proj.weight": (C, C),
                p + "self_attn.out_proj.bias": (C,),
                p + "linear1.weight": (F, C),
                p + "linear1.bias": (F,),
                p + "linear2.weight": (C, F),
                p + "linear2.bias": (C,),
                p + "norm1.weight": (C,),
                p + "norm1.bias": (C,),
                p + "norm2.weight": (C,),
                p + "norm2.bias": (C,),
            })
        shapes.update({"ln.weight": (C,), "ln.bias": (C,), "head.weight": (V, C)})
        return shapes


def flat_views(shapes, buf):
    """Carve consecutive views with the given shapes out of one 1-D buffer."""
    views, off = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)  # math.prod: np.prod costs microseconds a call, 40 calls a backward
        views[name] = buf[off:off + n].reshape(shape)
        off += n
    assert off == buf.size, "buffer size does not match the shapes"
    return views


def _layernorm_vector(x, w, b, eps=L.LN_EPS):
    """layers.layernorm_forward for one (C,) vector, in fewer NumPy calls; no backward cache."""
    xc = x - float(np.add.reduce(x)) / x.size  # x - mu (the scalar math in Python floats: fewer NumPy calls)
    xc *= 1.0 / math.sqrt(float(np.dot(xc, xc)) / x.size + eps)  # / sqrt(var + eps)
    xc *= w
    xc += b
    return xc


@lru_cache(maxsize=8)
def _mean_weights(n, dtype):
    v = np.full(n, 1.0 / n, dtype=dtype)
    v.flags.writeable = False
    return v


def _layernorm_rows(x, w, b, eps=L.LN_EPS):
    """layers.layernorm_forward for a few (B,C) rows (decode_step_batch's streams), in fewer NumPy calls; no cache.

    w and b None: xhat alone (decode_weights folds them into the next matrix).

    10.7 -> 8.1 us for (4,128) rows (nine of them a generated character at nanoGPT's recipe).
    """
    C = x.shape[-1]
    xc = x - np.dot(x, _mean_weights(C, x.dtype))[:, None]  # x - mu, mu = x @ (1/C, ..., 1/C)
    r = L.row_dots(xc, xc)  # C var, then 1 / sqrt(var + eps) in place
    r /= C
    r += eps
    np.sqrt(r, out=r)
    np.divide(1, r, out=r)
    xc *= r[:, None]
    if w is not None:  # None: folded into the matrix the norm feeds (decode_weights)
        xc *= w
        xc += b
    return xc


def _softmax_rows(att):
    """layers.softmax for a few short rows (decode_step's H heads), in fewer NumPy calls.

    exp runs unshifted; only if some row's sum overflowed or fell below 1e-20
    (the smallest and largest of the sums tell) is the whole thing redone with
    each row shifted by its own max.  Call it under errstate(over="ignore"):
    the unshifted exp may overflow, which is what the check catches.
    """
    e = np.exp(att)
    sums = np.add.reduce(e, axis=-1, keepdims=True)
    s = sums.ravel().tolist()  # a few Python floats: min and max of them cost less than NumPy calls
    if not (1e-20 <= min(s) and max(s) < math.inf):  # (a NaN may slip through: it stays NaN either way)
        e = np.exp(att - np.fmax.reduce(att, axis=-1, keepdims=True))
        sums = np.add.reduce(e, axis=-1, keepdims=True)
    e /= sums
    return e


class ParamDict(dict):
    """model.params: name -> view into model.flat, a dict that refuses rebinding.

    ``params[k] = arr`` would leave model.flat, the per-layer views, the workers
    and AdamW's flat fast path reading the old array without a word; it raises
    TypeError instead (writing the same array back, as ``params[k] *= 2`` does,
    is allowed).  Write in place, ``params[k][...] = arr``, or use
    ``model.load_state_dict(d)``.  A dict subclass, so reading stays a dict lookup.
    """

    def _refuse(self, *args, **kwargs):
        raise TypeError("model.params cannot be rebound (its arrays are views into model.flat): write in place, "
                        "model.params[k][...] = arr, or use model.load_state_dict(d)")

    def __setitem__(self, k, v):
        if k not in self or v is not dict.__getitem__(self, k):
            self._refuse()

    __delitem__ = pop = popitem = clear = update = setdefault = __ior__ = _refuse

    def __reduce__(self):
        return dict, (dict(self),)  # a pickle or copy is a plain dict


def _as_int(v, what):
    """operator.index(v) (a Python or NumPy integer, not a bool or float), else ValueError."""
    if isinstance(v, (bool, np.bool_)):
        raise ValueError(f"{what} must be an integer, got {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {v!r}") from None


class TinyLLM:
    """Character-level causal transformer with hand-written backward.

    model = TinyLLM(Config(vocab_size=59), seed=0)      # engine="reference": the textbook layers
    logits = model.forward(idx)                         # (B,T) ints -> (B,T,V), no dropout
    loss, grads = model.loss_and_grads(idx, targets, train=True)
    """

    ENGINES = {"fast": L, "reference": reference}

    def __init__(self, config, seed=0, dtype=np.float32, chars=None, engine="fast", flat=None):
        """``flat``: an existing 1-D array of n_params numbers of ``dtype`` to hold the parameters,
        taken as it is and not initialised (parallel.py's workers run on the caller's parameters
        in shared memory this way, without a copy per call); a whole array rather than a slice
        of a larger one, or AdamW updates the parameters array by array instead of in one
        flat pass (optim.flat_base).  None: a new one, initialised as PyTorch initialises
        the original's modules (from ``seed``)."""
        self.config = config
        if engine not in self.ENGINES:
            raise ValueError(f"engine must be one of {sorted(self.ENGINES)}, got {engine!r}")
        self.engine, self.L = engine, self.ENGINES[engine]  # the module whose layers the model runs
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype}")
        self.chars = None if chars is None else list(chars)
        self.shapes = config.param_shapes()
        self.n_params = sum(math.prod(s) for s in self.shapes.values())
        if flat is None:
            self._flat = np.zeros(self.n_params, dtype=self.dtype)
        elif not (type(flat) is np.ndarray and flat.shape == (self.n_params,) and flat.dtype == self.dtype
                  and flat.flags.c_contiguous and flat.flags.writeable):
            raise ValueError(f"flat must be a writeable contiguous 1-D {self.dtype} array of {self.n_params} "
                             f"numbers, got {type(flat).__name__} {getattr(flat, 'dtype', '')} "
                             f"{getattr(flat, 'shape', '')}")
        else:
            self._flat = flat
        self._params = ParamDict(flat_views(self.shapes, self._flat))
        # each layer's 12 parameters in param_shapes' order (in_proj w, b; out_proj w, b; linear1 w, b;
        # linear2 w, b; norm1 w, b; norm2 w, b) for decode_step's hot loop; views, so they follow
        # every in-place update (training, load)
        self._layer_params = [tuple(a for name, a in self.params.items() if name.startswith(f"layers.{i}."))
                              for i in range(config.n_layers)]
        self.rng = np.random.default_rng(seed)  # dropout masks come from here
        if flat is None:
            self._init_weights(np.random.default_rng(seed))

    @property
    def flat(self):
        """All parameters, one 1-D buffer; update it in place (``flat[...] = x``, ``flat += d``)."""
        return self._flat

    @flat.setter
    def flat(self, value):
        if value is not self._flat:  # `model.flat += d` updates in place, then assigns the same array back
            raise AttributeError("model.flat cannot be rebound: write in place, model.flat[...] = x, "
                                 "or use model.load_state_dict(d)")

    @property
    def params(self):
        """Name -> view into ``flat``, read-only as a mapping (see ParamDict)."""
        return self._params

    @params.setter
    def params(self, value):
        if value is not self._params:
            raise AttributeError("model.params cannot be rebound: write in place, model.params[k][...] = arr, "
                                 "or use model.load_state_dict(d)")

    def load_state_dict(self, state):
        """Copy ``state`` (name -> array, exactly the names and shapes of ``params``) into ``flat``, in place.

        Everything is checked before anything is copied (names, shapes, real
        floating dtype, finite values), so a refused state leaves the model as
        it was; a ValueError names the first problem.  Values are cast to the
        model's dtype.  The views, workers and optimizers that read ``flat``
        see the new values, since no array is replaced.
        """
        missing = [k for k in self.shapes if k not in state]
        extra = [k for k in state if k not in self.shapes]
        if missing or extra:
            raise ValueError("state does not match the model: "
                             + (f"missing {', '.join(missing[:3])}" if missing else "")
                             + ("; " if missing and extra else "")
                             + (f"unexpected {', '.join(map(str, extra[:3]))}" if extra else ""))
        arrays = {}
        for k, shape in self.shapes.items():
            a = np.asarray(state[k])
            if a.shape != shape:
                raise ValueError(f"state '{k}' has shape {a.shape}, the model's is {shape}")
            if a.dtype.kind != "f":
                raise ValueError(f"state '{k}' has dtype {a.dtype}, expected a floating type")
            if not np.isfinite(a).all():
                raise ValueError(f"state '{k}' holds NaN or infinite values")
            arrays[k] = a
        for k, a in arrays.items():
            self._params[k][...] = a

    def _init_weights(self, rng):
        """PyTorch's default initialization for each module of the original."""
        C, F = self.config.d_model, self.config.d_ff
        p = self.params

        def uniform(name, bound):
            p[name][...] = rng.uniform(-bound, bound, p[name].shape)

        p["tok_emb.weight"][...] = rng.standard_normal(p["tok_emb.weight"].shape)  # nn.Embedding: N(0,1)
        p["pos_emb.weight"][...] = rng.standard_normal(p["pos_emb.weight"].shape)
        for i in range(self.config.n_layers):
            q = f"layers.{i}."
            uniform(q + "self_attn.in_proj_weight", np.sqrt(6.0 / (C + 3 * C)))  # xavier_uniform
            uniform(q + "self_attn.out_proj.weight", 1 / np.sqrt(C))  # nn.Linear default
            uniform(q + "linear1.weight", 1 / np.sqrt(C))
            uniform(q + "linear1.bias", 1 / np.sqrt(C))
            uniform(q + "linear2.weight", 1 / np.sqrt(F))
            uniform(q + "linear2.bias", 1 / np.sqrt(F))
            p[q + "norm1.weight"][...] = 1.0
            p[q + "norm2.weight"][...] = 1.0
            # in_proj_bias, out_proj.bias and the norm biases stay zero, as in PyTorch
        p["ln.weight"][...] = 1.0
        uniform("head.weight", 1 / np.sqrt(C))

    # ------------------------------------------------------------ forward

    def _check_idx(self, idx):
        idx = np.asarray(idx)
        if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"idx must be a 2-D integer array (B,T), got {idx.dtype} {idx.shape}")
        T = idx.shape[1]
        if not 1 <= T <= self.config.context:
            raise ValueError(f"sequence length {T} must be between 1 and context={self.config.context}")
        if idx.size and (idx.min() < 0 or idx.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got values from "
                             f"{idx.min()} to {idx.max()}")
        return idx

    def _check_cache(self, cache, B):
        c = self.config
        shape = (B, c.n_heads, c.context, c.d_model // c.n_heads)
        if len(cache) != c.n_layers or any(k.shape != shape or v.shape != shape for k, v in cache):
            raise ValueError(f"the KV cache must hold {c.n_layers} (k, v) pairs shaped {shape} "
                             "(model.new_kv_cache)")

    def _block_forward(self, x, i, rng, kv=None, last=False):
        """One encoder layer; returns (out, cache).  rng None means no dropout.

        With ``kv = (k_cache, v_cache, pos)`` (generation) attention reads and
        extends the KV cache instead, and no backward cache is kept.  With
        ``last`` as well, the layer's output is computed for the last position
        alone, (B,1,C) (see forward_cached).
        """
        cfg, p, q, L = self.config, self.params, f"layers.{i}.", self.L
        pd = cfg.dropout if rng is not None else 0.0

        w_attn = (p[q + "self_attn.in_proj_weight"], p[q + "self_attn.in_proj_bias"],
                  p[q + "self_attn.out_proj.weight"], p[q + "self_attn.out_proj.bias"])

        def attn(h):
            if kv is not None:
                return L.attention_cached_forward(h, *w_attn, cfg.n_heads, *kv, last=last), None
            a, ca = L.attention_forward(h, *w_attn, cfg.n_heads, pd, rng)
            a, cd = L.dropout_forward(a, pd, rng)  # dropout1
            return a, (ca, cd)

        def ffn(h):
            f, cf = L.ffn_forward(h, p[q + "linear1.weight"], p[q + "linear1.bias"],
                                  p[q + "linear2.weight"], p[q + "linear2.bias"],
                                  cfg.activation, pd, rng)
            f, cd = L.dropout_forward(f, pd, rng)  # dropout2
            return f, (cf, cd)

        norm1 = (p[q + "norm1.weight"], p[q + "norm1.bias"])
        norm2 = (p[q + "norm2.weight"], p[q + "norm2.bias"])
        if cfg.norm_first:
            h, cn1 = L.layernorm_forward(x, *norm1)
            a, ca = attn(h)
            a += x[:, -1:] if last else x  # x + attn(norm1(x)), summed into attention's fresh output
            x = a
            h, cn2 = L.layernorm_forward(x, *norm2)
            f, cf = ffn(h)
            f += x
            x = f
        else:
            a, ca = attn(x)
            a += x[:, -1:] if last else x  # x + attn(x), summed into attention's fresh output: no new (B,T,C) array
            x, cn1 = L.layernorm_forward(a, *norm1)
            f, cf = ffn(x)
            f += x
            x, cn2 = L.layernorm_forward(f, *norm2)
        return x, (ca, cn1, cf, cn2)

    def _forward(self, idx, rng):
        """Full forward; returns (logits, cache for the backward)."""
        p, L = self.params, self.L
        B, T = idx.shape
        x, c_tok = L.embedding_forward(idx, p["tok_emb.weight"])  # (B,T) -> (B,T,C)
        x = x + p["pos_emb.weight"][:T]  # broadcast over B: position t gets row t
        block_caches = []
        for i in range(self.config.n_layers):
            x, c = self._block_forward(x, i, rng)
            block_caches.append(c)
        x, c_ln = L.layernorm_forward(x, p["ln.weight"], p["ln.bias"])
        logits, c_head = L.linear_forward(x, p["head.weight"])  # (B,T,C) -> (B,T,V)
        return logits, (c_tok, block_caches, c_ln, c_head, T)

    def forward_cached(self, idx, cache, pos, last=False):
        """Logits (B,Tn,V) for tokens idx (B,Tn) at positions pos..pos+Tn-1, using a KV cache.

        ``cache`` is a list of (k, v) arrays per layer, each (B,H,context,D), as
        made by ``new_kv_cache``; positions before pos must already be in it.

        ``last=True`` returns the logits of the last position only, (B,1,V), as
        generation needs after a prompt: every layer still caches the keys and
        values of all Tn tokens, but the last layer's attention output, FFN and
        norms, and the head, run for one position instead of Tn, since nothing
        reads the others (measured: a 64-token prefill 1.40 -> 1.19 ms).
        """
        p, L = self.params, self.L
        idx = self._check_idx(idx)
        Tn, pos = idx.shape[1], _as_int(pos, "pos")
        if not 0 <= pos <= self.config.context - Tn:
            raise ValueError(f"positions {pos}..{pos + Tn - 1} are outside the context 0..{self.config.context - 1}")
        self._check_cache(cache, idx.shape[0])
        x = p["tok_emb.weight"][idx] + p["pos_emb.weight"][pos:pos + Tn]  # (B,Tn) -> (B,Tn,C)
        for i, (k, v) in enumerate(cache):
            x, _ = self._block_forward(x, i, None, kv=(k, v, pos), last=last and i == len(cache) - 1)
        x, _ = L.layernorm_forward(x, p["ln.weight"], p["ln.bias"])
        return L.linear_forward(x, p["head.weight"])[0]  # (B,Tn or 1,C) -> (B,Tn or 1,V)

    def decode_step(self, token, pos, cache):
        """Logits (V,) for one token at position pos of a batch-1 text, reading and extending the KV cache.

        The computation of forward_cached on a (1,1) input, written for one
        C-vector.  Generating a character runs about 110 small NumPy calls
        and a few BLAS matrix-vector products, so the number of calls, not the
        arithmetic, sets the speed: no (B,T) axes, no backward caches, one
        vector layer norm (``_layernorm_vector``) instead of the batched one.
        Shapes: x (C,); q, k, v (H,D); the cache (1,H,context,D) per layer.
        """
        cfg, p = self.config, self.params
        if type(token) is not int or type(pos) is not int:  # the usual case costs two type checks
            token, pos = _as_int(token, "token id"), _as_int(pos, "position")
        if not 0 <= pos < cfg.context:
            raise ValueError(f"position {pos} is outside the context 0..{cfg.context - 1}")
        if not 0 <= token < cfg.vocab_size:
            raise ValueError(f"token id {token} is outside [0, {cfg.vocab_size})")
        if len(cache) != len(self._layer_params):  # zip would silently skip the missing layers
            raise ValueError(f"the KV cache has {len(cache)} layers, the model {len(self._layer_params)}")
        H, C = cfg.n_heads, cfg.d_model
        D, n = C // H, pos + 1
        scale = 1.0 / math.sqrt(D)  # a Python float: q keeps its dtype
        relu = cfg.activation == "relu"  # then in place, without the mask relu_forward keeps for a backward
        ln = _layernorm_vector
        x = p["tok_emb.weight"][token] + p["pos_emb.weight"][pos]  # (C,)
        # overflow in _softmax_rows's unshifted exp is expected and handled there; one errstate for the
        # whole step (entering one costs about as much as a NumPy call).  A real blow-up elsewhere
        # still warns when its infinities turn into NaN ("invalid").
        with np.errstate(over="ignore"):
            for (w_in, b_in, w_out, b_out, w1, b1, w2, b2, n1w, n1b, n2w, n2b), (k_cache, v_cache) in zip(
                    self._layer_params, cache):
                K, V = k_cache[0], v_cache[0]  # (H,context,D)

                h = ln(x, n1w, n1b) if cfg.norm_first else x
                qkv = np.dot(w_in, h)  # (3C,C) @ (C,) -> (3C,)
                qkv += b_in
                q, k, v = qkv.reshape(3, H, D)
                K[:, pos], V[:, pos] = k, v
                q *= scale
                att = np.matmul(K[:, :n], q[:, :, None])[:, :, 0]  # (H,n,D) @ (H,D,1) -> (H,n)
                att = _softmax_rows(att)  # over the n keys; the newest token may see every cached one: no mask
                y = np.matmul(att[:, None, :], V[:, :n])  # (H,1,n) @ (H,n,D) -> (H,1,D)
                a = np.dot(w_out, y.reshape(C))  # heads side by side, (C,C) @ (C,) -> (C,)
                a += b_out
                if cfg.norm_first:
                    x += a  # x is this call's own array (the embedding sum, then these sums)
                else:
                    x = ln(x + a, n1w, n1b)

                h = ln(x, n2w, n2b) if cfg.norm_first else x
                f = np.dot(w1, h)  # (F,C) @ (C,) -> (F,)
                f += b1
                f = np.maximum(f, 0, out=f) if relu else np.multiply(f, L.gelu_gate(f), out=f)  # act(f), in place
                f = np.dot(w2, f)  # (C,F) @ (F,) -> (C,)
                f += b2
                if cfg.norm_first:
                    x += f
                else:
                    x = ln(x + f, n2w, n2b)
        return np.dot(p["head.weight"], ln(x, p["ln.weight"], p["ln.bias"]))  # (V,C) @ (C,) -> (V,)

    def decode_weights(self):
        """A snapshot of the parameters for decode_step_batch, its matrices transposed into contiguous (C,N) copies.

        OpenBLAS multiplies a few rows by a transposed view slowly: (4,128) @ w1.T
        (512,128) took 58 us, by a contiguous copy of w1.T 10.5 us (measured).  A
        snapshot: later changes to the parameters are not seen, so make a new one
        after training steps.

        A layer norm that feeds a matrix has its scale and shift folded into it:
        (xhat * g + s) @ W + c = xhat @ (g[:, None] * W) + (s @ W + c), so the
        norm computes xhat alone (its g and s are None here).  That holds for the
        final norm before the head, and with norm_first for both norms of every
        layer (with post-norm their outputs are the residual stream itself and
        stay as they are).  Against the unfolded snapshot: a character of
        nanoGPT's recipe, 4 streams at positions 0-63, 517 -> 498 us (paired
        ratio 0.97, two runs); the logits agree to float rounding (4e-6 there;
        decode_step_batch is tested against forward).  Attention's 1/sqrt(D)
        is folded the same way into q's columns of the input projection; with
        that, the norms' means as one product and the residual sums in place,
        another 3-5 % (the fastest of 40 rounds in three alternating runs:
        403, 344, 352 -> 393, 327, 328 us).
        """
        p = self.params

        def copy(a):
            return a.T.copy() if a.ndim == 2 else a.copy()

        def fold(g, s, w, c):  # -> (g[:, None] * w, s @ w + c): w a (C,N) copy, c (N,) or None
            return g[:, None] * w, np.dot(s, w) + (0 if c is None else c)

        C = self.config.d_model
        scale = 1.0 / math.sqrt(C // self.config.n_heads)
        layers = []
        for layer in self._layer_params:
            w_in, b_in, w_out, b_out, w1, b1, w2, b2, n1w, n1b, n2w, n2b = (copy(a) for a in layer)
            w_in[:, :C] *= scale  # q / sqrt(D) folded into q's columns of the projection
            b_in[:C] *= scale
            if self.config.norm_first:
                (w_in, b_in), (w1, b1) = fold(n1w, n1b, w_in, b_in), fold(n2w, n2b, w1, b1)
                n1w = n1b = n2w = n2b = None
            layers.append((w_in, b_in, w_out, b_out, w1, b1, w2, b2, n1w, n1b, n2w, n2b))
        head, head_b = fold(p["ln.weight"], p["ln.bias"], copy(p["head.weight"]), None)
        return {"tok_emb": p["tok_emb.weight"].copy(), "pos_emb": p["pos_emb.weight"].copy(),
                "layers": layers, "ln": (None, None), "head": head, "head_bias": head_b}

    def decode_step_batch(self, tokens, pos, cache, weights=None):
        """Logits (B,V) for B tokens (B,), one per stream, all at position pos, reading and extending B caches.

        decode_step for B texts of equal length at once (generate.BatchDecoder:
        samples that share their start): the same math row by row, with the
        matrix-vector products turned into (B,C) @ (C,N) matrix products, so
        one step's ~110 NumPy calls serve B streams instead of one.  ``weights``:
        decode_weights(), made once for many steps (default: made for this call).
        decode_step stays a loop of its own, for one vector: on the shipped model
        a character costs 176 us there against 263 us here with B = 1.
        Shapes: x (B,C); q, k, v (B,H,D); the cache (B,H,context,D) per layer.
        """
        cfg = self.config
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer) or tokens.size == 0:
            raise ValueError(f"tokens must be a non-empty 1-D integer array (B,), got {tokens.dtype} {tokens.shape}")
        B = tokens.shape[0]
        self._check_cache(cache, B)  # B streams, every layer (zip would skip missing ones)
        pos = _as_int(pos, "position")
        if not 0 <= pos < cfg.context:
            raise ValueError(f"position {pos} is outside the context of {cfg.context}")
        if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size})")
        w = self.decode_weights() if weights is None else weights
        H, C = cfg.n_heads, cfg.d_model
        D, n = C // H, pos + 1
        relu = cfg.activation == "relu"
        ln = _layernorm_rows

        x = w["tok_emb"][tokens] + w["pos_emb"][pos]  # (B,) -> (B,C)
        with np.errstate(over="ignore"):  # as in decode_step: _softmax_rows handles its own overflow
            for (w_in, b_in, w_out, b_out, w1, b1, w2, b2, n1w, n1b, n2w, n2b), (K, V) in zip(w["layers"], cache):
                h = ln(x, n1w, n1b) if cfg.norm_first else x
                qkv = np.dot(h, w_in)  # (B,C) @ (C,3C) -> (B,3C)
                qkv += b_in
                q, k, v = qkv.reshape(B, 3, H, D).transpose(1, 0, 2, 3)  # 3 x (B,H,D)
                K[:, :, pos], V[:, :, pos] = k, v  # q is already scaled by 1/sqrt(D) (decode_weights)
                att = np.matmul(K[:, :, :n], q[..., None])[..., 0]  # (B,H,n,D) @ (B,H,D,1) -> (B,H,n)
                att = _softmax_rows(att)  # the newest token may see every cached one: no mask
                y = np.matmul(att[:, :, None, :], V[:, :, :n])  # (B,H,1,n) @ (B,H,n,D) -> (B,H,1,D)
                a = np.dot(y.reshape(B, C), w_out)  # heads side by side, (B,C) @ (C,C) -> (B,C)
                a += b_out
                if cfg.norm_first:
                    x += a  # x is this call's own array (the embedding sum, then these sums)
                else:
                    x = ln(x + a, n1w, n1b)

                h = ln(x, n2w, n2b) if cfg.norm_first else x
                f = np.dot(h, w1)  # (B,C) @ (C,F) -> (B,F)
                f += b1
                f = np.maximum(f, 0, out=f) if relu else np.multiply(f, L.gelu_gate(f), out=f)  # act(f), in place
                f = np.dot(f, w2)  # (B,F) @ (F,C) -> (B,C)
                f += b2
                if cfg.norm_first:
                    x += f
                else:
                    x = ln(x + f, n2w, n2b)
        logits = np.dot(ln(x, *w["ln"]), w["head"])  # (B,C) @ (C,V) -> (B,V)
        logits += w["head_bias"]  # the final norm's shift, folded (decode_weights)
        return logits

    def new_kv_cache(self, batch=1):
        """Empty per-layer (k, v) buffers, (B,H,context,D) each, allocated once."""
        c = self.config
        shape = (batch, c.n_heads, c.context, c.d_model // c.n_heads)
        return [(np.zeros(shape, self.dtype), np.zeros(shape, self.dtype)) for _ in range(c.n_layers)]

    def forward(self, idx):
        """Logits (B,T,V) for integer tokens idx (B,T), evaluation mode (no dropout)."""
        logits, _ = self._forward(self._check_idx(idx), rng=None)
        return logits

    __call__ = forward

    # ----------------------------------------------------------- backward

    def _block_backward(self, dout, i, cache, grads):
        """Backward of one encoder layer; adds its parameter gradients into grads."""
        cfg, q, L = self.config, f"layers.{i}.", self.L
        ca, cn1, cf, cn2 = cache

        def attn_back(da):
            c_att, c_drop = ca
            dx, dwi, dbi, dwo, dbo = L.attention_backward(L.dropout_backward(da, c_drop), c_att)
            grads[q + "self_attn.in_proj_weight"] += dwi
            grads[q + "self_attn.in_proj_bias"] += dbi
            grads[q + "self_attn.out_proj.weight"] += dwo
            grads[q + "self_attn.out_proj.bias"] += dbo
            return dx

        def ffn_back(df):
            c_ffn, c_drop = cf
            dx, dw1, db1, dw2, db2 = L.ffn_backward(L.dropout_backward(df, c_drop), c_ffn)
            grads[q + "linear1.weight"] += dw1
            grads[q + "linear1.bias"] += db1
            grads[q + "linear2.weight"] += dw2
            grads[q + "linear2.bias"] += db2
            return dx

        def norm_back(dy, c, name):
            dx, dw, db = L.layernorm_backward(dy, c)
            grads[q + name + ".weight"] += dw
            grads[q + name + ".bias"] += db
            return dx

        if cfg.norm_first:
            # x2 = x1 + ffn(norm2(x1)):  the residual passes dout straight through (summed into the
            # branch's fresh gradient: no new (B,T,C) array)
            dx1 = norm_back(ffn_back(dout), cn2, "norm2")
            dx1 += dout
            # x1 = x + attn(norm1(x))
            dx = norm_back(attn_back(dx1), cn1, "norm1")
            dx += dx1
            return dx
        # out = norm2(h + ffn(h)):  both paths into h receive d(h + ffn(h))
        ds = norm_back(dout, cn2, "norm2")
        dh = ffn_back(ds)
        dh += ds  # summed into the branch's fresh gradient: no new (B,T,C) array
        # h = norm1(x + attn(x))
        ds = norm_back(dh, cn1, "norm1")
        dx = attn_back(ds)
        dx += ds
        return dx

    def _backward(self, dlogits, cache, grads):
        """The forward read in reverse; adds every parameter's gradient into grads (views like params).

        Returns dx0, the gradient at the first layer's input x0 = tok_emb[idx] + pos_emb (B,T,C).
        """
        c_tok, block_caches, c_ln, c_head, T = cache
        L = self.L
        dx, dhead, _ = L.linear_backward(dlogits, c_head)
        grads["head.weight"] += dhead
        dx, dw, db = L.layernorm_backward(dx, c_ln)
        grads["ln.weight"] += dw
        grads["ln.bias"] += db
        for i in reversed(range(self.config.n_layers)):
            dx = self._block_backward(dx, i, block_caches[i], grads)
        # x = tok_emb[idx] + pos_emb[:T]: the sum sends dx to both terms
        grads["pos_emb.weight"][:T] += dx.sum(axis=0)  # rows past T were not used: no gradient
        grads["tok_emb.weight"] += L.embedding_backward(dx, c_tok)
        return dx

    def _dropout_rng(self, train, rng):
        """The generator dropout draws from, or None for no dropout."""
        if not train or self.config.dropout == 0:
            return None
        return self.rng if rng is None else rng

    def _check_targets(self, idx, targets):
        """targets as an array: integers in [0, V), shaped like idx (no ignore index: -100 is an error)."""
        targets = np.asarray(targets)
        if targets.shape != idx.shape:
            raise ValueError(f"targets shape {targets.shape} != idx shape {idx.shape}")
        if not np.issubdtype(targets.dtype, np.integer):
            raise ValueError(f"targets must be integers, got {targets.dtype}")
        if targets.size and (targets.min() < 0 or targets.max() >= self.config.vocab_size):
            raise ValueError(f"targets must be in [0, {self.config.vocab_size}), got values from "
                             f"{targets.min()} to {targets.max()}")
        return targets

    def loss(self, idx, targets, train=False, rng=None):
        """Mean cross-entropy only (no backward), e.g. for validation."""
        idx = self._check_idx(idx)
        targets = self._check_targets(idx, targets)
        logits, _ = self._forward(idx, self._dropout_rng(train, rng))
        return self.L.cross_entropy_forward(logits, targets)[0]

    def loss_and_grads(self, idx, targets, train=False, rng=None, weight=1.0, grads=None):
        """Mean cross-entropy of next-token targets and its gradient for every parameter.

        idx, targets: int (B,T).  train=True applies dropout with masks drawn from
        ``rng`` (default: the model's own generator, seeded at construction), so a
        fixed generator state gives a fixed mask.  train=False (the default) is
        deterministic.  Returns (loss: float, grads: dict name -> array shaped like
        params); the gradient arrays are views into one fresh flat buffer, laid out
        exactly like ``model.flat``.

        For gradient accumulation (parallel.py): the gradient returned is that of
        ``weight`` x loss (the loss itself is returned unweighted), and with
        ``grads``, a dict like the one returned, it is added into those arrays
        instead of a fresh buffer -- no extra pass over the 626,560 numbers.

        Speed: this runs the whole batch in one process.  For training, use
        ``parallel.DataParallel(model)``, the same contract on cache-sized
        micro-batches over all cores, which train.py uses (the benchmark's
        "library" line measures both against PyTorch).
        """
        idx = self._check_idx(idx)
        targets = self._check_targets(idx, targets)
        logits, cache = self._forward(idx, self._dropout_rng(train, rng))
        loss, c_ce = self.L.cross_entropy_forward(logits, targets)
        if grads is None:
            grads = flat_views(self.shapes, np.zeros_like(self.flat))
        self._backward(self.L.cross_entropy_backward(weight, c_ce), cache, grads)
        return loss, grads

    def input_grad(self, idx, dlogits):
        """d(sum(dlogits * logits)) / d x0 (B,T,C), x0 = tok_emb[idx] + pos_emb, evaluation mode.

        The hand-written backward run down to the first layer's input; with
        dlogits = d loss_p / d logits it gives d loss_p / d x0 (inspect.py's saliency).
        """
        logits, cache = self._forward(self._check_idx(idx), rng=None)
        return self._backward(dlogits.astype(self.dtype, copy=False), cache,
                              flat_views(self.shapes, np.zeros_like(self.flat)))

    # ---------------------------------------------------------- save/load

    def save(self, path):
        """Write an .npz: one array per parameter plus JSON config and vocabulary (read by weights.load_model).

        Written to a temporary file beside ``path`` and moved into place with
        os.replace, so an interrupted save never damages an existing file.
        """
        arrays = dict(self.params)
        arrays["__config__"] = np.array(json.dumps(dataclasses.asdict(self.config)))
        if self.chars is not None:
            arrays["__chars__"] = np.array(json.dumps(self.chars))
        atomic_savez(path, arrays)
