#!/usr/bin/env python3
"""Train TinyLLM in NumPy: `python train.py --help`.  Same as the `tinyllm-train` command."""
import signal
import sys

if __name__ == "__main__":
    # A Ctrl-C while NumPy imports would break its C start-up into an ImportError with a
    # traceback; noted here instead, it ends the program quietly once the import is done.
    interrupted = []
    signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    from tinyllm_np.train import main

    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(130 if interrupted else main())
