"""data.py: the held-out split, the ids file (smallest type, memory-mapped, rebuilt when stale or damaged)."""

import os
import pathlib

import numpy as np
import pytest

from tinyllm_np import data
from tinyllm_np.data import DataError, open_corpus, question_group, split_text
from tinyllm_np.tokenizer import CharTokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
DIALOGUE = (ROOT / "data" / "dialogue.txt").read_text(encoding="utf-8")


def question(line):
    return line[len("<|user|>"):line.index("<|bot|>")]


def test_chat_split_holds_out_whole_question_groups():
    train, val = split_text(DIALOGUE, 0.1)
    train_groups = {question_group(question(l)) for l in train.splitlines()}
    val_lines = val.splitlines()
    val_groups = {question_group(question(l)) for l in val_lines}
    assert val_groups and not val_groups & train_groups  # no validation question, in any case, in training
    assert {"hello", "what is ai", "tell me a joke"} <= train_groups  # the examples the tests check stay
    assert len(val_groups) == round(0.1 * len(train_groups | val_groups))
    assert 0.05 < len(val) / len(DIALOGUE) < 0.15
    assert sorted(train.splitlines() + val_lines) == sorted(DIALOGUE.splitlines())  # nothing lost
    assert split_text(DIALOGUE, 0.1) == (train, val)


def test_plain_split_drops_validation_lines_seen_in_training():
    lines = [f"line {i % 50}" if i % 3 else f"unique {i}" for i in range(400)]
    text = "\n".join(lines[:200]) + "\n\n" + "\n".join(lines[200:]) + "\n"
    train, val = split_text(text, 0.25)
    assert text.startswith(train)  # training: the head of the text
    seen = set(train.splitlines())
    val_lines = val.splitlines()
    assert val_lines and not [l for l in val_lines if l.strip() and l in seen]
    tail = text[len(train):].splitlines()
    assert val_lines == [l for l in tail if l not in seen or not l.strip()]  # the rest of the tail, in order


def test_chat_text_with_one_question_is_split_as_plain_text():
    text = "<|user|>hi<|bot|>a<|end|>\n" * 20 + "<|user|>hi<|bot|>b<|end|>\n" * 5
    train, val = split_text(text, 0.1)
    assert train == text[: len(train)] and val == ""


@pytest.mark.parametrize("text", [
    DIALOGUE[:20_000],
    "héllo wörld ✓ 東京\nline two\n" * 300 + "x" * 5000 + "\nend ✓ ü",  # a line longer than a piece
    "".join(f"<|user|>q{i % 40}é?<|bot|>answer {i % 7}<|end|>\n" for i in range(500)),
    "".join(f"line {i % 450} ✓\n" for i in range(500)) + "no final line break",  # validation in many pieces
])
def test_small_pieces_give_the_same_split_and_ids(tmp_path, monkeypatch, text):
    src = tmp_path / "t.txt"
    src.write_text(text, encoding="utf-8")
    whole = open_corpus(src, tmp_path / "a.ids", 0.1)
    monkeypatch.setattr(data, "CHUNK", 64)  # pieces cut mid-character, mid-line, mid-marker
    pieces = open_corpus(src, tmp_path / "b.ids", 0.1)
    assert np.array_equal(whole.train, pieces.train) and np.array_equal(whole.val, pieces.val)
    train, val = split_text(text, 0.1)
    tok = CharTokenizer.from_text(text)
    assert whole.chars == tok.chars
    assert np.array_equal(whole.train, tok.encode(train)) and np.array_equal(whole.val, tok.encode(val))


def test_non_utf8_error_names_the_byte_in_any_piece(tmp_path, monkeypatch):
    src = tmp_path / "t.txt"
    src.write_bytes("é".encode() * 100 + b"\xff" + b"abc\n" * 10)
    monkeypatch.setattr(data, "CHUNK", 64)
    with pytest.raises(DataError, match=r"not valid UTF-8 \(byte 200\)"):
        open_corpus(src, tmp_path / "t.ids", 0.1)
    src.write_bytes(b"")
    with pytest.raises(DataError, match="file is empty"):
        open_corpus(src, tmp_path / "t.ids", 0.1)


@pytest.mark.parametrize("n_chars,dtype", [(200, np.uint8), (256, np.uint8), (257, np.uint16), (70_000, np.uint32)])
def test_ids_use_the_smallest_type(tmp_path, n_chars, dtype):
    start = 0x20000 if n_chars > 60_000 else 0x100  # a plane of assigned code points, no surrogates
    chars = "".join(chr(start + i) for i in range(n_chars - 1))  # and "\n": n_chars in all
    src = tmp_path / "t.txt"
    src.write_text(chars + "\n" + chars[::-1] + "\n", encoding="utf-8")
    c = open_corpus(src, tmp_path / "t.ids", 0.5)
    assert c.train.dtype == dtype and len(c.chars) == n_chars
    tok = CharTokenizer(c.chars)
    assert tok.decode(c.train) == chars + "\n" and isinstance(c.train, np.memmap)


def write(path, text):
    path.write_text(text, encoding="utf-8")


def test_ids_file_is_reused_only_while_it_checks_out(tmp_path):
    src, ids = tmp_path / "t.txt", tmp_path / "t.ids"
    text = "".join(f"line {i} of the text\n" for i in range(300))
    write(src, text)
    first = open_corpus(src, ids, 0.1)
    assert first.rebuilt == "missing"
    expect = (np.array(first.train), np.array(first.val))
    assert open_corpus(src, ids, 0.1).rebuilt is None

    def rebuilt_because(**kw):
        c = open_corpus(src, ids, kw.pop("val_frac", 0.1), **kw)
        return c.rebuilt, c

    # the same size and modification time, other bytes: only the content hash can tell
    st = os.stat(src)
    write(src, text.replace("line 7 ", "line 8 "))
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    why, c = rebuilt_because()
    assert why == "the text changed" and not np.array_equal(c.train, expect[0][: len(c.train)])
    write(src, text)
    assert rebuilt_because()[0] == "the text changed"  # back again: rebuilt to the old ids
    assert np.array_equal(open_corpus(src, ids, 0.1).train, expect[0])

    raw = bytearray(ids.read_bytes())
    raw[-5] ^= 1  # one bit of one id
    ids.write_bytes(bytes(raw))
    assert rebuilt_because()[0] == "damaged (the ids' sha256 differs)"
    ids.write_bytes(ids.read_bytes()[:-3])
    assert rebuilt_because()[0] == "damaged (wrong length)"
    ids.write_bytes(b"garbage")
    assert rebuilt_because()[0] == "not an ids file"
    assert rebuilt_because(val_frac=0.2)[0] == "another split"
    assert rebuilt_because(val_frac=0.2, chars=sorted(set(text)) + ["~"])[0] == "another vocabulary"
    assert rebuilt_because(val_frac=0.2)[0] == "another vocabulary"  # a new run: the text's own characters
    assert rebuilt_because(val_frac=0.2, chars=sorted(set(text)) + ["~"])[0] == "another vocabulary"
    why, c = rebuilt_because()
    assert why == "another split" and c.chars == sorted(set(text)) and np.array_equal(c.train, expect[0]) and np.array_equal(c.val, expect[1])
    with pytest.raises(DataError, match="characters not in the vocabulary"):
        open_corpus(src, ids, 0.1, chars=["l", "i"])


def test_encode_utf8_matches_encode():
    text = "héllo wörld <|user|> 123 ✓\n"
    tok = CharTokenizer.from_text(text)
    for t in (text, "hello", ""):
        ids = tok.encode_utf8(t.encode())
        assert ids.dtype == np.uint8 and np.array_equal(ids, tok.encode(t))
    with pytest.raises(ValueError, match="not in the vocabulary: 'z😀'"):
        tok.encode_utf8("oz😀".encode())


def test_the_header_never_overwrites_the_first_ids(tmp_path):
    """The header's room is reserved before the split's description and counts are known: whatever their
    length, the file decodes to the text and reopens as it is.  Vocabularies of 150-199 characters (12 bytes
    each in the header, twice) and file names of 0-11 extra characters move the header across every offset
    near a 4,096-byte boundary; the tail repeats training lines, so the description of dropped lines is long."""
    for n_chars in range(150, 200):
        chars = "".join(chr(0x100 + i) for i in range(n_chars))
        lines = [chars[i:] + chars[:i] for i in range(6)]
        text = "\n".join(lines + lines[:2]) + "\n"
        for extra in range(12):
            src, ids = tmp_path / f"t{'x' * extra}.txt", tmp_path / f"{n_chars}_{extra}.ids"
            src.write_text(text, encoding="utf-8")
            c = open_corpus(src, ids, 0.3)
            assert CharTokenizer(c.chars).decode(c.train[:n_chars]) == lines[0], (n_chars, extra)
