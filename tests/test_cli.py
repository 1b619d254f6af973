"""The `moefuse` console script: help, dispatch, and errors a user sees for bad configs."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from moefuse.cli import COMMANDS, main

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")


def test_help_lists_every_command(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_console_script_is_installed() -> None:
    proc = subprocess.run([sys.executable, "-m", "moefuse.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "build-shards" in proc.stdout


def test_unknown_command(capsys) -> None:
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_train_reports_config_errors(tmp_path, capsys) -> None:
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", TINY, "fusion.num_expert=4"]) == 2
    assert "unknown config key fusion.num_expert" in capsys.readouterr().err
    # Its own output_dir: the default (outputs/demo/run) may hold a demo run, which is a different error.
    assert main(["train", TINY, f"data.train_shards=[{tmp_path}/nothing]", f"train.output_dir={tmp_path}/run"]) == 2
    assert "nothing" in capsys.readouterr().err


ENTRY_POINTS = {module for module, _ in COMMANDS.values()} | {"moefuse.cli", "moefuse.__main__"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    return names | {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}


def test_no_entry_point_is_imported_as_a_library() -> None:
    """Entry points (the modules behind `moefuse <command>`) hold a `main` and are only run by the console script;
    the library code they run lives in importable modules, so no module of the package or the benchmarks imports
    an entry point (tests may, to call its main)."""
    sources = [p for folder in ("moefuse", "benchmarks") for p in (REPO / folder).rglob("*.py")]
    assert len(sources) > 40
    offenders = {str(p.relative_to(REPO)): sorted(_imports(p) & ENTRY_POINTS) for p in sources
                 if ".".join(p.relative_to(REPO).with_suffix("").parts) not in ENTRY_POINTS}  # one runs another
    assert not {path: found for path, found in offenders.items() if found}


@pytest.mark.parametrize("module", sorted(m for m, _ in COMMANDS.values()))
def test_every_entry_point_lives_in_commands_and_has_a_main(module: str) -> None:
    assert module.startswith("moefuse.commands."), f"{module}: entry points live in moefuse/commands, libraries not"
    assert callable(importlib.import_module(module).main)
