"""Bad weight files, odd chat input, interrupted saves: a clear one-line error or a graceful answer."""

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from tinyllm_np import Config, TinyLLM, load_model, WeightsError
from tinyllm_np import fileio
from tinyllm_np.chat import ChatSession

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(ROOT, "weights", "tinyllm.npz")
HELLO = "Hi there! How can I help you today?"
SMALL = dict(vocab_size=13, d_model=16, n_layers=1, n_heads=2, d_ff=32, context=10)


def run(args, stdin=b"", timeout=120):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, input=stdin, capture_output=True, timeout=timeout)
    return r.returncode, r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace")


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.npz"
    TinyLLM(Config(**SMALL), chars=list("abcdefghijklm")).save(path)
    return path


def _rewrite(path, change):
    data = dict(np.load(path))
    change(data)
    with open(path, "wb") as f:
        np.savez(f, **data)
    return path


# ------------------------------------------------------------ weight files

def bad_files(tmp_path, good):
    """(name, path, expected message) for every kind of bad weights file."""
    raw = good.read_bytes()
    out = []

    def add(name, data, msg):
        p = tmp_path / f"{name}.npz"
        p.write_bytes(data) if isinstance(data, bytes) else None
        out.append((name, p, msg))
        return p

    add("empty", b"", "file is empty")
    add("truncated", raw[: len(raw) // 2], "cannot read")
    corrupt = bytearray(raw)
    mid = len(raw) // 2
    corrupt[mid:mid + 64] = bytes(64)
    add("corrupt", bytes(corrupt), "damaged")
    add("text", b"hello, I am not a weights file\n" * 10, "not an .npz")
    add("pickle", pickle.dumps({"tok_emb.weight": [1, 2, 3]}), "pickle")
    buf = io.BytesIO()
    np.save(buf, np.zeros(3))
    add("npy", buf.getvalue(), "single .npy array")
    for name, change, msg in [
        ("object", lambda d: d.__setitem__("head.weight", np.array([{"x": 1}], dtype=object)), "pickled object"),
        ("missing", lambda d: d.pop("ln.bias"), "missing tensor(s) ln.bias"),
        ("extra", lambda d: d.__setitem__("secret", np.zeros(2, np.float32)), "unexpected tensor(s) secret"),
        ("shape", lambda d: d.__setitem__("ln.bias", np.zeros(15, np.float32)), "'ln.bias' has shape (15,)"),
        ("dtype", lambda d: d.__setitem__("ln.bias", np.zeros(16, np.int32)), "dtype int32"),
        ("mixed", lambda d: d.__setitem__("ln.bias", np.zeros(16, np.float64)), "mix dtypes"),
        ("nan", lambda d: d.__setitem__("ln.bias", np.full(16, np.nan, np.float32)), "NaN"),
        ("config", lambda d: d.__setitem__("__config__", np.array(json.dumps({**SMALL, "d_ff": 64}))),
         "config says (64, 16)"),
        ("badjson", lambda d: d.__setitem__("__config__", np.array("{not json")), "not valid JSON"),
        ("noconfig", lambda d: d.pop("__config__"), "no '__config__'"),
        ("unknownfield", lambda d: d.__setitem__("__config__", np.array('{"vocab_size": 13, "wings": 2}')),
         "unknown config field"),
        ("vocab", lambda d: d.__setitem__("__chars__", np.array('["a", "b"]')), "vocabulary has 2 characters"),
        ("dupvocab", lambda d: d.__setitem__("__chars__", np.array('["a"' + ', "a"' * 12 + "]")), "distinct"),
    ]:
        p = tmp_path / f"{name}.npz"
        p.write_bytes(good.read_bytes())
        out.append((name, _rewrite(p, change), msg))
    return out


def test_every_bad_weights_file_is_refused_with_a_clear_message(tmp_path, good):
    load_model(good)  # the untouched file loads
    for name, path, msg in bad_files(tmp_path, good):
        with pytest.raises(WeightsError) as e:
            load_model(path)
        text = str(e.value)
        assert msg in text, f"{name}: {text}"
        assert text.startswith(str(path)) and "\n" not in text, name
    with pytest.raises(WeightsError, match="no such file"):
        load_model(tmp_path / "absent.npz")
    with pytest.raises(WeightsError, match="directory"):
        load_model(tmp_path)


def test_pickle_in_weights_never_runs(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.npz"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(WeightsError):
        load_model(path)
    arr = np.empty(1, dtype=object)
    arr[0] = Evil()
    with zipfile.ZipFile(tmp_path / "evil2.npz", "w") as z, z.open("head.weight.npy", "w") as f:
        np.lib.format.write_array(f, arr, allow_pickle=True)
    with pytest.raises(WeightsError):
        load_model(tmp_path / "evil2.npz")
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["truncated", "pickle", "shape", "vocab"])
def test_cli_reports_bad_weights_in_one_line(tmp_path, good, kind):
    path = next(p for name, p, _ in bad_files(tmp_path, good) if name == kind)
    code, out, err = run(["chat.py", "--weights", str(path), "--prompt", "hi"])
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"chat: error: {path}") and "Traceback" not in err


# ------------------------------------------------------------ atomic saves

def test_interrupted_save_keeps_the_old_file(tmp_path, good, monkeypatch):
    before = good.read_bytes()

    def explode(f, **arrays):
        f.write(b"partial garbage")
        raise KeyboardInterrupt  # Ctrl-C in the middle of writing

    monkeypatch.setattr(fileio.np, "savez", explode)
    with pytest.raises(KeyboardInterrupt):
        TinyLLM(Config(**SMALL), seed=9).save(good)
    assert good.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["good.npz"]  # no temp file left behind


def test_save_replaces_atomically_and_keeps_permissions(tmp_path, good):
    os.chmod(good, 0o640)
    model = TinyLLM(Config(**SMALL), seed=4, chars=list("abcdefghijklm"))
    model.save(good)
    assert np.array_equal(load_model(good).flat, model.flat)
    assert os.stat(good).st_mode & 0o777 == 0o640


# ------------------------------------------------------------ chat input

@pytest.fixture(scope="module")
def session():
    return ChatSession(load_model(WEIGHTS), greedy=True)


def test_odd_chat_input_over_a_pipe():
    lines = [b"", b"   ", b"\xf0\x9f\x98\x80\xf0\x9f\x98\x80", b"Hel\x00lo!", b"\xff\xfeHello!\xc3",
             b"x" * 10_000, b"Hello!"]
    code, out, err = run(["chat.py", "--greedy", "--max-new-tokens", "150"], stdin=b"\n".join(lines) + b"\n")
    assert code == 0 and "Traceback" not in err
    replies = out.splitlines()
    assert len(replies) == 4  # the emoji-only line sends nothing; empty lines are skipped
    assert replies[0] == HELLO and replies[1] == HELLO  # NUL and invalid UTF-8 bytes are dropped
    assert replies[-1] == HELLO  # after a 10 KB line the conversation still works
    assert "nothing left to send" in err and "only its end is seen" in err and "\\x00" in err


def test_eof_without_newline_and_empty_stdin():
    assert run(["chat.py", "--greedy"], stdin=b"Hello!")[:2] == (0, HELLO + "\n")
    assert run(["chat.py", "--greedy"], stdin=b"")[:2] == (0, "")


def test_interrupted_reply_leaves_a_valid_context(session):
    session.reset()
    shown = []

    def emit(piece):
        shown.append(piece)
        if len(shown) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        session.reply("What is AI?", emit=emit)
    assert session.history == []  # the half reply is not kept
    assert session.reply("Hello!") == HELLO


def test_ctrl_c_while_waiting_for_input_exits_cleanly():
    proc = subprocess.Popen([sys.executable, "chat.py", "--greedy"], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write(b"Hello!\n")
    proc.stdin.flush()
    assert proc.stdout.readline().decode() == HELLO + "\n"  # now it waits for the next line
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and b"Traceback" not in err


def _wait_until_chat_runs(proc, timeout=20):
    """Wait until chat.py's own code runs (NumPy's extension is mapped), past Python's start-up.

    A SIGINT during the interpreter's start-up (site, .pth files) is Python's business, not
    chat.py's: it can end in "Fatal Python error: init_import_site" before any of our code runs.
    """
    maps = f"/proc/{proc.pid}/maps"
    if not os.path.exists(maps):
        time.sleep(0.3)  # no /proc: a conservative guess
        return
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with open(maps) as f:
                if "numpy" in f.read():
                    return
        except OSError:
            return
        time.sleep(0.002)


def test_ctrl_c_at_any_moment_never_shows_a_traceback():
    """From importing NumPy through loading the weights, waiting for input and replying.

    The first milliseconds are tried several times: a Ctrl-C inside NumPy's C start-up used to
    surface as an ImportError with a traceback in about one run in five.
    """
    for delay in (0.0, 0.001, 0.003) * 4 + (0.02, 0.1, 0.3, 1.0):
        proc = subprocess.Popen([sys.executable, "chat.py", "--greedy"], cwd=ROOT, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _wait_until_chat_runs(proc)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(b"Hello!\n" * 50, timeout=60)
        assert proc.returncode in (0, 130) and b"Traceback" not in err, (delay, err[-300:])


def test_bad_chat_flags():
    for flags in (["--temperature", "-1"], ["--max-new-tokens", "0"], ["--top-k", "0"]):
        code, out, err = run(["chat.py", *flags, "--prompt", "hi"])
        assert code == 2 and err.startswith("chat: error:") and err.count("\n") == 1


@pytest.mark.parametrize("flags,message", [
    (["--temperature", "abc"], "argument --temperature: invalid float value: 'abc'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--slide"], "argument --slide: expected one argument"),
])
def test_chat_argparse_errors_are_one_line(flags, message):
    code, out, err = run(["chat.py", *flags, "--prompt", "hi"])
    assert code == 2 and out == "" and err.startswith("chat: error: ") and message in err
    assert err.count("\n") == 1


def test_chat_help_still_works():
    code, out, err = run(["chat.py", "--help"])
    assert code == 0 and out.startswith("usage: chat.py") and "--slide" in out and err == ""


@pytest.mark.parametrize("where", ["load", "session"])
def test_ctrl_c_while_loading_exits_130_quietly(where, monkeypatch, capsys):
    from tinyllm_np import chat as C

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(C, "load_model", interrupted) if where == "load" else \
        monkeypatch.setattr(C, "ChatSession", interrupted)
    assert C.main(["--prompt", "Hello!", "--greedy"]) == 130
    out, err = capsys.readouterr()
    assert out == "" and err == ""
