"""The benchmark command runs and reports every figure the README quotes (no timing is judged here)."""

import subprocess
import sys

import pytest


def test_bench_smoke():
    out = subprocess.run([sys.executable, "-m", "tinyllm_np.bench", "--steps", "1", "--gen-chars", "5", "--no-torch",
                          "--configs", "seed,nanogpt"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for expected in ("float32 matmul peak", "[seed] the seed", "dropout 0.1, micro-batches of 4, 2 worker(s)",
                     "[nanogpt] nanoGPT's CPU recipe", "dropout 0.0, micro-batches of 6, 2 worker(s)",
                     "% of peak", "peak RSS", "its workers",
                     "generation, 8-char prompt", "generation, 128-char prompt", "first char after"):
        assert expected in text, f"missing {expected!r} in:\n{text}"
    assert "[wide]" not in text and "[seed-p0]" not in text  # --configs chose two


def test_bench_gpt_block_matches_our_model_in_size():
    """The PyTorch side of the matrix has our parameter count at every configuration (a fair comparison)."""
    pytest.importorskip("torch")
    from tinyllm_np.bench import CONFIGS
    from tinyllm_np.model import TinyLLM
    from tinyllm_np.torch_ref import TorchGPT

    for _, cfg, _ in CONFIGS.values():
        assert sum(p.numel() for p in TorchGPT(cfg).parameters()) == TinyLLM(cfg).n_params


@pytest.mark.parametrize("args", [["--workers", "0"], ["--micro-batch", "x"], ["--configs", "seed,nope"]])
def test_bench_rejects_bad_flags(args):
    out = subprocess.run([sys.executable, "-m", "tinyllm_np.bench", *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "bench: error" in out.stderr, out.stderr
