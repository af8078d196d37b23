"""The model: architecture facts, causality, dtypes, dropout control, save/load."""

import numpy as np
import pytest

from tinyllm_np import Config, TinyLLM, load_model, WeightsError

SMALL = dict(vocab_size=13, d_model=16, n_layers=2, n_heads=4, d_ff=32, context=10)


def test_original_parameter_count_and_names():
    model = TinyLLM(Config(vocab_size=59))
    assert model.n_params == 626_560
    assert sum(p.size for p in model.params.values()) == 626_560
    p = model.params
    assert p["tok_emb.weight"].shape == (59, 128)
    assert p["pos_emb.weight"].shape == (128, 128)
    assert p["layers.2.self_attn.in_proj_weight"].shape == (384, 128)
    assert p["layers.0.self_attn.in_proj_bias"].shape == (384,)
    assert p["layers.1.self_attn.out_proj.weight"].shape == (128, 128)
    assert p["layers.0.linear1.weight"].shape == (512, 128)
    assert p["layers.0.linear2.weight"].shape == (128, 512)
    assert p["ln.weight"].shape == (128,) and p["head.weight"].shape == (59, 128)
    assert "head.bias" not in p and "layers.3.norm1.weight" not in p
    assert len(p) == 2 + 3 * 12 + 3


def test_defaults_are_the_original_recipe():
    c = Config()
    assert (c.d_model, c.n_layers, c.n_heads, c.d_ff, c.context, c.dropout) == (128, 3, 4, 512, 128, 0.1)
    assert c.norm_first is False and c.activation == "relu"


@pytest.mark.parametrize("kwargs", [dict(d_model=10, n_heads=4), dict(activation="tanh"), dict(dropout=1.0),
                                    dict(n_layers=0)])
def test_bad_config_is_refused(kwargs):
    with pytest.raises(ValueError):
        Config(**{**SMALL, **kwargs})


@pytest.mark.parametrize("norm_first", [False, True])
def test_causality(norm_first):
    """Changing tokens after position t leaves the logits at positions <= t unchanged."""
    model = TinyLLM(Config(**SMALL, norm_first=norm_first), seed=1)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 13, (3, 10))
    base = model.forward(idx)
    for t in range(9):
        changed = idx.copy()
        changed[:, t + 1:] = rng.integers(0, 13, (3, 9 - t))
        out = model.forward(changed)
        np.testing.assert_array_equal(out[:, :t + 1], base[:, :t + 1])
        assert not np.allclose(out[:, t + 1:], base[:, t + 1:])  # the future does matter there


def test_float32_stays_float32():
    model = TinyLLM(Config(**SMALL))
    idx = np.zeros((2, 5), dtype=np.int64)
    assert model.forward(idx).dtype == np.float32
    loss, grads = model.loss_and_grads(idx, idx, train=True)
    assert all(g.dtype == np.float32 for g in grads.values())
    assert list(grads) == list(model.params)


def test_float64_matches_float32():
    m32 = TinyLLM(Config(**SMALL), seed=3)
    m64 = TinyLLM(Config(**SMALL), seed=3, dtype=np.float64)
    idx = np.random.default_rng(0).integers(0, 13, (2, 10))
    np.testing.assert_allclose(m32.forward(idx), m64.forward(idx), rtol=1e-4, atol=1e-4)


def test_initial_loss_near_uniform():
    model = TinyLLM(Config(vocab_size=59))
    idx = np.random.default_rng(0).integers(0, 59, (4, 128))
    loss = model.loss(idx, np.roll(idx, -1, axis=1))
    assert abs(loss - np.log(59)) < 1.0


def test_dropout_is_controlled_by_train_flag_and_rng():
    model = TinyLLM(Config(**SMALL, dropout=0.3))
    idx = np.random.default_rng(0).integers(0, 13, (2, 10))
    tgt = np.roll(idx, -1, axis=1)
    eval_a, _ = model.loss_and_grads(idx, tgt)
    eval_b = model.loss(idx, tgt)
    assert eval_a == eval_b  # train=False: deterministic, no dropout
    l1, g1 = model.loss_and_grads(idx, tgt, train=True, rng=np.random.default_rng(5))
    l2, g2 = model.loss_and_grads(idx, tgt, train=True, rng=np.random.default_rng(5))
    l3, _ = model.loss_and_grads(idx, tgt, train=True, rng=np.random.default_rng(6))
    assert l1 == l2 and all(np.array_equal(g1[k], g2[k]) for k in g1)
    assert l1 != eval_a and l1 != l3
    # the model's own generator: two fresh models with one seed give one training step
    a = TinyLLM(Config(**SMALL, dropout=0.3), seed=9).loss_and_grads(idx, tgt, train=True)[0]
    b = TinyLLM(Config(**SMALL, dropout=0.3), seed=9).loss_and_grads(idx, tgt, train=True)[0]
    assert a == b


def test_bad_token_input_is_refused():
    model = TinyLLM(Config(**SMALL))
    with pytest.raises(ValueError, match="context"):
        model.forward(np.zeros((1, 11), dtype=int))
    with pytest.raises(ValueError, match="token ids"):
        model.forward(np.full((1, 3), 13))
    with pytest.raises(ValueError, match="2-D integer"):
        model.forward(np.zeros(3))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_save_load_round_trip(tmp_path, dtype):
    model = TinyLLM(Config(**SMALL, norm_first=True, activation="gelu"), seed=4, dtype=dtype, chars=list("abcdefghijklm"))
    path = tmp_path / "w.npz"
    model.save(path)
    loaded = load_model(path)
    assert loaded.config == model.config and loaded.dtype == dtype and loaded.chars == model.chars
    idx = np.random.default_rng(0).integers(0, 13, (2, 10))
    np.testing.assert_array_equal(loaded.forward(idx), model.forward(idx))
    assert [f.name for f in tmp_path.iterdir()] == ["w.npz"]  # no temp file left behind


def test_load_never_unpickles(tmp_path):
    model = TinyLLM(Config(**SMALL))
    arrays = dict(model.params)
    arrays["__config__"] = np.array({"evil": 1}, dtype=object)
    path = tmp_path / "evil.npz"
    np.savez(path, **arrays)
    with pytest.raises(WeightsError, match="pickled"):
        load_model(path)


def test_load_refuses_wrong_shape(tmp_path):
    model = TinyLLM(Config(**SMALL))
    path = tmp_path / "w.npz"
    model.save(path)
    data = dict(np.load(path))
    data["head.weight"] = data["head.weight"][:5]
    np.savez(path, **data)
    with pytest.raises(WeightsError, match="head.weight.*shape"):
        load_model(path)


def test_gradients_can_be_weighted_and_accumulated():
    """loss_and_grads(weight=w, grads=g) adds w x the gradient into g: gradient accumulation."""
    model = TinyLLM(Config(**SMALL), dtype=np.float64)
    rng = np.random.default_rng(5)
    (a, ta), (b, tb) = [(rng.integers(0, 13, (2, 10)), rng.integers(0, 13, (2, 10))) for _ in range(2)]
    la, ga = model.loss_and_grads(a, ta)
    lb, gb = model.loss_and_grads(b, tb)
    l1, acc = model.loss_and_grads(a, ta, weight=0.25)
    l2, same = model.loss_and_grads(b, tb, weight=0.75, grads=acc)
    assert same is acc and (l1, l2) == (la, lb)  # the losses are not weighted
    for k in ga:
        np.testing.assert_allclose(acc[k], 0.25 * ga[k] + 0.75 * gb[k], rtol=1e-12, atol=1e-15)
    assert any(np.abs(ga[k] - gb[k]).max() > 1e-3 for k in ga)  # two different gradients were mixed


def test_a_model_over_a_given_buffer_uses_it_as_it_is():
    """TinyLLM(flat=buf) (how parallel.py's workers see the caller's shared parameters): no init, no copy."""
    ref = TinyLLM(Config(**SMALL), seed=3)
    buf = ref.flat.copy()
    m = TinyLLM(Config(**SMALL), seed=99, flat=buf)
    assert m.flat is buf and np.array_equal(buf, ref.flat)  # the seed did not re-initialise it
    idx = np.arange(20).reshape(2, 10) % 13
    assert np.array_equal(m.forward(idx), ref.forward(idx))
    buf[:] *= 2  # a write to the buffer is the model's new parameters
    assert not np.array_equal(m.forward(idx), ref.forward(idx))
    n = ref.n_params
    for bad in (np.zeros(n - 1, np.float32), np.zeros(n, np.float64), np.zeros((1, n), np.float32),
                np.zeros(2 * n, np.float32)[::2], [0.0] * n, np.ma.zeros(n, np.float32)):
        with pytest.raises(ValueError, match="flat must be"):
            TinyLLM(Config(**SMALL), flat=bad)
    frozen = np.zeros(n, np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="flat must be"):
        TinyLLM(Config(**SMALL), flat=frozen)
