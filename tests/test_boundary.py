"""Bad input at the public entry points is a clear ValueError; parameters cannot leave the flat buffer."""

import pickle

import numpy as np
import pytest

from tinyllm_np import Config, TinyLLM, load_model
from tinyllm_np import layers as L
from tinyllm_np import train as T
from tinyllm_np.generate import Decoder, generate, sample
from tinyllm_np.optim import AdamW, flat_base

SMALL = dict(vocab_size=13, d_model=16, n_layers=2, n_heads=4, d_ff=32, context=10)


def small_model(**kw):
    return TinyLLM(Config(**{**SMALL, **kw}), seed=1)


# ------------------------------------------------------------- token ids, targets, positions

BAD_IDS = [np.array([[1, 13]]), np.array([[-1, 2]]), np.array([[1.0, 2.0]]), np.array([[True, False]]),
           np.array([1, 2]), np.zeros((1, 0), np.int64), np.zeros((1, 11), np.int64)]


@pytest.mark.parametrize("idx", BAD_IDS, ids=["V", "-1", "float", "bool", "1-D", "empty", "past-context"])
def test_every_entry_point_refuses_bad_token_ids(idx):
    model = small_model()
    good_t = np.zeros(idx.shape, np.int64)
    for call in (lambda: model.forward(idx), lambda: model.loss(idx, good_t),
                 lambda: model.loss_and_grads(idx, good_t),
                 lambda: model.forward_cached(idx, model.new_kv_cache(), 0)):
        with pytest.raises(ValueError):
            call()


@pytest.mark.parametrize("bad", [-1, -100, 13], ids=["-1", "-100 (no ignore index)", "V"])
def test_targets_outside_the_vocabulary_are_refused(bad):
    """-1 used to wrap to the last class (a wrong loss), -100 to raise an IndexError."""
    model = small_model()
    idx = np.zeros((2, 4), np.int64)
    tgt = np.ones((2, 4), np.int64)
    tgt[1, 2] = bad
    for call in (model.loss, model.loss_and_grads):
        with pytest.raises(ValueError, match=r"targets must be in \[0, 13\)"):
            call(idx, tgt)
    with pytest.raises(ValueError, match="integers"):
        model.loss(idx, tgt.astype(np.float64))
    assert np.isfinite(model.loss(idx, np.ones((2, 4), np.int64)))  # the good ones still pass


def test_forward_cached_refuses_positions_outside_the_context():
    model = small_model()
    idx = np.array([[1, 2, 3]])
    for pos in (-1, 8, 10, 1.0):  # pos + Tn > context for 8; -1 used to return an empty array
        with pytest.raises(ValueError):
            model.forward_cached(idx, model.new_kv_cache(), pos)
    assert model.forward_cached(idx, model.new_kv_cache(), 7).shape == (1, 3, 13)  # 7..9: the last fit
    with pytest.raises(ValueError, match="KV cache"):
        model.forward_cached(idx, model.new_kv_cache(batch=2), 0)  # idx has batch 1
    with pytest.raises(ValueError, match="KV cache"):
        model.forward_cached(idx, model.new_kv_cache()[:1], 0)


def test_decode_step_refuses_non_integers_and_a_short_cache():
    model = small_model()
    for token, pos in ((1.0, 0), (True, 0), (1, 0.0), (1, np.float64(2))):
        with pytest.raises(ValueError, match="integer"):
            model.decode_step(token, pos, model.new_kv_cache())
    with pytest.raises(ValueError, match="layers"):
        model.decode_step(1, 0, model.new_kv_cache()[:1])  # zip would have run one layer of two
    a = model.decode_step(np.int64(3), np.int64(0), model.new_kv_cache())  # NumPy integers are integers
    np.testing.assert_array_equal(a, model.decode_step(3, 0, model.new_kv_cache()))


def test_generate_and_sample_refuse_bad_arguments():
    model = small_model()
    for kw in (dict(prompt_ids=[1, 2.5]), dict(prompt_ids=[1, 13]), dict(prompt_ids=[-1]),
               dict(max_new_tokens=-1), dict(temperature=-0.5), dict(temperature=float("nan")),
               dict(top_k=0), dict(slide=2.5), dict(slide=0)):
        args = {"prompt_ids": [1, 2], "max_new_tokens": 3, **kw}
        with pytest.raises(ValueError):
            list(generate(model, **args))
    for cached in (True, False):
        with pytest.raises(ValueError):
            Decoder(model, cached=cached).logits([1, 2.5])
    logits = np.array([0.0, 1.0, 2.0])
    for kw in (dict(temperature=-1.0), dict(temperature=np.inf), dict(top_k=-2), dict(top_k=1.5)):
        with pytest.raises(ValueError):
            sample(logits, rng=np.random.default_rng(0), **kw)
    assert sample(logits, top_k=1, rng=np.random.default_rng(0)) == 2


# ------------------------------------------------------------- dropout the masks can represent

@pytest.mark.parametrize("p", [1e-6, 7.6e-6, 0.999995, 0.99999237060546875, 1.0, -0.1, float("nan"), "0.1", True])
def test_config_refuses_a_dropout_the_16_bit_masks_cannot_represent(p):
    """round(p * 65536) == 0 silently meant no dropout; == 65536 divided by zero."""
    with pytest.raises(ValueError, match="dropout must be"):
        Config(**SMALL, dropout=p)
    if isinstance(p, float) and 0 < p < 1:
        with pytest.raises(ValueError, match=r"0\.5/65536 < p < 65535\.5/65536"):
            L.dropout_mask((4,), p, np.random.default_rng(0))  # the layer refuses it too


@pytest.mark.parametrize("p", [0.0, 7.63e-6, 0.1, 0.99999])
def test_config_accepts_the_representable_dropouts(p):
    assert Config(**SMALL, dropout=p).dropout == p
    if p:
        assert 1 <= L.dropout_threshold(p) <= 65535


@pytest.mark.parametrize("p,kind", [("0.999995", "dropping everything"), ("1e-6", "no dropout")])
def test_train_reports_a_bad_dropout_in_one_line(tmp_path, capsys, p, kind):
    data = tmp_path / "t.txt"
    data.write_text("hello there\n" * 200)
    assert T.main(["--data", str(data), "--dropout", p, "--out", str(tmp_path / "w.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train: error: --dropout must be 0 or in") and kind in err
    assert len(err.strip().splitlines()) == 1


# ------------------------------------------------------------- the flat buffer

def test_params_cannot_be_rebound():
    model = small_model()
    k = "layers.0.linear1.weight"
    before = model.params[k]
    with pytest.raises(TypeError, match=r"model.params\[k\]\[...\] = arr.*load_state_dict"):
        model.params[k] = np.zeros_like(before)
    for call in (lambda: model.params.pop(k), lambda: model.params.update({k: before.copy()}),
                 lambda: model.params.__delitem__(k), lambda: model.params.clear(),
                 lambda: model.params.setdefault("x", 1)):
        with pytest.raises(TypeError):
            call()
    with pytest.raises(AttributeError, match="in place"):
        model.params = dict(model.params)
    with pytest.raises(AttributeError, match="in place"):
        model.flat = model.flat.copy()
    assert model.params[k] is before and flat_base(model.params) is model.flat
    model.params[k] *= 2  # in place: the same array is written back, which is allowed
    model.flat += 0  # likewise
    model.params[k][...] = 0.5
    assert model.params[k] is before and np.all(before == 0.5)
    assert isinstance(pickle.loads(pickle.dumps(model.params)), dict)


def test_load_state_dict_copies_into_the_flat_buffer_and_every_reader_follows():
    """decode_step (per-layer views), forward (params) and AdamW's flat pass all see the loaded values."""
    model, other = small_model(), TinyLLM(Config(**SMALL), seed=7)
    opt = AdamW(model.params, lr=0.0, weight_decay=0.0)
    flat, views = model.flat, dict(model.params)
    model.load_state_dict({k: v.astype(np.float64) for k, v in other.params.items()})  # cast to float32
    assert model.flat is flat and all(model.params[k] is v for k, v in views.items())
    np.testing.assert_array_equal(model.flat, other.flat)
    idx = [3, 1, 4, 1, 5]
    cache = model.new_kv_cache()
    steps = np.stack([model.decode_step(t, i, cache) for i, t in enumerate(idx)])
    np.testing.assert_allclose(steps, other.forward(np.array([idx]))[0], rtol=1e-5, atol=1e-5)
    assert opt._flat is model.flat
    _, grads = model.loss_and_grads(np.array([idx]), np.array([idx]))
    assert type(grads) is dict and flat_base(grads) is not None  # grads stay plain dicts of views


def test_load_state_dict_checks_everything_before_copying():
    model = small_model()
    good = {k: v.copy() for k, v in model.params.items()}
    before = model.flat.copy()
    k = "ln.weight"
    for bad, msg in (({**good, k: np.full(16, np.nan)}, "NaN"), ({**good, k: np.zeros(15)}, "shape"),
                     ({**good, k: np.zeros(16, np.int64)}, "dtype"), ({**good, "extra": np.zeros(1)}, "unexpected"),
                     ({n: a for n, a in good.items() if n != k}, "missing")):
        bad = {n: (a + 1 if n == "tok_emb.weight" else a) for n, a in bad.items()}  # a change that must not land
        with pytest.raises(ValueError, match=msg):
            model.load_state_dict(bad)
        np.testing.assert_array_equal(model.flat, before)


def test_load_model_goes_through_load_state_dict(tmp_path):
    model = small_model()
    model.save(tmp_path / "m.npz")
    loaded = load_model(tmp_path / "m.npz")
    np.testing.assert_array_equal(loaded.flat, model.flat)
    assert flat_base(loaded.params) is loaded.flat
