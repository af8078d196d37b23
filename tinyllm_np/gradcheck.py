"""Finite-difference gradient checks for every layer and for the whole model.

    python -m tinyllm_np.gradcheck              # every check, as a table
    python -m tinyllm_np.gradcheck --layer ref_attention
    python -m tinyllm_np.gradcheck --list
    python -m tinyllm_np.gradcheck --break layernorm_variance    # a mistake on purpose: watch it fail
    python -m tinyllm_np.gradcheck --break list                  # the mistakes on offer

Both engines are checked: the checks named ref_* run the layers of
reference.py (what a learner reads), the others those of layers.py (what
training runs); ref_model_* and model_* run the whole model on each engine.

How a check works: for an op y = f(x, w, ...) pick a fixed random G shaped like y
and define the scalar L = sum(G * y), so dL/dy = G.  The hand-written backward,
fed G, gives dL/dx.  Central differences give the same thing numerically:

    dL/dx[i] ~ (L(x + h e_i) - L(x - h e_i)) / (2h)      error O(h^2)

Everything runs in float64 with h = 1e-6.  Two errors are reported for each
gradient array, with a = analytic (the hand-written backward) and n = numeric:

* rel. error: norm-wise, over the whole array -- the pass/fail criterion:

      ||a - n||_2 / (||a||_2 + ||n||_2)          pass below 1e-7

* max rel. error: the largest per-entry relative error -- shown, not judged:

      max_i |a_i - n_i| / max(|a_i| + |n_i|, floor),
      floor = 1e-3 * max_j (|a_j| + |n_j|)

  The floor keeps entries whose true gradient is ~0 (where a and n are both
  rounding noise) from reporting a meaningless error near 1; an entry smaller
  than 1/1000 of the array's largest is measured against that floor instead.
  The value lies in [0, 1]: 0 is exact agreement, ~1 means some entry has the
  wrong sign or is missing.  It points at a backward that is wrong in a few
  entries only, which the norm-wise error can dilute.

Dropout is checked under a fixed mask: every evaluation draws its mask from a
generator re-seeded to the same state.

``--break NAME`` swaps a wrong backward (see BREAKS: each is written out, with
the right line beside it in a comment) into the reference engine for one run
of the checks that should catch it; the table shows which gradients the
mistake spoils and which it leaves alone.
"""

import functools
import sys
from typing import NamedTuple

import numpy as np

from . import layers as L
from . import reference as R
from .cli import OneLineParser
from .model import Config, TinyLLM

H_STEP = 1e-6
TOLERANCE = 1e-7  # on the norm-wise relative error
ENTRY_FLOOR = 1e-3  # per-entry denominators are at least this fraction of the array's largest |a| + |n|


def numeric_grad(f, x, h=H_STEP):
    """Central-difference gradient of the scalar function f() with respect to array x.

    x is perturbed in place one entry at a time and always restored.
    """
    grad = np.zeros_like(x)
    flat_x, flat_g = x.reshape(-1), grad.reshape(-1)  # views: writes reach x and grad
    for i in range(flat_x.size):
        old = flat_x[i]
        flat_x[i] = old + h
        fp = f()
        flat_x[i] = old - h
        fm = f()
        flat_x[i] = old
        flat_g[i] = (fp - fm) / (2 * h)
    return grad


def rel_error(a, b):
    """||a - b|| / (||a|| + ||b||), 0 when both are zero.  The pass/fail criterion."""
    den = np.linalg.norm(a) + np.linalg.norm(b)
    return 0.0 if den == 0 else float(np.linalg.norm(a - b) / den)


def max_entry_error(a, b, floor=ENTRY_FLOOR):
    """max_i |a_i - b_i| / max(|a_i| + |b_i|, floor * max_j (|a_j| + |b_j|)), 0 when both are zero.

    The largest per-entry relative error, with entries far below the array's
    largest measured against a floor so that gradients that are ~0 in both a
    and b (rounding noise) do not count.  Always in [0, 1].
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    size = np.abs(a) + np.abs(b)
    top = size.max(initial=0.0)
    if top == 0:
        return 0.0
    return float(np.max(np.abs(a - b) / np.maximum(size, floor * top)))


class GradError(NamedTuple):
    """How far a hand-written gradient is from the numeric one (see the module docstring)."""

    rel: float  # norm-wise relative error: the pass/fail criterion
    max_entry: float  # largest per-entry relative error, floored: informational

    @property
    def ok(self):
        return self.rel < TOLERANCE


def compare(analytic, numeric):
    return GradError(rel_error(analytic, numeric), max_entry_error(analytic, numeric))


def check_op(forward, backward, arrays, seed=0):
    """Compare backward against finite differences for every array in ``arrays``.

    forward(arrays) -> (out, cache); backward(G, cache) -> {name: dL/d arrays[name]}.
    Returns {name: GradError}.
    """
    out, cache = forward(arrays)
    G = np.random.default_rng(seed + 1).standard_normal(np.shape(out))
    analytic = backward(G, cache)

    def loss():
        return float(np.sum(forward(arrays)[0] * G))

    return {name: compare(analytic[name], numeric_grad(loss, arrays[name])) for name in analytic}


# ------------------------------------------------------------------ cases
# Each case builds small float64 inputs and returns check_op's result.  ``lib`` is the engine whose
# layers it checks: layers (fast, what training runs) or reference (what a learner reads).  The
# backward is looked up when the case runs, so a --break (below) reaches it.

def _rand(rng, *shape):
    return rng.standard_normal(shape)


def case_embedding(seed=0, backward=None, lib=L):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, 5, (3, 4))  # (B,T), with repeated tokens
    arrays = {"weight": _rand(rng, 5, 6)}
    backward = backward or lib.embedding_backward
    return check_op(lambda a: lib.embedding_forward(idx, a["weight"]),
                    lambda G, c: {"weight": backward(G, c)}, arrays, seed)


def case_linear(seed=0, backward=None, lib=L):
    rng = np.random.default_rng(seed)
    arrays = {"x": _rand(rng, 2, 3, 4), "weight": _rand(rng, 5, 4), "bias": _rand(rng, 5)}
    backward = backward or lib.linear_backward
    return check_op(lambda a: lib.linear_forward(a["x"], a["weight"], a["bias"]),
                    lambda G, c: dict(zip(("x", "weight", "bias"), backward(G, c))), arrays, seed)


def case_layernorm(seed=0, backward=None, lib=L):
    rng = np.random.default_rng(seed)
    arrays = {"x": _rand(rng, 2, 3, 6), "weight": _rand(rng, 6), "bias": _rand(rng, 6)}
    backward = backward or lib.layernorm_backward
    return check_op(lambda a: lib.layernorm_forward(a["x"], a["weight"], a["bias"]),
                    lambda G, c: dict(zip(("x", "weight", "bias"), backward(G, c))), arrays, seed)


def _case_activation(fwd, bwd, seed):
    rng = np.random.default_rng(seed)
    arrays = {"x": _rand(rng, 3, 7)}
    return check_op(lambda a: fwd(a["x"]), lambda G, c: {"x": bwd(G, c)}, arrays, seed)


def case_relu(seed=0, backward=None, lib=L):
    """relu_forward/relu_backward, the ReLU ffn_forward runs (decode_step's np.maximum is tested equal to forward)."""
    return _case_activation(lib.relu_forward, backward or lib.relu_backward, seed)  # looked up now: a patch is seen


def case_gelu(seed=0, backward=None, lib=L):
    return _case_activation(lib.gelu_forward, backward or lib.gelu_backward, seed)


def case_softmax(seed=0, backward=None, lib=R):
    """The reference's softmax pair (the fast engine's backward lives inside attention_backward)."""
    return _case_activation(lib.softmax_forward, backward or lib.softmax_backward, seed)


def case_dropout(seed=0, backward=None, lib=L):
    rng = np.random.default_rng(seed)
    arrays = {"x": _rand(rng, 4, 8)}
    fwd = lambda a: lib.dropout_forward(a["x"], 0.3, np.random.default_rng(seed + 7))  # noqa: E731
    backward = backward or lib.dropout_backward
    return check_op(fwd, lambda G, c: {"x": backward(G, c)}, arrays, seed)


def case_attention(seed=0, backward=None, p_drop=0.2, lib=L):
    rng = np.random.default_rng(seed)
    B, T, C, H = 2, 5, 8, 2
    arrays = {"x": _rand(rng, B, T, C), "in_proj_weight": _rand(rng, 3 * C, C) * 0.5,
              "in_proj_bias": _rand(rng, 3 * C), "out_proj.weight": _rand(rng, C, C),
              "out_proj.bias": _rand(rng, C)}
    backward = backward or lib.attention_backward

    def fwd(a):
        drop_rng = np.random.default_rng(seed + 7) if p_drop else None
        return lib.attention_forward(a["x"], a["in_proj_weight"], a["in_proj_bias"],
                                     a["out_proj.weight"], a["out_proj.bias"], H, p_drop, drop_rng)

    names = ("x", "in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
    return check_op(fwd, lambda G, c: dict(zip(names, backward(G, c))), arrays, seed)


def _case_ffn(activation, seed, backward, lib):
    rng = np.random.default_rng(seed)
    arrays = {"x": _rand(rng, 2, 3, 4), "linear1.weight": _rand(rng, 6, 4), "linear1.bias": _rand(rng, 6),
              "linear2.weight": _rand(rng, 4, 6), "linear2.bias": _rand(rng, 4)}
    backward = backward or lib.ffn_backward

    def fwd(a):
        return lib.ffn_forward(a["x"], a["linear1.weight"], a["linear1.bias"], a["linear2.weight"],
                               a["linear2.bias"], activation, 0.2, np.random.default_rng(seed + 7))

    names = ("x", "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias")
    return check_op(fwd, lambda G, c: dict(zip(names, backward(G, c))), arrays, seed)


def case_ffn_relu(seed=0, backward=None, lib=L):
    return _case_ffn("relu", seed, backward, lib)


def case_ffn_gelu(seed=0, backward=None, lib=L):
    return _case_ffn("gelu", seed, backward, lib)


def case_cross_entropy(seed=0, backward=None, lib=L):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 7, (3, 4))
    arrays = {"logits": _rand(rng, 3, 4, 7) * 2}
    backward = backward or lib.cross_entropy_backward
    return check_op(lambda a: lib.cross_entropy_forward(a["logits"], targets),
                    lambda G, c: {"logits": backward(float(G), c)}, arrays, seed)


SMALL = dict(vocab_size=11, d_model=8, n_layers=2, n_heads=2, d_ff=16, context=8, dropout=0.2)


def check_model(norm_first=False, activation="relu", dropout=True, seed=0, engine="fast"):
    """Whole-model check on a small float64 TinyLLM: every parameter, every entry.

    The loss is the model's mean cross-entropy, dL/dloss = 1.
    """
    cfg = Config(**SMALL, norm_first=norm_first, activation=activation)
    model = TinyLLM(cfg, seed=seed, dtype=np.float64, engine=engine)
    rng = np.random.default_rng(seed)
    # Scale the weights up a little so every path carries a gradient of a size
    # finite differences resolve well (the init keeps some tiny on purpose).
    model.flat += 0.1 * rng.standard_normal(model.flat.shape)
    idx = rng.integers(0, cfg.vocab_size, (2, 6))
    targets = rng.integers(0, cfg.vocab_size, (2, 6))

    def drop_rng():
        return np.random.default_rng(seed + 7)  # the same masks at every evaluation

    _, grads = model.loss_and_grads(idx, targets, train=dropout, rng=drop_rng())
    loss = lambda: model.loss(idx, targets, train=dropout, rng=drop_rng())  # noqa: E731
    return {name: compare(grads[name], numeric_grad(loss, p)) for name, p in model.params.items()}


def _model_case(norm_first, activation, engine):
    return lambda seed=0: check_model(norm_first, activation, dropout=True, seed=seed, engine=engine)


_LAYER_CASES = {"embedding": case_embedding, "linear": case_linear, "layernorm": case_layernorm,
                "relu": case_relu, "gelu": case_gelu, "dropout": case_dropout, "attention": case_attention,
                "ffn_relu": case_ffn_relu, "ffn_gelu": case_ffn_gelu, "cross_entropy": case_cross_entropy}
_MODELS = {"model_postnorm_relu": (False, "relu"), "model_postnorm_gelu": (False, "gelu"),
           "model_prenorm_relu": (True, "relu"), "model_prenorm_gelu": (True, "gelu")}

# name -> check.  ref_*: the reference engine (reference.py, what a learner reads); the others: the
# fast engine (layers.py, what training runs).  Both run by default.
CASES = {"ref_" + name: functools.partial(case, lib=R) for name, case in _LAYER_CASES.items()}
CASES["ref_softmax"] = case_softmax
CASES.update({"ref_" + name: _model_case(*m, "reference") for name, m in _MODELS.items()})
CASES.update(_LAYER_CASES)
CASES.update({name: _model_case(*m, "fast") for name, m in _MODELS.items()})


# ------------------------------------------------------------------ breaks
# A mistake put into the reference's backward on purpose, to see what each term is for:
# ``python -m tinyllm_np.gradcheck --break NAME``.  Each is a wrong backward written out beside the
# right one's docstring; the run swaps it in for its checks alone.

_right = {name: getattr(R, name) for name in ("linear_backward", "layernorm_backward", "attention_backward")}


def _embedding_backward_fancy_index(dout, cache):
    """dW[idx] += dout: NumPy's fancy-index assignment keeps one of each repeated token's rows."""
    idx, shape = cache
    dW = np.zeros(shape, dtype=dout.dtype)
    dW[idx] += dout  # right: np.add.at(dW, idx, dout)
    return dW


def _linear_backward_bias_mean(dout, cache):
    """db = mean of dout over positions: the bias is used at every position, so its gradient is the sum."""
    dx, dw, _ = _right["linear_backward"](dout, cache)
    return dx, dw, dout.reshape(-1, dout.shape[-1]).mean(axis=0)  # right: .sum(axis=0)


def _layernorm_backward_no_variance(dout, cache):
    """dx = rstd * (g - mean(g)): the path through var, - xhat * mean(g * xhat), forgotten."""
    _, dw, db = _right["layernorm_backward"](dout, cache)
    xhat, rstd, w = cache
    g = dout * w
    return rstd * (g - g.mean(axis=-1, keepdims=True)), dw, db


def _layernorm_backward_no_mean(dout, cache):
    """dx = rstd * (g - xhat * mean(g * xhat)): the path through mu, - mean(g), forgotten."""
    _, dw, db = _right["layernorm_backward"](dout, cache)
    xhat, rstd, w = cache
    g = dout * w
    return rstd * (g - xhat * (g * xhat).mean(axis=-1, keepdims=True)), dw, db


def _softmax_backward_diagonal(dout, cache):
    """dx_i = dout_i * y_i (1 - y_i): only the Jacobian's diagonal, as if y_i depended on x_i alone."""
    y = cache
    return dout * y * (1 - y)  # right: y * (dout - sum_i dout_i y_i)


def _dropout_backward_no_mask(dout, cache):
    """dx = dout / keep_prob(p): the scale kept, the mask forgotten, so dropped entries get gradient."""
    if cache is None:
        return dout
    _, p = cache
    return dout / R.keep_prob(p)  # right: dout * mask / keep_prob(p)


def _attention_backward_no_scale(dout, cache):
    """dq = dS @ k, dk = dS^T @ q: the forward's 1/sqrt(D) in S = q k^T / sqrt(D) left out."""
    c_in, q, k, v, scale, *rest = cache
    return _right["attention_backward"](dout, (c_in, q, k, v, 1.0, *rest))  # the backward's scale: 1


def _cross_entropy_backward_no_minus_one(dloss, cache):
    """dz = softmax(z) / N: the - onehot(target), the log's own derivative, forgotten."""
    probs, t, shape = cache
    return (dloss / probs.shape[0] * probs).reshape(shape)  # right: probs - onehot(t)


def _gelu_backward_half_product_rule(dout, cache):
    """dy/dx = 0.5 (1 + t): the product rule's other half, 0.5 x dt/dx, forgotten."""
    _, t = cache
    return dout * 0.5 * (1 + t)


def _block_backward_no_ffn_residual(model, dout, i, cache, grads):
    """dh = ffn_back(ds), without + ds: the FFN's skip connection forgotten in a post-norm layer's backward.

    TinyLLM._block_backward written out for post-norm: out = norm2(h + ffn(h))
    sends ds to the FFN and, through the skip connection, straight to h.
    """
    assert not model.config.norm_first, "written for post-norm"
    E, q = model.L, f"layers.{i}."
    (c_att, c_drop1), cn1, (c_ffn, c_drop2), cn2 = cache
    ds, *g_norm2 = E.layernorm_backward(dout, cn2)
    dh, *g_ffn = E.ffn_backward(E.dropout_backward(ds, c_drop2), c_ffn)  # right: dh = dh + ds
    ds, *g_norm1 = E.layernorm_backward(dh, cn1)
    dx, *g_attn = E.attention_backward(E.dropout_backward(ds, c_drop1), c_att)
    names = ("norm2.weight", "norm2.bias", "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias",
             "norm1.weight", "norm1.bias", "self_attn.in_proj_weight", "self_attn.in_proj_bias",
             "self_attn.out_proj.weight", "self_attn.out_proj.bias")
    for name, g in zip(names, g_norm2 + g_ffn + g_norm1 + g_attn):
        grads[q + name] += g
    return dx + ds  # the attention's residual is kept


# name -> (checks to run, object, attribute replaced for the run, the mistake)
BREAKS = {
    "embedding_duplicates": (("ref_embedding",), R, "embedding_backward", _embedding_backward_fancy_index),
    "linear_bias_mean": (("ref_linear",), R, "linear_backward", _linear_backward_bias_mean),
    "layernorm_variance": (("ref_layernorm",), R, "layernorm_backward", _layernorm_backward_no_variance),
    "layernorm_mean": (("ref_layernorm",), R, "layernorm_backward", _layernorm_backward_no_mean),
    "gelu_product_rule": (("ref_gelu",), R, "gelu_backward", _gelu_backward_half_product_rule),
    "softmax_diagonal": (("ref_softmax", "ref_attention"), R, "softmax_backward", _softmax_backward_diagonal),
    "dropout_mask": (("ref_dropout", "ref_ffn_relu"), R, "dropout_backward", _dropout_backward_no_mask),
    "attention_scale": (("ref_attention",), R, "attention_backward", _attention_backward_no_scale),
    "cross_entropy_minus_one": (("ref_cross_entropy",), R, "cross_entropy_backward",
                                _cross_entropy_backward_no_minus_one),
    "residual": (("ref_model_postnorm_relu",), TinyLLM, "_block_backward", _block_backward_no_ffn_residual),
}


def describe_break(name):
    """The mistake's one-line explanation: its function's docstring, first line."""
    return BREAKS[name][3].__doc__.strip().splitlines()[0]


def run_broken(name, seed=0):
    """{check: {parameter: GradError}} with the mistake ``name`` swapped in for these checks only."""
    checks, owner, attr, wrong = BREAKS[name]
    right = getattr(owner, attr)
    setattr(owner, attr, wrong)
    try:
        return {check: CASES[check](seed=seed) for check in checks}
    finally:
        setattr(owner, attr, right)


def summary(n, failed, worst_rel, worst_entry):
    """The verdict line: how many failed, against what bound."""
    verdict = (f"{failed} of {n} gradients failed the check (pass means rel. error < {TOLERANCE:g})" if failed
               else f"all {n} gradients pass (rel. error < {TOLERANCE:g})")
    return f"{verdict}; largest rel. error {worst_rel:.2e}, largest max rel. error {worst_entry:.2e}"


def main(argv=None):
    ap = OneLineParser(prog="python -m tinyllm_np.gradcheck", description=__doc__.split("\n\n")[0])
    ap.add_argument("--layer", action="append", metavar="NAME",
                    help="run only this check (repeatable); see --list")
    ap.add_argument("--list", action="store_true", help="list the check names and exit")
    ap.add_argument("--break", dest="breaks", metavar="NAME",
                    help="put the named mistake into the reference's backward and run the checks that should "
                         "catch it (exit 0 if they do); '--break list' lists the mistakes")
    ap.add_argument("--seed", type=int, default=0)
    args, code = ap.parse_or_code(argv)
    if args is None:
        return code
    if args.list:
        print("\n".join(CASES))
        return 0
    if args.breaks == "list":
        width = max(map(len, BREAKS))
        for name in BREAKS:
            print(f"{name:<{width}}  {describe_break(name)}")
        return 0
    if args.breaks is not None and args.breaks not in BREAKS:
        return _usage_error(f"unknown mistake {args.breaks!r}; choose from: {', '.join(BREAKS)}")
    if args.breaks is not None and args.layer:
        return _usage_error("--break runs its own checks; drop --layer")
    names = args.layer or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        return _usage_error(f"unknown check {unknown[0]!r}; choose from: {', '.join(CASES)}")
    print(f"Gradient checks: hand-written backward (a) vs central differences (n), float64, h = {H_STEP:g}")
    print(f"  rel. error     = ||a - n|| / (||a|| + ||n||) over the whole array; pass if < {TOLERANCE:g}")
    print("  max rel. error = max_i |a_i - n_i| / max(|a_i| + |n_i|, floor), per entry; shown, not judged")
    print(f"                   floor = {ENTRY_FLOOR:g} * max_j (|a_j| + |n_j|): entries ~0 in both do not count")
    if args.breaks is not None:
        print(f"  broken on purpose ({args.breaks}): {describe_break(args.breaks)}")
    print()
    row = "{:<24} {:<36} {:>10} {:>14}  {}"
    print(row.format("layer", "parameter", "rel. error", "max rel. error", "pass/fail"))
    print(row.format("-" * 24, "-" * 36, "-" * 10, "-" * 14, "-" * 9))
    if args.breaks is not None:
        runs = run_broken(args.breaks, args.seed).items()
    else:
        runs = ((name, CASES[name](seed=args.seed)) for name in names)  # one at a time: the table grows as it runs
    n = failed = 0
    worst_rel = worst_entry = 0.0
    for name, errors in runs:
        for param, err in errors.items():
            n += 1
            failed += not err.ok
            worst_rel, worst_entry = max(worst_rel, err.rel), max(worst_entry, err.max_entry)
            print(row.format(name, param, f"{err.rel:.2e}", f"{err.max_entry:.2e}", "pass" if err.ok else "FAIL"),
                  flush=True)
    print()
    print(summary(n, failed, worst_rel, worst_entry))
    if args.breaks is not None:
        print("the check caught the mistake" if failed else "the mistake went unnoticed: the check is too weak")
        return 0 if failed else 1
    return 1 if failed else 0


def _usage_error(msg):
    print(f"gradcheck: error: {msg}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
