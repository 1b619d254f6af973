"""How every command fails: one line that names the bad thing and the fix, an exit code, never a traceback.

`UserError` is the base of the errors a user can cause and fix (a bad config, manifest, shard, media file or model
folder); each module keeps its own subclass (ConfigError, DataError, MediaError, ManifestError, BuildError, ...).
`OSError` from a read or write (a full disk, a file where a folder is expected, a path that cannot be written) is
turned into a message that names the path, through `os_error_message`. Every command's `main` is wrapped in
`command(prog)`, so these never escape as tracebacks; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class UserError(Exception):
    """An error the user can fix; its message names the bad thing (file, key, row) and what to do."""


_HINTS = {
    errno.ENOSPC: "the disk is full: free space or write somewhere else",
    errno.EFBIG: "the file is over the size limit of this disk or process (ulimit -f): free space or write "
                 "somewhere else",
    errno.EDQUOT: "the disk quota is exceeded: free space or write somewhere else",
    errno.EACCES: "permission denied: choose a folder you can write to",
    errno.EPERM: "operation not permitted: choose a folder you can write to",
    errno.EROFS: "the file system is read-only: choose another folder",
    errno.ENOTDIR: "a file is in the way where a folder is expected: move it or choose another path",
    errno.EISDIR: "this is a folder where a file is expected: give a file path",
    errno.EEXIST: "something is already there: move it or choose another path",
    errno.ENOENT: "it does not exist",
}


def os_error_message(e: OSError) -> str:
    """`<path>: <what the system said> (<what it means and the fix>)`."""
    where = e.filename if e.filename is not None else "a file"
    hint = _HINTS.get(e.errno or -1)
    said = e.strerror or str(e)
    return f"{where}: {said}" + (f" ({hint})" if hint else "")


@contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """Re-raise an OSError that names no file (a failed write() or flush()) as one that names `path`."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise type(e)(e.errno, e.strerror or str(e), str(path)) from e
        raise


def command(prog: str) -> Callable:
    """Decorator for a command's `main(argv) -> int`: user errors and OSErrors become `prog: error: ...` on
    stderr and exit code 2; Ctrl-C is exit code 130. Clean-up is the job of the code that wrote (try/finally)."""

    def wrap(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
        @functools.wraps(main)
        def wrapped(argv: list[str] | None = None) -> int:
            try:
                return int(main(argv) or 0)
            except UserError as e:
                print(f"{prog}: error: {e}", file=sys.stderr)
            except OSError as e:
                print(f"{prog}: error: {os_error_message(e)}", file=sys.stderr)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                return 130
            return 2

        return wrapped

    return wrap


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def probability(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


__all__ = ["UserError", "command", "naming", "non_negative_int", "os_error_message", "positive_int", "probability"]
