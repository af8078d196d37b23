"""Text generation: sampling, a KV cache, and a sliding window past the context.

    for tok in generate(model, prompt_ids, max_new_tokens=200, temperature=0.7, rng=rng):
        ...                                            # one token id at a time (streaming)
    for toks in generate_batch(model, prompts, 500, top_p=0.9, rng=rng):
        ...                                            # (B,) ids a step: B prompts (B,n) at once

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


def sample(logits, temperature=0.7, top_k=None, greedy=False, rng=None, top_p=None):
    """Pick a token id from a (V,) row of logits; from (B,V) rows, one id per row, (B,).

    greedy: argmax.  Otherwise p = softmax(logits / temperature), restricted to
    the top_k most likely tokens if given, then with top_p (nucleus sampling) to
    the smallest set of most likely tokens whose probabilities sum to >= top_p
    (ties ranked by token id), renormalised; and one draw from it.  The rows
    draw in order from one rng.random(B) call, so a seed fixes every row.
    """
    if not temperature >= 0 or temperature == np.inf:  # `not >=` also refuses NaN
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be None or a positive integer, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if greedy or temperature == 0:
        ids = np.argmax(logits, axis=-1)
    else:
        z = logits - np.fmax.reduce(logits, axis=-1, keepdims=True)  # <= 0, so exp cannot overflow
        V = z.shape[-1]
        if top_k is not None and 0 < top_k < V:
            z[z < np.partition(z, V - top_k, axis=-1)[..., V - top_k, None]] = -np.inf
        z *= 1.0 / temperature
        cdf = np.exp(z, dtype=np.float64)  # unnormalized probabilities; float64 for the running sum
        if top_p is not None and top_p < 1:
            order = np.argsort(-cdf, axis=-1, kind="stable")  # most likely first; ties by id
            ranked = np.take_along_axis(cdf, order, axis=-1)
            cum = np.add.accumulate(ranked, axis=-1)
            drop = cum - ranked >= top_p * cum[..., -1:]  # the tokens ranked above hold >= top_p of the mass
            np.put_along_axis(cdf, order, np.where(drop, 0.0, ranked), axis=-1)
        np.add.accumulate(cdf, axis=-1, out=cdf)
        r = (rng if rng is not None else np.random.default_rng()).random(cdf.shape[:-1]) * cdf[..., -1]
        ids = np.minimum(np.add.reduce(cdf <= r[..., None], axis=-1), V - 1)  # searchsorted(side="right") per row
    return int(ids) if ids.ndim == 0 else ids


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


class BatchDecoder:
    """Next-token logits for B token streams of one length, with one (B,H,context,D) KV cache per layer.

    The decoder owns its streams: they start as B prompts of equal length and
    only grow, one token per stream, through ``append``; ``logits()`` is always
    about the tokens it holds, so its cache cannot be stale.  All streams are
    at the same position, so the window (window_start) moves for all at once;
    a moved window is one batched prefill of (B, tokens in the window).  As
    with any KV cache, the model's parameters must not change while it decodes.
    """

    def __init__(self, model, prompts, slide=None):
        prompts = np.asarray(prompts)
        if prompts.ndim != 2 or not np.issubdtype(prompts.dtype, np.integer) or 0 in prompts.shape:
            raise ValueError(f"prompts must be a (B,n) integer array with B, n >= 1, got {prompts.dtype} "
                             f"{prompts.shape}")
        self.model = model
        self.context = model.config.context
        self.slide = check_slide(slide, self.context)
        B, n = prompts.shape
        self._tokens = np.empty((B, max(2 * n, 256)), dtype=np.int64)  # grown by doubling in append
        self._tokens[:, :n] = prompts
        self.n = n
        self.cache = model.new_kv_cache(batch=B)
        self.weights = model.decode_weights()  # the parameters as they are now, for every step
        self.start = 0  # first token of the window
        self.done = 0  # tokens whose keys/values are in the cache, relative to start
        self._logits = None  # logits for the current tokens, once computed

    @property
    def tokens(self):
        """All tokens so far, (B,n): a read-only view."""
        view = self._tokens[:, :self.n]
        view.flags.writeable = False
        return view

    def logits(self):
        """Logits (B,V) predicting each stream's next token."""
        if self._logits is None:
            n = self.n
            start = window_start(n, self.context, self.slide)
            if start != self.start:
                self.start, self.done = start, 0  # the window moved: prefill it again
            new = self._tokens[:, start + self.done:n]  # tokens not yet in the cache
            if new.shape[1] == 1:  # the common case: one new token per stream
                self._logits = self.model.decode_step_batch(new[:, 0], self.done, self.cache, self.weights)
            else:  # the prompts, or a moved window
                self._logits = self.model.forward_cached(new, self.cache, self.done, last=True)[:, 0]
            self.done = n - start
        return self._logits

    def append(self, tokens):
        """Add one token (B,) to every stream."""
        tokens = np.asarray(tokens)
        B = self._tokens.shape[0]
        if tokens.shape != (B,) or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"append needs ({B},) integer tokens, got {tokens.dtype} {tokens.shape}")
        if self.n == self._tokens.shape[1]:
            self._tokens = np.concatenate([self._tokens, np.empty_like(self._tokens)], axis=1)
        self._tokens[:, self.n] = tokens
        self.n += 1
        self._logits = None


def generate_batch(model, prompts, max_new_tokens=200, temperature=0.7, top_k=None, top_p=None, greedy=False,
                   rng=None, slide=None):
    """Yield up to max_new_tokens steps of (B,) sampled token ids, for B prompts (B,n) of one length at once.

    Each step samples every stream from one rng in stream order (see sample).
    """
    rng = rng if rng is not None else np.random.default_rng()
    dec = BatchDecoder(model, prompts, slide=slide)
    for _ in range(max_new_tokens):
        toks = sample(dec.logits(), temperature, top_k, greedy, rng, top_p=top_p)
        dec.append(toks)
        yield toks
