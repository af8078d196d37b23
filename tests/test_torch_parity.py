"""Parity with the original model built from PyTorch's nn.TransformerEncoderLayer (skipped without torch)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tinyllm_np import Config, TinyLLM  # noqa: E402
from tinyllm_np.torch_ref import from_numpy  # noqa: E402


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_logits_loss_and_every_gradient_match_pytorch(norm_first, activation):
    cfg = Config(vocab_size=59, norm_first=norm_first, activation=activation)
    model = TinyLLM(cfg, seed=2, dtype=np.float64)
    tmodel = from_numpy(model).eval()  # eval: dropout off on both sides
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 59, (3, 40))
    tgt = rng.integers(0, 59, (3, 40))
    loss, grads = model.loss_and_grads(idx, tgt)
    tlogits = tmodel(torch.from_numpy(idx))
    tloss = torch.nn.functional.cross_entropy(tlogits.reshape(-1, 59), torch.from_numpy(tgt).reshape(-1))
    tloss.backward()
    np.testing.assert_allclose(model.forward(idx), tlogits.detach().numpy(), rtol=1e-10, atol=1e-10)
    assert loss == pytest.approx(tloss.item(), rel=1e-12)
    for name, p in tmodel.named_parameters():
        np.testing.assert_allclose(grads[name], p.grad.numpy(), rtol=1e-8, atol=1e-12, err_msg=name)


def test_float32_full_context_matches_pytorch():
    model = TinyLLM(Config(vocab_size=59), seed=0)
    tmodel = from_numpy(model).eval()
    idx = np.random.default_rng(1).integers(0, 59, (2, 128))
    with torch.no_grad():
        want = tmodel(torch.from_numpy(idx)).numpy()
    np.testing.assert_allclose(model.forward(idx), want, rtol=1e-4, atol=1e-4)


def test_state_dict_names_and_shapes_are_the_originals():
    model = TinyLLM(Config(vocab_size=59))
    tmodel = from_numpy(model)
    tstate = tmodel.state_dict()
    assert list(tstate) == list(model.params)
    assert all(tuple(tstate[k].shape) == model.params[k].shape for k in tstate)
    assert sum(p.numel() for p in tmodel.parameters()) == 626_560
