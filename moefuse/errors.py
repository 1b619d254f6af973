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
import math
import os
import select
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
def naming(path: str | Path, temp: str | Path | None = None) -> Iterator[None]:
    """Re-raise an OSError that names no file (a failed write() or flush()) as one that names `path`. With `temp`,
    the temporary file or folder an atomic write goes through before its rename to `path`, an error that names
    `temp` or a file in it names the same place under `path` instead: the user asked for `path`, and `temp` is
    gone by the time they read the message."""
    try:
        yield
    except OSError as e:
        final = str(path) if e.filename is None else final_name(e.filename, temp, path)
        if final is not None:
            raise type(e)(e.errno, e.strerror or str(e), final) from e
        raise


def final_name(name: str | bytes | int, temp: str | Path | None, path: str | Path) -> str | None:
    """`name` with its `temp` part replaced by `path` (`run/.model.tmp/x.bin` -> `run/model/x.bin`), or None when
    `name` is not `temp` or under it."""
    if temp is None or not isinstance(name, str):
        return None
    try:
        below = Path(name).relative_to(temp)
    except ValueError:
        return None
    return str(Path(path) / below) if below.parts else str(path)


EXIT_STDOUT_CLOSED = 128 + 13
"""Exit code of a command whose stdout reader went away (`moefuse predict ... | head -1`): 128 + SIGPIPE, what a
shell reports for any program that SIGPIPE ended (`yes | head -1`). Python ignores SIGPIPE, so writing to such a
pipe raises BrokenPipeError instead, which would be a traceback and, at exit, "Exception ignored ...
BrokenPipeError"."""


def stdout_closed() -> bool:
    """Whether stdout is a pipe or socket whose reader has gone (poll reports POLLERR or POLLHUP on it), i.e. a
    BrokenPipeError came from our output and not from some other pipe. Without poll (Windows) it is taken to be."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    if not hasattr(select, "poll"):
        return True
    poller = select.poll()
    poller.register(fd, 0)  # POLLERR and POLLHUP are reported whatever the mask
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def flush_stdout() -> None:
    """Flush stdout now, so that a closed pipe raises here, inside the handler, not at interpreter exit."""
    if sys.stdout is not None:
        sys.stdout.flush()


def detach_stdout() -> int:
    """The Python documentation's recipe for a closed stdout (library/signal.html, "Note on SIGPIPE"): point stdout
    at /dev/null, so that nothing more (the flush at exit included) can fail on it; -> EXIT_STDOUT_CLOSED."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
    return EXIT_STDOUT_CLOSED


def command(prog: str) -> Callable:
    """Decorator for a command's `main(argv) -> int`: user errors and OSErrors become `prog: error: ...` on
    stderr and exit code 2; Ctrl-C is exit code 130; a reader of stdout that has gone (`| head -1`) ends the command
    quietly with EXIT_STDOUT_CLOSED. Clean-up is the job of the code that wrote (try/finally)."""

    def wrap(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
        @functools.wraps(main)
        def wrapped(argv: list[str] | None = None) -> int:
            try:
                try:
                    return int(main(argv) or 0)
                finally:  # --help's SystemExit too: flushed here, where a reader that has gone is handled
                    flush_stdout()
            except BrokenPipeError as e:
                if stdout_closed():
                    return detach_stdout()
                print(f"{prog}: error: {os_error_message(e)}", file=sys.stderr)
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


class Number:
    """argparse type: an integer (`kind=int`) or a finite float (`kind=float`) in a range, so that every numeric
    flag refuses nan, inf and out-of-range values in the parser, before anything starts, with argparse's one line
    `PROG: error: argument --FLAG: must be ..., got VALUE` and exit code 2.

    `low`/`high` bound the value (None = unbounded on that side); `low_open`/`high_open` exclude the bound itself.
    A float flag always refuses nan and +-inf (float() accepts them; no option here means "no limit" by inf).
    The bounds are attributes, so tests can find every numeric flag and its range from the parsers themselves."""

    def __init__(self, kind: type, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, unit: str = "") -> None:
        self.kind, self.low, self.high, self.low_open, self.high_open = kind, low, high, low_open, high_open
        self.unit = unit
        self.__name__ = "integer" if kind is int else "number"  # argparse names the type in some messages

    def range_text(self) -> str:
        """`>= 1`, `> 0`, `in [1, 65535]`, `in [0, 1)` ..."""
        unit = f" {self.unit}" if self.unit else ""
        low, high = _plain(self.low), _plain(self.high)
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}{unit}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {low}{unit}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {high}{unit}"
        return "(any)"

    def contains(self, value: float) -> bool:
        """Whether a finite value is within the bounds."""
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __call__(self, text: str) -> int | float:
        what = "an integer" if self.kind is int else "a finite number"
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {what} {self.range_text()}, got {text!r}") from None
        if not math.isfinite(value) or not self.contains(value):
            raise argparse.ArgumentTypeError(f"must be {what} {self.range_text()}, got {text}")
        return value

    def __repr__(self) -> str:
        return f"Number({self.kind.__name__}, {self.range_text()})"


def _plain(value: float | None) -> str:
    """A bound as people write it: 4294967295, not 4.29497e+09; 0.5, not 0.500000."""
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


positive_int = Number(int, 1)
"""argparse type: an integer >= 1."""
non_negative_int = Number(int, 0)
"""argparse type: an integer >= 0."""
probability = Number(float, 0, 1)
"""argparse type: a number in [0, 1]."""
fraction = Number(float, 0, 1, high_open=True)
"""argparse type: a share of something that cannot take all of it, in [0, 1)."""
positive_float = Number(float, 0, low_open=True)
"""argparse type: a finite number > 0."""
port = Number(int, 1, 65535)
"""argparse type: a TCP port to listen on, 1-65535 (RFC 6335). 0, "any free port", is refused: the server would
listen on a port that it does not announce."""
seed = Number(int, 0, 2**32 - 1)
"""argparse type: a random seed, 0 to 2**32 - 1 (the range numpy's `np.random.seed` accepts, the narrowest of the
libraries seeded: torch, random, numpy)."""
MAX_PROCESSES = 256
"""Most worker processes or threads a flag may ask for: more is a typo that would fork the machine to a halt."""
process_count = Number(int, 1, MAX_PROCESSES)
"""argparse type: worker processes or threads, 1 to MAX_PROCESSES."""


def help_text(text: str) -> str:
    """`text` as an argparse help string: argparse %-formats help (for `%(default)s`), so a literal `%` in text
    taken from docs ("11 % more") must be doubled, or `--help` crashes."""
    return text.replace("%", "%%")


__all__ = ["EXIT_STDOUT_CLOSED", "MAX_PROCESSES", "Number", "UserError", "command", "detach_stdout", "final_name",
           "flush_stdout", "fraction", "help_text", "naming", "non_negative_int", "os_error_message", "port",
           "positive_float", "positive_int", "probability", "process_count", "seed", "stdout_closed"]
