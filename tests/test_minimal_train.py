"""The minimal training loop over the public API: the loss starts near ln V and falls; the command runs."""

import math
import os

import pytest

from tinyllm_np import minimal_train as M

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "dialogue.txt")


def test_loss_starts_near_ln_v_and_falls():
    text = open(DATA, encoding="utf-8").read()[:50_000]
    model, tok, losses = M.train(text, steps=60, batch_size=8, context=32, d_model=32, log=lambda msg: None)
    assert abs(losses[0] - math.log(len(tok))) < 0.3  # a fresh model guesses all characters alike
    assert sum(losses[-10:]) / 10 < losses[0] - 1.0
    sample = M.sample_text(model, tok, "<|user|>Hi<|bot|>", n=20)
    assert len(sample) == 20 and set(sample) <= set(tok.chars)


def test_command(capsys):
    assert M.main(["--steps", "3", "--batch-size", "2", "--context", "16", "--d-model", "8",
                   "--engine", "reference", "--prompt", "Hi"]) == 0
    out = capsys.readouterr().out
    assert "the first loss should be near ln 59 = 4.08" in out and "step 3: loss" in out
    assert out.split("step 3: loss", 1)[1].split("\n", 1)[1].startswith("Hi")  # then the sample


@pytest.mark.parametrize("args,msg", [(["--data", "/nonexistent.txt"], "no such file"),
                                      (["--d-model", "6"], "multiple of 4"), (["--steps", "0"], "positive")])
def test_bad_input_is_one_line(args, msg, capsys):
    with pytest.raises(SystemExit) as e:
        M.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("minimal_train: error:") and msg in err


def test_the_tour_shows_the_loop_as_it_is():
    import inspect

    tour = open(os.path.join(os.path.dirname(DATA), "..", "docs", "tour.md"), encoding="utf-8").read()
    shown = tour.split("```python\n", 1)[1].split("```", 1)[0]
    source = [line for line in inspect.getsource(M.train).splitlines() if not line.lstrip().startswith('"""')]
    assert shown.splitlines() == source
