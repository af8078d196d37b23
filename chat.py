#!/usr/bin/env python3
"""Chat with TinyLLM in NumPy: `python chat.py`, or `python chat.py --prompt "Hello!"`.  Same as `tinyllm-chat`."""
import sys

try:
    from tinyllm_np.chat import main
except KeyboardInterrupt:  # Ctrl-C while NumPy is still importing
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
