"""Import of the original TinyLLM's PyTorch checkpoint (skipped without torch)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tinyllm_np import Config, TinyLLM, load_model  # noqa: E402
from tinyllm_np import convert  # noqa: E402
from tinyllm_np.torch_ref import TorchTinyLLM  # noqa: E402

CHARS = list("\n !',.<>?|ABCDEFGHIJKLMNOPRSTUVWYabcdefghijklmnopqrstuvwxyz")


def make_original(path, config, seed):
    torch.manual_seed(seed)
    tm = TorchTinyLLM(config).eval()
    torch.save({"chars": CHARS[:config.vocab_size], "model": tm.state_dict()}, path)
    return tm


@pytest.mark.parametrize("shape", [
    dict(vocab_size=59),  # the original 626,560-parameter model
    dict(vocab_size=59, d_model=192, n_layers=5, n_heads=6, d_ff=768, context=192),  # its 2.28 M successor
])
def test_original_checkpoint_converts_and_gives_the_same_logits(tmp_path, shape):
    cfg = Config(**shape)
    tm = make_original(tmp_path / "tiny_llm.pt", cfg, seed=0)
    assert convert.main([str(tmp_path / "tiny_llm.pt"), str(tmp_path / "w.npz")]) == 0
    model = load_model(tmp_path / "w.npz")
    assert model.config == cfg  # shapes -> architecture, heads from d_model / 32
    assert model.chars == CHARS[:59]
    if cfg.d_model == 192:
        assert model.n_params == 2_284_224
    idx = np.random.default_rng(0).integers(0, 59, (2, cfg.context))
    with torch.no_grad():
        want = tm(torch.from_numpy(idx)).numpy()
    np.testing.assert_allclose(model.forward(idx), want, rtol=1e-4, atol=1e-4)


def test_export_round_trip(tmp_path):
    model = TinyLLM(Config(vocab_size=59), seed=3, chars=CHARS)
    model.save(tmp_path / "a.npz")
    assert convert.main(["--to-torch", str(tmp_path / "a.npz"), str(tmp_path / "a.pt")]) == 0
    ckpt = torch.load(tmp_path / "a.pt", weights_only=True)
    assert ckpt["chars"] == CHARS and set(ckpt["model"]) == set(model.params)
    assert convert.main([str(tmp_path / "a.pt"), str(tmp_path / "b.npz")]) == 0
    assert np.array_equal(load_model(tmp_path / "b.npz").flat, model.flat)


def test_heads_flag_and_bad_files(tmp_path, capsys):
    cfg = Config(vocab_size=59, d_model=64, n_layers=2, n_heads=2, d_ff=128, context=32)
    make_original(tmp_path / "m.pt", cfg, seed=1)
    assert convert.main([str(tmp_path / "m.pt"), str(tmp_path / "m.npz"), "--n-heads", "4"]) == 0
    assert load_model(tmp_path / "m.npz").config.n_heads == 4
    assert convert.main([str(tmp_path / "m.pt"), str(tmp_path / "x.npz"), "--n-heads", "5"]) == 2
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert convert.main([str(tmp_path / "junk.pt"), str(tmp_path / "y.npz")]) == 2
    assert convert.main([str(tmp_path / "missing.pt"), str(tmp_path / "y.npz")]) == 2
    err = capsys.readouterr().err
    assert "divisible" in err and "cannot read" in err and "no such file" in err
    assert not (tmp_path / "x.npz").exists() and not (tmp_path / "y.npz").exists()


def test_pickled_code_in_checkpoint_is_refused(tmp_path, capsys):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"chars": CHARS, "model": {}, "x": Evil()}, path, pickle_module=pickle)
    assert convert.main([str(path), str(tmp_path / "e.npz")]) == 2
    captured = capsys.readouterr()
    assert "pwned" not in captured.out and "cannot read" in captured.err
