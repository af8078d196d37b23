"""tinyllm_np: TinyLLM, a character-level chat transformer, written from scratch in NumPy."""

from .model import Config, TinyLLM
from .optim import AdamW, clip_grad_norm, lr_at
from .parallel import DataParallel, auto_micro_batch, auto_workers
from .weights import WeightsError, load_model

__all__ = ["Config", "TinyLLM", "WeightsError", "load_model", "AdamW", "clip_grad_norm", "lr_at",
           "DataParallel", "auto_micro_batch", "auto_workers"]
__version__ = "0.1.0"
