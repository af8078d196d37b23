#!/usr/bin/env python3
"""Chat with TinyLLM in NumPy: `python chat.py`, or `python chat.py --prompt "Hello!"`.  Same as `tinyllm-chat`."""
import sys

from tinyllm_np.chat import main

if __name__ == "__main__":
    sys.exit(main())
