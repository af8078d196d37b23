"""Time two long commands in turns, so that a shared host's drift falls on both alike.

    python docs/interleave.py [--turn SECONDS] OUT_A CMD_A OUT_B CMD_B

On a shared machine the speed drifts by a fifth or more within minutes, and two
long commands timed one after the other meet different machines.  Here only
one command runs at any moment, and they take turns: every ``--turn`` seconds
(default 2) the running one's process group gets SIGSTOP and the other's
SIGCONT (B is started at its first turn).  A command's time is the sum of its
turns, from its start to its exit; when one has ended, the other runs on alone.
Each CMD runs in ``sh -c`` in its own process group, its output to OUT; the
last line of each OUT is then "<seconds> s running, <KB> KB peak" (the largest
resident set of the command or any child it waited for, as /usr/bin/time's %M).

The cost: at each switch, the command resumed finds the caches holding the
other's data (a few ms in a turn of 2 s), and a command's own clocks count the
turns it was stopped (its progress lines and ETAs run slow).
"""

import argparse
import os
import signal
import subprocess
import sys
import time

POLL = 0.01  # seconds between looks for an ended command


def start(cmd, out):
    with open(out, "w") as f:
        return subprocess.Popen(["sh", "-c", cmd], stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def run_for(proc, seconds):
    """Let proc run up to ``seconds``; returns (seconds it ran, its rusage if it ended, else None)."""
    t0 = time.monotonic()
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        now = time.monotonic()
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return now - t0, usage
        if now - t0 >= seconds:
            return now - t0, None
        time.sleep(min(POLL, seconds - (now - t0)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--turn", type=float, default=2.0, help="seconds each command runs before the other's turn")
    ap.add_argument("out_a")
    ap.add_argument("cmd_a")
    ap.add_argument("out_b")
    ap.add_argument("cmd_b")
    args = ap.parse_args(argv)
    if not args.turn > 0:
        ap.error("--turn must be a positive number of seconds")
    sides = [(args.out_a, args.cmd_a), (args.out_b, args.cmd_b)]
    procs, ran, usage = [None, None], [0.0, 0.0], [None, None]
    try:
        turn = 0
        while alive := [k for k in (0, 1) if usage[k] is None]:
            i = alive[turn % len(alive)]  # in turns while both run; then the one left, to its end
            if procs[i] is None:
                procs[i] = start(sides[i][1], sides[i][0])
            else:
                os.killpg(procs[i].pid, signal.SIGCONT)
            dt, u = run_for(procs[i], float("inf") if len(alive) == 1 else args.turn)
            ran[i] += dt
            if u is not None:
                usage[i] = u
            else:
                os.killpg(procs[i].pid, signal.SIGSTOP)
            turn += 1
    except BaseException:
        for p in procs:
            if p is not None and p.returncode is None:
                for sig in (signal.SIGCONT, signal.SIGTERM):
                    try:
                        os.killpg(p.pid, sig)
                    except ProcessLookupError:
                        pass
        raise
    for (out, _), p, t, u in zip(sides, procs, ran, usage):
        with open(out, "a") as f:
            f.write(f"{t:.2f} s running, {u.ru_maxrss} KB peak\n")
        print(f"{out}: {t:.2f} s running, exit {p.returncode}")
    return max(abs(p.returncode) for p in procs)


if __name__ == "__main__":
    sys.exit(main())
