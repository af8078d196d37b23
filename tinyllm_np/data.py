"""A text on disk -> token ids -> training windows and fixed evaluation windows.

    text = read_text("my.txt")                      # DataError for missing, empty, non-UTF-8 files
    train_text, val_text = split_text(text, 0.1)
    x, y = sample_batch(ids, B, T, rng)             # B random windows, targets shifted by one
"""

import hashlib

import numpy as np


class DataError(Exception):
    """A problem with the user's text; the message is one line naming the file."""


def read_text(path):
    """The training text; clear errors for missing, unreadable, empty or non-UTF-8 files."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a text file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    if not text:
        raise DataError(f"{path}: file is empty")
    return text


def split_text(text, val_frac):
    """Train on the head of the text, validate on its tail; cut at a line break if there is one."""
    cut = int(len(text) * (1 - val_frac))
    nl = text.rfind("\n", 0, cut)
    if nl > cut // 2:
        cut = nl + 1
    return text[:cut], text[cut:]


def sample_batch(ids, B, T, rng):
    """B random windows: x = ids[i:i+T], y = ids[i+1:i+T+1].  (B,T) each."""
    starts = rng.integers(0, len(ids) - T, size=B)
    offs = starts[:, None] + np.arange(T + 1)  # (B,T+1) positions
    w = ids[offs]
    return w[:, :-1], w[:, 1:]


def fixed_windows(ids, B, T, n_batches, seed):
    """The same evaluation windows every time (a generator of their own, untouched by training)."""
    rng = np.random.default_rng(seed)
    return [sample_batch(ids, B, T, rng) for _ in range(n_batches)]


def data_fingerprint(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
