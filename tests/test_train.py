"""Training loop: loss goes down, checkpoints resume bit for bit, bad input gets one clear line."""

import csv
import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

from tinyllm_np import TinyLLM, load_model
from tinyllm_np import train as T
from tinyllm_np.data import split_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--d-ff", "32", "--context", "16",
        "--batch-size", "4", "--quiet"]


# eight questions, two answers: a held-out question (data.py's split) has an answer seen in training
_QA = [(q, "hello there") for q in ("hi", "hey", "hello", "hi there")] + \
      [(q, "see you") for q in ("bye", "goodbye", "see ya", "bye now")]
TEXT = "".join(f"<|user|>{q}<|bot|>{a}<|end|>\n" for q, a in _QA) * 10


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def run_args(tmp_path, data, *extra):
    return ["--data", str(data), "--out", str(tmp_path / "w.npz"), "--checkpoint", str(tmp_path / "ck.npz"),
            "--log", str(tmp_path / "log.csv"), "--plot", str(tmp_path / "loss.png"), *TINY, *extra]


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_short_training_run_lowers_the_loss(tmp_path, text_file):
    assert T.main(run_args(tmp_path, text_file, "--max-steps", "150", "--lr", "1e-2", "--eval-every", "50")) == 0
    rows = read_log(tmp_path / "log.csv")
    assert len(rows) == 150
    first = np.mean([float(r["train_loss"]) for r in rows[:10]])
    last = np.mean([float(r["train_loss"]) for r in rows[-10:]])
    assert last < 0.5 * first
    vals = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert len(vals) == 3 and vals[-1] < vals[0]
    model = load_model(tmp_path / "w.npz")
    assert model.chars == sorted(set(text_file.read_text()))
    assert model.config.d_model == 16 and model.dtype == np.float32


def test_engine_flag_trains_on_the_reference_layers_to_the_same_losses(tmp_path, text_file, monkeypatch):
    """--engine reference reaches the model (the workers build their own, see test_reference); same losses."""
    made = []
    real = T.TinyLLM

    def spy(*args, **kwargs):
        made.append(kwargs.get("engine"))
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "TinyLLM", spy)
    losses = {}
    for engine in ("fast", "reference"):
        assert T.main(run_args(tmp_path / engine, text_file, "--max-steps", "5", "--engine", engine,
                               "--workers", "1")) == 0
        losses[engine] = np.array([float(r["train_loss"]) for r in read_log(tmp_path / engine / "log.csv")])
    assert made == ["fast", "reference"]
    assert np.abs(losses["fast"] - losses["reference"]).max() < 1e-4
    assert T.main(run_args(tmp_path / "reference", text_file, "--max-steps", "6", "--resume",
                           "--engine", "reference", "--workers", "1")) == 0  # the engine is not in the checkpoint
    assert made[-1] == "reference"


def test_resume_is_bitwise_identical(tmp_path, text_file):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--lr", "5e-3", "--warmup", "5", "--clip", "1.0", "--ckpt-every", "7"]  # constant lr: the total differs
    assert T.main(run_args(a, text_file, "--max-steps", "30", *common)) == 0
    assert T.main(run_args(b, text_file, "--max-steps", "12", *common)) == 0
    # the second half: same command with --resume, as after an interruption at step 12
    assert T.main(run_args(b, text_file, "--max-steps", "30", "--resume")) == 0
    wa, wb = load_model(a / "w.npz"), load_model(b / "w.npz")
    assert np.array_equal(wa.flat, wb.flat)
    la = [r["train_loss"] for r in read_log(a / "log.csv")]
    lb = [r["train_loss"] for r in read_log(b / "log.csv")]
    assert la == lb and len(la) == 30


def test_resume_refuses_another_micro_batch_or_batch_size(tmp_path, text_file, capsys):
    """--micro-batch changes the dropout masks, --batch-size the steps: on --resume they must be the checkpoint's."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert T.main(run_args(a, text_file, "--max-steps", "20", "--micro-batch", "2")) == 0
    assert T.main(run_args(b, text_file, "--max-steps", "8", "--micro-batch", "2")) == 0
    capsys.readouterr()
    for flags, message in ((["--micro-batch", "1"], "--micro-batch 1 differs from the checkpoint's 2"),
                           (["--batch-size", "2"], "--batch-size 2 differs from the checkpoint's 4")):
        assert T.main(run_args(b, text_file, "--max-steps", "20", "--resume", *flags)) == 2
        err = capsys.readouterr().err
        assert err.startswith("train: error: --resume: " + message) and err.count("\n") == 1
    # the same values given again are what runs; omitted, the checkpoint's run too
    assert T.main(run_args(b, text_file, "--max-steps", "14", "--resume", "--micro-batch", "2")) == 0
    assert T.main(run_args(b, text_file, "--max-steps", "20", "--resume")) == 0
    assert np.array_equal(load_model(a / "w.npz").flat, load_model(b / "w.npz").flat)
    # and the two settings really differ, or this test would prove nothing
    c = tmp_path / "c"
    assert T.main(run_args(c, text_file, "--max-steps", "20", "--micro-batch", "1")) == 0
    assert not np.array_equal(load_model(a / "w.npz").flat, load_model(c / "w.npz").flat)


def test_resume_of_a_checkpoint_from_before_micro_batches(tmp_path, text_file):
    """An older checkpoint records --workers (one micro-batch per worker), not --micro-batch."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert T.main(run_args(a, text_file, "--max-steps", "12", "--micro-batch", "2")) == 0
    assert T.main(run_args(b, text_file, "--max-steps", "6", "--micro-batch", "2")) == 0
    config, params, chars, m, v, state = T.load_checkpoint(b / "ck.npz")
    del state["hparams"]["micro_batch"]
    state["hparams"]["workers"] = 2  # batch 4 over 2 workers: micro-batches of 2
    old = TinyLLM(config, chars=chars)
    old.load_state_dict(params)
    T.save_checkpoint(b / "ck.npz", old, SimpleNamespace(m=m, v=v), state)
    assert T.main(run_args(b, text_file, "--max-steps", "12", "--resume", "--workers", "1")) == 0
    assert np.array_equal(load_model(a / "w.npz").flat, load_model(b / "w.npz").flat)


def test_sigint_saves_checkpoint_and_resume_matches(tmp_path, text_file):
    """A real SIGINT to a training subprocess; resumed run ends bitwise equal to an uninterrupted one."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = ["--max-steps", "400", "--ckpt-every", "1000", "--log-every", "1", "--schedule", "cosine", "--warmup", "10"]
    assert T.main(run_args(full, text_file, *args)) == 0
    cmd = [sys.executable, "-m", "tinyllm_np.train", *[a for a in run_args(cut, text_file, *args) if a != "--quiet"]]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # wait until training is under way
        if line.startswith("step 20/"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "checkpoint saved" in err and "Traceback" not in err
    assert not (cut / "w.npz").exists()
    assert T.main(run_args(cut, text_file, *args, "--resume")) == 0
    assert np.array_equal(load_model(full / "w.npz").flat, load_model(cut / "w.npz").flat)
    assert [r["train_loss"] for r in read_log(full / "log.csv")] == [r["train_loss"] for r in read_log(cut / "log.csv")]


@pytest.mark.parametrize("signum,whole_group", [(signal.SIGTERM, False), (signal.SIGTERM, True),
                                                (signal.SIGINT, True)])
def test_a_signal_saves_a_checkpoint_even_when_the_workers_get_it_too(tmp_path, text_file, signum, whole_group):
    """SIGTERM to train.py alone, or SIGTERM / SIGINT to its whole process group, workers included
    (a job manager's kill -TERM -PGID, a Ctrl-C in the terminal): the workers must not die first."""
    cmd = [sys.executable, "-m", "tinyllm_np.train",
           *[a for a in run_args(tmp_path, text_file, "--max-steps", "100000", "--log-every", "1",
                                 "--micro-batch", "2") if a != "--quiet"]]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=whole_group)
    for line in proc.stderr:
        if line.startswith("step 5/"):
            break
    if whole_group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    name = "SIGTERM" if signum == signal.SIGTERM else "SIGINT"
    assert proc.returncode == (143 if signum == signal.SIGTERM else 130), err
    assert f"{name} at step" in err and "Traceback" not in err, err
    load_model(tmp_path / "ck.npz")  # a valid checkpoint


def test_non_finite_loss_stops_with_step(tmp_path, text_file, capsys):
    code = T.main(run_args(tmp_path, text_file, "--max-steps", "50", "--lr", "1e30", "--ckpt-every", "1"))
    err = capsys.readouterr().err
    assert code == 1 and "non-finite" in err and "at step" in err
    load_model(tmp_path / "ck.npz")  # the last good checkpoint is still loadable and finite


def _cli(tmp_path, *args):
    r = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return r.returncode, r.stderr


@pytest.mark.parametrize("content,flags,message", [
    (None, [], "no such file"),
    (b"", [], "file is empty"),
    (b"\xff\xfe bad bytes", [], "not valid UTF-8"),
    (b"too short", [], "fewer than --context"),
    (b"x" * 1000, ["--lr", "-1"], "--lr must be a positive"),
    (b"x" * 1000, ["--max-steps", "0"], "--max-steps must be positive"),
    (b"x" * 1000, ["--batch-size", "0"], "--batch-size must be positive"),
])
def test_bad_input_gets_one_line_and_exit_2(tmp_path, content, flags, message):
    data = tmp_path / "d.txt"
    if content is not None:
        data.write_bytes(content)
    code, err = _cli(tmp_path, *run_args(tmp_path, data, *flags))
    assert code == 2 and message in err
    assert err.count("\n") == 1 and err.startswith("train: error:") and "Traceback" not in err
    assert not (tmp_path / "w.npz").exists()


def test_resume_without_checkpoint(tmp_path, text_file):
    code, err = _cli(tmp_path, *run_args(tmp_path, text_file, "--resume"))
    assert code == 2 and "no checkpoint" in err


def test_resume_refuses_other_data(tmp_path, text_file):
    assert T.main(run_args(tmp_path, text_file, "--max-steps", "3")) == 0
    other = tmp_path / "other.txt"
    other.write_text(text_file.read_text() + "more", encoding="utf-8")
    code, err = _cli(tmp_path, *run_args(tmp_path, other, "--resume"))
    assert code == 2 and "different data" in err


def test_batch_larger_than_the_text(tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("abcdefgh\n" * 30, encoding="utf-8")  # 270 characters, 243 for training
    code, err = _cli(tmp_path, *run_args(tmp_path, data, "--batch-size", "64"))
    assert code == 2 and "one batch needs 64 x 17 characters" in err and err.count("\n") == 1


def test_unwritable_output_is_refused_before_training(tmp_path, text_file):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = _cli(tmp_path, *run_args(tmp_path, text_file), "--out", str(blocker / "w.npz"))
    assert code == 2 and "--out" in err and "cannot write" in err and err.count("\n") == 1
    assert not (tmp_path / "log.csv").exists()


def test_damaged_checkpoint_on_resume(tmp_path, text_file):
    assert T.main(run_args(tmp_path, text_file, "--max-steps", "3")) == 0
    ck = tmp_path / "ck.npz"
    ck.write_bytes(ck.read_bytes()[:200])
    code, err = _cli(tmp_path, *run_args(tmp_path, text_file, "--resume"))
    assert code == 2 and err.startswith("train: error: cannot resume:") and err.count("\n") == 1
    (tmp_path / "w.npz").replace(ck)  # weights without training state are not a checkpoint
    code, err = _cli(tmp_path, *run_args(tmp_path, text_file, "--resume"))
    assert code == 2 and "not a training checkpoint" in err


def test_loss_curve_png_when_matplotlib_is_installed(tmp_path, text_file):
    pytest.importorskip("matplotlib")
    assert T.main(run_args(tmp_path, text_file, "--max-steps", "20", "--eval-every", "10")) == 0
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------- reviewed defects (each test failed before its fix)

def _main(argv):
    """main()'s exit code, also when argparse exits."""
    try:
        return T.main(argv)
    except SystemExit as e:
        return e.code


def test_non_finite_parameters_are_never_saved(tmp_path, text_file, capsys):
    """lr 1e39: the loss of step 1 is finite but its update overflows the float32 parameters."""
    code = T.main(run_args(tmp_path, text_file, "--max-steps", "3", "--lr", "1e39", "--ckpt-every", "1"))
    err = capsys.readouterr().err
    assert code == 1 and "non-finite parameters" in err and "at step 1;" in err and err.count("\n") == 1
    assert not (tmp_path / "ck.npz").exists() and not (tmp_path / "w.npz").exists()


def test_blow_up_after_a_checkpoint_keeps_the_last_good_one(tmp_path, text_file, capsys, monkeypatch):
    good, bad = tmp_path / "good", tmp_path / "bad"
    assert T.main(run_args(good, text_file, "--max-steps", "2")) == 0

    class BlowsUpAtStep3(T.AdamW):
        def step(self, grads):
            super().step(grads)
            if self.t == 3:
                self._flat[5] = np.inf

    monkeypatch.setattr(T, "AdamW", BlowsUpAtStep3)
    assert T.main(run_args(bad, text_file, "--max-steps", "10", "--ckpt-every", "1")) == 1
    err = capsys.readouterr().err
    assert "non-finite parameters" in err and "at step 3;" in err and "last good checkpoint is kept" in err
    assert np.array_equal(load_model(bad / "ck.npz").flat, load_model(good / "w.npz").flat)  # step 2's
    assert not (bad / "w.npz").exists()
    assert len(read_log(bad / "log.csv")) == 2


@pytest.mark.parametrize("flags,message", [
    (["--epochs", "inf"], "--epochs must be a finite number"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--min-lr", "inf"], "--min-lr must be a finite number"),
    (["--min-lr=-1e-4"], "--min-lr must be between 0 and --lr"),
    (["--min-lr", "0.01"], "--min-lr must be between 0 and --lr"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number"),
    (["--clip", "inf"], "--clip must be a finite number"),
])
def test_non_finite_and_inconsistent_float_flags(tmp_path, text_file, flags, message, capsys):
    assert T.main(run_args(tmp_path, text_file, *flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith("train: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "log.csv").exists()


@pytest.mark.parametrize("flags,message", [
    (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--schedule", "nope"], "argument --schedule: invalid choice: 'nope'"),
])
def test_argparse_errors_are_one_line(flags, message, capsys):
    assert _main(flags) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("train: error: ") and message in err and err.count("\n") == 1


def test_help_still_works(capsys):
    assert _main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: train.py") and "--max-steps" in out


def test_unwritable_plot_is_refused_before_training(tmp_path, text_file, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert T.main(run_args(tmp_path, text_file, "--plot", str(blocker / "loss.png"))) == 2
    err = capsys.readouterr().err
    assert err.startswith("train: error: --plot") and "cannot write" in err and err.count("\n") == 1
    assert not (tmp_path / "log.csv").exists()


def test_interrupted_log_rewrite_on_resume_keeps_the_log(tmp_path, text_file, monkeypatch):
    assert T.main(run_args(tmp_path, text_file, "--max-steps", "6", "--ckpt-every", "3")) == 0
    before = (tmp_path / "log.csv").read_bytes()

    class InterruptedWriter(T.csv.DictWriter):
        def writerows(self, rows):
            super().writerows(list(rows)[:1])
            raise KeyboardInterrupt  # Ctrl-C in the middle of rewriting the log

    monkeypatch.setattr(T.csv, "DictWriter", InterruptedWriter)
    assert T.main(run_args(tmp_path, text_file, "--max-steps", "9", "--resume")) == 130
    assert (tmp_path / "log.csv").read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]
    monkeypatch.undo()
    assert T.main(run_args(tmp_path, text_file, "--max-steps", "9", "--resume")) == 0
    rows = read_log(tmp_path / "log.csv")
    assert [r["step"] for r in rows] == [str(i) for i in range(1, 10)]
    assert (tmp_path / "log.csv").read_bytes().startswith(before)


def test_default_out_leaves_the_shipped_weights_alone(tmp_path, text_file, monkeypatch, capsys):
    assert T.build_parser().get_default("out") == os.path.join("runs", "tinyllm.npz")
    monkeypatch.chdir(tmp_path)
    loud = [a for a in TINY if a != "--quiet"]
    assert T.main(["--data", str(text_file), *loud, "--max-steps", "2"]) == 0
    assert (tmp_path / "runs" / "tinyllm.npz").exists() and not (tmp_path / "weights").exists()
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "train: chat with it: python chat.py --weights runs/tinyllm.npz"
    # text without the chat markers: a model that cannot chat is pointed to the sampler instead
    plain = tmp_path / "plain.txt"
    plain.write_text("".join(f"line {i}: abcdefgh\n" for i in range(100)), encoding="utf-8")
    assert T.main(["--data", str(plain), *loud, "--max-steps", "2", "--out", "w b.npz"]) == 0
    err = capsys.readouterr().err
    assert (tmp_path / "w b.npz").exists() and "chat.py" not in err
    assert err.splitlines()[-1] == "train: sample from it: python -m tinyllm_np.sample --weights 'w b.npz'"


def test_bits_per_character_in_progress_log_and_summary(tmp_path, text_file, capsys):
    loud = [a for a in run_args(tmp_path, text_file) if a != "--quiet"]
    assert T.main([*loud, "--max-steps", "10", "--eval-every", "5", "--log-every", "1"]) == 0
    err = capsys.readouterr().err
    with open(tmp_path / "log.csv", newline="") as f:
        header = f.readline().strip().split(",")
    assert header == ["step", "epoch", "lr", "train_loss", "grad_norm", "eval_train_loss", "val_loss", "tok_per_s",
                      "elapsed_s", "train_bpc", "eval_train_bpc", "val_bpc"]  # new columns after the old ones
    rows = read_log(tmp_path / "log.csv")
    for r in rows:
        assert float(r["train_bpc"]) == pytest.approx(float(r["train_loss"]) / np.log(2), abs=2e-6)
    last = rows[-1]
    tr, va = float(last["eval_train_loss"]), float(last["val_loss"])
    assert float(last["val_bpc"]) == pytest.approx(va / np.log(2), abs=2e-6)
    assert float(last["eval_train_bpc"]) == pytest.approx(tr / np.log(2), abs=2e-6)
    step10 = [l for l in err.splitlines() if l.startswith("step 10/10")][0]
    assert f"loss {float(last['train_loss']):.4f} ({float(last['train_loss']) / np.log(2):.3f} bpc)" in step10
    assert f"val {va:.4f} ({va / np.log(2):.3f} bpc)" in step10
    assert (f"final: held-out validation loss {va:.4f} nats/char = {va / np.log(2):.3f} bpc; training windows "
            f"(memorised, eval mode) {tr:.4f} = {tr / np.log(2):.3f} bpc") in err.splitlines()


def test_resume_is_bitwise_when_the_ids_file_is_damaged_or_gone(tmp_path, text_file, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--lr", "5e-3", "--ckpt-every", "6"]
    assert T.main(run_args(a, text_file, "--max-steps", "18", *common)) == 0
    assert T.main(run_args(b, text_file, "--max-steps", "6", *common)) == 0
    ids = b / "ck.ids"  # beside the checkpoint ck.npz
    raw = bytearray(ids.read_bytes())
    header_bytes = int(raw[:100].split(b"\n")[0].split()[-1])
    raw[header_bytes:header_bytes + 200:2] = bytes(x ^ 1 for x in raw[header_bytes:header_bytes + 200:2])
    ids.write_bytes(bytes(raw))  # training ids, damaged but still in the vocabulary's range
    loud = [x for x in run_args(b, text_file, "--max-steps", "12", "--resume") if x != "--quiet"]
    assert T.main(loud) == 0
    assert "rebuilt: the old file was damaged (the ids' sha256 differs)" in capsys.readouterr().err
    ids.unlink()
    assert T.main(run_args(b, text_file, "--max-steps", "18", "--resume")) == 0
    assert ids.exists()
    assert np.array_equal(load_model(a / "w.npz").flat, load_model(b / "w.npz").flat)
    assert [r["train_loss"] for r in read_log(a / "log.csv")] == [r["train_loss"] for r in read_log(b / "log.csv")]


# ------------------------------------------------- worker faults, bitwise whatever the workers, flags on --resume

def _worker_pids(pid):
    """The DataParallel workers of process ``pid``: its spawned children (not multiprocessing's resource tracker)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"spawn_main" in cmdline:
            found.append(int(entry))
    return sorted(found)


FAULT = ["--max-steps", "40", "--ckpt-every", "1000", "--eval-every", "1000", "--log-every", "1",
         "--micro-batch", "1", "--epochs", "3", "--schedule", "cosine"]  # 4 micro-batches a step, dropout 0.1


def _run_until(tmp_path, text_file, flags, at_step=8):
    """A train.py subprocess (2 workers), left running at step ``at_step``; (proc, worker pids)."""
    cmd = [sys.executable, "-m", "tinyllm_np.train",
           *[a for a in run_args(tmp_path, text_file, *FAULT, *flags) if a != "--quiet"]]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith(f"step {at_step}/"):
            break
    pids = _worker_pids(proc.pid)
    assert len(pids) == 2
    return proc, pids


def _ended(proc, code, pattern):
    """Wait for train.py; its exit code must be ``code`` and stderr's one line match ``pattern``: the match."""
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    line = _the_one_line(err)
    m = re.fullmatch(pattern, line)
    assert m, line
    return m


def _the_one_line(err):
    """stderr without the progress lines: must be exactly one line."""
    lines = [ln for ln in err.splitlines() if ln and not ln.startswith(("step ", "training "))]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the FAULT run without interruption, on 2 workers."""
    path = tmp_path_factory.mktemp("full")
    text = path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")  # the text_file fixture's text
    assert T.main(run_args(path, text, *FAULT)) == 0
    return load_model(path / "w.npz").flat, [r["train_loss"] for r in read_log(path / "log.csv")]


def _resumed_equals(tmp_path, text_file, uninterrupted, saved, *flags):
    assert T.load_checkpoint(tmp_path / "ck.npz")[5]["step"] == saved
    assert len(read_log(tmp_path / "log.csv")) == saved
    assert T.main(run_args(tmp_path, text_file, *FAULT, "--resume", *flags)) == 0
    assert np.array_equal(load_model(tmp_path / "w.npz").flat, uninterrupted[0])
    assert [r["train_loss"] for r in read_log(tmp_path / "log.csv")] == uninterrupted[1]


def test_a_killed_worker_saves_the_last_step_and_resume_is_bitwise(tmp_path, text_file, uninterrupted):
    proc, pids = _run_until(tmp_path, text_file, [])
    os.kill(pids[1], signal.SIGKILL)
    m = _ended(proc, 1, rf"train: error: worker 1 \(pid {pids[1]}\) was killed by SIGKILL during step (\d+); "
                        rf"saved step (\d+) to \S+; continue with --resume")
    failed, saved = int(m[1]), int(m[2])
    assert failed == saved + 1 and saved >= 8
    assert not (tmp_path / "w.npz").exists()
    _resumed_equals(tmp_path, text_file, uninterrupted, saved)


def test_a_stopped_worker_times_out_and_resume_on_one_worker_is_bitwise(tmp_path, text_file, uninterrupted):
    proc, pids = _run_until(tmp_path, text_file, ["--worker-timeout", "3"])  # margin for a loaded machine
    try:
        os.kill(pids[0], signal.SIGSTOP)
        m = _ended(proc, 1, rf"train: error: worker 0 \(pid {pids[0]}\) gave no answer in 3 s during step (\d+); "
                            rf"saved step (\d+) to \S+; continue with --resume")
    finally:
        if os.path.exists(f"/proc/{pids[0]}") and "zombie" not in open(f"/proc/{pids[0]}/status").read():
            os.kill(pids[0], signal.SIGKILL)
            raise AssertionError("train.py left its stopped worker behind")
    _resumed_equals(tmp_path, text_file, uninterrupted, int(m[2]), "--workers", "1")


def test_sigterm_is_acted_on_while_a_worker_is_stuck(tmp_path, text_file, uninterrupted):
    """The issue's case: a worker SIGSTOPped, then SIGTERM to train.py: 143 after the stop grace (5 s)."""
    proc, pids = _run_until(tmp_path, text_file, [])
    os.kill(pids[0], signal.SIGSTOP)
    time.sleep(0.5)  # a step takes milliseconds: by now train.py waits for worker 0 in the middle of a step
    proc.send_signal(signal.SIGTERM)
    m = _ended(proc, 143, rf"train: SIGTERM at step (\d+): worker 0 \(pid {pids[0]}\) had not answered; "
                          rf"call abandoned; checkpoint saved to \S+; continue with --resume")
    _resumed_equals(tmp_path, text_file, uninterrupted, int(m[1]), "--workers", "3")


def test_a_run_is_bitwise_the_same_whatever_the_workers(tmp_path, text_file, uninterrupted):
    """The issue's reproduction: 2 workers throughout, against 1 and 3 workers, and a resume with another count."""
    for workers in ("1", "3"):
        d = tmp_path / workers
        assert T.main(run_args(d, text_file, *FAULT, "--workers", workers)) == 0
        assert np.array_equal(load_model(d / "w.npz").flat, uninterrupted[0])
    d = tmp_path / "resumed"
    assert T.main(run_args(d, text_file, *FAULT, "--max-steps", "17", "--workers", "2")) == 0
    assert T.main(run_args(d, text_file, *FAULT, "--resume", "--workers", "1")) == 0
    assert np.array_equal(load_model(d / "w.npz").flat, uninterrupted[0])


def _steps_per_epoch(text_file, B=4, T=16):
    train_text, _ = split_text(text_file.read_text(encoding="utf-8"), 0.1)
    return len(train_text) // (B * T)


def _lrs(path):
    return [float(r["lr"]) for r in read_log(path / "log.csv")]


def test_max_steps_is_the_total_and_the_schedule_spans_it(tmp_path):
    """--max-steps alone: that many steps even where the default 8 epochs are fewer; cosine reaches --min-lr."""
    data = tmp_path / "d.txt"
    # distinct lines (a held-out line must not occur in training); 8 epochs would be 104 steps
    data.write_text("".join(f"the quick brown fox jumps over the lazy dog {i:02d}\n" for i in range(20)),
                    encoding="utf-8")
    assert 8 * _steps_per_epoch(data) < 120
    assert T.main(run_args(tmp_path, data, "--max-steps", "120", "--schedule", "cosine", "--lr", "1e-2")) == 0
    lrs = _lrs(tmp_path)
    assert len(lrs) == 120
    assert lrs == [float(f"{T.lr_at(i, 1e-2, 120, schedule='cosine'):.6g}") for i in range(120)]


def test_epochs_and_max_steps_together(tmp_path, text_file):
    """Both: the schedule spans the epochs, the run stops at --max-steps."""
    assert T.main(run_args(tmp_path, text_file, "--epochs", "1", "--max-steps", "5", "--schedule", "linear")) == 0
    spe = _steps_per_epoch(text_file)
    assert _lrs(tmp_path) == [float(f"{T.lr_at(i, 3e-3, spe, schedule='linear'):.6g}") for i in range(5)]
    state = T.load_checkpoint(tmp_path / "ck.npz")[5]
    assert state["hparams"]["epochs"] == 1 and state["hparams"]["max_steps"] == 5


def test_a_finished_run_is_extended_by_max_steps_or_epochs(tmp_path, text_file, capsys):
    """Each extension ends bitwise where a run that long from the start ends (constant lr: same schedule)."""
    straight, ext = tmp_path / "straight", tmp_path / "ext"
    assert T.main(run_args(straight, text_file, "--max-steps", "10")) == 0
    assert T.main(run_args(ext, text_file, "--max-steps", "6")) == 0
    assert T.main(run_args(ext, text_file, "--resume", "--max-steps", "10")) == 0
    assert np.array_equal(load_model(straight / "w.npz").flat, load_model(ext / "w.npz").flat)
    assert len(read_log(ext / "log.csv")) == 10
    # --epochs alone: that many epochs in total (the checkpoint's --max-steps is dropped)
    assert T.main(run_args(straight, text_file, "--epochs", "2")) == 0
    assert T.main(run_args(ext, text_file, "--resume", "--epochs", "2")) == 0
    assert np.array_equal(load_model(straight / "w.npz").flat, load_model(ext / "w.npz").flat)
    assert len(read_log(ext / "log.csv")) == len(read_log(straight / "log.csv")) == 2 * _steps_per_epoch(text_file)
    # a length the checkpoint is already past is refused, not ignored
    capsys.readouterr()
    assert T.main(run_args(ext, text_file, "--resume", "--max-steps", "50")) == 2
    err = capsys.readouterr().err
    at = 2 * _steps_per_epoch(text_file)
    assert err == (f"train: error: --resume: the checkpoint is at step {at}, past the 50 steps asked for; "
                   "give a larger --max-steps or --epochs\n")


def test_resume_applies_an_explicit_lr_even_the_default_one(tmp_path, text_file):
    assert T.main(run_args(tmp_path, text_file, "--max-steps", "4", "--lr", "1e-2")) == 0
    assert T.main(run_args(tmp_path, text_file, "--resume", "--max-steps", "8")) == 0  # the checkpoint's lr
    assert T.main(run_args(tmp_path, text_file, "--resume", "--max-steps", "12", "--lr", "3e-3")) == 0  # the default
    assert T.main(run_args(tmp_path, text_file, "--resume", "--max-steps", "14", "--clip", "0.5")) == 0
    assert _lrs(tmp_path) == [1e-2] * 8 + [3e-3] * 6  # and the new lr is the checkpoint's from then on
    hp = T.load_checkpoint(tmp_path / "ck.npz")[5]["hparams"]
    assert hp["lr"] == 3e-3 and hp["clip"] == 0.5 and hp["max_steps"] == 14


@pytest.mark.parametrize("flags,message", [
    (["--d-model", "32"], "--d-model 32 differs from the checkpoint's 16"),
    (["--context", "8"], "--context 8 differs from the checkpoint's 16"),
    (["--dropout", "0"], "--dropout 0.0 differs from the checkpoint's 0.1"),
    (["--norm-first"], "--norm-first True differs from the checkpoint's False"),
    (["--seed", "1"], "--seed 1 differs from the checkpoint's 0"),
    (["--val-frac", "0.2"], "--val-frac 0.2 differs from the checkpoint's 0.1"),
])
def test_resume_refuses_a_flag_that_changes_the_model_or_the_data(tmp_path, text_file, flags, message, capsys):
    assert T.main(run_args(tmp_path, text_file, "--max-steps", "2")) == 0
    capsys.readouterr()
    assert T.main(run_args(tmp_path, text_file, "--resume", "--max-steps", "4", *flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"train: error: --resume: {message}: ") and err.count("\n") == 1
    assert len(read_log(tmp_path / "log.csv")) == 2


def test_given_flags_sees_flags_equal_to_their_defaults():
    assert T.given_flags(["--lr", "3e-3", "--resume", "--data=x.txt"]) == {"lr", "resume", "data"}
    assert T.given_flags([]) == set()


def test_resume_accepts_micro_batch_auto_when_it_gives_the_checkpoints_size(tmp_path, text_file, capsys):
    assert T.main(run_args(tmp_path, text_file, "--max-steps", "2")) == 0  # auto: the size from the shapes
    assert T.main(run_args(tmp_path, text_file, "--resume", "--max-steps", "4", "--micro-batch", "auto")) == 0
    assert T.main(run_args(tmp_path, text_file, "--resume", "--max-steps", "6", "--micro-batch", "1")) == 2
    assert "--micro-batch 1 differs from the checkpoint's" in capsys.readouterr().err


def test_a_bad_inspect_text_leaves_the_log_as_it_was(tmp_path, text_file, capsys):
    assert T.main(run_args(tmp_path, text_file, "--max-steps", "3")) == 0
    before = (tmp_path / "log.csv").read_bytes()
    assert T.main(run_args(tmp_path, text_file, "--resume", "--max-steps", "5", "--inspect-text", "\u00e9\u00e9\u00e9")) == 2
    assert capsys.readouterr().err.startswith("train: error: --inspect-text: ")
    assert (tmp_path / "log.csv").read_bytes() == before


def test_memory_freed_by_the_ids_build_is_handed_back_only_after_a_build(tmp_path, text_file, monkeypatch):
    calls = []
    monkeypatch.setattr(T, "release_freed_memory", lambda: calls.append(1))
    args = run_args(tmp_path, text_file, "--max-steps", "2")
    assert T.main(args) == 0 and calls == [1]  # first run: the ids file was built
    assert T.main(args) == 0 and calls == [1]  # the same text again: the ids file is reused, nothing built


_RSS_AFTER_FREE = r"""
import numpy as np
from tinyllm_np import alloc
def anon_kb():
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("RssAnon")))
assert alloc.reuse_freed_memory()
pieces = [np.ones(1 << 20, np.float32) for _ in range(40)]  # 40 x 4 MB, each under the mmap threshold
del pieces
kept = anon_kb()
released = alloc.release_freed_memory()
print(kept - anon_kb(), released)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"),
                    reason="glibc's allocator on Linux")
def test_release_freed_memory_gives_back_what_reuse_kept():
    out = subprocess.run([sys.executable, "-c", _RSS_AFTER_FREE], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout.split()
    freed_kb, released = int(out[0]), out[1]
    assert released == "True" and freed_kb > 120_000  # most of the 160 MB kept after the del
