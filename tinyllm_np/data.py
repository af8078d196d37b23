"""A text on disk -> token ids (on disk too, memory-mapped) -> training windows and fixed evaluation windows.

    corpus = open_corpus("my.txt", "runs/ck.ids", val_frac=0.1)   # DataError for missing, empty, non-UTF-8 files
    x, y = sample_batch(corpus.train, B, T, rng)                  # B random windows, targets shifted by one

The ids file.  The text is encoded once into the smallest integer type that holds
its vocabulary (uint8 up to 256 characters, then uint16, uint32) and written
atomically to an ids file (train.py puts it beside the checkpoint, as nanoGPT's
train.bin): a one-line JSON header, then the training ids, then the validation
ids, memory-mapped read-only.  It is never trusted: it is used only if its header
names the same source bytes (sha256 of the whole text), split rule, val_frac and
vocabulary, its length fits, and the sha256 of its ids matches; otherwise it is
rebuilt.  The text is read in pieces of CHUNK bytes, so memory stays bounded
(a few pieces, plus the validation tail for plain text) whatever the text's size.

The held-out split (SPLIT_RULE), so that the validation loss measures
generalisation, not memorisation:

* Chat text (every non-blank line ``<|user|>Q<|bot|>A<|end|>``): the distinct
  questions are grouped by their normalised form (lower case, trailing spaces and
  ``.?!`` removed: "What is AI?", "what is ai" are one group); a seeded
  ``val_frac`` of the groups (at least one) is held out, and every line asking a
  held-out question goes to validation.  The groups of KEPT_QUESTIONS, the
  examples the tests check word for word, always stay in training.
* Plain text: the last ``val_frac`` of the bytes (cut at a line break) is the
  validation part, less every line that also occurs in the training part
  (blank lines stay).
"""

import hashlib
import io
import json
import os
import tempfile

import numpy as np

from .fileio import atomic_write
from .tokenizer import BOT, END, USER, CharTokenizer

CHUNK = 1 << 22  # bytes read, decoded and encoded at a time
SPLIT_RULE = "held-out-1"  # names the rule above; a change of rule rebuilds every ids file
SPLIT_SEED = 15  # which chat questions are held out; fixed, so runs of any --seed share one validation set
KEPT_QUESTIONS = ("Hello!", "What is AI?", "Tell me a joke")
FORMAT = "tinyllm-ids"


class DataError(Exception):
    """A problem with the user's text; the message is one line naming the file."""


def _open_source(path):
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a text file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    return f


def read_text(path):
    """The whole text as a str; clear errors for missing, unreadable, empty or non-UTF-8 files."""
    with _open_source(path) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    if not text:
        raise DataError(f"{path}: file is empty")
    return text


def file_sha256(path):
    """sha256 of a file's bytes (= data_fingerprint of its text), read in pieces: 0.06 s per 100 MB here."""
    h = hashlib.sha256()
    with _open_source(path) as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def data_fingerprint(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------ reading in pieces

def _pieces(f, start, end):
    """(offset, bytes) pieces of f[start:end], about CHUNK bytes each, each ending at a line break
    (a line longer than CHUNK: at a character boundary), so that each piece decodes on its own."""
    f.seek(start)
    pos, off, carry = start, start, b""
    while pos < end:
        data = f.read(min(CHUNK, end - pos))
        if not data:
            break  # the file got shorter while read: the sha256 check catches it
        pos += len(data)
        buf = carry + data
        if pos >= end:
            yield off, buf
            return
        cut = buf.rfind(b"\n") + 1
        if cut == 0:  # no line break: stop before the last character's lead byte
            cut = len(buf) - 1
            while cut > 0 and buf[cut] & 0xC0 == 0x80:
                cut -= 1
            cut = cut or len(buf)
        yield off, buf[:cut]
        carry, off = buf[cut:], off + cut
    if carry:
        yield off, carry


def _tail_start(f, size, val_frac):
    """Where plain text's validation part starts: the last line break before (1 - val_frac) of the
    bytes, if it lies in their second half; else the nearest character boundary."""
    cut = int(size * (1 - val_frac))
    pos, lo = cut, cut // 2
    while pos > lo:
        n = min(CHUNK, pos - lo)
        f.seek(pos - n)
        i = f.read(n).rfind(b"\n")
        if i >= 0:
            return pos - n + i + 1
        pos -= n
    f.seek(cut)
    while cut > 0 and f.read(1)[0] & 0xC0 == 0x80:
        cut -= 1
        f.seek(cut)
    return cut


def question_group(q):
    """The held-out split's unit for chat text: the question, lower case, trailing ' .?!' removed."""
    return q.lower().rstrip(" .?!")


# ------------------------------------------------------------------ the split

class _Scan:
    """One pass over the text: sha256, vocabulary, UTF-8 check, and whether it is chat text (with
    each line's question group, as a group number; -1 for a blank line)."""

    def __init__(self, f, path, size):
        h = hashlib.sha256()
        seen = np.zeros(0x110000, bool)  # code points present
        self.chat, self.groups, self.line_groups = True, {}, []
        raw_group = {}  # a question's bytes -> its group number, so each distinct question is normalised once
        user, bot, end = USER.encode(), BOT.encode(), END.encode()
        for off, piece in _pieces(f, 0, size):
            h.update(piece)
            if piece.isascii():
                seen[:128] |= np.bincount(np.frombuffer(piece, np.uint8), minlength=128).astype(bool)
            else:
                try:
                    text = piece.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}: not valid UTF-8 (byte {off + e.start})") from None
                cp = np.frombuffer(text.encode("utf-32-le"), "<u4")
                seen[: int(cp.max()) + 1] |= np.bincount(cp).astype(bool)
            if self.chat:
                self.line_groups.append(self._chat_groups(piece, raw_group, user, bot, end))
        self.sha256 = h.hexdigest()
        self.chars = [chr(c) for c in np.flatnonzero(seen)]
        if not self.chat:
            self.line_groups = None

    def _chat_groups(self, piece, raw_group, user, bot, end):
        """Each line's group number (-1: an empty line), or None (and self.chat = False) if a line is
        not chat.  Vectorized: the markers are found with NumPy; Python only cuts out the questions."""
        a = np.frombuffer(piece, np.uint8)
        ends = _line_ends(a)
        starts = np.append(0, ends[:-1])
        stops = ends - (a[ends - 1] == 10)  # without the line break
        full = stops > starts
        s, e = starts[full], stops[full]
        ok = bool(np.all(e - s >= len(user) + len(bot) + len(end)))
        for k, c in enumerate(user):
            ok = ok and bool(np.all(a[s + k] == c))
        for k, c in enumerate(end):
            ok = ok and bool(np.all(a[e - len(end) + k] == c))
        if ok:
            m = a[: len(a) - len(bot) + 1] == bot[0]  # where bot occurs
            for k in range(1, len(bot)):
                m &= a[k: len(a) - len(bot) + 1 + k] == bot[k]
            at = np.flatnonzero(m)
            line, first = np.unique(np.searchsorted(s, at, side="right") - 1, return_index=True)
            ok = len(line) == len(s) and (len(line) == 0 or line[0] >= 0)  # one or more per line
        if not ok:
            self.chat = False
            return None
        qs = [piece[i:j] for i, j in zip((s + len(user)).tolist(), at[first].tolist())]
        for q in set(qs) - raw_group.keys():  # each distinct question is normalised once
            raw_group[q] = self.groups.setdefault(question_group(q.decode("utf-8")), len(self.groups))
        out = np.full(len(starts), -1, np.int32)
        out[full] = np.fromiter(map(raw_group.__getitem__, qs), np.int32, len(qs))
        return out


def _line_ends(a):
    """End offsets (after the line break) of the lines of a piece (uint8 array)."""
    ends = np.flatnonzero(a == 10) + 1
    return ends if len(a) and a[-1] == 10 else np.append(ends, len(a))


def held_out_groups(groups, val_frac):
    """Which question groups go to validation: a bool per group number (groups: name -> number)."""
    kept = {question_group(q) for q in KEPT_QUESTIONS}
    names = sorted(g for g in groups if g not in kept)
    k = min(max(1, round(val_frac * len(groups))), len(groups) - 1, len(names))
    held = np.zeros(len(groups), bool)
    for i in np.random.default_rng(SPLIT_SEED).permutation(len(names))[:k]:
        held[groups[names[i]]] = True
    return held


def _write_split(f, size, scan, val_frac, write_train, write_val):
    """Stream the split's training and validation bytes (whole lines) to the two callbacks;
    returns a one-line description of what was held out."""
    if scan.chat and len(scan.groups) > 1:
        held = np.append(held_out_groups(scan.groups, val_frac), False)  # index -1 (a blank line): training
        for (off, piece), groups in zip(_pieces(f, 0, size), scan.line_groups):
            a = np.frombuffer(piece, np.uint8)
            ends = _line_ends(a)
            to_val = np.repeat(held[groups], np.diff(ends, prepend=0))
            write_train(a[~to_val].tobytes())
            write_val(a[to_val].tobytes())
        return f"{int(held.sum())} of {len(scan.groups)} distinct questions held out"
    cut = _tail_start(f, size, val_frac)
    f.seek(cut)
    tail = f.read(size - cut).split(b"\n")  # "a\nb\n" -> [a, b, ""]: joined with "\n" it ends as it did
    wanted = {line for line in tail if line.strip()}
    seen = set()
    for off, piece in _pieces(f, 0, cut):
        seen |= wanted.intersection(piece.split(b"\n"))
        write_train(piece)
    batch, n = [], 0  # the kept lines, written CHUNK bytes at a time (joined as b"\n".join(all kept))
    for line in tail:
        if line not in seen:
            batch.append(line)
            n += len(line) + 1
            if n >= CHUNK:
                write_val(b"\n".join(batch) + b"\n")
                batch, n = [], 0
    write_val(b"\n".join(batch))
    return f"{len(seen)} of {len(wanted)} distinct validation lines dropped as they occur in training"


def split_text(text, val_frac):
    """(training text, validation text) of a str, by the held-out split rule above."""
    raw = text.encode("utf-8")
    f = io.BytesIO(raw)
    scan = _Scan(f, "<text>", len(raw))
    parts = ([], [])
    _write_split(f, len(raw), scan, val_frac, parts[0].append, parts[1].append)
    return b"".join(parts[0]).decode("utf-8"), b"".join(parts[1]).decode("utf-8")


# ------------------------------------------------------------------ the ids file

class Corpus:
    """The token ids of a text's training and validation parts (read-only arrays, memory-mapped)."""

    def __init__(self, train, val, chars, sha256, split, path, rebuilt):
        self.train, self.val, self.chars, self.sha256 = train, val, chars, sha256
        self.split, self.path, self.rebuilt = split, path, rebuilt  # rebuilt: None, or why it was


def _read_header(path):
    """The ids file's header (a dict) or None if there is no usable one."""
    try:
        with open(path, "rb") as f:
            first = f.readline(100).split()
            if len(first) != 3 or first[0] != FORMAT.encode() or first[1] != b"1":
                return None
            n = int(first[2])
            head = json.loads(f.read(n - f.tell()))
        head["header_bytes"] = n
        return head
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _payload_sha256(path, start):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _check(path, head, sha256, val_frac, chars):
    """Why the ids file at path cannot be used ('' if it can)."""
    if head is None:
        return "missing" if not os.path.exists(path) else "not an ids file"
    try:
        dtype = np.dtype(head["dtype"])
        n_train, n_val, n = int(head["n_train"]), int(head["n_val"]), head["header_bytes"]
        if head["sha256"] != sha256:
            return "the text changed"
        if head["split"] != SPLIT_RULE or head["val_frac"] != val_frac:
            return "another split"
        if head["chars"] != (head["text_chars"] if chars is None else chars) or \
                dtype != CharTokenizer(head["chars"]).dtype:
            return "another vocabulary"
        if os.path.getsize(path) != n + (n_train + n_val) * dtype.itemsize:
            return "damaged (wrong length)"
        if _payload_sha256(path, n) != head["ids_sha256"]:
            return "damaged (the ids' sha256 differs)"
    except (KeyError, TypeError, ValueError, OSError):
        return "damaged header"
    return ""


def _mapped(path, dtype, offset, n):
    if n == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(n,))


def open_corpus(text_path, ids_path, val_frac, chars=None, sha256=None):
    """The Corpus of a UTF-8 text: from its ids file if that is valid, else built and written there.

    chars: the vocabulary (e.g. a checkpoint's); None: the text's own characters, sorted.
    sha256: the text's file_sha256 if already known (it is then checked again while building).
    """
    if sha256 is None:
        sha256 = file_sha256(text_path)
    head = _read_header(ids_path)
    why = _check(ids_path, head, sha256, val_frac, chars)
    if not why:
        return _mapped_corpus(ids_path, head, None)
    with _open_source(text_path) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise DataError(f"{text_path}: file is empty")
        scan = _Scan(f, text_path, size)
        if scan.sha256 != sha256:
            raise DataError(f"{text_path}: changed while being read")
        if chars is None:
            chars = scan.chars
        missing = set(scan.chars) - set(chars)
        if missing:
            raise DataError(f"{text_path}: characters not in the vocabulary: {''.join(sorted(missing))!r}")
        tok = CharTokenizer(chars)
        head = {"sha256": sha256, "size": size, "mtime_ns": os.fstat(f.fileno()).st_mtime_ns,
                "source": os.path.abspath(text_path), "split": SPLIT_RULE, "val_frac": val_frac,
                "chars": chars, "text_chars": scan.chars, "dtype": tok.dtype.name, "n_train": 0, "n_val": 0, "desc": "",
                "ids_sha256": "0" * 64}
        # the header's size, fixed before the ids are written: room for the counts' digits and the split's
        # description (under 200 bytes), checked below before the header is written over the reserved space
        n = len(_header_bytes(head, 0)) + 1024
        n = -(-n // 4096) * 4096

        def write(out):
            h, counts = hashlib.sha256(), [0, 0]

            def put(dest, i):  # -> a callback writing the ids of some UTF-8 bytes to dest
                def put_ids(data):
                    ids = tok.encode_utf8(data)
                    counts[i] += len(ids)
                    if i == 0:
                        h.update(ids)  # the validation ids are hashed when copied after these
                    dest.write(ids.tobytes())
                return put_ids

            out.write(b"\0" * n)
            with tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(ids_path))) as val:
                head["desc"] = _write_split(f, size, scan, val_frac, put(out, 0), put(val, 1))
                val.seek(0)
                while block := val.read(CHUNK):
                    h.update(block)
                    out.write(block)
            head.update(n_train=counts[0], n_val=counts[1], ids_sha256=h.hexdigest())
            header = _header_bytes(head, n)
            if len(header) != n:  # would overwrite the first ids: never write such a file
                raise RuntimeError(f"ids header of {len(header)} bytes does not fit the {n} reserved")
            out.seek(0)
            out.write(header)

        atomic_write(ids_path, write, suffix=".ids")
    head["header_bytes"] = n
    return _mapped_corpus(ids_path, head, why)


def _mapped_corpus(path, head, rebuilt):
    dtype, n, n_train = np.dtype(head["dtype"]), head["header_bytes"], head["n_train"]
    train = _mapped(path, dtype, n, n_train)
    val = _mapped(path, dtype, n + n_train * dtype.itemsize, head["n_val"])
    return Corpus(train, val, head["chars"], head["sha256"], head["desc"], path, rebuilt)


def _header_bytes(head, n):
    """'tinyllm-ids 1 <n>' then the JSON header, padded with spaces to n bytes (n=0: unpadded)."""
    body = json.dumps({k: v for k, v in head.items() if k != "header_bytes"}).encode()
    first = f"{FORMAT} 1 {n:>12}\n".encode()
    out = first + body + b"\n"
    return out + b" " * (n - len(out)) if n else out


# ------------------------------------------------------------------ windows

def sample_batch(ids, B, T, rng):
    """B random windows: x = ids[i:i+T], y = ids[i+1:i+T+1].  (B,T) each, int64 (ids may be a memmap)."""
    starts = rng.integers(0, len(ids) - T, size=B)
    offs = starts[:, None] + np.arange(T + 1)  # (B,T+1) positions
    w = ids[offs].astype(np.int64)
    return w[:, :-1], w[:, 1:]


def fixed_windows(ids, B, T, n_batches, seed):
    """The same evaluation windows every time (a generator of their own, untouched by training)."""
    rng = np.random.default_rng(seed)
    return [sample_batch(ids, B, T, rng) for _ in range(n_batches)]
