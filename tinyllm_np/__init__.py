"""tinyllm_np: TinyLLM, a character-level chat transformer, written from scratch in NumPy."""

from .model import Config, TinyLLM, WeightsError
from .optim import AdamW, clip_grad_norm, lr_at

__all__ = ["Config", "TinyLLM", "WeightsError", "AdamW", "clip_grad_norm", "lr_at"]
__version__ = "0.1.0"
