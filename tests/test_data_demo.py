"""demo-data: a self-contained manifest that builds cleanly, deterministic, and not overwritten by accident."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from test_data_helpers import build

from moefuse.commands.demo_data import main
from moefuse.datasets.demo import DTMF, dtmf_tone, make_demo_data, render_digit


def test_demo_data_builds_cleanly(tmp_path: Path) -> None:
    manifest = make_demo_data(tmp_path / "demo", count=60, seed=1, progress=False)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(rows) == 60 and len({r["id"] for r in rows}) == 60
    assert Counter((r["task"], r["split"]) for r in rows) == {("digit", "train"): 24, ("digit", "val"): 3,
                                                              ("digit", "test"): 3, ("avqa", "train"): 24,
                                                              ("avqa", "val"): 3, ("avqa", "test"): 3}
    for r in rows:
        if r["task"] == "avqa":
            meta, answer = r["meta"], r["answer"]
            a, b = meta["image_digit"], meta["audio_digit"]
            assert answer == {"written": str(a), "spoken": str(b), "sum": str(a + b),
                              "same": "yes" if a == b else "no"}[meta["qtype"]]
    info = build(manifest, tmp_path / "shards")
    assert info["rejected"] == 0 and sum(v["samples"] for v in info["splits"].values()) == 60
    assert info["tasks"]["digit"]["type"] == "classification" and info["tasks"]["avqa"]["type"] == "qa"
    assert len(info["counts"]["train"]["digit"]) >= 4  # several modality subsets


def test_demo_data_is_deterministic(tmp_path: Path) -> None:
    a = make_demo_data(tmp_path / "a", count=20, seed=5, progress=False)
    b = make_demo_data(tmp_path / "b", count=20, seed=5, progress=False)
    c = make_demo_data(tmp_path / "c", count=20, seed=6, progress=False)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    for path in (tmp_path / "a" / "media").rglob("*.*"):
        assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()


def test_demo_data_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--out", str(tmp_path), "--count", "20", "--quiet"]) == 0
    assert main(["--out", str(tmp_path), "--count", "20", "--quiet"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--count", "24", "--quiet", "--overwrite"]) == 0
    assert len((tmp_path / "manifest.jsonl").read_text().splitlines()) == 24
    media = sum(1 for _ in (tmp_path / "media").rglob("*.*"))
    rows = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert media == sum(("image" in r) + ("audio" in r) for r in rows)  # no stale files of the first run


def test_dtmf_tone_carries_its_digit() -> None:
    rng = np.random.default_rng(0)
    for digit, (low, high) in DTMF.items():
        wav = dtmf_tone(digit, rng)
        spectrum = np.abs(np.fft.rfft(wav))  # 1 s at 16 kHz: bin i is i Hz
        peaks = sorted(np.argsort(spectrum)[-2:])
        assert abs(peaks[0] - low) <= 5 and abs(peaks[1] - high) <= 5


def test_rendered_digit_image() -> None:
    img = render_digit(7, np.random.default_rng(0))
    assert img.size == (64, 64) and img.mode == "RGB"
    assert np.asarray(img).std() > 10  # something is drawn
