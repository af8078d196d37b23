"""Training without the machinery: the whole loop over the public API, then a sample.

    python -m tinyllm_np.minimal_train                      # a small model, 200 steps: about 15 s
    python -m tinyllm_np.minimal_train --steps 1000 --engine reference

Sample windows of the text, compute the loss and its gradients, let AdamW take
a step; repeat.  The first loss is about ln V (the model starts out guessing
every character alike), and it falls as the model learns.  train.py is this
loop plus what a long run needs: checkpoints and --resume, evaluation on
held-out text, progress and a CSV log, Ctrl-C handling, and worker processes
that share each batch's micro-batches over the cores.
"""

import numpy as np

from tinyllm_np import AdamW, CharTokenizer, Config, TinyLLM, generate, read_text, sample_batch
from tinyllm_np.cli import OneLineParser
from tinyllm_np.data import DataError


def train(text, steps=200, batch_size=16, context=64, d_model=64, lr=3e-3, engine="fast", seed=0, log=print):
    """Train a small TinyLLM on ``text``; returns (model, tokenizer, losses)."""
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    cfg = Config(vocab_size=len(tok), d_model=d_model, n_heads=4, d_ff=4 * d_model, context=context)
    model = TinyLLM(cfg, seed=seed, engine=engine, chars=tok.chars)
    opt = AdamW(model.params, lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    log(f"{model.n_params:,} parameters, vocabulary {len(tok)}: the first loss should be near ln {len(tok)} = "
        f"{np.log(len(tok)):.2f}")
    losses = []
    for step in range(1, steps + 1):
        x, y = sample_batch(ids, batch_size, context, rng)  # (B,T) inputs, targets shifted by one
        loss, grads = model.loss_and_grads(x, y, train=True)  # forward, backward, with dropout
        opt.step(grads)
        losses.append(loss)
        if step == 1 or step % 50 == 0 or step == steps:
            log(f"step {step}: loss {loss:.3f}")
    return model, tok, losses


def sample_text(model, tok, prompt, n=120, temperature=0.7, seed=0):
    """n characters continuing ``prompt`` (characters the vocabulary lacks are left out of the prompt)."""
    ids = tok.encode(prompt, drop_unknown=True)
    out = generate(model, ids, max_new_tokens=n, temperature=temperature, rng=np.random.default_rng(seed))
    return tok.decode(list(out))


def main(argv=None):
    ap = OneLineParser(prog="python -m tinyllm_np.minimal_train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/dialogue.txt", help="UTF-8 training text (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=64, help="model width, a multiple of the 4 heads")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--engine", choices=["fast", "reference"], default="fast")
    ap.add_argument("--prompt", default="<|user|>Hi!<|bot|>", help="what the sample at the end continues")
    ap.add_argument("--seed", type=int, default=0)
    args, code = ap.parse_or_code(argv)
    if args is None:
        return code
    if min(args.steps, args.batch_size, args.context - 1) < 1 or args.d_model % 4 or not args.d_model > 0 < args.lr:
        ap.error("--steps, --batch-size, --lr and --d-model must be positive (--d-model a multiple of 4), "
                 "--context at least 2")
    try:
        text = read_text(args.data)
    except DataError as e:
        ap.error(str(e))
    if len(text) <= args.context + 1:
        ap.error(f"{args.data}: {len(text)} characters, too few for --context {args.context}")
    model, tok, _ = train(text, args.steps, args.batch_size, args.context, args.d_model, args.lr, args.engine,
                          args.seed)
    print(args.prompt + sample_text(model, tok, args.prompt, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
