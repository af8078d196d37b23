"""docs/interleave.py: two commands timed in turns, never running at the same moment."""

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGSTOP are POSIX")

_PATH = Path(__file__).resolve().parent.parent / "docs" / "interleave.py"

# Spins until it has used SECONDS of CPU time, writing a time stamp (the system-wide monotonic
# clock) about every millisecond of its run: the stamps show when it was running.
_SPIN = (sys.executable + " -c \"import sys, time\n"
         "t = time.process_time() + float(sys.argv[1])\n"
         "while time.process_time() < t:\n"
         "    print(time.monotonic(), flush=True)\n"
         "    s = time.perf_counter()\n"
         "    while time.perf_counter() - s < 0.001: pass\n"
         "sys.exit(int(sys.argv[2]))\" {} {}")


def _load():
    spec = importlib.util.spec_from_file_location("interleave", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _stamps(path):
    lines = Path(path).read_text().splitlines()
    return [float(x) for x in lines[:-1]], lines[-1]


def test_turns_do_not_overlap_and_each_side_counts_its_own_time(tmp_path, capsys):
    mod = _load()
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    code = mod.main(["--turn", "0.1", str(a), _SPIN.format(0.4, 0), str(b), _SPIN.format(0.25, 3)])
    assert code == 3  # the larger exit code of the two
    sa, last_a = _stamps(a)
    sb, last_b = _stamps(b)
    ran_a, ran_b = float(last_a.split()[0]), float(last_b.split()[0])
    assert last_a.endswith("KB peak") and last_b.endswith("KB peak")
    # each ran about as long as it spun (start-up of an interpreter on top), not the whole wall time
    assert 0.4 <= ran_a < 0.4 + 0.5 and 0.25 <= ran_b < 0.25 + 0.5
    assert max(sa + sb) - min(sa + sb) >= 0.6  # they did not run side by side
    # while one of them ran, the other wrote nothing: in time order, the stamps change hands only
    # at a switch of turns, not every millisecond as two commands running side by side would
    merged = sorted([(t, "a") for t in sa] + [(t, "b") for t in sb])
    switches = sum(1 for (_, x), (_, y) in zip(merged, merged[1:]) if x != y)
    assert 3 <= switches <= 2 + (ran_a + ran_b) / 0.1  # several turns, and no finer interleaving than turns
    assert "s running, exit 0" in capsys.readouterr().out


def test_the_other_runs_on_alone_after_one_ends(tmp_path):
    mod = _load()
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    assert mod.main(["--turn", "5", str(a), "true", str(b), _SPIN.format(0.2, 0)]) == 0
    sb, last_b = _stamps(b)
    assert sb and float(last_b.split()[0]) >= 0.2
