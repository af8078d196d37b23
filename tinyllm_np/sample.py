"""Sample any trained model, as nanoGPT's sample.py does.

    python -m tinyllm_np.sample                                   # the shipped model, 10 samples
    python -m tinyllm_np.sample --weights runs/tinyllm.npz --start "ROMEO:" --num-samples 4
    python -m tinyllm_np.sample --start FILE:prompt.txt --max-new-tokens 1000 --top-p 0.9

stdout holds, for each sample, the start text followed by the generated text,
then a line of 15 dashes (nanoGPT's ``print(decode(y[0].tolist()));
print('---------------')``); notices go to stderr.  On a terminal the first
sample streams as it is written.  The samples run as one batch, B streams
through one KV cache (generate.generate_batch), so ten samples cost far less
than ten runs.  The start's characters outside the vocabulary are dropped, and
what stdout shows is the start the model saw.  Past the context the window
slides as in the chat (--slide).  Same --seed, same output (default 1337, as
nanoGPT's).
"""

import sys

import numpy as np

from .blas import blas_threads
from .chat import default_weights
from .cli import EXIT_USAGE, OneLineParser, stdout_gone
from .generate import check_slide, generate_batch
from .tokenizer import CharTokenizer
from .weights import WeightsError, load_model

DASHES = "-" * 15


class SampleError(Exception):
    """A problem with the user's input: one line on stderr, exit code 2."""


def build_parser():
    ap = OneLineParser(prog="python -m tinyllm_np.sample", description="Sample a trained TinyLLM (NumPy).")
    a = ap.add_argument
    a("--weights", default=None, help="weights .npz or checkpoint (default: the shipped weights/tinyllm.npz)")
    a("--start", default="\n", help='the text to continue, or FILE:path to read it from a UTF-8 file '
                                    '(default: "\\n")')
    a("--num-samples", type=int, default=10, help="samples, generated as one batch (default: %(default)s)")
    a("--max-new-tokens", type=int, default=500, help="characters generated per sample (default: %(default)s)")
    a("--temperature", type=float, default=0.8, help="softmax temperature (default: %(default)s)")
    a("--top-k", type=int, default=None, help="sample from the k most likely characters only")
    a("--top-p", type=float, default=None, help="nucleus: the smallest set of most likely characters whose "
                                                "probabilities sum to >= p, in (0, 1]")
    a("--greedy", action="store_true", help="always take the most likely character")
    a("--seed", type=int, default=1337, help="seed for sampling (default: %(default)s)")
    a("--slide", type=int, default=None, metavar="N",
      help="past the context, move the window by N characters (1 to the context; default: context // 2)")
    return ap


def check_args(args):
    """SampleError for a flag out of range."""
    for name, ok, want in (("--num-samples", args.num_samples >= 1, ">= 1"),
                           ("--max-new-tokens", args.max_new_tokens >= 0, ">= 0"),
                           ("--temperature", args.temperature >= 0, ">= 0"),
                           ("--top-k", args.top_k is None or args.top_k >= 1, ">= 1"),
                           ("--top-p", args.top_p is None or 0 < args.top_p <= 1, "in (0, 1]")):
        if not ok:
            raise SampleError(f"{name} must be {want}")


def read_start(start):
    """The start text: itself, or a UTF-8 file's contents for FILE:path."""
    if not start.startswith("FILE:"):
        return start
    path = start[len("FILE:"):]
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise SampleError(f"--start {start}: not UTF-8 text (byte {e.start})") from e
    except OSError as e:
        raise SampleError(f"--start {start}: {e.strerror or e}") from e


def start_ids(tok, text, context, notice):
    """Token ids of the start, its unknown characters dropped (with a notice); SampleError if none is left."""
    bad = tok.unknown(text)
    if bad:
        shown = "".join(bad).encode("unicode_escape").decode("ascii")
        notice(f"sample: dropped {len(bad)} character(s) not in the vocabulary: {shown}")
    ids = tok.encode(text, drop_unknown=True)
    if ids.size == 0:
        raise SampleError("--start has no character in the model's vocabulary" if text else "--start is empty")
    if ids.size > context:
        notice(f"sample: the start is {ids.size} characters, longer than the {context}-character window; "
               f"the window slides past it")
    return ids


def _notice(msg):
    print(msg, file=sys.stderr, flush=True)


def run(args, out=sys.stdout, notice=_notice):
    """Load, sample, write; returns the exit code.  SampleError for bad input."""
    check_args(args)
    text = read_start(args.start)
    path = args.weights or default_weights()
    try:
        model = load_model(path)
    except WeightsError as e:
        msg = str(e)
        raise SampleError(msg if msg.startswith(path) else f"{path}: {msg}") from e
    if model.chars is None:
        raise SampleError(f"{path}: the weights file has no vocabulary ('__chars__'); cannot decode samples")
    try:
        slide = check_slide(args.slide, model.config.context)
    except ValueError as e:
        raise SampleError(f"--{e}") from e
    tok = CharTokenizer(model.chars)
    ids = start_ids(tok, text, model.config.context, notice)
    start = tok.decode(ids)
    B = args.num_samples
    chars = np.array(model.chars)
    stream = out.isatty()  # the first sample appears as it is written
    if stream:
        out.write(start)
        out.flush()
    steps = []
    for toks in generate_batch(model, np.tile(ids, (B, 1)), args.max_new_tokens, args.temperature, args.top_k,
                               args.top_p, args.greedy, np.random.default_rng(args.seed), slide=slide):
        steps.append(toks)
        if stream:
            out.write(chars[toks[0]])
            out.flush()
    new = np.stack(steps, axis=1) if steps else np.zeros((B, 0), dtype=np.int64)  # (B, max_new_tokens)
    for b in range(B):
        text = "" if stream and b == 0 else start + "".join(chars[new[b]].tolist())  # (sample 0 is shown)
        out.write(text + "\n" + DASHES + "\n")
        out.flush()
    return 0


def main(argv=None):
    args, code = build_parser().parse_or_code(argv)
    if args is None:
        return code
    # One BLAS thread: a decode step's products of a few rows stay on one thread anyway, and the
    # threads a prefill wakes would spin on the other core (4 x 1,000 characters: 0.95x the wall
    # time, half the CPU time, 20 paired runs).  Restored after, for callers in the same process.
    before = blas_threads(1)
    try:
        return run(args)
    except SampleError as e:
        _notice(f"sample: error: {e}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stdout, flush=True)
        return 130
    except BrokenPipeError:  # e.g. piped into head: stop quietly
        return stdout_gone()
    finally:
        if before is not None:
            blas_threads(before)


if __name__ == "__main__":
    sys.exit(main())
