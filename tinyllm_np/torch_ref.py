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


class _GPTBlock(nn.Module):
    """nanoGPT's Block (model.py): attention on F.scaled_dot_product_attention, an MLP, two LayerNorms.

    norm_first=False gives the post-norm order of our default layer, so the
    same block serves every configuration of the benchmark.
    """

    def __init__(self, c):
        super().__init__()
        C = c.d_model
        self.n_head, self.dropout, self.norm_first = c.n_heads, c.dropout, c.norm_first
        self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.c_attn, self.attn_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.c_fc, self.mlp_proj = nn.Linear(C, c.d_ff), nn.Linear(c.d_ff, C)
        self.act = nn.ReLU() if c.activation == "relu" else nn.GELU(approximate="tanh")
        self.drop = nn.Dropout(c.dropout)

    def attn(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=2))  # 3 x (B,H,T,D)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        return self.drop(self.attn_proj(y.transpose(1, 2).contiguous().view(B, T, C)))

    def mlp(self, x):
        return self.drop(self.mlp_proj(self.act(self.c_fc(x))))

    def forward(self, x):
        if self.norm_first:
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))
        x = self.ln_1(x + self.attn(x))
        return self.ln_2(x + self.mlp(x))


class TorchGPT(nn.Module):
    """The same model as nanoGPT writes it (model.py's GPT), for speed comparisons only.

    Differences from nanoGPT, all to match our model's computation: biases in
    every Linear and LayerNorm (nanoGPT's train.py sets bias=False), an untied
    head (nanoGPT ties it to the token embedding), GELU in the tanh form as
    ours (nanoGPT's nn.GELU() is the exact erf form), ReLU and post-norm when
    the config says so, and no dropout on the embeddings (ours has none).  Same parameter count as TinyLLM; its own (PyTorch's
    default) initialization, since only its speed is measured.
    """

    def __init__(self, config):
        super().__init__()
        c = config
        self.config = c
        self.wte, self.wpe = nn.Embedding(c.vocab_size, c.d_model), nn.Embedding(c.context, c.d_model)
        self.h = nn.ModuleList([_GPTBlock(c) for _ in range(c.n_layers)])
        self.ln_f = nn.LayerNorm(c.d_model)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)

    def forward(self, idx):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))  # ours has no embedding dropout
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))
