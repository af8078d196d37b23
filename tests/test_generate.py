"""Generation: KV cache equals full recomputation, sliding window, sampling."""

import numpy as np
import pytest

from tinyllm_np import Config, TinyLLM
from tinyllm_np.generate import Decoder, generate, sample, window_start


def small_model(context=16, dtype=np.float64, **kw):
    return TinyLLM(Config(vocab_size=23, d_model=16, n_layers=2, n_heads=2, d_ff=32, context=context, **kw),
                   seed=5, dtype=dtype)


@pytest.mark.parametrize("norm_first", [False, True])
def test_forward_cached_equals_forward(norm_first):
    model = small_model(norm_first=norm_first)
    idx = np.random.default_rng(0).integers(0, 23, (2, 16))
    cache = model.new_kv_cache(batch=2)
    parts = [model.forward_cached(idx[:, :5], cache, 0)]
    parts += [model.forward_cached(idx[:, t:t + 1], cache, t) for t in range(5, 16)]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), model.forward(idx), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm_first", [False, True])
def test_forward_cached_last_only(norm_first):
    """last=True: the last position's logits, and the same keys and values cached as a full pass."""
    model = small_model(norm_first=norm_first)
    idx = np.random.default_rng(1).integers(0, 23, (2, 16))
    full_cache, last_cache = model.new_kv_cache(batch=2), model.new_kv_cache(batch=2)
    for pos, end in ((0, 9), (9, 10), (10, 16)):  # a prompt, one token, then a longer prefill at pos 10
        full = model.forward_cached(idx[:, pos:end], full_cache, pos)
        last = model.forward_cached(idx[:, pos:end], last_cache, pos, last=True)
        assert last.shape == (2, 1, 23)
        np.testing.assert_allclose(last, full[:, -1:], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(last[:, 0], model.forward(idx[:, :end])[:, -1], rtol=1e-12, atol=1e-12)
    for (kf, vf), (kl, vl) in zip(full_cache, last_cache):
        assert np.array_equal(kf, kl) and np.array_equal(vf, vl)


@pytest.mark.parametrize("norm_first,activation", [(False, "relu"), (True, "relu"), (False, "gelu"), (True, "gelu")])
def test_decode_step_equals_forward(norm_first, activation):
    """The single-vector step generation uses: same logits as the full forward, token by token."""
    model = small_model(norm_first=norm_first, activation=activation)
    idx = np.random.default_rng(3).integers(0, 23, 16)
    cache = model.new_kv_cache()
    steps = np.stack([model.decode_step(int(t), pos, cache) for pos, t in enumerate(idx)])
    np.testing.assert_allclose(steps, model.forward(idx[None])[0], rtol=1e-12, atol=1e-12)


def test_decode_step_with_overflowing_attention_scores():
    """Scores far past exp's float32 range: decode_step's softmax falls back to the shifted one, as forward's."""
    model = small_model(dtype=np.float32)
    for i in range(2):
        model.params[f"layers.{i}.self_attn.in_proj_weight"][:32] *= 60  # q and k rows: scores in the thousands
    idx = np.random.default_rng(3).integers(0, 23, 16)
    cache = model.new_kv_cache()
    steps = np.stack([model.decode_step(int(t), pos, cache) for pos, t in enumerate(idx)])
    full = model.forward(idx[None])[0]
    assert np.isfinite(full).all()
    np.testing.assert_allclose(steps, full, rtol=1e-3, atol=1e-3)


def test_decode_step_after_a_prefill():
    """A prompt cached by forward_cached, then one token at a time: the mix Decoder uses."""
    model = small_model()
    idx = np.random.default_rng(4).integers(0, 23, 12)
    cache = model.new_kv_cache()
    model.forward_cached(idx[None, :7], cache, 0)
    steps = np.stack([model.decode_step(int(idx[pos]), pos, cache) for pos in range(7, 12)])
    np.testing.assert_allclose(steps, model.forward(idx[None])[0, 7:], rtol=1e-12, atol=1e-12)


def test_decode_step_rejects_bad_token_and_position():
    model = small_model()
    cache = model.new_kv_cache()
    for token, pos in ((23, 0), (-1, 0), (0, 16), (0, -1)):
        with pytest.raises(ValueError):
            model.decode_step(token, pos, cache)


def test_window_start_rule():
    assert [window_start(n, 8, 1) for n in (1, 8, 9, 20)] == [0, 0, 1, 12]  # slide 1: the last 8
    assert [window_start(n, 8, 4) for n in (8, 9, 12, 13, 16, 17)] == [0, 4, 4, 8, 8, 12]
    for n in range(1, 100):
        s = window_start(n, 8, 3)
        assert 0 <= n - s <= 8 and s % 3 == 0


@pytest.mark.parametrize("slide", [1, 5, 16])
def test_cached_generation_equals_full_recomputation_past_the_context(slide):
    """Greedy, 80 new tokens with a 16-token context: the window slides many times."""
    model = small_model()
    prompt = [1, 2, 3, 4, 5, 6, 7]
    cached = list(generate(model, prompt, 80, greedy=True, slide=slide))
    full = list(generate(model, prompt, 80, greedy=True, slide=slide, cached=False))
    assert cached == full and len(cached) == 80


def test_cached_logits_equal_full_logits_every_step_at_full_size():
    """The shipped shape (context 128), float32, 200 tokens: every step's logits agree."""
    model = TinyLLM(Config(vocab_size=59), seed=1)
    ids = list(np.random.default_rng(2).integers(0, 59, 200))
    dc, df = Decoder(model), Decoder(model, cached=False)
    for n in range(90, 200):
        np.testing.assert_allclose(dc.logits(ids[:n]), df.logits(ids[:n]), rtol=1e-4, atol=1e-4)


def test_logits_asked_twice_for_the_same_text():
    """A second call with no new token recomputes the last one instead of failing on an empty prefill."""
    model = small_model(context=8)
    dc, df = Decoder(model), Decoder(model, cached=False)
    for n in (1, 3, 3, 8, 8, 11, 11, 12):  # 11 moves the window, then is asked again
        ids = list(range(1, n + 1))
        np.testing.assert_allclose(dc.logits(ids), df.logits(ids), rtol=1e-12)


def test_original_rule_slide_1_recomputes_last_128():
    model = small_model(context=8)
    ids = list(range(1, 20))
    np.testing.assert_allclose(Decoder(model, slide=1).logits(ids),
                               model.forward(np.array([ids[-8:]]))[0, -1], rtol=1e-12)


def test_prompt_longer_than_context():
    model = small_model(context=8)
    out = list(generate(model, list(range(20)), 5, greedy=True))
    assert out == list(generate(model, list(range(20)), 5, greedy=True, cached=False))


def test_sampling():
    logits = np.array([0.0, 10.0, 0.0, 9.5])
    assert sample(logits, greedy=True) == 1
    rng = np.random.default_rng(0)
    draws = [sample(logits, 1.0, top_k=2, rng=rng) for _ in range(300)]
    assert set(draws) == {1, 3}  # top-k removes the rest
    draws = [sample(logits, 0.05, rng=rng) for _ in range(50)]
    assert set(draws) == {1}  # low temperature concentrates on the best
    a = [sample(logits, 3.0, rng=np.random.default_rng(7)) for _ in range(5)]
    b = [sample(logits, 3.0, rng=np.random.default_rng(7)) for _ in range(5)]
    assert a == b
    with pytest.raises(ValueError):
        Decoder(small_model()).logits([])


# ------------------------------------------------------- a changed text never reads a stale cache

@pytest.mark.parametrize("slide", [None, 1])
def test_decoder_notices_a_changed_text(slide):
    """Same-length, longer and shorter changed texts, and a change in the middle: always the full forward's logits.

    Before the decoder compared its cached tokens, [1,2,3] then [4,5,6] differed from a full forward by 3.0.
    """
    model = small_model(context=8)
    dec = Decoder(model, slide=slide)
    texts = [[1, 2, 3], [4, 5, 6], [4, 5, 6, 7], [1, 2, 3, 4, 5], [1, 2, 9, 4, 5], [1, 2, 9, 4, 5, 6],
             [1, 2, 9, 4, 5, 7], [7], [7, 1], [7, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [7, 1, 2, 3, 4, 5, 6, 7, 8, 0, 10],
             [3, 1, 2, 3, 4, 5, 6, 7, 8, 0, 10], [4, 5, 6]]
    for ids in texts:
        s = len(ids) - 8 if slide == 1 and len(ids) > 8 else (4 if len(ids) > 8 else 0)  # the window rule
        want = model.forward(np.array([ids[s:]]))[0, -1]
        np.testing.assert_allclose(dec.logits(ids), want, rtol=1e-10, atol=1e-10, err_msg=str(ids))


def test_decoder_reruns_only_from_the_first_changed_token(monkeypatch):
    """An append is one decode_step; a change at position i re-runs positions i.. only, as one prefill."""
    model = small_model()
    calls = []
    orig_step, orig_prefill = model.decode_step, model.forward_cached
    monkeypatch.setattr(model, "decode_step", lambda t, pos, c: calls.append(("step", pos)) or orig_step(t, pos, c))
    monkeypatch.setattr(model, "forward_cached",
                        lambda idx, c, pos, last=False: calls.append(("prefill", pos, idx.shape[1]))
                        or orig_prefill(idx, c, pos, last=last))
    dec = Decoder(model)
    dec.logits([1, 2, 3, 4, 5])
    dec.logits([1, 2, 3, 4, 5, 6])
    dec.logits([1, 2, 9, 4, 5, 6])
    dec.logits([1, 2, 9, 4, 5, 6])
    assert calls == [("prefill", 0, 5), ("step", 5), ("prefill", 2, 4), ("step", 5)]
