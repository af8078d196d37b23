"""See inside the model: what it computes at each position of a text, as JSON and as one HTML page.

    python -m tinyllm_np.inspect --out inspect.html                 # the shipped model, an example exchange
    python -m tinyllm_np.inspect --text "Hello" --out p.html --json p.json
    python -m tinyllm_np.inspect --timeline runs/tinyllm_timeline.json --out learning.html

For a text of T characters with ids idx, computed in float64 from the model's
parameters (a float32 model is copied up) with the model's own layers:

    attention[l][h][i][j]  A = softmax(q_i . k_j / sqrt(D) + mask) of layer l, head h: row i sums
                           to 1, and A[i][j] = 0 for j > i (a query never sees the future)
    top[t]                 the 5 most likely characters after position t: [char, p], most likely first
    loss[t]                loss_t = -log softmax(logits_t)[idx[t+1]], for t < T-1
    lens[l][t]             the logit lens: argmax of head(ln(h_l)), h_l the residual stream after
                           layer l (the final layer norm and head applied early); lens[L-1] is the
                           model's own prediction
    saliency[p][j]         ||d loss_p / d x0_j||_2 with x0 = tok_emb[idx] + pos_emb (the first layer's
                           input), from the hand-written backward (TinyLLM.input_grad); exactly 0 for j > p

``--json`` writes these (plus ``lens_prob``, the lens's probability of its top
character, and ``model``, the weights file and each tensor's size) at full
precision.  The page holds the same numbers rounded for size: attention to
1/255 (a byte each, base64, lower triangle only), the rest to 4 significant
digits; its JavaScript only draws them.  A training run records snapshots of
the page's numbers (``train.py --inspect-text``) into a timeline file, which
``--timeline`` turns into a page with a step slider.
"""

import base64
import dataclasses
import json
import math
import os
import sys

import numpy as np

from . import layers as L
from .chat import default_weights
from .cli import OneLineParser, run_main
from .fileio import atomic_write_bytes
from .model import Config, TinyLLM
from .tokenizer import BOT, END, USER
from .weights import WeightsError, load_model

EXAMPLE = USER + "Hello!" + BOT + "Hi there! How can I help you today?" + END
TIMELINE_KIND = "tinyllm-inspect-timeline"
TIMELINE_VERSION = 1
TOP_K = 5
SALIENCY_ROWS = 16  # backward passes batched at once: 16 copies of a 128-character text, about 100 MB in float64
TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "inspect_page.html")


class InspectError(ValueError):
    """A problem with the user's input (text, files); printed as one line, exit code 2."""


# ------------------------------------------------------------------ the text

def prepare_text(text, chars, context):
    """(ids, the text used, notices): unknown characters dropped, then the last ``context`` kept."""
    stoi = {c: i for i, c in enumerate(chars)}
    notices = []
    bad = sorted(set(text) - stoi.keys())
    if bad:
        n = sum(c not in stoi for c in text)
        notices.append(f"dropped {n} character(s) not in the vocabulary: {''.join(bad)!r}")
        text = "".join(c for c in text if c in stoi)
    if len(text) > context:
        notices.append(f"the text has {len(text)} characters, more than the context of {context}: "
                       f"using its last {context}")
        text = text[-context:]
    if len(text) < 2:
        raise InspectError(f"the text needs at least 2 characters the model knows, got {len(text)}")
    return np.array([stoi[c] for c in text], dtype=np.int64), text, notices


# ---------------------------------------------------------------- computing

def _float64(model):
    """The model itself if float64 on the fast engine, else a float64 fast-engine copy (its generators untouched)."""
    if model.dtype == np.float64 and model.engine == "fast":  # the attention cache read is the fast engine's
        return model
    m = TinyLLM(model.config, dtype=np.float64, chars=model.chars)  # the fast engine
    m.flat[...] = model.flat
    return m


def _attention_weights(att_cache, T):
    """(H,T,T) attention weights of one sequence from layers.attention_forward's cache.

    The cache keeps softmax's output per block of query positions s..e-1 as
    (B,H,e-s,e) (keys 0..e-1, see layers.query_blocks); keys past e are masked,
    so those entries stay 0.
    """
    blocks = att_cache[4]
    H = blocks[0][2].shape[1]
    A = np.zeros((H, T, T))
    for s, e, att, _, _ in blocks:
        A[:, s:e, :e] = att[0]
    return A


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def analyze(model, ids):
    """The views of one text, as float64 arrays (the math is in the module docstring).

    Returns a dict: attention (L,H,T,T), logprobs (T,V), loss (T-1,), lens_ids
    and lens_prob (L,T), saliency (T-1,T).  Evaluation mode; the model's
    generators (dropout, data) are not touched, so training goes on unchanged.
    """
    m = _float64(model)
    cfg, p = m.config, m.params
    ids = np.asarray(ids, dtype=np.int64)
    T = ids.size
    idx = m._check_idx(ids[None])
    x = p["tok_emb.weight"][idx] + p["pos_emb.weight"][:T]  # x0 (1,T,C)
    hidden, attention = [], []
    for i in range(cfg.n_layers):
        x, (ca, _, _, _) = m._block_forward(x, i, None)  # evaluation mode: no dropout, nothing drawn
        attention.append(_attention_weights(ca[0], T))
        hidden.append(x[0])
    h = np.stack(hidden)  # (L,T,C): the residual stream after each layer
    h, _ = L.layernorm_forward(h, p["ln.weight"], p["ln.bias"])
    lens_logp = _log_softmax(L.linear_forward(h, p["head.weight"])[0])  # (L,T,C) -> (L,T,V)
    logp = lens_logp[-1]  # the last layer's lens is the model's output
    lens_ids = lens_logp.argmax(axis=-1)
    lens_prob = np.exp(np.take_along_axis(lens_logp, lens_ids[..., None], axis=-1)[..., 0])
    loss = -logp[np.arange(T - 1), ids[1:]]

    # saliency row p: d loss_p / d x0 from the backward of one copy of the text whose only nonzero
    # d loss / d logits is row p's, softmax(logits_p) - onehot(idx[p+1]) (layers.cross_entropy_backward).
    # Rows go SALIENCY_ROWS at a time, each batch cut after its last row's position, n = rows[-1] + 1:
    # logits_p reads positions 0..p only, so later ones cannot matter (the backward's exact zeros
    # for p < j < n show it) -- half the work of full-length copies.
    probs = np.exp(logp)
    saliency = np.zeros((T - 1, T))
    for a in range(0, T - 1, SALIENCY_ROWS):
        rows = np.arange(a, min(a + SALIENCY_ROWS, T - 1))
        n, b = rows[-1] + 1, np.arange(rows.size)
        dlogits = np.zeros((rows.size, n, cfg.vocab_size))
        dlogits[b, rows] = probs[rows]
        dlogits[b, rows, ids[rows + 1]] -= 1.0
        dx0 = m.input_grad(np.repeat(idx[:, :n], rows.size, axis=0), dlogits)  # (b,n,C)
        saliency[rows, :n] = np.sqrt(np.einsum("btc,btc->bt", dx0, dx0))
    return {"attention": np.stack(attention), "logprobs": logp, "loss": loss, "lens_ids": lens_ids,
            "lens_prob": lens_prob, "saliency": saliency}


def top_k(logprobs, chars, k=TOP_K, digits=None):
    """[T] lists of [char, p], most likely first (p rounded to ``digits`` significant digits if given)."""
    order = np.argsort(-logprobs, axis=-1, kind="stable")[:, :min(k, logprobs.shape[-1])]
    rnd = (lambda v: v) if digits is None else (lambda v: _sig(v, digits))
    return [[[chars[j], rnd(float(math.exp(row[j])))] for j in o] for row, o in zip(logprobs, order)]


def model_info(config, weights):
    """Configuration-independent facts for the page: the weights file and every tensor's size."""
    shapes = config.param_shapes()
    size = os.path.getsize(weights) if weights and os.path.isfile(weights) else None
    return {"weights": weights, "weights_bytes": size, "n_params": sum(math.prod(s) for s in shapes.values()),
            "tensors": [[name, list(s), math.prod(s)] for name, s in shapes.items()]}


def to_json(model, chars, views, weights=None):
    """The --json record: the issue's schema (chars, config, attention, top, loss, lens, saliency) and
    lens_prob, model; numbers at full precision."""
    cc = model.chars
    return {"chars": list(chars), "config": dataclasses.asdict(model.config),
            "attention": views["attention"].tolist(), "top": top_k(views["logprobs"], cc),
            "loss": views["loss"].tolist(), "lens": [[cc[i] for i in row] for row in views["lens_ids"]],
            "lens_prob": views["lens_prob"].tolist(), "saliency": views["saliency"].tolist(),
            "model": model_info(model.config, weights)}


# ---------------------------------------------------------------- the page

def _sig(v, digits=4):
    """v rounded to ``digits`` significant digits (a float that JSON writes in few characters)."""
    return float(f"{v:.{digits}g}")


def _sig_list(a, digits=4):
    return [_sig(float(v), digits) for v in np.ravel(a)]


def page_snapshot(model, views, step=None):
    """The page's copy of the views, rounded for size (module docstring); ``step`` for a timeline."""
    A = views["attention"]
    T = A.shape[-1]
    tril = np.tril_indices(T)
    att = [[base64.b64encode(np.round(A[l, h][tril] * 255).astype(np.uint8).tobytes()).decode("ascii")
            for h in range(A.shape[1])] for l in range(A.shape[0])]
    cc = model.chars
    S = views["saliency"]
    return {"step": step, "mean_loss": _sig(float(views["loss"].mean()), 5),
            "attention_u8": att,
            "top": top_k(views["logprobs"], cc, digits=4),
            "loss": _sig_list(views["loss"]),
            "lens": ["".join(cc[i] for i in row) for row in views["lens_ids"]],
            "lens_prob": [_sig_list(row, 3) for row in views["lens_prob"]],
            "saliency": [_sig_list(S[p, :p + 1]) for p in range(S.shape[0])]}  # j > p: exactly 0, left out


def page_meta(config, text, vocab, weights, notices=(), source=None):
    """What the page shows besides the snapshots: the text used, the vocabulary, the model."""
    return {"text": text, "vocab": list(vocab), "config": dataclasses.asdict(config),
            "model": model_info(config, weights), "notices": list(notices), "source": source}


def script_json(obj):
    """JSON text safe inside <script>: no '<', '>', '&' or line separators left as themselves.

    Inside JSON strings they become \\u escapes, which JSON.parse turns back into
    the same characters; outside strings JSON never has them.  So a text such as
    '</script><marquee>' cannot end the script element or become markup.
    """
    s = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        s = s.replace(ch, esc)
    return s


def render_page(meta, snapshots):
    """The self-contained HTML page: the template with the data in its one JSON <script> element."""
    with open(TEMPLATE, encoding="utf-8") as f:
        template = f.read()
    head, sep, tail = template.partition("__INSPECT_DATA__")
    assert sep and "__INSPECT_DATA__" not in tail, "the template must hold the data marker once"
    return head + script_json({"meta": meta, "snapshots": snapshots}) + tail


def write_page(path, meta, snapshots):
    atomic_write_bytes(path, render_page(meta, snapshots).encode("utf-8"))


# ---------------------------------------------------------------- timeline

def write_timeline(path, meta, snapshots):
    """One JSON object {kind, version, meta, snapshots}, written atomically (temp file, os.replace)."""
    obj = {"kind": TIMELINE_KIND, "version": TIMELINE_VERSION, "meta": meta, "snapshots": snapshots}
    atomic_write_bytes(path, json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def read_timeline(path):
    """(meta, snapshots) of a timeline file; InspectError with one line if it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise InspectError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InspectError(f"{path}: is a directory, not a timeline file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InspectError(f"{path}: not a timeline file ({type(e).__name__})") from None
    if not isinstance(obj, dict) or obj.get("kind") != TIMELINE_KIND:
        raise InspectError(f"{path}: not a timeline file (written by train.py --inspect-text)")
    if obj.get("version") != TIMELINE_VERSION:
        raise InspectError(f"{path}: timeline version {obj.get('version')!r}, this reads {TIMELINE_VERSION}")
    meta, snaps = obj.get("meta"), obj.get("snapshots")
    if not isinstance(meta, dict) or not isinstance(snaps, list) or not snaps:
        raise InspectError(f"{path}: a timeline needs its meta and at least one snapshot")
    return meta, snaps


class Timeline:
    """Snapshots of the views of one text during training (train.py --inspect-text/--inspect-every).

    Each record() computes the views (evaluation mode, a float64 copy: the
    training model, its generators and so the training numbers are untouched)
    and rewrites the whole file atomically.  With ``resume_step`` an existing
    file for the same text keeps its snapshots up to that step.
    """

    def __init__(self, path, model, text, weights, resume_step=None):
        self.path, self.model = path, model
        self.ids, used, notices = prepare_text(text, model.chars, model.config.context)
        self.notices = notices
        self.meta = page_meta(model.config, used, model.chars, weights, notices, source="train.py")
        self.snapshots = []
        if resume_step is not None and os.path.exists(path):
            try:
                meta, snaps = read_timeline(path)
            except InspectError:
                return
            if meta.get("text") == used and meta.get("config") == self.meta["config"]:
                self.snapshots = [s for s in snaps if isinstance(s.get("step"), int) and s["step"] <= resume_step]

    def record(self, step):
        if self.snapshots and self.snapshots[-1]["step"] == step:
            return
        self.snapshots.append(page_snapshot(self.model, analyze(self.model, self.ids), step=step))
        write_timeline(self.path, self.meta, self.snapshots)


# --------------------------------------------------------------------- CLI

def build_parser():
    ap = OneLineParser(prog="python -m tinyllm_np.inspect", description=__doc__.split("\n\n")[0])
    a = ap.add_argument
    a("--weights", default=None, help="weights file (default: the shipped model)")
    a("--text", default=None, help="the text to look at (default for a chat model: an example exchange; "
                                   "longer than the context: its last context characters)")
    a("--out", default="inspect.html", help="the HTML page to write (default: %(default)s)")
    a("--json", default=None, metavar="FILE", help="also write the numbers as JSON (full precision)")
    a("--timeline", default=None, metavar="FILE",
      help="build a page with a step slider from a timeline file of train.py --inspect-text")
    return ap


def _note(msg):
    print(f"inspect: {msg}", file=sys.stderr, flush=True)


def run(args):
    if args.timeline is not None:
        for flag in ("weights", "text", "json"):
            if getattr(args, flag) is not None:
                raise InspectError(f"--{flag} cannot be used with --timeline (the timeline holds its text and steps)")
        meta, snaps = read_timeline(args.timeline)
        write_page(args.out, meta, snaps)
        _note(f"wrote {args.out} ({len(snaps)} snapshots, {os.path.getsize(args.out):,} bytes)")
        return 0
    weights = args.weights or default_weights()
    model = load_model(weights)
    if model.chars is None:
        raise InspectError(f"{weights}: has no vocabulary (__chars__); cannot read a text")
    text = args.text
    if text is None:
        if not set(USER + BOT + END) <= set(model.chars):
            raise InspectError("--text is required for a model that is not a chat model")
        text = EXAMPLE
    ids, used, notices = prepare_text(text, model.chars, model.config.context)
    for n in notices:
        _note(n)
    views = analyze(model, ids)
    if args.json is not None:
        record = to_json(model, used, views, weights)
        atomic_write_bytes(args.json, json.dumps(record, ensure_ascii=False).encode("utf-8"))
    write_page(args.out, page_meta(model.config, used, model.chars, weights, notices),
               [page_snapshot(model, views)])
    _note(f"wrote {args.out} ({os.path.getsize(args.out):,} bytes)" + (f" and {args.json}" if args.json else ""))
    return 0


def main(argv=None):
    return run_main(build_parser(), run, (InspectError, WeightsError), "inspect", argv)


if __name__ == "__main__":
    sys.exit(main())
