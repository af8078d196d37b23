"""Finite-difference gradient checks for every layer and for the whole model.

    python -m tinyllm_np.gradcheck              # every check, as a table
    python -m tinyllm_np.gradcheck --layer attention
    python -m tinyllm_np.gradcheck --list

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
"""

import sys
from typing import NamedTuple

import numpy as np

from . import layers as L
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
# Each case builds small float64 inputs and returns check_op's result.

def _rand(rng, *shape):
    return rng.standard_normal(shape)


def case_embedding(seed=0, backward=L.embedding_backward):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, 5, (3, 4))  # (B,T), with repeated tokens
    arrays = {"weight": _rand(rng, 5, 6)}
    return check_op(lambda a: L.embedding_forward(idx, a["weight"]),
                    lambda G, c: {"weight": backward(G, c)}, arrays, seed)


def case_linear(seed=0, backward=L.linear_backward):
    rng = np.random.default_rng(seed)
    arrays = {"x": _rand(rng, 2, 3, 4), "weight": _rand(rng, 5, 4), "bias": _rand(rng, 5)}
    return check_op(lambda a: L.linear_forward(a["x"], a["weight"], a["bias"]),
                    lambda G, c: dict(zip(("x", "weight", "bias"), backward(G, c))), arrays, seed)


def case_layernorm(seed=0, backward=L.layernorm_backward):
    rng = np.random.default_rng(seed)
    arrays = {"x": _rand(rng, 2, 3, 6), "weight": _rand(rng, 6), "bias": _rand(rng, 6)}
    return check_op(lambda a: L.layernorm_forward(a["x"], a["weight"], a["bias"]),
                    lambda G, c: dict(zip(("x", "weight", "bias"), backward(G, c))), arrays, seed)


def _case_activation(fwd, bwd, seed):
    rng = np.random.default_rng(seed)
    arrays = {"x": _rand(rng, 3, 7)}
    return check_op(lambda a: fwd(a["x"]), lambda G, c: {"x": bwd(G, c)}, arrays, seed)


def case_relu(seed=0, backward=None):
    """relu_forward/relu_backward, the ReLU ffn_forward runs (decode_step's np.maximum is tested equal to forward)."""
    return _case_activation(L.relu_forward, backward or L.relu_backward, seed)  # looked up now: a patch is seen


def case_gelu(seed=0, backward=None):
    return _case_activation(L.gelu_forward, backward or L.gelu_backward, seed)


def case_dropout(seed=0, backward=L.dropout_backward):
    rng = np.random.default_rng(seed)
    arrays = {"x": _rand(rng, 4, 8)}
    fwd = lambda a: L.dropout_forward(a["x"], 0.3, np.random.default_rng(seed + 7))  # noqa: E731
    return check_op(fwd, lambda G, c: {"x": backward(G, c)}, arrays, seed)


def case_attention(seed=0, backward=L.attention_backward, p_drop=0.2):
    rng = np.random.default_rng(seed)
    B, T, C, H = 2, 5, 8, 2
    arrays = {"x": _rand(rng, B, T, C), "in_proj_weight": _rand(rng, 3 * C, C) * 0.5,
              "in_proj_bias": _rand(rng, 3 * C), "out_proj.weight": _rand(rng, C, C),
              "out_proj.bias": _rand(rng, C)}

    def fwd(a):
        drop_rng = np.random.default_rng(seed + 7) if p_drop else None
        return L.attention_forward(a["x"], a["in_proj_weight"], a["in_proj_bias"],
                                   a["out_proj.weight"], a["out_proj.bias"], H, p_drop, drop_rng)

    names = ("x", "in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
    return check_op(fwd, lambda G, c: dict(zip(names, backward(G, c))), arrays, seed)


def _case_ffn(activation, seed, backward):
    rng = np.random.default_rng(seed)
    arrays = {"x": _rand(rng, 2, 3, 4), "linear1.weight": _rand(rng, 6, 4), "linear1.bias": _rand(rng, 6),
              "linear2.weight": _rand(rng, 4, 6), "linear2.bias": _rand(rng, 4)}

    def fwd(a):
        return L.ffn_forward(a["x"], a["linear1.weight"], a["linear1.bias"], a["linear2.weight"],
                             a["linear2.bias"], activation, 0.2, np.random.default_rng(seed + 7))

    names = ("x", "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias")
    return check_op(fwd, lambda G, c: dict(zip(names, backward(G, c))), arrays, seed)


def case_ffn_relu(seed=0, backward=L.ffn_backward):
    return _case_ffn("relu", seed, backward)


def case_ffn_gelu(seed=0, backward=L.ffn_backward):
    return _case_ffn("gelu", seed, backward)


def case_cross_entropy(seed=0, backward=L.cross_entropy_backward):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 7, (3, 4))
    arrays = {"logits": _rand(rng, 3, 4, 7) * 2}
    return check_op(lambda a: L.cross_entropy_forward(a["logits"], targets),
                    lambda G, c: {"logits": backward(float(G), c)}, arrays, seed)


SMALL = dict(vocab_size=11, d_model=8, n_layers=2, n_heads=2, d_ff=16, context=8, dropout=0.2)


def check_model(norm_first=False, activation="relu", dropout=True, seed=0):
    """Whole-model check on a small float64 TinyLLM: every parameter, every entry.

    The loss is the model's mean cross-entropy, dL/dloss = 1.
    """
    cfg = Config(**SMALL, norm_first=norm_first, activation=activation)
    model = TinyLLM(cfg, seed=seed, dtype=np.float64)
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


def _model_case(norm_first, activation):
    return lambda seed=0: check_model(norm_first, activation, dropout=True, seed=seed)


CASES = {
    "embedding": case_embedding,
    "linear": case_linear,
    "layernorm": case_layernorm,
    "relu": case_relu,
    "gelu": case_gelu,
    "dropout": case_dropout,
    "attention": case_attention,
    "ffn_relu": case_ffn_relu,
    "ffn_gelu": case_ffn_gelu,
    "cross_entropy": case_cross_entropy,
    "model_postnorm_relu": _model_case(False, "relu"),
    "model_postnorm_gelu": _model_case(False, "gelu"),
    "model_prenorm_relu": _model_case(True, "relu"),
    "model_prenorm_gelu": _model_case(True, "gelu"),
}


def main(argv=None):
    ap = OneLineParser(prog="python -m tinyllm_np.gradcheck", description=__doc__.split("\n\n")[0])
    ap.add_argument("--layer", action="append", metavar="NAME",
                    help="run only this check (repeatable); see --list")
    ap.add_argument("--list", action="store_true", help="list the check names and exit")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(CASES))
        return 0
    names = args.layer or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"gradcheck: unknown check {unknown[0]!r}; choose from: {', '.join(CASES)}", file=sys.stderr)
        return 2
    print(f"Gradient checks: hand-written backward (a) vs central differences (n), float64, h = {H_STEP:g}")
    print(f"  rel. error     = ||a - n|| / (||a|| + ||n||) over the whole array; pass if < {TOLERANCE:g}")
    print("  max rel. error = max_i |a_i - n_i| / max(|a_i| + |n_i|, floor), per entry; shown, not judged")
    print(f"                   floor = {ENTRY_FLOOR:g} * max_j (|a_j| + |n_j|): entries ~0 in both do not count")
    print()
    row = "{:<22} {:<36} {:>10} {:>14}  {}"
    print(row.format("layer", "parameter", "rel. error", "max rel. error", "pass/fail"))
    print(row.format("-" * 22, "-" * 36, "-" * 10, "-" * 14, "-" * 9))
    n = failed = 0
    worst_rel = worst_entry = 0.0
    for name in names:
        for param, err in CASES[name](seed=args.seed).items():
            n += 1
            failed += not err.ok
            worst_rel, worst_entry = max(worst_rel, err.rel), max(worst_entry, err.max_entry)
            print(row.format(name, param, f"{err.rel:.2e}", f"{err.max_entry:.2e}", "pass" if err.ok else "FAIL"),
                  flush=True)
    print()
    verdict = f"{failed} of {n} gradients FAILED" if failed else f"all {n} gradients pass"
    print(f"{verdict} (rel. error < {TOLERANCE:g}); largest rel. error {worst_rel:.2e}, "
          f"largest max rel. error {worst_entry:.2e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
