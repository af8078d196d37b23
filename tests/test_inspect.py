"""The inspector: its numbers against the model's own forward and backward, its page, its timeline, its CLI."""

import base64
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tinyllm_np import Config, TinyLLM, load_model
from tinyllm_np import inspect as I
from tinyllm_np import layers as L
from tinyllm_np import train as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(ROOT, "weights", "tinyllm.npz")
CHARS = list(" !<>?behilnorstuy|")


def tiny(seed=0, dtype=np.float64, **kw):
    cfg = dict(vocab_size=len(CHARS), d_model=16, n_layers=2, n_heads=2, d_ff=24, context=12)
    cfg.update(kw)
    return TinyLLM(Config(**cfg), seed=seed, dtype=dtype, chars=CHARS)


@pytest.fixture(scope="module")
def small():
    m = tiny(seed=3)
    ids, text, _ = I.prepare_text("<|user|>hi!", m.chars, m.config.context)
    return m, ids, text, I.analyze(m, ids)


def test_views_match_the_models_own_forward(small):
    m, ids, text, v = small
    T_ = ids.size
    logits = m.forward(ids[None])[0]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    np.testing.assert_allclose(v["logprobs"], logp, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(v["loss"], -logp[np.arange(T_ - 1), ids[1:]], rtol=1e-12)
    A = v["attention"]
    assert A.shape == (2, 2, T_, T_)
    np.testing.assert_allclose(A.sum(-1), 1.0, rtol=1e-12)
    assert np.all(A[..., np.triu_indices(T_, 1)[0], np.triu_indices(T_, 1)[1]] == 0)
    # layer 0's weights recomputed from the textbook formula on x0
    p = m.params
    x0 = p["tok_emb.weight"][ids] + p["pos_emb.weight"][:T_]
    q, k, _ = np.split(x0 @ p["layers.0.self_attn.in_proj_weight"].T + p["layers.0.self_attn.in_proj_bias"], 3, -1)
    for h in range(2):
        s = q[:, 8 * h:8 * h + 8] @ k[:, 8 * h:8 * h + 8].T / np.sqrt(8) + L.causal_mask(T_, np.float64)
        np.testing.assert_allclose(A[0, h], L.softmax(s), rtol=1e-10, atol=1e-14)
    # the lens's last layer is the model's own prediction
    assert np.array_equal(v["lens_ids"][-1], logits.argmax(-1))
    rec = I.to_json(m, text, v)
    assert rec["lens"][-1] == [m.chars[i] for i in logits.argmax(-1)]
    assert [c for c, _ in rec["top"][3]][0] == m.chars[logits[3].argmax()]
    probs = [pr for _, pr in rec["top"][3]]
    assert probs == sorted(probs, reverse=True) and len(probs) == 5


def test_saliency_is_the_finite_difference_gradient_norm_and_zero_after_p(small):
    m, ids, _, v = small
    T_ = ids.size
    p = m.params
    x0 = p["tok_emb.weight"][ids] + p["pos_emb.weight"][:T_]

    def loss_at(x, pos):  # the forward from x0, written out with the model's layers
        h = x[None]
        for i in range(m.config.n_layers):
            h, _ = m._block_forward(h, i, None)
        h, _ = L.layernorm_forward(h, p["ln.weight"], p["ln.bias"])
        z = (h @ p["head.weight"].T)[0, pos]
        z = z - z.max()
        return -(z[ids[pos + 1]] - np.log(np.exp(z).sum()))

    eps = 1e-5
    for pos in (0, 4, T_ - 2):
        g = np.zeros_like(x0)
        for j in range(T_):
            for c in range(x0.shape[1]):
                xp, xm = x0.copy(), x0.copy()
                xp[j, c] += eps
                xm[j, c] -= eps
                g[j, c] = (loss_at(xp, pos) - loss_at(xm, pos)) / (2 * eps)
        want = np.linalg.norm(g, axis=1)
        np.testing.assert_allclose(v["saliency"][pos, :pos + 1], want[:pos + 1], rtol=1e-6, atol=1e-9)
        assert np.all(want[pos + 1:] < 1e-9)
    S = v["saliency"]
    assert np.all(S[np.triu_indices(T_ - 1, 1)] == 0.0)  # exactly, from the backward
    assert np.all(S[np.tril_indices(T_ - 1)] > 0)


def test_saliency_zeros_come_from_the_backward_not_from_padding():
    # rows of one batch share the batch's length, so row 0 of a 16-row batch runs a 16-long backward
    m = tiny(seed=1, context=20)
    ids = np.arange(20) % len(CHARS)
    full = m.input_grad(ids[None], np.eye(1, 20 * len(CHARS)).reshape(1, 20, -1))  # d logits_0[0] / d x0
    assert np.all(full[0, 1:] == 0.0) and np.any(full[0, 0] != 0)


def test_a_deliberately_broken_backward_fails_the_saliency_check(small, monkeypatch):
    m, ids, _, v = small
    real = L.layernorm_backward

    def broken(dout, cache):
        dx, dw, db = real(dout, cache)
        return dx * 1.01, dw, db
    monkeypatch.setattr(L, "layernorm_backward", broken)
    assert not np.allclose(I.analyze(m, ids)["saliency"], v["saliency"], rtol=1e-6)


def test_float32_model_is_analyzed_in_float64_and_left_untouched():
    m = tiny(seed=2, dtype=np.float32)
    before, rng_state = m.flat.copy(), m.rng.bit_generator.state
    v = I.analyze(m, np.array([1, 2, 3, 4]))
    assert v["saliency"].dtype == np.float64 and v["attention"].dtype == np.float64
    assert np.array_equal(m.flat, before) and m.rng.bit_generator.state == rng_state


def test_prepare_text_drops_unknown_and_keeps_the_last_context_characters():
    ids, text, notes = I.prepare_text("héllo there <|user|>hi", CHARS, 8)
    assert text == "user|>hi" and len(ids) == 8
    assert "dropped 1 character" in notes[0] and "'é'" in notes[0] and "last 8" in notes[1]
    with pytest.raises(I.InspectError, match="at least 2"):
        I.prepare_text("éé", CHARS, 8)


HOSTILE = ["</script><marquee>hi", "<img src=x onerror=alert(1)>", "a&amp;b\u2028\u2029"]


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_text_is_data_in_the_page(hostile):
    chars = sorted(set("".join(HOSTILE)) | set(CHARS))
    m = TinyLLM(Config(vocab_size=len(chars), d_model=8, n_layers=1, n_heads=2, d_ff=8, context=32),
                dtype=np.float64, chars=chars)
    ids, text, _ = I.prepare_text(hostile, chars, 32)
    meta = I.page_meta(m.config, text, chars, "<b>w.npz</b>")
    html = I.render_page(meta, [I.page_snapshot(m, I.analyze(m, ids))])
    data = re.search(r'<script type="application/json" id="inspect-data">(.*?)</script>', html, re.S).group(1)
    for bad in ("<", ">", "&", "\u2028", "\u2029"):
        assert bad not in data
    assert html.count("</script>") == 2 and "<marquee" not in html and "<img" not in html
    back = json.loads(data)
    assert back["meta"]["text"] == hostile and back["meta"]["model"]["weights"] == "<b>w.npz</b>"
    assert "innerHTML" not in html and "document.write" not in html  # text goes in with textContent


def test_page_snapshot_rounding_keeps_the_numbers(small):
    m, ids, _, v = small
    s = I.page_snapshot(m, v)
    T_ = ids.size
    tri = np.tril_indices(T_)
    for l in range(2):
        for h in range(2):
            a = np.frombuffer(base64.b64decode(s["attention_u8"][l][h]), np.uint8) / 255
            np.testing.assert_allclose(a, v["attention"][l, h][tri], atol=0.5 / 255 + 1e-12)
    np.testing.assert_allclose(s["loss"], v["loss"], rtol=5e-4)
    for p in range(T_ - 1):
        np.testing.assert_allclose(s["saliency"][p], v["saliency"][p, :p + 1], rtol=5e-4)
    assert s["lens"][-1] == "".join(m.chars[i] for i in v["lens_ids"][-1])


def test_timeline_round_trip_and_bad_files(tmp_path, small):
    m, ids, text, v = small
    meta = I.page_meta(m.config, text, m.chars, None)
    snaps = [I.page_snapshot(m, v, step=0), I.page_snapshot(m, v, step=5)]
    path = tmp_path / "t.json"
    I.write_timeline(path, meta, snaps)
    assert I.read_timeline(path) == (meta, snaps)
    (tmp_path / "bad.json").write_text('{"kind": "other"}')
    for p, msg in ((tmp_path / "none.json", "no such file"), (tmp_path / "bad.json", "not a timeline"),
                   (tmp_path, "is a directory")):
        with pytest.raises(I.InspectError, match=msg):
            I.read_timeline(p)


# ------------------------------------------------------------- training snapshots

TINY = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--d-ff", "32", "--context", "16",
        "--batch-size", "4", "--quiet", "--workers", "1"]


def _train(d, data, *extra):
    return T.main(["--data", str(data), "--out", str(d / "w.npz"), "--checkpoint", str(d / "ck.npz"),
                   "--log", str(d / "log.csv"), "--plot", "", *TINY, *extra])


def test_snapshots_do_not_change_training_and_resume_keeps_them(tmp_path):
    data = tmp_path / "text.txt"
    data.write_text("<|user|>hi<|bot|>hello there<|end|>\n<|user|>bye<|bot|>see you<|end|>\n" * 40)
    a, b = tmp_path / "a", tmp_path / "b"
    assert _train(a, data, "--max-steps", "12") == 0
    snap = ["--inspect-text", "<|user|>hi<|bot|>hello", "--inspect-every", "5"]
    assert _train(b, data, "--max-steps", "7", "--ckpt-every", "7", *snap) == 0
    assert _train(b, data, "--max-steps", "12", "--resume", *snap) == 0
    assert np.array_equal(load_model(a / "w.npz").flat, load_model(b / "w.npz").flat)  # bitwise
    meta, snaps = I.read_timeline(b / "w_timeline.json")
    assert [s["step"] for s in snaps] == [0, 5, 7, 10, 12] and meta["text"] == "|>hi<|bot|>hello"  # the last 16
    # the last snapshot is the saved model's view
    w = load_model(b / "w.npz")
    ids, _, _ = I.prepare_text(meta["text"], w.chars, 16)
    assert snaps[-1] == I.page_snapshot(w, I.analyze(w, ids), step=12)
    out = tmp_path / "tl.html"
    assert I.main(["--timeline", str(b / "w_timeline.json"), "--out", str(out)]) == 0
    assert '"step":10' in out.read_text()
    assert _train(tmp_path / "c", data, "--max-steps", "2", "--inspect-text", "ééé") == 2


# ----------------------------------------------------------------------- CLI

def test_cli_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    cases = [(["--weights", str(tmp_path / "none.npz")], "no such file"),
             (["--weights", str(bad)], "not an .npz"),
             (["--text", "\u00e9\u00e9"], "at least 2 characters"),
             (["--timeline", str(tmp_path / "none.json")], "no such file"),
             (["--timeline", str(bad), "--text", "hi"], "cannot be used with --timeline"),
             (["--bogus"], "unrecognized arguments")]
    for argv, msg in cases:
        assert I.main(argv + ["--out", str(tmp_path / "o.html")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("inspect: error:") and msg in err, (argv, err)
    plain = TinyLLM(Config(vocab_size=3, d_model=8, n_layers=1, n_heads=2, d_ff=8, context=8), chars="abc")
    plain.save(tmp_path / "plain.npz")
    assert I.main(["--weights", str(tmp_path / "plain.npz"), "--out", str(tmp_path / "o.html")]) == 2
    assert "--text is required" in capsys.readouterr().err


@pytest.fixture(scope="module")
def shipped_page(tmp_path_factory):
    """The shipped model's page for a 128-character text (longer text given: its last 128 kept)."""
    d = tmp_path_factory.mktemp("page")
    text = "<|user|>Hello!<|bot|>Hi there! How can I help you today?<|end|>\n" * 3
    r = subprocess.run([sys.executable, "-m", "tinyllm_np.inspect", "--text", text + "\u00e9",
                        "--out", str(d / "p.html"), "--json", str(d / "p.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return d, r.stderr


def test_shipped_page_size_and_notices(shipped_page):
    d, err = shipped_page
    assert "dropped 1 character" in err and "using its last 128" in err
    rec = json.loads((d / "p.json").read_text())
    assert len(rec["chars"]) == 128 and len(rec["saliency"]) == 127 and len(rec["attention"][0][0]) == 128
    assert set(rec) >= {"chars", "config", "attention", "top", "loss", "lens", "saliency"}
    size = os.path.getsize(d / "p.html")
    assert size < 2_000_000, size
    # 20 snapshots of that page in one timeline stay under 10 MB
    html = (d / "p.html").read_text()
    data = json.loads(re.search(r'id="inspect-data">(.*?)</script>', html, re.S).group(1))
    assert len(I.render_page(data["meta"], data["snapshots"] * 20).encode()) < 10_000_000


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")
def test_page_renders_in_headless_chromium(shipped_page):
    d, _ = shipped_page
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                        "--dump-dom", "file://" + str(d / "p.html")], capture_output=True, text=True, timeout=120)
    body = re.search(r"<body([^>]*)>", r.stdout)
    assert body, r.stderr[-2000:]
    attrs = dict(re.findall(r'(data-[a-z]+)="([^"]*)"', body.group(1)))
    assert attrs.get("data-ok") == "1" and attrs.get("data-errors") == "0", attrs
    assert attrs["data-heatmaps"] == "12" and attrs["data-chars"] == "128"
    assert '<pre id="errors"></pre>' in r.stdout
    assert "Hi there! How can I help you today?" in re.sub(r"<[^>]+>", "", r.stdout)


def test_json_numbers_match_pytorch():
    torch = pytest.importorskip("torch")
    from tinyllm_np.torch_ref import from_numpy

    model = load_model(WEIGHTS)
    ids, text, _ = I.prepare_text(I.EXAMPLE, model.chars, model.config.context)
    rec = json.loads(json.dumps(I.to_json(model, text, I.analyze(model, ids), WEIGHTS)))
    tm = from_numpy(I._float64(model)).eval()
    T_ = ids.size
    idx = torch.from_numpy(ids[None])
    x0 = (tm.tok_emb(idx) + tm.pos_emb(torch.arange(T_))).detach().requires_grad_(True)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(T_, dtype=torch.float64)
    x, att, lens = x0, [], []
    for layer in tm.layers:
        _, w = layer.self_attn(x, x, x, attn_mask=mask, need_weights=True, average_attn_weights=False)
        att.append(w[0].detach().numpy())
        x = layer(x, src_mask=mask, is_causal=True)
        lens.append(tm.head(tm.ln(x))[0].argmax(-1).numpy())
    logp = torch.log_softmax(tm.head(tm.ln(x))[0], -1)
    loss = -logp[torch.arange(T_ - 1), idx[0, 1:]]
    rel = dict(rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(np.array(rec["attention"]), np.stack(att), **rel)
    np.testing.assert_allclose(rec["loss"], loss.detach().numpy(), **rel)
    assert rec["lens"] == [[model.chars[i] for i in row] for row in lens]
    p = logp.exp().detach().numpy()
    for t in range(T_):
        order = np.argsort(-p[t])[:5]
        assert [c for c, _ in rec["top"][t]] == [model.chars[i] for i in order]
        np.testing.assert_allclose([q for _, q in rec["top"][t]], p[t, order], **rel)
    # saliency by autograd: T-1 copies of x0, copy q's loss_q summed, one backward
    xs = x0.detach().repeat(T_ - 1, 1, 1).requires_grad_(True)
    h = xs
    for layer in tm.layers:
        h = layer(h, src_mask=mask, is_causal=True)
    lp = torch.log_softmax(tm.head(tm.ln(h)), -1)
    q = torch.arange(T_ - 1)
    (-lp[q, q, idx[0, 1:]]).sum().backward()
    sal = xs.grad.norm(dim=-1).numpy()
    np.testing.assert_allclose(np.array(rec["saliency"]), sal, rtol=1e-4, atol=1e-12)
