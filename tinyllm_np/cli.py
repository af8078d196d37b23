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


def run_main(parser, run, user_errors, name, argv=None):
    """Parse argv, return run(args)'s exit code; the user's errors (``user_errors``, and OSError, e.g.
    a full disk: the atomic writes leave the old file whole) as ``<name>: error: ...``, exit 2;
    Ctrl-C as exit 130."""
    args, code = parser.parse_or_code(argv)
    if args is None:
        return code
    try:
        return run(args)
    except user_errors as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"{name}: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted", file=sys.stderr)
        return 130


def stdout_gone():
    """After a BrokenPipeError (the reader left, e.g. ``| head``): exit code 0, and no error at exit.

    Python flushes stdout once more at exit; pointed at os.devnull, that flush cannot fail again.
    """
    try:
        sys.stdout = open(os.devnull, "w")
    except OSError:
        pass
    return 0
