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
    if greedy or temperature == 0:
        return int(np.argmax(logits))
    z = logits - np.fmax.reduce(logits)  # <= 0, so exp cannot overflow
    if top_k is not None and 0 < top_k < z.size:
        z[z < np.partition(z, -top_k)[-top_k]] = -np.inf
    z *= 1.0 / temperature
    cdf = np.exp(z, dtype=np.float64)  # unnormalized probabilities; float64 for the running sum
    np.add.accumulate(cdf, out=cdf)
    r = (rng if rng is not None else np.random.default_rng()).random() * cdf[-1]
    return min(int(cdf.searchsorted(r, side="right")), z.size - 1)


def check_slide(slide, context):
    """The slide (None: the default, context // 2); ValueError unless 1 <= slide <= context."""
    slide = max(1, context // 2) if slide is None else slide
    if not 1 <= slide <= context:
        raise ValueError(f"slide must be between 1 and {context} (the context), got {slide}")
    return slide


class Decoder:
    """Next-token logits for a growing token list, with a KV cache (or full recomputation)."""

    def __init__(self, model, slide=None, cached=True):
        self.model = model
        self.context = model.config.context
        self.slide = check_slide(slide, self.context)
        self.cached = cached
        self.cache = model.new_kv_cache() if cached else None
        self.start = 0  # first token of the window
        self.done = 0  # tokens whose keys/values are in the cache (cached mode), relative to start

    def logits(self, ids):
        """Logits (V,) predicting the token after ids (a list of all tokens so far)."""
        n = len(ids)
        if n == 0:
            raise ValueError("generation needs at least one prompt token")
        start = window_start(n, self.context, self.slide)
        if not self.cached:
            window = np.asarray(ids[start:n], dtype=np.int64)[None]
            return self.model.forward(window)[0, -1]
        if start != self.start or self.done > n - start:
            self.start, self.done = start, 0  # the window moved (or the text changed): prefill again
        elif self.done == n - start:  # asked again with no new token: redo the last one (its key and value rewritten)
            self.done -= 1
        new = ids[start + self.done:n]  # tokens not yet in the cache
        if len(new) == 1:  # the common case: one new token, the lean single-vector step
            out = self.model.decode_step(new[0], self.done, self.cache)
        else:  # a prompt or a moved window: all of its new tokens in one batched pass ("prefill")
            out = self.model.forward_cached(np.asarray(new, dtype=np.int64)[None], self.cache, self.done,
                                            last=True)[0, -1]
        self.done = n - start
        return out


def generate(model, prompt_ids, max_new_tokens=200, temperature=0.7, top_k=None, greedy=False,
             rng=None, slide=None, cached=True):
    """Yield up to max_new_tokens sampled token ids, one at a time."""
    ids = [int(i) for i in prompt_ids]
    dec = Decoder(model, slide=slide, cached=cached)
    for _ in range(max_new_tokens):
        tok = sample(dec.logits(ids), temperature, top_k, greedy, rng)
        ids.append(tok)
        yield tok
