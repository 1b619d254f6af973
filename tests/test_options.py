"""Every option of every `moefuse` command is checked before anything starts (issue #24, item 4).

The numeric flags are found in the commands' own parsers (each `main` is run up to its `parse_args`, which is
stopped there), so a flag added later is covered without editing this file: every one must use a ranged type of
`moefuse.errors` (a raw `type=int` or `type=float` takes nan, inf and any range) and refuse nan, inf and values
outside its range with one argparse line naming the flag, exit code 2. Then: every command's `--help` renders, a
reader of stdout that goes away ends any command quietly, and a few cases through the real console script.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys

import pytest
from conftest import REPO, TINY

from moefuse import cli
from moefuse.datasets.shards import parse_size
from moefuse.errors import EXIT_STDOUT_CLOSED, Number


class _Parsed(BaseException):
    """Raised in place of parse_args, carrying the parser: nothing after the parser of a command runs."""

    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__()
        self.parser = parser


def command_parser(name: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The argparse parser `moefuse NAME` builds, taken from its main as it calls parse_args."""

    def stop(self: argparse.ArgumentParser, *args, **kwargs):
        raise _Parsed(self)

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", stop)
        with pytest.raises(_Parsed) as caught:
            importlib.import_module(cli.COMMANDS[name][0]).main([])
    return caught.value.parser


def numeric_flags() -> list[tuple[str, str]]:
    """(command, flag) of every option whose type is a number, from the parsers themselves."""
    found = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name in cli.COMMANDS:
            for action in command_parser(name, monkeypatch)._actions:
                if action.option_strings and (isinstance(action.type, Number) or action.type in (int, float,
                                                                                                  parse_size)):
                    found.append((name, action.option_strings[-1]))
    return found


NUMERIC_FLAGS = numeric_flags()


def test_the_flags_were_found() -> None:
    """The discovery sees the flags the issue names (a discovery that found nothing would pass every test)."""
    for expected in [("serve", "--port"), ("serve", "--max-upload-mb"), ("serve", "--max-wait-ms"),
                     ("build-shards", "--val-fraction"), ("build-shards", "--maxsize"), ("demo-data", "--count"),
                     ("demo", "--seed"), ("evaluate", "--num-workers"), ("predict", "--min-confidence")]:
        assert expected in NUMERIC_FLAGS
    assert len(NUMERIC_FLAGS) >= 30


def bad_values(kind: object) -> list[str]:
    """nan, inf, -inf, -1 and the values just outside the type's bounds."""
    values = ["nan", "inf", "-inf", "1e999", "NaN"]
    if not isinstance(kind, Number):  # parse_size: a byte count >= 1
        return [*values, "0", "-1", "0.1"]
    step = 1 if kind.kind is int else 0.5
    if kind.low is not None:
        values += [str(kind.low if kind.low_open else kind.low - step)]
        values += ["-1"] if kind.low >= 0 else []
    if kind.high is not None:
        values += [str(kind.high if kind.high_open else kind.high + step)]
    if kind.kind is int:
        values += ["1.5", "1e3"]
    return values


def parse_error(parser: argparse.ArgumentParser, argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        parser.parse_args(argv)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize(("name", "flag"), NUMERIC_FLAGS)
def test_every_numeric_flag_refuses_nan_inf_and_out_of_range(name: str, flag: str, monkeypatch, capsys) -> None:
    parser = command_parser(name, monkeypatch)
    action = next(a for a in parser._actions if flag in a.option_strings)
    assert action.type not in (int, float), f"moefuse {name} {flag}: use a ranged type from moefuse.errors"
    for value in bad_values(action.type):
        code, err = parse_error(parser, [f"{flag}={value}"], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and "Traceback" not in err, (value, err)
        assert lines[-1].startswith(f"moefuse {name}: error: argument {flag}: "), (value, err)
        assert lines[0].startswith("usage:") and all(not line.startswith(f"moefuse {name}") for line in lines[:-1])
    if action.default is not None:  # the default itself is in range
        assert action.type(str(action.default)) == action.default


def test_number_type_bounds() -> None:
    """The type itself: open and closed bounds, integers, the words of its message."""
    percent = Number(float, 0, 100, low_open=True, unit="%")
    assert percent("100") == 100.0 and percent("1e-9") == 1e-9
    for text in ("0", "100.0001", "nan", "-inf", "ten"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"must be a finite number in \(0, 100\] %"):
            percent(text)
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be an integer in \[0, 4294967295\], got 4294967296"):
        Number(int, 0, 2**32 - 1)(str(2**32))


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_help_renders(name: str, capsys) -> None:
    """`moefuse CMD --help`: exit 0 and a usage line (argparse %-formats help: a `%` taken from a doc crashed it)."""
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(f"usage: moefuse {name}") and "options:" in out


@pytest.mark.parametrize(("argv", "flag", "says"), [
    (["serve", "--checkpoint", "nowhere", "--max-upload-mb", "inf"], "--max-upload-mb", "finite"),
    (["serve", "--checkpoint", "nowhere", "--port", "70000"], "--port", "[1, 65535]"),
    (["serve", "--checkpoint", "nowhere", "--port", "0"], "--port", "[1, 65535]"),
    (["serve", "--checkpoint", "nowhere", "--timeout-s", "2", "--max-wait-ms", "2000"], "--max-wait-ms",
     "under --timeout-s"),
    (["build-shards", "--manifest", "m.jsonl", "--out", "o", "--val-fraction", "0.5", "--test-fraction", "0.5"],
     "--test-fraction", "must be < 1"),
    (["demo", "--seed", "-1"], "--seed", "[0, 4294967295]"),
])
def test_console_script_refuses_before_anything_starts(argv: list[str], flag: str, says: str, tmp_path) -> None:
    """Through the real console script, with checks across flags too; the bad option wins over the missing model
    folder, so nothing was loaded, and nothing is written."""
    done = subprocess.run([sys.executable, "-m", "moefuse.cli", *argv], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert last.startswith(f"moefuse {argv[0]}: error: argument {flag}: ") and says in last, last
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("override", "says"), [
    ("train.lr_fusion=inf", "train.lr_fusion: expected a finite number"),
    ("train.max_grad_norm=.nan", "train.max_grad_norm: expected a finite number"),
    ("fusion.dropout=-.inf", "fusion.dropout: expected a finite number"),
    ("train.seed=-1", "train.seed: must be in [0, 2**32 - 1]"),
])
def test_train_overrides_refuse_non_finite_numbers(override: str, says: str, tmp_path, capsys) -> None:
    """`moefuse train`'s options are config keys: every float key refuses nan and inf, the seed its range."""
    assert cli.main(["train", str(TINY), override, f"train.output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def closed_stdout_run(*args: str, unbuffered: bool = False) -> subprocess.CompletedProcess:
    """`moefuse ARGS` with stdout a pipe whose reader has already gone (what `| head -1` leaves); block-buffered
    stdout (a pipe's default: the write fails at a flush) or unbuffered (PYTHONUNBUFFERED: it fails at once)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | ({"PYTHONUNBUFFERED": "1"}
                                                                             if unbuffered else {})
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-m", "moefuse.cli", *args], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120, cwd=REPO, env=env)
    finally:
        os.close(write)


@pytest.mark.parametrize("unbuffered", [False, True])
@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"], ["build-shards", "--help"]])
def test_a_closed_stdout_ends_quietly(args: list[str], unbuffered: bool) -> None:
    """Quiet: no traceback, no "Exception ignored". The exit code is 141 (128 + SIGPIPE), or 0 where argparse
    itself ignored the failed write of a command's help (it does, when stdout is unbuffered)."""
    done = closed_stdout_run(*args, unbuffered=unbuffered)
    expected = {EXIT_STDOUT_CLOSED} if args == ["--help"] else {EXIT_STDOUT_CLOSED, 0}
    assert done.stderr == "" and done.returncode in expected


def test_a_closed_stdout_ends_a_command_writing_output_quietly(fault_run) -> None:
    """predict writes its JSON Lines to stdout: a reader that left ends it quietly, like `moefuse --help | head`."""
    done = closed_stdout_run("predict", "--checkpoint", str(fault_run / "model"), "--task", "digit", "--text", "one")
    assert done.stderr == "" and done.returncode == EXIT_STDOUT_CLOSED


def test_help_through_head_ends_quietly() -> None:
    """The issue's own command line, through a shell."""
    done = subprocess.run(f"{sys.executable} -m moefuse.cli --help | head -1", shell=True, capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0 and done.stdout.startswith("usage: moefuse") and done.stderr == ""
