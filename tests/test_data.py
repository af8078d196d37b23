"""Dataset generator and character tokenizer."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tinyllm_np import dataset
from tinyllm_np.tokenizer import CharTokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_committed_dataset_is_the_generators_output():
    committed = (ROOT / "data" / "dialogue.txt").read_bytes()
    assert committed == dataset.generate().encode("utf-8")
    assert 1_100_000 < len(committed) < 1_300_000


def test_generator_is_deterministic_and_seeded():
    assert dataset.generate(seed=1, n_dialogues=2000) == dataset.generate(seed=1, n_dialogues=2000)
    assert dataset.generate(seed=1, n_dialogues=2000) != dataset.generate(seed=2, n_dialogues=2000)


def test_vocabulary_is_the_originals_59_characters():
    text = dataset.generate()
    assert len(set(text)) == 59 and set(text) == set(dataset.ALPHABET)


def test_original_examples_are_in_the_data_with_exact_answers():
    text = dataset.generate()
    for q, a in [("Hello!", "Hi there! How can I help you today?"),
                 ("What is AI?", "AI stands for Artificial Intelligence. It refers to computer systems designed "
                                 "to perform tasks that typically require human intelligence."),
                 ("Tell me a joke", "Why did the computer go to the doctor? Because it had a virus!")]:
        assert f"<|user|>{q}<|bot|>{a}<|end|>\n" in text


def test_every_line_is_one_exchange_and_each_question_has_one_answer():
    answers = {}
    for line in dataset.generate(n_dialogues=3000).splitlines():
        assert line.startswith("<|user|>") and line.endswith("<|end|>") and line.count("<|bot|>") == 1
        q, a = line[len("<|user|>"):-len("<|end|>")].split("<|bot|>")
        assert answers.setdefault(q, a) == a


def test_phrasings_include_variants():
    assert dataset.variants("What is AI?") == ["What is AI?", "what is ai?", "What is AI", "what is ai"]


def test_module_command_writes_file(tmp_path):
    out = tmp_path / "d.txt"
    assert dataset.main(["--out", str(out), "--dialogues", "2000", "--seed", "3"]) == 0
    assert out.read_text(encoding="utf-8") == dataset.generate(seed=3, n_dialogues=2000)


def test_tokenizer_round_trip():
    text = "héllo wörld <|user|> 123 ✓\n"
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.chars == sorted(set(text))


def test_tokenizer_unknown_characters():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.encode("abz")
    assert tok.decode(tok.encode("a😀bz", drop_unknown=True)) == "ab"
    assert tok.unknown("xay") == ["x", "y"]
    with pytest.raises(ValueError):
        CharTokenizer(["a", "a"])


def test_module_command_bad_input(tmp_path, capsys):
    assert dataset.main(["--out", str(tmp_path / "d.txt"), "--dialogues", "5"]) == 2
    assert capsys.readouterr().err.startswith("dataset: error: need at least")
    assert not (tmp_path / "d.txt").exists()


def test_dataset_command_runs_without_a_runpy_warning():
    # nothing the package's __init__ imports may import dataset.py, or `python -m tinyllm_np.dataset`
    # (the README's command) warns that its module was imported before it ran
    r = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "tinyllm_np.dataset", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "RuntimeWarning" not in r.stderr, r.stderr
