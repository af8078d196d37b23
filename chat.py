#!/usr/bin/env python3
"""Chat with TinyLLM in NumPy: `python chat.py`, or `python chat.py --prompt "Hello!"`.  Same as `tinyllm-chat`."""
import signal
import sys

if __name__ == "__main__":
    # A Ctrl-C while NumPy imports would break its C start-up into an ImportError with a
    # traceback; noted here instead, it ends the program quietly once the import is done.
    interrupted = []
    signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    from tinyllm_np.chat import main

    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(130 if interrupted else main())
