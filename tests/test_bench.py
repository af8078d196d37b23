"""The benchmark command runs and reports every figure the README quotes (no timing is judged here)."""

import subprocess
import sys


def test_bench_smoke():
    out = subprocess.run([sys.executable, "-m", "tinyllm_np.bench", "--steps", "1", "--gen-chars", "5", "--no-torch"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for expected in ("float32 matmul peak", "dropout 0.1, micro-batches of 4, 2 worker processes",
                     "dropout 0.1, micro-batches of 4, 1 worker", "dropout 0.0, micro-batches of 4, 2 worker processes",
                     "dropout 0.0, micro-batches of 4, 1 worker", "% of peak", "peak RSS", "its workers",
                     "generation, 8-char prompt", "generation, 128-char prompt", "first char after"):
        assert expected in text, f"missing {expected!r} in:\n{text}"


def test_bench_rejects_bad_flags():
    out = subprocess.run([sys.executable, "-m", "tinyllm_np.bench", "--workers", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "bench: error" in out.stderr
