"""Progress that a person can read on a terminal and in a log file.

On a terminal (the stream is a tty) a tqdm bar. Anywhere else (a redirected log, CI, `nohup`) a bar is one long
line of carriage-return redraws, so `progress` prints plain lines instead: one when the work starts, then at most
one per `interval_s` seconds (done/total, the rate, the time left and the latest postfix, such as the loss), and one
when it ends. `enabled=False` (a command's `--quiet`) prints neither; messages printed with `write` always appear.

    bar = progress(total=500, desc="train", unit="step")
    bar.update(1); bar.set_postfix(loss="0.6931")
    bar.close()
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any, TypeVar

from tqdm import tqdm

INTERVAL_ENV = "MOEFUSE_LOG_INTERVAL_S"  # seconds between two progress lines in a file (default 30)
T = TypeVar("T")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60:02d}:{seconds % 60:02d}"


class LineProgress:
    """The tqdm subset moefuse uses (`update`, `set_postfix`, `close`), printed as one line per interval."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int = 0, interval_s: float = 30.0,
                 stream: IO[str] | None = None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.interval_s, self.stream = interval_s, stream or sys.stderr
        self.postfix: dict[str, Any] = {}
        self.start = self.last = time.monotonic()
        self.start_n = initial
        self.closed = False
        self._print("started")

    def _line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        plural = self.unit + ("es" if self.unit.endswith(("s", "sh", "ch", "x")) else "s")
        parts = [f"{self.desc}: {done} {plural}", f"{rate:.2f} {self.unit}/s", f"elapsed {_duration(elapsed)}"]
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"left {_duration((self.total - self.n) / rate)}")
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        return ", ".join(parts)

    def _print(self, what: str | None = None) -> None:
        line = f"{self.desc}: {what}" if what == "started" else self._line()
        print(line, file=self.stream, flush=True)
        self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.interval_s:
            self._print()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._print()


class _Silent:
    """No progress at all (`--quiet`), same interface."""

    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int | None, desc: str, unit: str = "it", initial: int = 0, enabled: bool = True,
             leave: bool = True, stream: IO[str] | None = None) -> tqdm | LineProgress | _Silent:
    """A tqdm bar on a terminal, plain lines elsewhere, nothing when not `enabled` (see the module docstring)."""
    stream = stream or sys.stderr
    if not enabled:
        return _Silent()
    if stream.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, file=stream, dynamic_ncols=True)
    return LineProgress(total, desc, unit, initial, interval_s=_interval(), stream=stream)


def _interval() -> float:
    try:
        value = float(os.environ.get(INTERVAL_ENV, "30"))
    except ValueError:
        return 30.0
    return value if value >= 0 else 30.0  # nan compares false: 30 too


def track(items: Iterable[T], desc: str, unit: str = "batch", total: int | None = None,
          enabled: bool = True) -> Iterator[T]:
    """`items`, with progress (`progress`) as they are taken; a bar on a terminal is removed at the end."""
    bar = progress(total, desc, unit, enabled=enabled, leave=False)
    try:
        for item in items:
            bar.update(1)  # counted when taken: a consumer that stops after the last item still sees it counted
            yield item
    finally:
        bar.close()


def write(message: str) -> None:
    """Print a message above a tqdm bar (or plainly, without one), to stdout."""
    tqdm.write(message)
