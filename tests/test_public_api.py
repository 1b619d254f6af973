"""The public API: `from moefuse import ...`, `moefuse.__version__`, `moefuse --version`, `python -m moefuse`,
`model.predict` on paths, PIL images and arrays, and progress that reads well in a log file."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_cli
from PIL import Image

import moefuse
from moefuse.configutil import ConfigError
from moefuse.datasets.media import MediaError, MediaTooLarge
from moefuse.fusion.model import voter_names
from moefuse.progress import LineProgress, progress


def test_every_public_name_imports_and_none_is_a_module() -> None:
    assert moefuse.__version__.count(".") == 2
    for name in moefuse.__all__[1:]:
        assert not isinstance(getattr(moefuse, name), types.ModuleType), name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        moefuse.nothing  # noqa: B018


def test_version_and_python_dash_m() -> None:
    out = subprocess.run([sys.executable, "-m", "moefuse", "--version"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == f"moefuse {moefuse.__version__}"
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"moefuse {moefuse.__version__}"
    out = subprocess.run([sys.executable, "-m", "moefuse", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.startswith("usage: moefuse")


def test_importing_moefuse_loads_no_torch() -> None:
    """`import moefuse` (and so every `moefuse --help`) does not pay for torch until a name is used."""
    code = "import sys, moefuse; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "False", out.stderr


@pytest.fixture(scope="module")
def model(fault_run: Path):
    return moefuse.MultimodalMoEModel.from_pretrained(fault_run / "model")


def test_predict_takes_paths_images_and_arrays_alike(model, fault_data: dict, tmp_path: Path) -> None:
    """A PIL image, its array and its file give the same answer as `moefuse predict` on the file."""
    rng = np.random.default_rng(1)
    array = (rng.random((48, 40, 3)) * 255).astype("uint8")
    Image.fromarray(array).save(tmp_path / "x.png")
    by_path = model.predict(task="digit", image=str(tmp_path / "x.png"))
    by_image = model.predict(task="digit", image=Image.fromarray(array))
    by_array = model.predict(task="digit", image=array)
    assert by_path["prediction"] == by_image["prediction"] == by_array["prediction"]
    assert by_path["probability"] == pytest.approx(by_array["probability"], abs=1e-6)
    out = run_cli("predict", "--checkpoint", str(fault_data["root"] / "run" / "model"), "--task", "digit",
                  "--image", str(tmp_path / "x.png"))
    assert out.returncode == 0, out.stderr
    line = json.loads(out.stdout)
    assert line["prediction"] == by_path["prediction"]
    assert line["probability"] == pytest.approx(by_path["probability"], abs=1e-5)
    assert set(line) == set(by_path)


def test_predict_audio_arrays_at_the_encoders_rate_or_with_their_own(model) -> None:
    rate = model.encoders["audio"].sample_rate
    t = np.arange(rate // 2) / rate
    wav = (0.3 * np.sin(2 * np.pi * 440 * t)).astype("float32")
    same = model.predict(task="digit", audio=wav)
    stated = model.predict(task="digit", audio=(wav, rate))
    assert same["probability"] == pytest.approx(stated["probability"], abs=1e-6)
    resampled = model.predict(task="digit", audio=(wav[::2].copy(), rate // 2))
    assert 0.0 <= resampled["probability"] <= 1.0


@pytest.mark.parametrize("inputs, error, match", [
    ({"task": "nope", "image": np.zeros((8, 8, 3), "uint8")}, ConfigError, "unknown task 'nope'"),
    ({"task": "digit", "smell": "x"}, ConfigError, "unknown input 'smell'"),
    ({"task": "digit"}, ConfigError, "give at least one input"),
    ({"task": "avqa", "image": np.zeros((8, 8, 3), "uint8")}, ConfigError, "give question="),
    ({"task": "digit", "image": np.zeros((8, 8, 7), "uint8")}, MediaError, r"\[H, W, 1\|3\|4\]"),
    ({"task": "digit", "image": np.full((8, 8), np.nan)}, MediaError, "NaN"),
    ({"task": "digit", "image": 42}, MediaError, "got int"),
    ({"task": "digit", "audio": (np.zeros(10, "float32"), 0)}, MediaError, "sample rate"),
    ({"task": "digit", "audio": np.zeros((4, 4, 4), "float32")}, MediaError, "shape"),
    ({"task": "digit", "audio": (np.zeros(16000 * 61, "float32"), 16000)}, MediaTooLarge, "over the limit"),
])
def test_predict_names_the_bad_input(model, inputs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        model.predict(**inputs)


def test_voter_names_number_only_repeated_views() -> None:
    assert voter_names(["pooled", "pooled", "pooled"]) == ["pooled 1", "pooled 2", "pooled 3"]
    assert voter_names(["pooled", "cls", "audio"]) == ["pooled", "cls", "audio"]
    assert voter_names(["pooled", "text", "pooled"]) == ["pooled 1", "text", "pooled 2"]


def test_progress_in_a_file_is_lines_not_a_bar(monkeypatch) -> None:
    stream = io.StringIO()
    monkeypatch.setenv("MOEFUSE_LOG_INTERVAL_S", "0")
    bar = progress(5, "train", "step", stream=stream)
    assert isinstance(bar, LineProgress)
    for _ in range(5):
        bar.set_postfix(loss="0.5000")
        bar.update(1)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines[0] == "train: started" and len(lines) == 7  # started, 5 updates, closed
    assert lines[-1].startswith("train: 5/5 steps") and "loss 0.5000" in lines[-1]


def test_progress_interval_bounds_the_lines(monkeypatch) -> None:
    stream = io.StringIO()
    monkeypatch.setenv("MOEFUSE_LOG_INTERVAL_S", "3600")
    bar = progress(1000, "evaluate", "batch", stream=stream)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    assert len(stream.getvalue().splitlines()) == 2  # started, and the last line
    quiet = io.StringIO()
    silent = progress(10, "x", enabled=False, stream=quiet)
    silent.update(3)
    silent.close()
    assert quiet.getvalue() == ""


def test_a_redirected_demo_data_log_has_no_carriage_returns(tmp_path: Path) -> None:
    out = run_cli("demo-data", "--out", str(tmp_path / "d"), "--count", "30")
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stderr and "demo-data: started" in out.stderr
    quiet = run_cli("demo-data", "--out", str(tmp_path / "q"), "--count", "30", "--quiet")
    assert quiet.returncode == 0 and "demo-data:" not in quiet.stderr


def test_no_command_help_imports_torch() -> None:
    """`moefuse COMMAND --help` answers at once: no command imports torch (seconds) before its flags are checked."""
    from moefuse.cli import COMMANDS

    code = ("import contextlib, io, sys\nfrom moefuse.cli import main\nheavy = {}\n"
            "for name in sys.argv[1:]:\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "        main([name, '--help'])\n"
            "    heavy[name] = 'torch' in sys.modules\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code, *COMMANDS], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(dict.fromkeys(COMMANDS, False))
