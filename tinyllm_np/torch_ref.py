"""The original TinyLLM in PyTorch, as a reference for parity tests, benchmarks and conversion.

Optional: importing this module needs torch (``pip install torch``); nothing else
in tinyllm_np imports it.  The module layout reproduces the original model.py,
so its state_dict has exactly the names of our ``model.params``.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")  # our "gelu" is the tanh form


class TorchTinyLLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = config
        act = "relu" if c.activation == "relu" else _gelu_tanh
        self.config = c
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_emb = nn.Embedding(c.context, c.d_model)
        self.layers = nn.ModuleList([
            nn.TransformerEncoderLayer(c.d_model, c.n_heads, dim_feedforward=c.d_ff, dropout=c.dropout,
                                       activation=act, batch_first=True, norm_first=c.norm_first)
            for _ in range(c.n_layers)])
        self.ln = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)

    def forward(self, idx):
        T = idx.shape[1]
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device))
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=idx.device, dtype=x.dtype)
        for layer in self.layers:
            x = layer(x, src_mask=mask, is_causal=True)
        return self.head(self.ln(x))


def from_numpy(model):
    """A TorchTinyLLM holding a copy of a tinyllm_np model's parameters (same dtype)."""
    tm = TorchTinyLLM(model.config)
    tm = tm.double() if model.dtype == np.float64 else tm.float()
    state = {k: torch.from_numpy(np.array(v)) for k, v in model.params.items()}
    tm.load_state_dict(state, strict=True)
    return tm


def to_numpy_state(module):
    """state_dict of a torch module as a dict of NumPy arrays."""
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
