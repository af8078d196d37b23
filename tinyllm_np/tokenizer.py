"""Character tokenizer: one token per character, vocabulary built from the training text.

    tok = CharTokenizer.from_text(text)     # vocabulary = sorted distinct characters
    ids = tok.encode("Hello!")              # -> np.ndarray of int64
    tok.decode(ids) == "Hello!"

The vocabulary (``tok.chars``) is stored inside the weights file, so a model
always travels with the exact mapping it was trained with.
"""

import numpy as np


class CharTokenizer:
    def __init__(self, chars):
        chars = list(chars)
        if not chars or len(set(chars)) != len(chars) or not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise ValueError("vocabulary must be a non-empty list of distinct single characters")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text):
        if not text:
            raise ValueError("cannot build a vocabulary from empty text")
        return cls(sorted(set(text)))

    def __len__(self):
        return len(self.chars)

    def unknown(self, text):
        """Characters of text that are not in the vocabulary, sorted."""
        return sorted(set(text) - self.stoi.keys())

    def encode(self, text, drop_unknown=False):
        """Token ids of text.  Unknown characters raise ValueError, or are dropped if asked."""
        if drop_unknown:
            text = "".join(c for c in text if c in self.stoi)
        else:
            bad = self.unknown(text)
            if bad:
                raise ValueError(f"characters not in the vocabulary: {''.join(bad)!r}")
        return np.fromiter((self.stoi[c] for c in text), dtype=np.int64, count=len(text))

    def decode(self, ids):
        return "".join(self.chars[int(i)] for i in ids)
