"""Finite-difference gradient checks: every layer and the whole model on both engines, and proof the checks can fail."""

import numpy as np
import pytest

from tinyllm_np import gradcheck as gc
from tinyllm_np import layers as L
from tinyllm_np import reference as R

LAYER_CASES = [n for n in gc.CASES if "model_" not in n]
MODEL_CASES = [n for n in gc.CASES if "model_" in n]


def test_both_engines_are_checked():
    assert {"attention", "ref_attention", "ref_softmax", "model_postnorm_relu", "ref_model_postnorm_relu"} <= set(gc.CASES)
    for name in gc.CASES:
        if not name.startswith("ref_") and name != "ref_softmax":
            assert "ref_" + name in gc.CASES, name  # every fast check has its reference twin


@pytest.mark.parametrize("name", LAYER_CASES)
def test_layer_gradients_match_finite_differences(name):
    errors = gc.CASES[name]()
    assert errors, "the check compared nothing"
    for param, err in errors.items():
        assert err.ok and err.rel < gc.TOLERANCE, f"{name}/{param}: relative error {err.rel:.2e}"
        assert err.max_entry < 1e-4, f"{name}/{param}: max per-entry relative error {err.max_entry:.2e}"


@pytest.mark.parametrize("name", MODEL_CASES)
def test_model_gradients_match_finite_differences(name):
    errors = gc.CASES[name]()
    assert len(errors) == len(gc.Config(**gc.SMALL).param_shapes())  # every parameter checked
    for param, err in errors.items():
        assert err.ok and err.rel < gc.TOLERANCE, f"{name}/{param}: relative error {err.rel:.2e}"
        assert err.max_entry < 1e-4, f"{name}/{param}: max per-entry relative error {err.max_entry:.2e}"


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_model_gradients_without_dropout(engine):
    for param, err in gc.check_model(dropout=False, seed=3, engine=engine).items():
        assert err.rel < gc.TOLERANCE, f"{param}: relative error {err.rel:.2e}"


def test_numeric_grad_of_known_function():
    x = np.array([1.0, -2.0, 0.5])
    g = gc.numeric_grad(lambda: float(np.sum(x ** 3)), x)
    np.testing.assert_allclose(g, 3 * x ** 2, rtol=1e-8)
    np.testing.assert_array_equal(x, [1.0, -2.0, 0.5])  # restored


def test_max_entry_error_definition():
    a = np.array([[1.0, -2.0], [0.5, 4.0]])
    n = np.array([[1.1, -2.0], [0.5, 3.0]])
    # per entry |a-n| / max(|a|+|n|, 1e-3 * 7.0): 0.1/2.1, 0, 0, 1/7
    assert gc.max_entry_error(a, n) == pytest.approx(1 / 7)
    assert gc.max_entry_error(a, -a) == pytest.approx(1.0)  # wrong sign everywhere: the maximum
    assert gc.max_entry_error(np.zeros(3), np.zeros(3)) == 0.0


def test_max_entry_error_ignores_gradients_that_are_zero_in_both():
    """Entries that are rounding noise in both a and n must not report an error near 1."""
    a = np.array([1.0, 1e-12, -2.0])
    n = np.array([1.0, -1e-12, -2.0])  # the middle entry disagrees in sign, but both are ~0
    assert gc.max_entry_error(a, n, floor=0.0) == pytest.approx(1.0)  # the naive definition: noise
    assert gc.max_entry_error(a, n) < 1e-8  # floored at 1e-3 * 3
    a[1], n[1] = 0.01, -0.01  # the same disagreement above the floor does count
    assert gc.max_entry_error(a, n) == pytest.approx(1.0)


# ------------------------------------------- a broken backward must be caught

def _layernorm_backward_no_var_term(dout, cache):
    """Drops the xhat * mean(g * xhat) term (the path through the variance)."""
    xhat, rstd, w = cache  # (N,C), (N,1)
    C = xhat.shape[-1]
    g = dout.reshape(-1, C) * w
    dx = (g - g.mean(axis=-1, keepdims=True)) * rstd
    return dx.reshape(dout.shape), np.einsum("nc,nc->c", dout.reshape(-1, C), xhat), dout.reshape(-1, C).sum(0)


def _attention_backward_no_softmax_sum(dout, cache):
    """Treats softmax as elementwise: dS = A * dA, dropping the row-sum term."""
    qkv_cache, q, k, vs, blocks, out_cache, drop_scale, H = cache  # q and k already scaled by 1/sqrt(D)
    B, _, T, D = q.shape
    dy, dw_out, db_out = L.linear_backward(dout, out_cache)
    dy = dy.reshape(B, T, H, D).transpose(0, 2, 1, 3)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(q), np.zeros_like(q)
    for s, e, att, keep, att_k in blocks:
        datt = dy[:, :, s:e] @ vs[:, :, :e].transpose(0, 1, 3, 2) * (1 if keep is None else keep) * att  # missing:
        dq[:, :, s:e] = datt @ k[:, :, :e]                                                             # - sum(dA * A)
        dk[:, :, :e] += datt.transpose(0, 1, 3, 2) @ q[:, :, s:e]
        dv[:, :, :e] += att_k.transpose(0, 1, 3, 2) @ dy[:, :, s:e] * drop_scale
    dqkv = np.stack((dq, dk, dv)).transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * H * D)
    dx, dw_in, db_in = L.linear_backward(dqkv, qkv_cache)
    return dx, dw_in, db_in, dw_out, db_out


def _gelu_backward_no_tanh_derivative(dout, cache):
    x, s = cache  # s = sigmoid(2u) = 0.5 (1 + tanh(u))
    return dout * s  # dy/dx = 0.5 (1 + t): the product rule's 0.5 x dt/dx forgotten


def test_check_catches_broken_layernorm_backward():
    errors = gc.case_layernorm(backward=_layernorm_backward_no_var_term)
    assert errors["x"].rel > 1e-3 and not errors["x"].ok
    assert errors["x"].max_entry > 0.1
    assert errors["weight"].ok and errors["weight"].max_entry < 1e-6  # the untouched parts still agree


def test_check_catches_broken_attention_backward():
    errors = gc.case_attention(backward=_attention_backward_no_softmax_sum)
    assert errors["x"].rel > 1e-3 and errors["in_proj_weight"].rel > 1e-3
    assert errors["x"].max_entry > 0.1 and errors["in_proj_weight"].max_entry > 0.1
    assert errors["out_proj.weight"].rel < gc.TOLERANCE


def test_query_blocks_cover_every_query_once():
    for T in (1, 2, 5, 128):
        for n in (1, 2, 3, 200):
            blocks = L.query_blocks(T, n)
            assert blocks[0][0] == 0 and blocks[-1][1] == T and len(blocks) == min(n, T)
            assert all(e0 == s1 for (_, e0), (s1, _) in zip(blocks, blocks[1:]))


def test_attention_query_blocks_change_nothing():
    """The blocks skip only what the causal mask zeroes: same output and gradients for any count."""
    rng = np.random.default_rng(0)
    B, T, C, H = 2, 7, 8, 2
    x, w_in, b_in = rng.standard_normal((B, T, C)), rng.standard_normal((3 * C, C)), rng.standard_normal(3 * C)
    w_out, b_out, dout = rng.standard_normal((C, C)), rng.standard_normal(C), rng.standard_normal((B, T, C))
    ref = None
    for n in (1, 2, 3, 7):
        out, cache = L.attention_forward(x, w_in, b_in, w_out, b_out, H, n_blocks=n)
        assert len(cache[4]) == n
        result = [out, *L.attention_backward(dout, cache)]
        if ref is None:
            ref = result
        for a, b in zip(result, ref):
            assert np.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_check_catches_broken_gelu_backward():
    err = gc.case_gelu(backward=_gelu_backward_no_tanh_derivative)["x"]
    assert err.rel > 1e-3 and err.max_entry > 0.1


def test_model_check_catches_broken_layer(monkeypatch):
    monkeypatch.setattr(L, "layernorm_backward", lambda dout, cache: _layernorm_backward_no_var_term(dout, cache))
    errors = gc.check_model()
    assert errors["tok_emb.weight"].rel > 1e-3  # the error reaches the bottom of the network


def test_model_check_catches_wrong_dropout_mask(monkeypatch):
    """Backward that ignores the dropout mask must fail the whole-model check."""
    monkeypatch.setattr(L, "dropout_backward", lambda dout, cache: dout)
    errors = gc.check_model()
    assert max(e.rel for e in errors.values()) > 1e-3


def _table(out):
    """The header line and {(layer, parameter): (rel. error, max rel. error, verdict)} of the CLI table."""
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("layer "))
    rows = {}
    for line in lines:
        fields = line.split()
        if fields and fields[0] in gc.CASES:
            assert len(fields) == 5, line
            rows[fields[0], fields[1]] = (float(fields[2]), float(fields[3]), fields[4])
            for col, value in zip(("rel. error", "max rel. error"), fields[2:4]):
                end = header.index(col) + len(col)
                assert line[:end].endswith(" " + value), (col, line)  # right-aligned under its header
    return header, rows


def test_cli_table_and_exit_code(capsys):
    assert gc.main(["--layer", "layernorm", "--layer", "relu"]) == 0
    out = capsys.readouterr().out
    header, rows = _table(out)
    assert header.split() == ["layer", "parameter", "rel.", "error", "max", "rel.", "error", "pass/fail"]
    assert "max_i |a_i - n_i| / max(|a_i| + |n_i|, floor)" in out and "floor = 0.001 * max_j" in out
    assert set(rows) == {("layernorm", "x"), ("layernorm", "weight"), ("layernorm", "bias"), ("relu", "x")}
    for rel, max_entry, verdict in rows.values():
        assert rel < gc.TOLERANCE and max_entry < 1e-4 and verdict == "pass"
    assert "FAIL" not in out and "all 4 gradients pass" in out
    assert gc.main(["--layer", "nope"]) == 2


def test_cli_fails_on_broken_backward(monkeypatch, capsys):
    monkeypatch.setitem(gc.CASES, "layernorm",
                        lambda seed=0: gc.case_layernorm(seed, backward=_layernorm_backward_no_var_term))
    assert gc.main(["--layer", "layernorm"]) == 1
    out = capsys.readouterr().out
    _, rows = _table(out)
    rel, max_entry, verdict = rows["layernorm", "x"]
    assert verdict == "FAIL" and rel > 1e-3 and max_entry > 0.1
    assert rows["layernorm", "weight"][2] == "pass" and rows["layernorm", "weight"][1] < 1e-6
    assert "1 of 3 gradients failed the check (pass means rel. error < 1e-07)" in out


# ------------------------------------------------ --break: mistakes on purpose, in the reference

@pytest.mark.parametrize("name", list(gc.BREAKS))
def test_each_break_fails_its_check_and_is_undone(name):
    checks, owner, attr, wrong = gc.BREAKS[name]
    right = getattr(owner, attr)
    results = gc.run_broken(name)
    assert set(results) == set(checks)
    failed = [(check, param) for check, errors in results.items() for param, err in errors.items() if not err.ok]
    assert failed, f"--break {name}: every gradient still passes"
    assert max(err.rel for errors in results.values() for err in errors.values()) > 1e-3
    assert getattr(owner, attr) is right  # swapped in for that run only
    for check in checks:  # and without it the same checks pass
        assert all(err.ok for err in gc.CASES[check]().values()), check


def test_breaks_spoil_only_what_depends_on_the_mistake():
    """The table says where a mistake is: the gradients upstream of it fail, the rest pass."""
    attention = gc.run_broken("attention_scale")["ref_attention"]
    assert not attention["x"].ok and not attention["in_proj_weight"].ok
    assert attention["out_proj.weight"].ok and attention["out_proj.bias"].ok
    model = gc.run_broken("residual")["ref_model_postnorm_relu"]
    assert not model["layers.1.norm1.weight"].ok and not model["tok_emb.weight"].ok
    assert model["layers.1.linear2.weight"].ok and model["head.weight"].ok  # above the forgotten residual


def test_cli_break(capsys):
    assert gc.main(["--break", "list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listing] == list(gc.BREAKS)
    assert all(len(line.split()) > 3 for line in listing)  # each with its explanation
    assert gc.main(["--break", "layernorm_variance"]) == 0  # the check caught it: the run did its job
    out = capsys.readouterr().out
    _, rows = _table(out)
    assert set(rows) == {("ref_layernorm", "x"), ("ref_layernorm", "weight"), ("ref_layernorm", "bias")}
    assert rows["ref_layernorm", "x"][2] == "FAIL" and rows["ref_layernorm", "weight"][2] == "pass"
    assert "broken on purpose (layernorm_variance)" in out
    assert "1 of 3 gradients failed the check (pass means rel. error < 1e-07)" in out
    assert gc.main(["--break", "nope"]) == 2
    assert gc.main(["--break", "residual", "--layer", "ref_linear"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and err.startswith("gradcheck: error: unknown mistake 'nope'")


def test_check_catches_ffn_backward_that_forgets_dropout():
    """The feed-forward folds dropout's scale into w2 and applies its mask itself (with GELU)
    or merged into ReLU's: a backward that skips the scale, dropout's mask (GELU) or the merged
    mask (ReLU) must fail the check.  (That the forward applies them is test_layers' job.)"""
    no_scale = lambda dout, c: L.ffn_backward(dout, c[:4] + (None,) + c[5:])  # noqa: E731  dw2 not rescaled
    assert gc.case_ffn_relu(backward=no_scale)["linear2.weight"].rel > 1e-3
    no_mask = lambda dout, c: L.ffn_backward(dout, c[:2] + (None,) + c[3:])  # noqa: E731  da not masked (GELU)
    assert gc.case_ffn_gelu(backward=no_mask)["x"].rel > 1e-3
    unmasked = lambda dout, c: L.ffn_backward(dout, (c[0], np.ones_like(c[1])) + c[2:])  # noqa: E731  ReLU's too
    assert gc.case_ffn_relu(backward=unmasked)["x"].rel > 1e-3


def test_every_break_the_docs_name_exists():
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for path in ("tinyllm_np/reference.py", "docs/tour.md"):
        text = open(os.path.join(root, path), encoding="utf-8").read()
        named = set(re.findall(r"--break\s+`?(\w+)", text)) - {"NAME", "list"}
        assert named and named <= set(gc.BREAKS), (path, named - set(gc.BREAKS))
