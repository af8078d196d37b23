"""What the command-line tools share: usage errors as one line."""

import argparse

EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, ``<prog>: error: <message>``, and exit code 2.

    (argparse's default prints the whole usage block first.)  --help is unchanged.
    """

    def error(self, message):
        name = self.prog.split()[-1].removesuffix(".py").rsplit(".", 1)[-1]  # "train.py", "python -m x.bench"
        self.exit(EXIT_USAGE, f"{name}: error: {message}\n")
