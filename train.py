#!/usr/bin/env python3
"""Train TinyLLM in NumPy: `python train.py --help`.  Same as the `tinyllm-train` command."""
import sys

try:
    from tinyllm_np.train import main
except KeyboardInterrupt:  # Ctrl-C while NumPy is still importing
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
