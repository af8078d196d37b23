"""Chat: the shipped weights give the original's answers; the REPL and --prompt behave."""

import os
import subprocess
import sys

import numpy as np
import pytest

from tinyllm_np import TinyLLM, load_model
from tinyllm_np.chat import ChatSession, StopFilter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(ROOT, "weights", "tinyllm.npz")

EXAMPLES = [
    ("Hello!", "Hi there! How can I help you today?"),
    ("What is AI?", "AI stands for Artificial Intelligence. It refers to computer systems designed to perform "
                    "tasks that typically require human intelligence."),
    ("Tell me a joke", "Why did the computer go to the doctor? Because it had a virus!"),
]


def chat(*args, stdin=None):
    r = subprocess.run([sys.executable, "chat.py", *args], cwd=ROOT, input=stdin, capture_output=True,
                       timeout=120)
    return r.returncode, r.stdout.decode("utf-8"), r.stderr.decode("utf-8")


@pytest.fixture(scope="module")
def shipped():
    return load_model(WEIGHTS)


def test_shipped_weights_are_the_original_size(shipped):
    assert shipped.n_params == 626_560 and shipped.dtype == np.float32 and len(shipped.chars) == 59


@pytest.mark.parametrize("prompt,answer", EXAMPLES)
def test_prompt_greedy_gives_the_originals_answer(prompt, answer):
    code, out, err = chat("--prompt", prompt, "--greedy")
    assert code == 0, err
    assert out == answer + "\n"


def test_sampled_answers_at_default_temperature(shipped):
    session = ChatSession(shipped, temperature=0.7, seed=0)
    got = [session.reply("Hello!") for _ in range(5)]
    assert got.count("Hi there! How can I help you today?") >= 4


def test_unseen_phrasings_get_the_right_answer(shipped):
    session = ChatSession(shipped, greedy=True)
    assert session.reply("hello there bot") == "Hi there! How can I help you today?"
    session.reset()
    assert session.reply("so what is ai") == EXAMPLES[1][1]


def test_out_of_vocabulary_characters_are_dropped_with_a_notice():
    code, out, err = chat("--prompt", "Hello!\U0001F600\u00e9", "--greedy")
    assert code == 0 and out == "Hi there! How can I help you today?\n"
    assert "dropped 2 character(s)" in err and "Traceback" not in err


def test_piped_multi_turn_session_with_commands():
    code, out, err = chat("--greedy", stdin="Hello!\n/help\n\n   \n/reset\nTell me a joke\n/quit\nignored\n".encode())
    assert code == 0, err
    assert out.splitlines() == [EXAMPLES[0][1], EXAMPLES[2][1]]
    assert "/reset" in err and "conversation cleared" in err


def test_history_is_kept_and_trimmed_oldest_first(shipped):
    s = ChatSession(shipped, greedy=True)
    s.history = [("a" * 10, "b" * 10), ("c" * 10, "d" * 10), ("e" * 10, "f" * 10)]
    p = s.prompt("Hello!")
    assert p.endswith("<|user|>Hello!<|bot|>") and len(p) <= s.context - s.reserve
    assert "eeee" in p and "aaaa" not in p  # the newest exchange stays, the oldest goes first


def test_stop_filter_holds_back_markers():
    f = StopFilter()
    shown = "".join(f.feed(c) for c in "Hi <there> <|en")
    assert shown == "Hi <there> " and not f.stopped
    assert f.feed("d") == "" and f.feed("|") == "" and f.feed(">") == "" and f.stopped


def test_a_reply_stops_at_every_turn_marker(monkeypatch, shipped):
    """<|bot|> ends a reply too: a weakly trained model may write one instead of <|end|>."""
    from tinyllm_np import chat as C

    for marker in (C.END, C.USER, C.BOT):
        f, shown = StopFilter(), ""
        for c in "Sure." + marker + "more":
            shown += f.feed(c)
            if f.stopped:
                break
        assert shown == "Sure." and f.stopped, marker
    session = ChatSession(shipped, greedy=True)
    said = [session.tok.stoi[c] for c in "Yes<|bot|>No"]
    monkeypatch.setattr(C, "generate", lambda *args, **kwargs: iter(said))
    assert session.reply("Hi") == "Yes" and session.history == [("Hi", "Yes")]


def test_bad_weights_path_is_one_line_error(tmp_path):
    code, out, err = chat("--weights", str(tmp_path / "nope.npz"), "--prompt", "hi")
    assert code == 2 and out == "" and err.count("\n") == 1 and "no such file" in err


def test_readme_conversation_in_one_session():
    """The README's transcript: the three examples in one conversation, history kept."""
    code, out, err = chat("--greedy", stdin="\n".join(q for q, _ in EXAMPLES).encode() + b"\n")
    assert code == 0 and out.splitlines() == [a for _, a in EXAMPLES]


def test_slide_1_gives_the_known_answer():
    code, out, err = chat("--prompt", "Hello!", "--greedy", "--slide", "1")
    assert code == 0, err
    assert out == EXAMPLES[0][1] + "\n"


def test_slide_reaches_generation(monkeypatch, capsys):
    """--slide goes through ChatSession to generate(); the default is generate's own, context // 2 = 64."""
    from tinyllm_np import chat as C

    seen = []
    real = C.generate

    def spy(*args, **kwargs):
        seen.append(kwargs.get("slide"))
        return real(*args, **kwargs)

    monkeypatch.setattr(C, "generate", spy)
    long = "blah " * 40 + "Hello!"  # 200+ characters: the window has to move
    assert C.main(["--prompt", long, "--greedy", "--slide", "1", "--max-new-tokens", "5"]) == 0
    assert C.main(["--prompt", "Hello!", "--greedy", "--max-new-tokens", "5"]) == 0
    assert seen == [1, 64]
    capsys.readouterr()


def test_slide_1_is_the_always_last_128_window(shipped):
    """slide=1 equals recomputing the last 128 characters for every character (the original's rule)."""
    from tinyllm_np.generate import generate

    message = "blah " * 30 + "Hello!"
    session = ChatSession(shipped, greedy=True, slide=1, max_new_tokens=20)
    ids = [int(i) for i in session.tok.encode(session.prompt(message))]
    assert len(ids) > shipped.config.context + 20  # the window moves at every character
    want = []
    for _ in range(20):
        window = np.asarray(ids[-shipped.config.context:])[None]
        want.append(int(np.argmax(shipped.forward(window)[0, -1])))
        ids.append(want[-1])
    got = list(generate(shipped, session.tok.encode(session.prompt(message)), 20, greedy=True, slide=1))
    assert got == want
    assert session.reply(message) == "".join(session.tok.chars[t] for t in want).split("<|end|>")[0]


@pytest.mark.parametrize("value", ["0", "129", "-3"])
def test_bad_slide_is_one_line(value):
    code, out, err = chat("--slide", value, "--prompt", "Hello!")
    assert code == 2 and out == "" and err.startswith("chat: error: --slide must be between 1 and 128")
    assert err.count("\n") == 1


def test_default_weights_found_in_a_checkout_then_an_install_prefix(tmp_path, monkeypatch):
    from tinyllm_np import chat as C

    checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(C.__file__))), "weights", "tinyllm.npz")
    assert C.default_weights() == checkout  # running from this checkout
    # a regular install: no weights/ beside the package, a copy under <prefix>/share/tinyllm-np
    fake_pkg = tmp_path / "site-packages" / "tinyllm_np" / "chat.py"
    monkeypatch.setattr(C, "__file__", str(fake_pkg))
    monkeypatch.setattr(C.sys, "prefix", str(tmp_path / "prefix"))
    monkeypatch.chdir(tmp_path)
    assert C.default_weights() == os.path.join("weights", "tinyllm.npz")  # nothing anywhere: the loader reports it
    installed = tmp_path / "prefix" / "share" / "tinyllm-np" / "tinyllm.npz"
    installed.parent.mkdir(parents=True)
    installed.write_bytes(b"")
    assert C.default_weights() == str(installed)
