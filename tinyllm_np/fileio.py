"""Atomic file writes: a crash or Ctrl-C mid-write never damages the file already there.

The data goes to a temporary file in the target's directory, is flushed to disk,
and only then replaces the target with os.replace (atomic on POSIX and Windows).
"""

import os
import tempfile

import numpy as np


def _file_mode(path):
    """The mode an ordinary new file would get, or the existing file's mode."""
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path, write, suffix=".tmp"):
    """Call write(f) on a temp file beside ``path``, fsync it, then os.replace it into place."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=d)
    try:
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_bytes(path, data):
    atomic_write(path, lambda f: f.write(data))


def atomic_savez(path, arrays):
    """np.savez of a dict of arrays, written atomically (no pickles: plain arrays only)."""
    atomic_write(path, lambda f: np.savez(f, **arrays), suffix=".npz")
