"""The sampler: batched decode equals single streams, nucleus sampling, and the command line."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest

from tinyllm_np import Config, TinyLLM, load_model
from tinyllm_np.chat import default_weights
from tinyllm_np.generate import BatchDecoder, generate, generate_batch, sample, window_start
from tinyllm_np import sample as S

SHIPPED = load_model(default_weights())
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_model(context=16, dtype=np.float64, **kw):
    return TinyLLM(Config(vocab_size=23, d_model=16, n_layers=2, n_heads=2, d_ff=32, context=context, **kw),
                   seed=5, dtype=dtype)


# ------------------------------------------------------------------ batched decode

@pytest.mark.parametrize("norm_first,activation", [(False, "relu"), (True, "gelu")])
def test_decode_step_batch_equals_single_streams(norm_first, activation):
    """B different streams in one step: each row equals decode_step on that stream alone, and the full forward.

    The norms get random scales and shifts (a fresh model's are 1 and 0), so that decode_weights' folding
    of them into the matrices they feed is checked.
    """
    model = small_model(norm_first=norm_first, activation=activation)
    rng = np.random.default_rng(8)
    for name, p in model.params.items():
        if "norm" in name or name.startswith("ln."):
            p[...] = rng.uniform(0.5, 1.5, p.shape) if name.endswith("weight") else rng.normal(0, 0.5, p.shape)
    idx = np.random.default_rng(3).integers(0, 23, (3, 16))
    cache, singles = model.new_kv_cache(batch=3), [model.new_kv_cache() for _ in range(3)]
    w = model.decode_weights()
    steps = np.stack([model.decode_step_batch(idx[:, pos], pos, cache, w) for pos in range(16)], axis=1)
    one = np.stack([[model.decode_step(int(idx[b, pos]), pos, singles[b]) for pos in range(16)] for b in range(3)])
    np.testing.assert_allclose(steps, one, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(steps, model.forward(idx), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(model.decode_step_batch(idx[:, 0], 0, model.new_kv_cache(batch=3)),
                               steps[:, 0], rtol=1e-12)  # without prepared weights: the same


def test_decode_step_batch_rejects_bad_input():
    model = small_model()
    cache = model.new_kv_cache(batch=2)
    for tokens, pos in (([0, 23], 0), ([-1, 0], 0), ([0, 0], 16), ([0, 0], -1), ([0], 0), ([[0, 0]], 0), ([], 0)):
        with pytest.raises(ValueError):
            model.decode_step_batch(np.array(tokens, dtype=np.int64), pos, cache)


@pytest.mark.parametrize("slide", [1, 5, None])
def test_batched_greedy_equals_one_at_a_time_past_the_context(slide):
    """4 different prompts, 60 greedy tokens with a 16-token context: the window slides for all at once."""
    model = small_model()
    prompts = np.random.default_rng(1).integers(0, 23, (4, 7))
    steps = np.stack(list(generate_batch(model, prompts, 60, greedy=True, slide=slide)), axis=1)
    for b in range(4):
        assert steps[b].tolist() == list(generate(model, prompts[b], 60, greedy=True, slide=slide))


def test_batch_decoder_owns_its_tokens():
    """Its tokens only grow through append: a caller cannot edit them behind the cache's back."""
    model = small_model()
    dec = BatchDecoder(model, np.array([[1, 2], [3, 4]]))
    first = dec.logits()
    assert dec.logits() is first  # asked twice: the same logits, nothing recomputed
    with pytest.raises(ValueError):
        dec.tokens[0, 0] = 5
    for bad in ([1], [1, 2, 3], [[1, 2]], [1.5, 2.0]):
        with pytest.raises(ValueError):
            dec.append(np.array(bad))
    for t in range(300):  # past the first buffer (grown by doubling) and many window moves
        dec.append(np.array([t % 23, (t * 7) % 23]))
    assert dec.tokens.shape == (2, 302) and dec.tokens[1, -1] == (299 * 7) % 23
    start = window_start(302, 16, 8)  # the default slide, context // 2
    full = [model.forward(np.asarray(dec.tokens[b:b + 1, start:]))[0, -1] for b in range(2)]
    np.testing.assert_allclose(dec.logits(), np.stack(full), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        BatchDecoder(model, np.zeros((2, 0), dtype=np.int64))


# ------------------------------------------------------------------ sampling

def test_rows_draw_in_order_from_one_generator():
    """(B,V) rows: row b takes the b-th draw, as B single-row calls on the same generator would."""
    logits = np.random.default_rng(0).standard_normal((5, 30))
    batch = sample(logits, 1.3, rng=np.random.default_rng(9))
    rng = np.random.default_rng(9)
    assert batch.tolist() == [sample(row, 1.3, rng=rng) for row in logits]
    assert sample(logits, greedy=True).tolist() == np.argmax(logits, axis=1).tolist()
    assert isinstance(sample(logits[0], 1.0, rng=rng), int)


def test_top_p_keeps_the_smallest_set_reaching_p():
    p = np.array([0.05, 0.5, 0.15, 0.3])
    logits = np.log(p)
    for top_p, kept in ((0.4, {1}), (0.75, {1, 3}), (0.85, {1, 2, 3}), (0.99, {0, 1, 2, 3})):
        draws = sample(np.tile(logits, (4000, 1)), 1.0, top_p=top_p, rng=np.random.default_rng(0))
        assert set(draws.tolist()) == kept, top_p
    draws = sample(np.tile(logits, (20000, 1)), 1.0, top_p=0.75, rng=np.random.default_rng(1))
    assert abs(np.mean(draws == 1) - 0.5 / 0.8) < 0.02  # renormalised over the kept set: 0.625 and 0.375
    # after temperature: at T=1, p=0.6 needs 0.5 + 0.3; at T=0.5 (0.5, 0.3 -> 0.68, 0.25) 0.68 alone suffices
    assert set(sample(np.tile(logits, (2000, 1)), 1.0, top_p=0.6, rng=np.random.default_rng(2)).tolist()) == {1, 3}
    assert set(sample(np.tile(logits, (2000, 1)), 0.5, top_p=0.6, rng=np.random.default_rng(2)).tolist()) == {1}
    # after top-k: top_k=2 leaves 0.5/0.8 and 0.3/0.8; p=0.6 then keeps the first only
    assert set(sample(np.tile(logits, (2000, 1)), 1.0, top_k=2, top_p=0.6,
                      rng=np.random.default_rng(3)).tolist()) == {1}


def test_top_p_limits():
    logits = np.random.default_rng(4).standard_normal((50, 40))
    assert sample(logits, 1.0, top_p=1e-9, rng=np.random.default_rng(0)).tolist() == np.argmax(logits, 1).tolist()
    plain = sample(logits, 0.9, rng=np.random.default_rng(5))
    assert sample(logits, 0.9, top_p=1.0, rng=np.random.default_rng(5)).tolist() == plain.tolist()
    tie = np.zeros(6)
    assert sample(tie, 1.0, top_p=0.1, rng=np.random.default_rng(0)) == 0  # ties ranked by id
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ValueError):
            sample(logits[0], 1.0, top_p=bad)


# ------------------------------------------------------------------ command line

def run(argv, tty=False):
    """main(argv) with stdout/stderr captured: (code, out, err)."""
    class Out(io.StringIO):
        writes = 0

        def isatty(self):
            return tty

        def write(self, s):
            Out.writes += 1
            return super().write(s)

    out, err = Out(), io.StringIO()
    args, code = S.build_parser().parse_or_code(argv)
    assert code is None
    try:
        code = S.run(args, out=out, notice=lambda m: print(m, file=err))
    except S.SampleError as e:
        return 2, out.getvalue(), f"sample: error: {e}\n"
    return code, out.getvalue(), err.getvalue(), Out.writes


def samples(out):
    parts = out.split("\n" + S.DASHES + "\n")
    assert parts[-1] == ""  # every sample ends with its dashes line
    return parts[:-1]


def test_output_format_and_seed():
    start = "<|user|>"
    argv = ["--start", start, "--num-samples", "3", "--max-new-tokens", "60", "--temperature", "1"]
    code, out, err, _ = run(argv + ["--seed", "4"])
    assert code == 0 and err == ""
    got = samples(out)
    assert len(got) == 3 and all(s.startswith(start) and len(s) == len(start) + 60 for s in got)
    assert len(set(got)) == 3  # three independent draws
    assert run(argv + ["--seed", "4"])[1] == out
    assert run(argv + ["--seed", "5"])[1] != out
    assert run(["--start", start, "--num-samples", "1", "--max-new-tokens", "0"])[1] == start + "\n" + S.DASHES + "\n"


def test_defaults_follow_nanogpt():
    ap = S.build_parser()
    assert ap.get_default("start") == "\n" and ap.get_default("max_new_tokens") == 500
    assert ap.get_default("num_samples") == 10 and ap.get_default("seed") == 1337
    code, out, _, _ = run(["--max-new-tokens", "5"])
    assert code == 0 and len(samples(out)) == 10 and all(s.startswith("\n") for s in samples(out))


def test_streams_on_a_terminal_with_the_same_text():
    argv = ["--start", "<|user|>Hi<|bot|>", "--num-samples", "2", "--max-new-tokens", "30"]
    _, piped, _, few = run(argv)
    _, shown, _, many = run(argv, tty=True)
    assert shown == piped and many > few + 25  # the first sample character by character


def test_batched_greedy_equals_one_at_a_time_on_the_shipped_model():
    """3 greedy samples as one batch, 300 characters past the 128-character context: each is the chat's path."""
    start = "<|user|>What is a computer?<|bot|>"
    code, out, _, _ = run(["--start", start, "--num-samples", "3", "--max-new-tokens", "300", "--greedy"])
    ids = [SHIPPED.chars.index(c) for c in start]
    one = start + "".join(SHIPPED.chars[t] for t in generate(SHIPPED, ids, 300, greedy=True))
    assert code == 0 and samples(out) == [one] * 3


def test_file_start_and_a_start_longer_than_the_context(tmp_path):
    text = open(os.path.join(ROOT, "data", "dialogue.txt"), encoding="utf-8").read()[:300]
    (tmp_path / "start.txt").write_text(text, encoding="utf-8")
    code, out, err, _ = run(["--start", f"FILE:{tmp_path / 'start.txt'}", "--num-samples", "2",
                             "--max-new-tokens", "50", "--greedy"])
    assert code == 0 and "longer than the 128-character window" in err and len(err.splitlines()) == 1
    ids = [SHIPPED.chars.index(c) for c in text]
    one = text + "".join(SHIPPED.chars[t] for t in generate(SHIPPED, ids, 50, greedy=True))
    assert samples(out) == [one] * 2
    assert run(["--start", text, "--num-samples", "2", "--max-new-tokens", "50", "--greedy"])[1] == out


def test_unknown_characters_are_dropped_with_a_notice():
    code, out, err, _ = run(["--start", "Hel€lo!é", "--num-samples", "1", "--max-new-tokens", "10"])
    assert code == 0 and err.splitlines() == ["sample: dropped 2 character(s) not in the vocabulary: \\xe9\\u20ac"]
    assert samples(out)[0].startswith("Hello!") and len(samples(out)[0]) == 16  # the start the model saw
    code, _, err = run(["--start", "€€"])
    assert code == 2 and err == "sample: error: --start has no character in the model's vocabulary\n"


def test_a_plain_text_model(tmp_path):
    """A vocabulary without the chat markers (which the chat refuses) samples all the same."""
    chars = list("abcdefgh \n")
    model = TinyLLM(Config(vocab_size=len(chars), d_model=16, n_layers=2, n_heads=2, d_ff=32, context=8,
                           norm_first=True, activation="gelu"), seed=1, chars=chars)
    model.save(tmp_path / "plain.npz")
    argv = ["--weights", str(tmp_path / "plain.npz"), "--start", "abc", "--num-samples", "4",
            "--max-new-tokens", "40", "--top-p", "0.9", "--top-k", "5", "--temperature", "1.2"]
    code, out, err, _ = run(argv)
    got = samples(out)
    assert code == 0 and err == "" and len(got) == 4
    assert all(s.startswith("abc") and len(s) == 43 and set(s) <= set(chars) for s in got)
    assert run(argv)[1] == out


@pytest.mark.parametrize("argv,message", [
    (["--num-samples", "0"], "--num-samples must be >= 1"),
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--slide", "0"], "--slide must be between 1 and 128 (the context), got 0"),
    (["--start", "FILE:/no/such/file"], "--start FILE:/no/such/file: No such file or directory"),
    (["--start", ""], "--start is empty"),
    (["--weights", "/no/such.npz"], "/no/such.npz: no such file"),
])
def test_bad_input_is_one_line_exit_2(argv, message):
    code, out, err = run(argv)
    assert (code, out, err) == (2, "", f"sample: error: {message}\n")


def test_bad_files(tmp_path):
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    code, _, err = run(["--start", f"FILE:{tmp_path / 'latin1.txt'}"])
    assert code == 2 and "not UTF-8 text" in err
    model = small_model(dtype=np.float32)  # no vocabulary
    model.save(tmp_path / "novocab.npz")
    code, _, err = run(["--weights", str(tmp_path / "novocab.npz")])
    assert code == 2 and err.endswith("has no vocabulary ('__chars__'); cannot decode samples\n")


def test_the_command_one_line_errors_and_lean_imports(tmp_path):
    """As a process: usage errors one line, exit 2, no traceback; start-up imports numpy and the package only."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    for argv, first in ((["--bogus"], "sample: error: unrecognized arguments: --bogus"),
                        (["--weights", str(tmp_path)], f"sample: error: {tmp_path}: is a directory")):
        r = subprocess.run([sys.executable, "-m", "tinyllm_np.sample", *argv], capture_output=True, text=True,
                           env=env, cwd=tmp_path)
        assert r.returncode == 2 and r.stdout == "" and r.stderr.startswith(first) and r.stderr.count("\n") == 1
    r = subprocess.run([sys.executable, "-c", "import sys, tinyllm_np.sample; "
                        "print(sorted(m for m in ('multiprocessing', 'concurrent', 'torch') if m in sys.modules))"],
                       capture_output=True, text=True, env=env)
    assert r.stdout == "[]\n"
    pyproject = open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8").read()
    assert 'tinyllm-sample = "tinyllm_np.sample:main"' in pyproject


def test_main_samples_on_one_blas_thread_and_restores_the_count(monkeypatch, capsys):
    from tinyllm_np.blas import blas_threads
    before = blas_threads()
    if before is None:
        pytest.skip("this BLAS's thread count cannot be set at run time")
    blas_threads(2)
    seen = []

    def fake_run(args):
        seen.append(blas_threads())
        return 0

    monkeypatch.setattr(S, "run", fake_run)
    try:
        assert S.main(["--num-samples", "1"]) == 0
        assert seen == [1] and blas_threads() == 2
        monkeypatch.setattr(S, "run", lambda args: (_ for _ in ()).throw(S.SampleError("bad")))
        assert S.main([]) == 2 and blas_threads() == 2  # restored on the error path too
    finally:
        blas_threads(before)
