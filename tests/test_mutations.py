"""A mutation run: each deliberate bug below must make named, real tests fail.

Each mutant is patched into tinyllm_np.layers (monkeypatch, undone after the test), then each of its
killers -- ordinary tests of this suite, called as functions -- must raise AssertionError.  The
killers pass unmutated (they run as themselves in the suite), so a failure here means the mutant
survived: the suite no longer checks what it claims to.
"""

import numpy as np
import pytest

import test_gradcheck
import test_layers
from tinyllm_np import layers as L

_mask, _scale = L.dropout_mask, L.dropout_scale

MUTANTS = {
    # dropout drops at p/3 (the scale still says p): E[dropout(x)] != x and the drop rate is wrong
    "drop rate p/3": ("dropout_mask", lambda shape, p, rng: _mask(shape, p / 3, rng)),
    # inverted dropout without its 1/(1-p): E[dropout(x)] = (1-p) x
    "dropout scale 1": ("dropout_scale", lambda p, dtype: np.dtype(dtype).type(1)),
    # a ReLU backward that passes every gradient, as if ReLU were the identity
    "ReLU backward passes everything": ("relu_backward", lambda dout, cache, out=None: dout),
}

DROPOUT_KILLERS = [test_layers.test_dropout_drops_at_rate_p_and_keeps_the_mean,
                   test_layers.test_attention_dropout_drops_attention_weights_at_rate_p,
                   test_layers.test_ffn_dropout_drops_hidden_units_at_rate_p]
KILLERS = {
    "drop rate p/3": DROPOUT_KILLERS,
    "dropout scale 1": DROPOUT_KILLERS,
    "ReLU backward passes everything": [
        lambda: test_gradcheck.test_layer_gradients_match_finite_differences("relu"),
        lambda: test_gradcheck.test_layer_gradients_match_finite_differences("ffn_relu"),  # the model's FFN
    ],
}


@pytest.mark.parametrize("mutant,killer", [(m, i) for m in MUTANTS for i in range(len(KILLERS[m]))])
def test_mutant_is_killed(monkeypatch, mutant, killer):
    name, bad = MUTANTS[mutant]
    monkeypatch.setattr(L, name, bad)
    with pytest.raises(AssertionError):
        KILLERS[mutant][killer]()


def test_relu_mutant_breaks_the_whole_model_gradient(monkeypatch):
    """The ReLU the gradcheck checks is the model's: breaking it breaks the model's gradients."""
    from tinyllm_np import gradcheck as gc
    monkeypatch.setattr(L, "relu_backward", MUTANTS["ReLU backward passes everything"][1])
    errors = gc.check_model(activation="relu", dropout=False)
    assert max(e.rel for e in errors.values()) > 1e-3
