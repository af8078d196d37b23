#!/usr/bin/env python3
"""Train TinyLLM in NumPy: `python train.py --help`.  Same as the `tinyllm-train` command."""
import sys

from tinyllm_np.train import main

if __name__ == "__main__":
    sys.exit(main())
