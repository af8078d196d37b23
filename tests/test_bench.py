"""The benchmark command runs and reports every figure the README quotes (no timing is judged here)."""

import subprocess
import sys

import pytest


def test_bench_smoke():
    out = subprocess.run([sys.executable, "-m", "tinyllm_np.bench", "--steps", "1", "--gen-chars", "5", "--no-torch",
                          "--configs", "seed,nanogpt"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for expected in ("float32 matmul peak", "[seed] the seed", "dropout 0.1, micro-batches of 8, 2 worker(s)",
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


@pytest.mark.parametrize("args", [["--workers", "0"], ["--micro-batch", "x"], ["--configs", "seed,nope"],
                                  ["--rounds", "0"], ["--steps", "-1"]])
def test_bench_rejects_bad_flags(args):
    out = subprocess.run([sys.executable, "-m", "tinyllm_np.bench", *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "bench: error" in out.stderr, out.stderr


def test_paired_rounds_takes_turns_and_the_ratio_within_each_round(monkeypatch):
    """Each round runs every function (one untimed step, then its share); a ratio is the median of the rounds' ratios."""
    from tinyllm_np import bench

    calls, clock = [], [0.0]
    costs = {"ours": [1.0, 1.0, 5.0], "a": [2.0, 2.0, 2.0], "b": [4.0, 4.0, 1.0]}  # seconds a step, round by round

    def make(name):
        n = [0]

        def fn():
            calls.append(name)
            clock[0] += costs[name][min(n[0] // 3, 2)]  # 3 calls a round: the untimed one and 2 timed
            n[0] += 1
        return fn

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    medians, per_round = bench.paired_rounds([make("ours"), make("a"), make("b")], steps=6, rounds=3)
    assert calls == (["ours"] * 3 + ["a"] * 3 + ["b"] * 3) * 3  # in turn, round after round
    assert per_round == [[1.0, 2.0, 4.0], [1.0, 2.0, 4.0], [5.0, 2.0, 1.0]]
    assert medians == [1.0, 2.0, 4.0]  # over every timed step
    # the rounds' ratios ours / min(a, b): 0.5, 0.5, 5 (median 0.5); b / min(ours, a): 4, 4, 0.5 (median 4)
    assert bench.round_ratios(per_round, 0, [1, 2]) == [0.5, 0.5, 5.0]
    assert bench.round_ratio(per_round, 0, [1, 2]) == 0.5
    assert bench.round_ratio(per_round, 2, [0, 1]) == 4.0
    calls.clear()
    assert bench.paired_rounds([make("a")], steps=1, rounds=1) == ([2.0], [[2.0]]) and calls == ["a", "a"]


def test_middle_half_is_the_quartiles_of_the_rounds_ratios():
    from tinyllm_np import bench

    assert bench.middle_half([0.9, 0.7, 0.8, 0.6, 1.0]) == pytest.approx((0.7, 0.9))
    assert bench.middle_half([0.75]) == (0.75, 0.75)  # one round: no spread to show


def test_bench_steps_default_per_configuration_in_rounds_of_four():
    """Every configuration has its default step count; the short nanoGPT step gets the most rounds."""
    from tinyllm_np import bench

    assert set(bench.STEPS) == set(bench.CONFIGS)
    assert max(bench.STEPS, key=bench.STEPS.get) == "nanogpt"
    out = subprocess.run([sys.executable, "-m", "tinyllm_np.bench", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert "nanogpt 100" in " ".join(out.stdout.split()), out.stdout
