"""The `moefuse` console script: help, dispatch, and errors a user sees for bad configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from moefuse.cli import COMMANDS, main

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


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
