"""Training loop: random windows of the text, next-character cross-entropy, AdamW.

    python train.py                                  # the original recipe on data/dialogue.txt
    python train.py --data my.txt --max-steps 200    # any UTF-8 text file
    python train.py --resume                         # continue from the last checkpoint

The weights go to runs/tinyllm.npz; the shipped weights/tinyllm.npz is replaced
only when asked for with --out weights/tinyllm.npz.

One step draws B windows of T+1 characters at random positions of the training
text; the first T characters are the input and the last T (shifted by one) the
targets.  An epoch is as many steps as it takes to see as many target characters
as the training text holds: len(train) // (B * T) steps.

--micro-batch and --workers are "auto" by default (explicit values win).  The
micro-batch is the largest number of sequences whose biggest activation
(T x d_ff floats, or a block of attention scores) fits 2 MB, at most half the
batch, evened out over it (parallel.auto_micro_batch): 8 at the original
recipe, 6 at nanoGPT's CPU recipe (B=12, T=64), 4 at width 256 with d_ff 1024,
the fastest of those measured at each (docs/performance.md).  It depends on
the shapes alone, since it changes the numbers (dropout masks follow
micro-batches), and the checkpoint records it.  The workers are one per core,
no more than there are micro-batches (parallel.auto_workers); they never change
the numbers.

Length: --epochs E alone runs ceil(E x steps/epoch) steps and the lr schedule
spans them (E = 8 when neither flag is given); --max-steps N alone runs N
steps and the schedule spans N; with both, the schedule spans the E epochs and
the run stops after N steps in total.

Checkpoints (parameters, AdamW moments, both random generators, the step, the
recipe) are written atomically; resuming continues bit for bit as if never
interrupted, whatever --workers the resumed run uses (parallel.py adds the
micro-batches' gradients in one fixed order).  On --resume the checkpoint's
recipe runs, and flags given on the command line are never silently ignored:
  applied:  --lr --min-lr --schedule --warmup --weight-decay --beta1 --beta2
            --clip, and the length: --max-steps N (the total; the checkpoint's
            --epochs, if it had one, keeps setting the schedule) or --epochs E
            (E epochs in total; the checkpoint's --max-steps is dropped unless
            given again); so a finished run can be extended;
  refused (one line, exit 2) if they differ from the checkpoint's: the model's
            shape (--d-model --n-layers --n-heads --d-ff --context
            --norm-first --activation --dropout) and what the steps see
            (--batch-size --micro-batch --seed --val-frac);
  the rest (--workers, --worker-timeout, --engine, outputs, logging,
            evaluation, --inspect-*) are this run's choice: --engine changes
            the numbers only by float rounding (tests/test_reference.py), the
            others not at all.

Exit codes: 0 done; 1 a non-finite loss/gradient/parameter (nothing more is
saved) or a worker process that died or stopped answering (the parameters of
the last completed step are saved first; --resume continues bitwise); 2 bad
input; 130 Ctrl-C (SIGINT) and 143 SIGTERM, each after finishing the current
step and saving a checkpoint (a stuck worker is given --worker-timeout or at
most 5 s, then the step is dropped and the last completed one saved).
"""

import argparse
import csv
import io
import json
import math
import os
import shlex
import signal
import sys
import tempfile
import time

import numpy as np

from .alloc import release_freed_memory, reuse_freed_memory
from .cli import OneLineParser, run_main
from .data import DataError, file_sha256, fixed_windows, open_corpus, sample_batch
from .reference import dropout_threshold
from .model import Config, TinyLLM
from .optim import AdamW, clip_grad_norm, lr_at
from .parallel import DataParallel, Interrupted, WorkerError, auto_micro_batch, auto_workers, micro_batches
from .tokenizer import BOT, END, USER, CharTokenizer
from .weights import CHECKPOINT_KEYS, WeightsError, load_npz_checked
from .fileio import atomic_savez, atomic_write_bytes
from .inspect import InspectError, Timeline


class TrainError(Exception):
    """A problem with the user's input; printed as one line, exit code 2 (as data.DataError)."""



def auto_or_count(text):
    """--workers / --micro-batch: "auto" or an integer (checked to be positive in validate_args)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer, got {text!r}") from None


def build_parser():
    ap = OneLineParser(prog="train.py", description="Train TinyLLM (NumPy) on a UTF-8 text file.")
    a = ap.add_argument
    a("--data", default="data/dialogue.txt", help="UTF-8 training text (default: %(default)s)")
    a("--out", default=os.path.join("runs", "tinyllm.npz"),
      help="final weights file (default: %(default)s; the shipped weights/tinyllm.npz is only "
           "replaced if you name it)")
    a("--checkpoint", default="checkpoints/tinyllm_ckpt.npz", help="checkpoint file (default: %(default)s)")
    a("--resume", action="store_true", help="continue from --checkpoint")
    a("--ckpt-every", type=int, default=200, help="steps between checkpoints (default: %(default)s)")
    a("--log", default="runs/train_log.csv", help="CSV log of the losses (default: %(default)s)")
    a("--plot", default="runs/loss.png", help="loss-curve PNG, written if matplotlib is installed ('' for none)")
    g = ap.add_argument_group("recipe (defaults: the original TinyLLM)")
    g.add_argument("--epochs", type=float, default=None,
                   help="passes over the training text, which the lr schedule spans (default: 8, or "
                        "--max-steps when that alone is given)")
    g.add_argument("--max-steps", type=int, default=None,
                   help="the run's length in steps, in total (with --epochs too, the schedule still spans the "
                        "epochs); on --resume, more than the checkpoint's step extends a finished run")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--context", type=int, default=128)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--min-lr", type=float, default=0.0, help="final lr of cosine/linear decay")
    g.add_argument("--schedule", choices=["constant", "cosine", "linear"], default="constant")
    g.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--beta1", type=float, default=0.9)
    g.add_argument("--beta2", type=float, default=0.999)
    g.add_argument("--clip", type=float, default=0.0, help="clip gradients to this global norm (0: off)")
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--micro-batch", type=auto_or_count, default="auto",
                   help="sequences per micro-batch: each batch is cut into micro-batches of at most this many, "
                        "gradients accumulated; dropout masks are drawn per micro-batch, so it changes the numbers "
                        "(see parallel.py). auto: the largest size whose biggest activation (T x d_ff, or a "
                        "block of attention scores) fits 2 MB, at most half the batch -- from the shapes alone, never "
                        "the machine (parallel.auto_micro_batch); recorded in the checkpoint (default: %(default)s)")
    g.add_argument("--workers", type=auto_or_count, default="auto",
                   help="worker processes running the micro-batches at once, one core each; the results do not "
                        "depend on it, bit for bit. auto: one per core, no more than the batch has micro-batches "
                        "(parallel.auto_workers); workers that fill the cores are pinned one per core (1: all in this "
                        "process) (default: %(default)s)")
    g.add_argument("--worker-timeout", type=float, default=None, metavar="SECONDS",
                   help="a worker silent this long counts as stuck: the last completed step is saved and the run "
                        "exits 1 (default: 120 s or 30 x the slowest step so far, whichever is longer)")
    m = ap.add_argument_group("model shape (defaults: the original TinyLLM)")
    m.add_argument("--d-model", type=int, default=128)
    m.add_argument("--n-layers", type=int, default=3)
    m.add_argument("--n-heads", type=int, default=4)
    m.add_argument("--d-ff", type=int, default=512)
    m.add_argument("--norm-first", action="store_true", help="pre-norm (GPT-2 style) instead of post-norm")
    m.add_argument("--activation", choices=["relu", "gelu"], default="relu")
    m.add_argument("--engine", choices=["fast", "reference"], default="fast",
                   help="layers to compute with: fast (layers.py) or reference (reference.py, the textbook forms); "
                        "the same numbers to float rounding, the same weights (default: %(default)s)")
    e = ap.add_argument_group("evaluation and output")
    e.add_argument("--val-frac", type=float, default=0.1, help="held-out fraction of the text (default: 0.1)")
    e.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (default: once an epoch)")
    e.add_argument("--eval-batches", type=int, default=8)
    e.add_argument("--log-every", type=int, default=50, help="progress lines when stderr is not a terminal")
    e.add_argument("--quiet", action="store_true", help="no progress output")
    e.add_argument("--inspect-text", default=None, metavar="TEXT",
                   help="record the inspector's views of TEXT (see tinyllm_np/inspect.py) at step 0, every "
                        "--inspect-every steps and at the end, for `python -m tinyllm_np.inspect --timeline`")
    e.add_argument("--inspect-every", type=int, default=100, help="steps between snapshots (default: %(default)s)")
    e.add_argument("--inspect-out", default=None,
                   help="the timeline file (default: beside --out, <out>_timeline.json)")
    return ap


FLOAT_FLAGS = ("epochs", "worker_timeout", "lr", "min_lr", "weight_decay", "beta1", "beta2", "clip", "dropout",
               "val_frac")

# On --resume: flags that must match the checkpoint, the model's shape (its Config) and what the steps see
# (its recorded recipe); other recipe flags given on the command line replace the checkpoint's.
SHAPE_FLAGS = ("d_model", "n_layers", "n_heads", "d_ff", "context", "norm_first", "activation", "dropout")
DATA_FLAGS = ("batch_size", "micro_batch", "seed", "val_frac")


def given_flags(argv):
    """Names (dests) of the options on the command line ``argv``, whether or not they equal their default."""
    probe = build_parser()
    for action in probe._actions:  # (not set_defaults, which would put the marker itself in the namespace)
        action.default = argparse.SUPPRESS  # argparse leaves an option with this default out unless given
    return set(vars(probe.parse_args(argv)))


def resume_recipe(args, config, hp, given):
    """Set args to the checkpoint's recipe ``hp``, except the flags in ``given``; TrainError for a refused one."""
    if "micro_batch" in given and args.micro_batch == "auto":  # what auto gives this checkpoint's shapes
        args.micro_batch = auto_micro_batch(config, hp["batch_size"])
    for name in SHAPE_FLAGS + DATA_FLAGS:
        theirs = getattr(config, name) if name in SHAPE_FLAGS else hp.get(name)
        if name in given and getattr(args, name) != theirs:
            flag = "--" + name.replace("_", "-")
            raise TrainError(f"--resume: {flag} {getattr(args, name)} differs from the checkpoint's {theirs}: "
                             f"it cannot change in the middle of a run (drop it, or start a new run)")
    for k, v in hp.items():
        if k not in given:
            setattr(args, k, v)
    if "epochs" in given and "max_steps" not in given:  # E epochs in total
        args.max_steps = None


def validate_args(args):
    for name in FLOAT_FLAGS:
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise TrainError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    checks = [
        (args.lr > 0, f"--lr must be a positive number, got {args.lr}"),
        (0 <= args.min_lr <= args.lr, f"--min-lr must be between 0 and --lr ({args.lr}), got {args.min_lr}"),
        (args.epochs is None or args.epochs > 0, f"--epochs must be positive, got {args.epochs}"),
        (args.max_steps is None or args.max_steps > 0, f"--max-steps must be positive, got {args.max_steps}"),
        (args.batch_size > 0, f"--batch-size must be positive, got {args.batch_size}"),
        (args.context > 1, f"--context must be at least 2, got {args.context}"),
        (args.weight_decay >= 0, f"--weight-decay must be >= 0, got {args.weight_decay}"),
        (0 <= args.beta1 < 1 and 0 <= args.beta2 < 1, "--beta1 and --beta2 must be in [0, 1)"),
        (args.clip >= 0, f"--clip must be >= 0, got {args.clip}"),
        (args.workers == "auto" or args.workers >= 1, f"--workers must be positive, got {args.workers}"),
        (args.micro_batch == "auto" or args.micro_batch >= 1,
         f"--micro-batch must be positive, got {args.micro_batch}"),
        (args.warmup >= 0, f"--warmup must be >= 0, got {args.warmup}"),
        (0 < args.val_frac < 1, f"--val-frac must be between 0 and 1, got {args.val_frac}"),
        (args.ckpt_every > 0, f"--ckpt-every must be positive, got {args.ckpt_every}"),
        (args.eval_every >= 0 and args.eval_batches > 0, "--eval-every must be >= 0 and --eval-batches > 0"),
        (args.log_every > 0, f"--log-every must be positive, got {args.log_every}"),
        (args.inspect_every > 0, f"--inspect-every must be positive, got {args.inspect_every}"),
        (args.worker_timeout is None or args.worker_timeout > 0,
         f"--worker-timeout must be a positive number of seconds, got {args.worker_timeout}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise TrainError(msg)
    try:
        dropout_threshold(args.dropout)  # the 16-bit masks' range, as Config checks it
    except ValueError as e:
        raise TrainError(f"--{e}") from None
    for name in ("d_model", "n_layers", "n_heads", "d_ff"):
        if getattr(args, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be positive")
    if args.d_model % args.n_heads:
        raise TrainError(f"--d-model {args.d_model} is not divisible by --n-heads {args.n_heads}")


def check_writable(path, what):
    """Fail before training if ``path`` cannot be written (its folder is made if missing)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise TrainError(f"{what} {path}: cannot write there ({e.strerror})") from None
    if os.path.isdir(path):
        raise TrainError(f"{what} {path}: is a directory")


def ids_path(checkpoint):
    """A run's token-ids file (data.py): beside its checkpoint, named as it is but ending in .ids."""
    root, ext = os.path.splitext(checkpoint)
    return (root if ext == ".npz" else checkpoint) + ".ids"


def evaluate(dp, windows):
    """Mean evaluation-mode loss over fixed batches (dp: a parallel.DataParallel), all in one call.

    The batches are the same size, so the mean over all their sequences is the
    mean of the batches' means.  One call lets DataParallel.loss run them in
    micro-batches sized for a forward alone, a few rounds of the workers instead
    of a call per batch: an evaluation of nanoGPT's recipe (2 x 20 batches of
    12) took 603 -> 524 ms on 2 shared AMD EPYC Zen 4 cores (docs/performance.md).
    """
    return float(dp.loss(np.concatenate([x for x, _ in windows]), np.concatenate([y for _, y in windows])))


# ------------------------------------------------------------- checkpoints

def save_checkpoint(path, model, opt, state):
    arrays = dict(model.params)
    arrays["__config__"] = np.array(json.dumps(vars(model.config)))
    arrays["__chars__"] = np.array(json.dumps(model.chars))
    arrays["__opt_m__"] = opt.m
    arrays["__opt_v__"] = opt.v
    arrays["__train__"] = np.array(json.dumps(state))
    atomic_savez(path, arrays)


def load_checkpoint(path):
    """(config, params, chars, opt_m, opt_v, state) from a checkpoint; TrainError if unusable."""
    try:
        config, params, chars, extra = load_npz_checked(path, extra=CHECKPOINT_KEYS)
        state = json.loads(str(extra["__train__"]))
    except WeightsError as e:
        raise TrainError(f"cannot resume: {e}") from None
    except (KeyError, ValueError) as e:
        raise TrainError(f"cannot resume: {path}: not a training checkpoint ({e})") from None
    return config, params, chars, extra["__opt_m__"], extra["__opt_v__"], state


# ---------------------------------------------------------------- progress

class Progress:
    def __init__(self, total, quiet, log_every):
        self.total, self.quiet, self.log_every = total, quiet, log_every
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.done0 = None

    def update(self, step, loss, tok_per_s, extra=""):
        if self.quiet:
            return
        if self.done0 is None:
            self.done0 = step - 1
        elapsed = time.perf_counter() - self.t0
        rate = (step - self.done0) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else 0.0
        line = (f"step {step}/{self.total} | loss {loss:.4f} ({bpc(loss):.3f} bpc) | {tok_per_s:,.0f} tok/s | "
                f"ETA {int(eta // 60)}:{int(eta % 60):02d}{extra}")
        if self.tty:
            sys.stderr.write("\r" + line.ljust(90))
            sys.stderr.flush()
        elif step % self.log_every == 0 or step == self.total or extra:
            print(line, file=sys.stderr, flush=True)

    def note(self, msg):
        if not self.quiet:
            self.error(msg)

    def error(self, msg):
        """A line printed even with --quiet (below a progress line left on a terminal)."""
        if self.tty and not self.quiet:
            sys.stderr.write("\n")
        print(msg, file=sys.stderr, flush=True)


# -------------------------------------------------------------------- log

LOG_FIELDS = ["step", "epoch", "lr", "train_loss", "grad_norm", "eval_train_loss", "val_loss", "tok_per_s", "elapsed_s",
              "train_bpc", "eval_train_bpc", "val_bpc"]  # the losses in nats/char, then in bits/char


def bpc(nats):
    """Bits per character, the character-level convention: a loss in nats per character / ln 2."""
    return nats / math.log(2)


def open_log(path, resume_step):
    """CSV log, open for appending rows.

    A new run starts it afresh; on resume, rows past the checkpoint's step are
    dropped (they will be redone).  Either way the header and the kept rows are
    written atomically (temp file + os.replace), so an interruption leaves the
    old log whole.
    """
    rows = []
    if resume_step is not None and os.path.exists(path):
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= resume_step]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LOG_FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))
    f = open(path, "a", newline="", encoding="utf-8")
    return f, csv.DictWriter(f, fieldnames=LOG_FIELDS)


def plot_log(log_path, png_path):
    """Loss curves from the CSV log, if matplotlib is installed; returns True if written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    with open(log_path, newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [float(r["train_loss"]) for r in rows], lw=0.6, alpha=0.6, label="train batch (dropout)")
    ev = [r for r in rows if r["val_loss"]]
    ax.plot([int(r["step"]) for r in ev], [float(r["eval_train_loss"]) for r in ev], "o-", label="train (eval)")
    ax.plot([int(r["step"]) for r in ev], [float(r["val_loss"]) for r in ev], "s-", label="validation")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/char)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(png_path, buf.getvalue())
    return True


# -------------------------------------------------------------------- main

def blown_up(what, step, checkpoint):
    """Report a non-finite loss, gradient or parameter; nothing more is saved.  Exit code 1."""
    kept = (f"the last good checkpoint is kept at {checkpoint}" if os.path.exists(checkpoint)
            else "no checkpoint was written yet")
    print(f"train: error: non-finite {what} at step {step}; stopped, {kept}", file=sys.stderr, flush=True)
    return 1


def stopped(progress, signum, step, checkpoint, why=""):
    """Report a stop by signal after its checkpoint; exit code 130 for SIGINT, 143 (128 + 15) for SIGTERM."""
    name = "SIGINT" if signum == signal.SIGINT else "SIGTERM"
    progress.note(f"train: {name} at step {step}: {why}checkpoint saved to {checkpoint}; continue with --resume")
    return 130 if signum == signal.SIGINT else 128 + signal.SIGTERM


class StopRequest:
    """Set by SIGINT/SIGTERM; the loop stops at the next step boundary."""

    def __init__(self):
        self.signum = None

    def __call__(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop right away
        self.signum = signum


def train(args):
    validate_args(args)
    given = getattr(args, "given", None)  # main() records which flags the command line gave
    if given is None:  # called with a Namespace of its own: the flags that differ from the defaults
        defaults = vars(build_parser().parse_args([]))
        given = {k for k, v in vars(args).items() if k in defaults and v != defaults[k]}
    outputs = [(args.out, "--out"), (args.checkpoint, "--checkpoint"), (args.log, "--log")]
    if args.plot:
        outputs.append((args.plot, "--plot"))
    if args.inspect_text is not None:
        args.inspect_out = args.inspect_out or os.path.splitext(args.out)[0] + "_timeline.json"
        outputs.append((args.inspect_out, "--inspect-out"))
    for path, what in outputs:
        check_writable(path, what)
    reuse_freed_memory()  # about a quarter faster per step on glibc; see alloc.py
    fingerprint = file_sha256(args.data)

    if args.resume:
        if not os.path.exists(args.checkpoint):
            raise TrainError(f"--resume: no checkpoint at {args.checkpoint}")
        config, params, chars, opt_m, opt_v, state = load_checkpoint(args.checkpoint)
        if state.get("data_sha256") != fingerprint:
            raise TrainError(f"cannot resume: {args.checkpoint} was trained on different data than {args.data}")
        model = TinyLLM(config, seed=args.seed, dtype=next(iter(params.values())).dtype, chars=chars,
                        engine=args.engine)
        model.load_state_dict(params)
        hp = state["hparams"]
        if "micro_batch" not in hp:
            # an older checkpoint, whose batch was split into one micro-batch per worker: the nearest
            # micro-batch size (the same split when the workers divide the batch; the dropout masks
            # differ anyway, since attention has changed how it draws them since)
            hp["micro_batch"] = math.ceil(hp["batch_size"] / hp.get("workers", 1))
        hp.pop("workers", None)  # the workers do not change the numbers: the command line's count runs
        resume_recipe(args, config, hp, given)
    else:
        chars = None  # the text's own characters
    # the text's token ids, split into a training and a held-out part (see data.py), kept in a file
    # beside the checkpoint and memory-mapped: built on the first run, checked and reused after
    corpus = open_corpus(args.data, ids_path(args.checkpoint), args.val_frac, chars, fingerprint)
    if corpus.rebuilt:
        release_freed_memory()  # the build's pieces, which reuse_freed_memory would keep for the whole run
    tok = CharTokenizer(corpus.chars)
    train_ids, val_ids = corpus.train, corpus.val
    if not args.resume:
        config = Config(vocab_size=len(tok), d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                        d_ff=args.d_ff, context=args.context, dropout=args.dropout, norm_first=args.norm_first,
                        activation=args.activation)
        model = TinyLLM(config, seed=args.seed, chars=tok.chars, engine=args.engine)
        state = None
    T, B = config.context, args.batch_size  # on --resume, the checkpoint's
    if args.micro_batch == "auto":  # on --resume, the checkpoint's size was set above
        args.micro_batch = auto_micro_batch(config, B)
    too_short = ("{data}: the {name} part has {n} characters, fewer than --context {T} + 2; use a longer text, "
                 "a smaller --context or another --val-frac")
    if len(train_ids) < T + 2:
        raise TrainError(too_short.format(data=args.data, name="training", n=len(train_ids), T=T))
    if B * (T + 1) > len(train_ids):
        raise TrainError(f"{args.data}: one batch needs {B} x {T + 1} characters but the training part has only "
                         f"{len(train_ids)}; use a smaller --batch-size or --context")
    if len(val_ids) < T + 2:
        raise TrainError(too_short.format(data=args.data, name="held-out validation", n=len(val_ids), T=T)
                         + f" ({corpus.split})")
    steps_per_epoch = max(1, len(train_ids) // (B * T))
    if args.epochs is None and args.max_steps is None:
        args.epochs = 8.0
    # the lr schedule spans the epochs if set, else --max-steps; the run is --max-steps long if set
    schedule_len = int(math.ceil(args.epochs * steps_per_epoch)) if args.epochs is not None else args.max_steps
    total = args.max_steps if args.max_steps is not None else schedule_len
    eval_every = args.eval_every or steps_per_epoch

    opt = AdamW(model.params, lr=args.lr, betas=(args.beta1, args.beta2), weight_decay=args.weight_decay)
    data_rng = np.random.default_rng([args.seed, 1])
    step = 0
    if state is not None:
        opt.load_state_dict({"t": state["opt_t"], "m": opt_m, "v": opt_v})
        data_rng.bit_generator.state = state["data_rng"]
        model.rng.bit_generator.state = state["dropout_rng"]
        step = state["step"]
        if total < step:
            raise TrainError(f"--resume: the checkpoint is at step {step}, past the {total} steps asked for; "
                             f"give a larger --max-steps or --epochs")
    hparams = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "min_lr", "schedule", "warmup",
                                             "weight_decay", "beta1", "beta2", "clip", "seed", "val_frac",
                                             "micro_batch", "max_steps")}
    train_eval = fixed_windows(train_ids, B, T, args.eval_batches, seed=args.seed + 101)
    val_eval = fixed_windows(val_ids, B, T, args.eval_batches, seed=args.seed + 202)

    def checkpoint_state():
        return {"step": step, "opt_t": opt.t, "data_rng": data_rng.bit_generator.state,
                "dropout_rng": model.rng.bit_generator.state, "data_sha256": fingerprint, "hparams": hparams}

    if args.workers == "auto":
        workers = auto_workers(B, args.micro_batch)
    else:
        workers = min(args.workers, len(micro_batches(B, args.micro_batch)))  # none that would never get work
    progress = Progress(total, args.quiet, args.log_every)
    if corpus.rebuilt:
        progress.note(f"token ids of {args.data} written to {corpus.path}"
                      + ("" if corpus.rebuilt == "missing" else f" (rebuilt: the old file was {corpus.rebuilt})"))
    progress.note(f"training {model.n_params:,} parameters on {len(train_ids):,} characters "
                  f"({len(val_ids):,} held out: {corpus.split}), vocabulary {len(tok)}; {steps_per_epoch} steps/epoch, "
                  f"{total} steps, micro-batches of {args.micro_batch} on {workers} worker(s)"
                  + (f", resuming at step {step}" if step else ""))
    timeline = None
    if args.inspect_text is not None:  # evaluation-mode views of a float64 copy: the training numbers are untouched
        try:
            timeline = Timeline(args.inspect_out, model, args.inspect_text, args.out,
                                resume_step=step if args.resume else None)
        except InspectError as e:
            raise TrainError(f"--inspect-text: {e}") from None
        for n in timeline.notices:
            progress.note(f"train: --inspect-text: {n}")
        timeline.record(step)
    log_f, log_w = open_log(args.log, step if args.resume else None)  # after every input check: a bad one keeps the log
    stop = StopRequest()
    old_handlers, dp = {}, None
    t_start = time.perf_counter()
    recent, last_eval = [], None
    before = row = None  # the state before the step under way (until it is applied); its log row (until written)
    try:
        for s in (signal.SIGINT, signal.SIGTERM):
            old_handlers[s] = signal.signal(s, stop)
        dp = DataParallel(model, workers, args.micro_batch, batch_size=B, timeout=args.worker_timeout,
                          stop=lambda: stop.signum is not None)
        while step < total:
            if stop.signum is not None:
                break
            t0 = time.perf_counter()
            before = checkpoint_state()
            opt.lr = lr_at(step, args.lr, schedule_len, args.warmup, args.schedule, args.min_lr)
            x, y = sample_batch(train_ids, B, T, data_rng)
            with np.errstate(over="ignore", invalid="ignore"):  # a blow-up is caught just below
                loss, grads = dp.loss_and_grads(x, y, train=True, flat=True)  # one array, laid out like model.flat
                gnorm = clip_grad_norm(grads, args.clip if args.clip > 0 else math.inf)
            if not (math.isfinite(loss) and math.isfinite(gnorm)):
                return blown_up("loss" if not math.isfinite(loss) else "gradient", step + 1, args.checkpoint)
            with np.errstate(over="ignore", invalid="ignore"):
                opt.step(grads)
            if not np.isfinite(model.flat).all():  # e.g. a huge lr: never checkpoint or save these
                return blown_up("parameters after the update", step + 1, args.checkpoint)
            step += 1
            before = None
            dt = time.perf_counter() - t0
            recent = (recent + [dt])[-20:]
            tps = B * T * len(recent) / sum(recent)
            row = {"step": step, "epoch": f"{step / steps_per_epoch:.3f}", "lr": f"{opt.lr:.6g}",
                   "train_loss": f"{loss:.6f}", "grad_norm": f"{gnorm:.4f}", "eval_train_loss": "",
                   "val_loss": "", "tok_per_s": f"{tps:.0f}", "elapsed_s": f"{time.perf_counter() - t_start:.1f}",
                   "train_bpc": f"{bpc(loss):.6f}", "eval_train_bpc": "", "val_bpc": ""}
            extra = ""
            if step % eval_every == 0 or step == total:
                tr, va = evaluate(dp, train_eval), evaluate(dp, val_eval)
                row["eval_train_loss"], row["val_loss"] = f"{tr:.6f}", f"{va:.6f}"
                row["eval_train_bpc"], row["val_bpc"] = f"{bpc(tr):.6f}", f"{bpc(va):.6f}"
                extra = f" | eval train {tr:.4f} ({bpc(tr):.3f} bpc) | val {va:.4f} ({bpc(va):.3f} bpc)"
                last_eval = tr, va
            log_w.writerow(row)
            log_f.flush()
            row = None
            progress.update(step, loss, tps, extra)
            if timeline is not None and (step % args.inspect_every == 0 or step == total):
                timeline.record(step)
            if step % args.ckpt_every == 0 or step == total:
                save_checkpoint(args.checkpoint, model, opt, checkpoint_state())
        if stop.signum is not None:
            save_checkpoint(args.checkpoint, model, opt, checkpoint_state())
            return stopped(progress, stop.signum, step, args.checkpoint)
        model.save(args.out)
        if last_eval is not None:
            tr, va = last_eval
            progress.note(f"final: held-out validation loss {va:.4f} nats/char = {bpc(va):.3f} bpc; training "
                          f"windows (memorised, eval mode) {tr:.4f} = {bpc(tr):.3f} bpc")
        progress.note(f"saved {args.out} after {step} steps ({time.perf_counter() - t_start:.0f} s this run)")
    except (WorkerError, Interrupted) as e:
        # The parameters here are those of the last completed step: a failed step never reached opt.step
        # (``before`` holds the random generators as they were before it drew its batch and masks).  A
        # failure in the evaluation after a step leaves that step complete; its row is logged without it.
        if row is not None:
            log_w.writerow(row)
        save_checkpoint(args.checkpoint, model, opt, before or checkpoint_state())
        if isinstance(e, Interrupted):
            return stopped(progress, stop.signum, step, args.checkpoint, f"{e}; ")
        during = f"during step {step + 1}" if before else f"during the evaluation after step {step}"
        progress.error(f"train: error: {e} {during}; saved step {step} to {args.checkpoint}; "
                       f"continue with --resume")
        return 1
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if dp is not None:
            dp.close()
        log_f.close()
    if args.plot and plot_log(args.log, args.plot):
        progress.note(f"loss curve: {args.plot}")
    if set(USER + BOT + END) <= set(tok.chars):  # a model that can chat; last, where the eye lands
        progress.note(f"train: chat with it: python chat.py --weights {shlex.quote(args.out)}")
    else:  # any other text: nanoGPT-style samples
        progress.note(f"train: sample from it: python -m tinyllm_np.sample --weights {shlex.quote(args.out)}")
    return 0


def main(argv=None):
    def run(args):
        args.given = given_flags(sys.argv[1:] if argv is None else argv)  # for the --resume rules
        return train(args)

    return run_main(build_parser(), run, (TrainError, DataError), "train", argv)


if __name__ == "__main__":
    sys.exit(main())
