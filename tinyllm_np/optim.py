"""AdamW, gradient clipping by global norm, and learning-rate schedules.

AdamW (Loshchilov & Hutter), the same update as torch.optim.AdamW.  For each
parameter p with gradient g, at step t = 1, 2, ...:

    p = p * (1 - lr * weight_decay)            decoupled weight decay
    m = beta1 * m + (1 - beta1) * g            first moment (mean of g)
    v = beta2 * v + (1 - beta2) * g^2          second moment (mean of g^2)
    m_hat = m / (1 - beta1^t)                  bias corrections: m, v start at 0
    v_hat = v / (1 - beta2^t)
    p = p - lr * m_hat / (sqrt(v_hat) + eps)
"""

import math

import numpy as np

from .chunks import over_chunks


def flat_base(arrays):
    """The 1-D buffer that the dict's arrays tile exactly, in order, or None.

    TinyLLM keeps its parameters (and returns its gradients) as views into one
    flat buffer; spotting that lets AdamW update everything in one vectorized pass.
    """
    arrs = list(arrays.values())
    if not arrs:
        return None
    base = arrs[0].base
    if base is None or base.ndim != 1 or not base.flags.c_contiguous:
        return None
    addr = base.__array_interface__["data"][0]
    for a in arrs:
        if a.base is not base or not a.flags.c_contiguous or a.__array_interface__["data"][0] != addr:
            return None
        addr += a.nbytes
    if addr != base.__array_interface__["data"][0] + base.nbytes:
        return None
    return base


class AdamW:
    """opt = AdamW(model.params, lr=3e-3); opt.step(grads) updates the params in place.

    ``lr`` is a plain attribute, so a schedule sets ``opt.lr`` before each step.
    ``state_dict()`` / ``load_state_dict()`` hold t, m and v for checkpoints.
    """

    CHUNK = None  # entries updated at a time: None: chunks.piece_count's near-equal pieces (see step)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError("lr, eps and weight_decay must be non-negative")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        self.params = params
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.t = 0
        self._flat = flat_base(params)
        n = sum(p.size for p in params.values())
        dtype = next(iter(params.values())).dtype
        self.m = np.zeros(n, dtype=dtype)
        self.v = np.zeros(n, dtype=dtype)
        self._tmp = np.empty(n, dtype=dtype)

    def _pairs(self, grads):
        """(param, grad, m, v, scratch) 1-D arrays to update; one group when both are flat.

        ``grads``: a dict like the params, or one 1-D array laid out like the
        params' flat buffer (DataParallel.loss_and_grads(..., flat=True)), which
        skips the check that a dict's arrays tile one buffer (flat_base looks at
        every array's address: 0.1 ms a call with a model's ~50 arrays).
        """
        if isinstance(grads, np.ndarray):
            if self._flat is None or grads.shape != self._flat.shape or grads.dtype != self._flat.dtype:
                raise ValueError(f"a flat gradient must be a 1-D array laid out like the params' flat buffer, "
                                 f"got {grads.dtype} {grads.shape}")
            return [(self._flat, grads, self.m, self.v, self._tmp)]
        if list(grads) != list(self.params):
            raise ValueError("grads must have exactly the params' keys, in the same order")
        if self._flat is not None:
            g = flat_base(grads)
            if g is not None and g.size == self._flat.size:
                return [(self._flat, g, self.m, self.v, self._tmp)]
        out, off = [], 0
        for name, p in self.params.items():
            g = grads[name]
            if g.shape != p.shape:
                raise ValueError(f"grad '{name}' has shape {g.shape}, param has {p.shape}")
            n = p.size
            s = slice(off, off + n)
            out.append((p.reshape(-1), np.ascontiguousarray(g).reshape(-1), self.m[s], self.v[s], self._tmp[s]))
            off += n
        return out

    def step(self, grads):
        self.t += 1
        b1, b2 = self.betas
        bc1 = 1 - b1 ** self.t
        bc2 = 1 - b2 ** self.t
        step_size = self.lr / bc1
        sqrt_bc2 = math.sqrt(bc2)
        decay = 1 - self.lr * self.weight_decay
        eps = self.eps
        for P, G, M, V, TMP in self._pairs(grads):
            # The update is a dozen elementwise passes, run piece by piece (chunks.over_chunks): the
            # pieces of p, g, m, v stay in cache through all of them, instead of each pass streaming
            # the whole buffers from memory again, and the second half of the pieces runs on a
            # helper thread.
            def update(s, e, P=P, G=G, M=M, V=V, TMP=TMP):
                p, g, m, v, tmp = P[s:e], G[s:e], M[s:e], V[s:e], TMP[s:e]
                if decay != 1:
                    p *= decay  # p = p * (1 - lr * wd)
                m *= b1
                np.multiply(g, 1 - b1, out=tmp)
                m += tmp  # m = b1 m + (1 - b1) g
                v *= b2
                np.multiply(g, g, out=tmp)
                tmp *= 1 - b2
                v += tmp  # v = b2 v + (1 - b2) g^2
                np.sqrt(v, out=tmp)
                tmp /= sqrt_bc2
                tmp += eps  # sqrt(v_hat) + eps
                np.divide(m, tmp, out=tmp)
                tmp *= step_size  # lr * m_hat / (sqrt(v_hat) + eps)
                p -= tmp

            over_chunks(update, P.size, self.CHUNK)

    def state_dict(self):
        return {"t": self.t, "m": self.m.copy(), "v": self.v.copy()}

    def load_state_dict(self, state):
        if state["m"].shape != self.m.shape or state["v"].shape != self.v.shape:
            raise ValueError("optimizer state does not match the parameters")
        self.t = int(state["t"])
        self.m[...] = state["m"]
        self.v[...] = state["v"]


def clip_grad_norm(grads, max_norm):
    """Scale all gradients in place so their global L2 norm is at most max_norm.

    norm = sqrt(sum over every gradient entry of g^2); if norm > max_norm, every
    gradient is multiplied by max_norm / (norm + 1e-6), as torch's clip_grad_norm_.
    Returns the norm before clipping.  ``grads``: a dict of arrays, or one array of them all.
    """
    flat = grads if isinstance(grads, np.ndarray) else flat_base(grads)
    arrays = [flat] if flat is not None else list(grads.values())
    norm = math.sqrt(sum(float(np.dot(a.reshape(-1), a.reshape(-1))) for a in arrays))
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for a in arrays:
            a *= coef
    return norm


def lr_at(step, base_lr, total_steps, warmup=0, schedule="constant", min_lr=0.0):
    """Learning rate for 0-based ``step``.

    Linear warmup from base_lr/warmup to base_lr over the first ``warmup`` steps, then
      constant: base_lr
      cosine:   min_lr + (base_lr - min_lr) * 0.5 * (1 + cos(pi * progress))
      linear:   base_lr + (min_lr - base_lr) * progress
    with progress going from 0 to 1 over the remaining steps.
    """
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    if schedule == "cosine":
        return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return base_lr + (min_lr - base_lr) * progress
    raise ValueError(f"unknown schedule {schedule!r} (constant, cosine, linear)")
