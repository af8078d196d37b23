"""What the command-line tools share: usage errors as one line."""

import argparse
import os
import sys

EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, ``<prog>: error: <message>``, and exit code 2.

    (argparse's default prints the whole usage block first.)  --help is unchanged.
    """

    def error(self, message):
        name = self.prog.split()[-1].removesuffix(".py").rsplit(".", 1)[-1]  # "train.py", "python -m x.bench"
        self.exit(EXIT_USAGE, f"{name}: error: {message}\n")

    def parse_or_code(self, argv=None):
        """(args, None), or (None, exit code) after --help (0) or a one-line usage error (2).

        For a main() that returns its exit code instead of raising SystemExit.
        """
        try:
            return self.parse_args(argv), None
        except SystemExit as e:
            return None, e.code


def stdout_gone():
    """After a BrokenPipeError (the reader left, e.g. ``| head``): exit code 0, and no error at exit.

    Python flushes stdout once more at exit; pointed at os.devnull, that flush cannot fail again.
    """
    try:
        sys.stdout = open(os.devnull, "w")
    except OSError:
        pass
    return 0
