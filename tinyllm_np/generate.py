"""Text generation: sampling, a KV cache, and a sliding window past the context.

    for tok in generate(model, prompt_ids, max_new_tokens=200, temperature=0.7, rng=rng):
        ...                                            # one token id at a time (streaming)

The model sees at most ``context`` (128) tokens.  For text of n tokens the window
starts at ``window_start(n)``: 0 while the text fits, afterwards a multiple of
``slide`` chosen so that at most ``context`` tokens remain.  With slide=1 this is
the original TinyLLM's rule (always the last 128 characters), which needs the whole
window recomputed for every character, because learned position embeddings make
every cached key depend on its position in the window.  A larger slide lets the
KV cache work: the window stays put for ``slide`` tokens, each costing one cached
step, and only a jump re-runs the window (one batched "prefill").  The default,
context // 2 = 64, keeps 64 to 128 characters in view.  Cached and uncached
generation follow the same rule, so they give the same text.
"""

import numpy as np


def window_start(n, context, slide):
    """First token of the window for a text of n tokens (see the module docstring)."""
    if n <= context:
        return 0
    return -(-(n - context) // slide) * slide  # ceil((n - context) / slide) * slide


def sample(logits, temperature=0.7, top_k=None, greedy=False, rng=None):
    """Pick a token id from a (V,) row of logits.

    greedy: argmax.  Otherwise softmax(logits / temperature), restricted to the
    top_k most likely tokens if given, and one draw from it.
    """
    if not temperature >= 0 or temperature == np.inf:  # `not >=` also refuses NaN
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be None or a positive integer, got {top_k!r}")
    if greedy or temperature == 0:
        return int(np.argmax(logits))
    z = logits - np.fmax.reduce(logits)  # <= 0, so exp cannot overflow
    if top_k is not None and top_k < z.size:
        z[z < np.partition(z, -top_k)[-top_k]] = -np.inf
    z *= 1.0 / temperature
    cdf = np.exp(z, dtype=np.float64)  # unnormalized probabilities; float64 for the running sum
    np.add.accumulate(cdf, out=cdf)
    r = (rng if rng is not None else np.random.default_rng()).random() * cdf[-1]
    return min(int(cdf.searchsorted(r, side="right")), z.size - 1)


def check_slide(slide, context):
    """The slide (None: the default, context // 2); ValueError unless 1 <= slide <= context."""
    slide = max(1, context // 2) if slide is None else slide
    if isinstance(slide, bool) or not isinstance(slide, (int, np.integer)) or not 1 <= slide <= context:
        raise ValueError(f"slide must be between 1 and {context} (the context), got {slide}")
    return slide


class Decoder:
    """Next-token logits for a growing token list, with a KV cache (or full recomputation).

    The cache never goes stale: the decoder keeps the window's tokens whose
    keys and values it holds and compares each call's window with them.  Keys
    and values at positions before the first difference stay valid (causal:
    they depend on earlier tokens only); from there on the tokens run again,
    one lean decode_step when a single token is new (the usual append), else
    one batched prefill.  A moved window starts over.
    """

    def __init__(self, model, slide=None, cached=True):
        self.model = model
        self.context = model.config.context
        self.slide = check_slide(slide, self.context)
        self.cached = cached
        self.cache = model.new_kv_cache() if cached else None
        self.start = 0  # first token of the window
        self.tokens = []  # the window's tokens whose keys/values are in the cache (cached mode)

    def logits(self, ids):
        """Logits (V,) predicting the token after ids (a sequence of all tokens so far)."""
        n = len(ids)
        if n == 0:
            raise ValueError("generation needs at least one prompt token")
        start = window_start(n, self.context, self.slide)
        if not self.cached:
            return self.model.forward(np.asarray(ids[start:n])[None])[0, -1]
        window = list(ids[start:n])
        have = self.tokens
        k = len(have)
        if start != self.start:  # the window moved: every position's key and value changes
            self.start, k = start, 0
        elif not (k < len(window) and window[:k] == have):  # not a plain append: keep the common prefix
            k = next((i for i, (a, b) in enumerate(zip(have, window)) if a != b), min(k, len(window)))
            k = min(k, len(window) - 1)  # at least the last token runs: its logits are the answer
        self.tokens = window[:k]  # until the call succeeds, only these are known good
        new = window[k:]
        if len(new) == 1:  # the common case: one new token, the lean single-vector step
            out = self.model.decode_step(new[0], k, self.cache)
        else:  # a prompt, a changed text or a moved window: its new tokens in one batched pass ("prefill")
            out = self.model.forward_cached(np.asarray(new)[None], self.cache, k, last=True)[0, -1]
        self.tokens = window
        return out


def generate(model, prompt_ids, max_new_tokens=200, temperature=0.7, top_k=None, greedy=False,
             rng=None, slide=None, cached=True):
    """Yield up to max_new_tokens sampled token ids, one at a time."""
    ids = list(prompt_ids)
    if any(isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)) for i in ids):
        raise ValueError("prompt token ids must be integers")  # int() would truncate 1.5 silently
    ids = [int(i) for i in ids]  # their range is the model's to check
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    dec = Decoder(model, slide=slide, cached=cached)
    for _ in range(max_new_tokens):
        tok = sample(dec.logits(ids), temperature, top_k, greedy, rng)
        ids.append(tok)
        yield tok
