#!/bin/sh
# nanoGPT's README CPU recipe, side by side with ours, on the same text; whole-process wall times.
#
#   sh docs/vs_nanogpt.sh NANOGPT_CHECKOUT TEXT_FILE [OUT_DIR]
#
# NANOGPT_CHECKOUT: a checkout of github.com/karpathy/nanoGPT (nothing of it is copied here).
# TEXT_FILE: a UTF-8 text (tiny shakespeare, or any public-domain text); both sides train on it,
# split 90/10 as nanoGPT's data/shakespeare_char/prepare.py does (our --val-frac 0.1).
# Run from the repository root; PyTorch runs with 2 threads.  Each side's output goes to OUT_DIR.
# ORDER="ours nano" runs our side first (default "nano ours"); alternate it when repeating.
# INTERLEAVE=2 runs the two trainings in turns of 2 s instead, one stopped while the other runs
# (docs/interleave.py), so that the host's drift over the minutes falls on both alike; the times are
# then the sums of each side's turns.
# nanoGPT's side needs torch, numpy and tiktoken (its sample.py imports it) in this Python.
set -eu
NANO=$(cd "$1" && pwd); TEXT=$(realpath "$2"); OUT=$(realpath -m "${3:-/tmp/vs_nanogpt}")
mkdir -p "$OUT"
python -c "import torch, tiktoken" 2>/dev/null || { echo "vs_nanogpt.sh: nanoGPT's side needs torch and tiktoken (pip install torch tiktoken)" >&2; exit 1; }
trap 'test $? -eq 0 || echo "vs_nanogpt.sh: a step failed; its output is in $OUT/*.txt" >&2' EXIT
export OMP_NUM_THREADS=2
# nanoGPT's char-level prepare step, on TEXT: vocabulary = sorted characters, uint16 ids, first 90% train
python - "$TEXT" "$NANO/data/shakespeare_char" <<'PY'
import pickle, sys
import numpy as np
text, folder = open(sys.argv[1], encoding="utf-8").read(), sys.argv[2]
chars = sorted(set(text))
stoi = {c: i for i, c in enumerate(chars)}
n = int(len(text) * 0.9)
for name, part in (("train", text[:n]), ("val", text[n:])):
    np.array([stoi[c] for c in part], dtype=np.uint16).tofile(f"{folder}/{name}.bin")
with open(f"{folder}/meta.pkl", "wb") as f:
    pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
PY
t() { /usr/bin/time -f "%e s wall, %M KB peak" "$@"; }
# training: nanoGPT's README CPU recipe (it evaluates every 250 iterations on eval_iters=20 batches);
# each command a string for sh -c (NANO, TEXT and OUT exported), so that interleave.py can run it too
export NANO TEXT OUT
NANO_TRAIN='cd "$NANO" && exec python train.py config/train_shakespeare_char.py --device=cpu --compile=False \
    --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 \
    --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0'
OURS_TRAIN='exec python train.py --data "$TEXT" --out "$OUT/ours.npz" --checkpoint "$OUT/ours_ckpt.npz" \
    --log "$OUT/ours_log.csv" --plot "" --batch-size 12 --context 64 --n-layers 4 --n-heads 4 --d-model 128 \
    --d-ff 512 --norm-first --activation gelu --dropout 0 --lr 1e-3 --min-lr 1e-4 --schedule cosine --warmup 100 \
    --beta2 0.99 --weight-decay 0.1 --clip 1.0 --max-steps 2000 --eval-every 250 --eval-batches 20 --ckpt-every 250'
train_nano() { t sh -c "$NANO_TRAIN" > "$OUT/nanogpt_train.txt" 2>&1; }
train_ours() { t sh -c "$OURS_TRAIN" > "$OUT/ours_train.txt" 2>&1; }
# sampling: 4 samples x 1000 new characters from each side's model (nanoGPT: temperature 0.8, top_k 200)
sample_nano() {
(cd "$NANO" && t python sample.py --out_dir=out-shakespeare-char --num_samples=4 --max_new_tokens=1000 \
    --device=cpu) > "$OUT/nanogpt_sample.txt" 2>&1
}
sample_ours() {
if python -c "import tinyllm_np.sample" 2>/dev/null; then
  t python -m tinyllm_np.sample --weights "$OUT/ours.npz" --num-samples 4 --max-new-tokens 1000 \
      --temperature 0.8 --top-k 200 --seed 1337 > "$OUT/ours_sample.txt" 2>&1
else  # no sampler command on this branch: generate.generate in a loop, one sample after another
  t python -c "
import sys, numpy as np
from tinyllm_np.generate import generate
from tinyllm_np.tokenizer import CharTokenizer
from tinyllm_np.weights import load_model
m = load_model(sys.argv[1]); tok = CharTokenizer(m.chars); rng = np.random.default_rng(1337)
for _ in range(4):
    print('\n' + tok.decode(list(generate(m, tok.encode('\n'), 1000, temperature=0.8, top_k=200, rng=rng))))
    print('-' * 15)
" "$OUT/ours.npz" > "$OUT/ours_sample.txt" 2>&1
fi
}
if [ -n "${INTERLEAVE:-}" ]; then
  python "$(dirname "$0")/interleave.py" --turn "$INTERLEAVE" "$OUT/nanogpt_train.txt" "$NANO_TRAIN" \
      "$OUT/ours_train.txt" "$OURS_TRAIN"
else
  for side in ${ORDER:-nano ours}; do train_$side; done
fi
for side in ${ORDER:-nano ours}; do sample_$side; done
grep -h "val loss" "$OUT/nanogpt_train.txt" | tail -1
grep -h "val " "$OUT/ours_train.txt" | tail -1
tail -qn1 "$OUT/nanogpt_train.txt" "$OUT/ours_train.txt" "$OUT/nanogpt_sample.txt" "$OUT/ours_sample.txt"
