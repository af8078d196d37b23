"""Convert between the original TinyLLM's PyTorch checkpoint and our .npz (needs torch).

    python -m tinyllm_np.convert tiny_llm.pt weights/original.npz          # .pt -> .npz
    python -m tinyllm_np.convert --to-torch weights/tinyllm.npz tiny_llm.pt  # .npz -> .pt

The original saves ``{"chars": [...], "model": state_dict}`` with torch.save.  It
is read with ``torch.load(weights_only=True)``, which refuses arbitrary pickled
objects.  The architecture is read from the tensor shapes (vocabulary, width,
context, layers, feed-forward width); what shapes cannot tell is a flag: the
number of heads (default d_model / 32, head size 32 as in both original models),
pre- or post-norm (default post-norm, as the original) and the activation.
"""

import re
import sys

import numpy as np

from .cli import OneLineParser
from .model import Config, TinyLLM
from .weights import WeightsError, load_model


class ConvertError(Exception):
    pass


def config_from_state(state, n_heads=None, norm_first=False, activation="relu", dropout=0.1):
    """A Config whose shapes match the state_dict's tensors (names as in the original)."""
    try:
        V, C = state["tok_emb.weight"].shape
        context = state["pos_emb.weight"].shape[0]
        layer_ids = {int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k))}
        n_layers = len(layer_ids)
        F = state["layers.0.linear1.weight"].shape[0]
    except KeyError as e:
        raise ConvertError(f"state_dict lacks {e.args[0]!r}; not a TinyLLM checkpoint") from None
    if layer_ids != set(range(n_layers)):
        raise ConvertError(f"layer numbers are not 0..{n_layers - 1}: {sorted(layer_ids)}")
    if n_heads is None:
        n_heads = max(1, C // 32)
    try:
        return Config(vocab_size=V, d_model=C, n_layers=n_layers, n_heads=n_heads, d_ff=F, context=context,
                      dropout=dropout, norm_first=norm_first, activation=activation)
    except ValueError as e:
        raise ConvertError(str(e)) from None


def model_from_state(state, chars, **config_kw):
    """A float32 TinyLLM holding the state_dict's tensors (NumPy arrays or torch tensors)."""
    state = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v) for k, v in state.items()}
    config = config_from_state(state, **config_kw)
    if chars is not None and len(chars) != config.vocab_size:
        raise ConvertError(f"{len(chars)} characters but the embedding has {config.vocab_size} rows")
    model = TinyLLM(config, chars=chars)
    try:
        model.load_state_dict(state)
    except ValueError as e:  # missing or extra tensors, a wrong shape, NaN: load_state_dict checks them all
        raise ConvertError(str(e)) from None
    return model


def load_torch_checkpoint(path):
    """(chars, state_dict) from an original tiny_llm.pt, without unpickling arbitrary objects."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConvertError(f"{path}: no such file") from None
    except Exception as e:  # weights_only refusal, truncated zip, not a torch file...
        raise ConvertError(f"{path}: cannot read as a PyTorch checkpoint ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(ckpt, dict) and "model" in ckpt:
        return ckpt.get("chars"), ckpt["model"]
    if isinstance(ckpt, dict) and "tok_emb.weight" in ckpt:
        return None, ckpt  # a bare state_dict
    raise ConvertError(f"{path}: expected {{'chars': [...], 'model': state_dict}}")


def to_torch_checkpoint(model, path):
    """Write {"chars", "model"} as the original does (tensors only; loads with weights_only=True)."""
    import io

    import torch

    from .fileio import atomic_write_bytes

    state = {k: torch.from_numpy(np.array(v)) for k, v in model.params.items()}
    buf = io.BytesIO()
    torch.save({"chars": list(model.chars) if model.chars else None, "model": state}, buf)
    atomic_write_bytes(path, buf.getvalue())


def main(argv=None):
    ap = OneLineParser(prog="python -m tinyllm_np.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--to-torch", action="store_true", help="convert our .npz to the original's .pt instead")
    ap.add_argument("--n-heads", type=int, default=None, help="attention heads (default: d_model / 32)")
    ap.add_argument("--norm-first", action="store_true", help="the checkpoint is pre-norm")
    ap.add_argument("--activation", choices=["relu", "gelu"], default="relu")
    args = ap.parse_args(argv)
    try:
        import torch  # noqa: F401
    except ImportError:
        print("convert: error: PyTorch is needed to read or write .pt files (pip install torch)", file=sys.stderr)
        return 2
    try:
        if args.to_torch:
            model = load_model(args.src)
            to_torch_checkpoint(model, args.dst)
        else:
            chars, state = load_torch_checkpoint(args.src)
            model = model_from_state(state, chars, n_heads=args.n_heads, norm_first=args.norm_first,
                                     activation=args.activation)
            model.save(args.dst)
    except (ConvertError, WeightsError, OSError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    c = model.config
    print(f"wrote {args.dst}: {model.n_params:,} parameters, vocabulary {c.vocab_size}, d_model {c.d_model}, "
          f"{c.n_layers} layers, {c.n_heads} heads, d_ff {c.d_ff}, context {c.context}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
