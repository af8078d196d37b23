"""tinyllm_np: TinyLLM, a character-level chat transformer, written from scratch in NumPy."""

from .data import read_text, sample_batch
from .generate import Decoder, generate
from .model import Config, TinyLLM
from .optim import AdamW, clip_grad_norm, lr_at
from .tokenizer import CharTokenizer
from .weights import WeightsError, load_model

__all__ = ["Config", "TinyLLM", "WeightsError", "load_model", "AdamW", "clip_grad_norm", "lr_at", "generate",
           "Decoder", "DataParallel", "CharTokenizer", "read_text", "sample_batch"]
__version__ = "0.1.0"


def __getattr__(name):
    """DataParallel is imported on first use: its module brings multiprocessing and ctypes (13 ms more at start-up)."""
    if name == "DataParallel":
        from .parallel import DataParallel

        return DataParallel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
