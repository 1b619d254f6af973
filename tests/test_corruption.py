"""Corrupted modalities (moefuse evaluate --corrupt): parsing, noise at the stated SNR, conflicts that give every
sample another sample's content, errors that name the fix, and the CLI end to end."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import make_sample, run_cli
from PIL import Image

from moefuse.configutil import ConfigError
from moefuse.datasets.corruption import Corruption, corrupt_samples
from moefuse.encoders import AudioEncoderConfig, ImageEncoderConfig, build_audio_encoder, build_image_encoder


@pytest.mark.parametrize("text, expected", [
    ("audio:noise:5", Corruption("audio", "noise", 5.0)),
    ("image:noise", Corruption("image", "noise", 0.0)),
    ("image:noise:-3.5", Corruption("image", "noise", -3.5)),
    ("text:conflict", Corruption("text", "conflict")),
])
def test_parse(text: str, expected: Corruption) -> None:
    assert Corruption.parse(text) == expected
    assert Corruption.parse(str(expected)) == expected


@pytest.mark.parametrize("text", ["audio", "audio:blur", "audio:noise:loud", "audio:conflict:3", "audio:noise:500",
                                  "audio:noise:1:2"])
def test_parse_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="corruption"):
        Corruption.parse(text)


@pytest.fixture(scope="module")
def preprocessors() -> dict:
    return {"image": build_image_encoder(ImageEncoderConfig()).preprocessor(False),
            "audio": build_audio_encoder(AudioEncoderConfig()).preprocessor(False)}


FIELDS = {"image": ("image",), "audio": ("audio",), "text": ("text", "question")}


def test_noise_at_the_stated_snr(preprocessors: dict) -> None:
    rng = np.random.default_rng(1)
    batch = [make_sample(rng, f"s{i}", "digit", "1", image=True, audio=True) for i in range(3)]
    for db in (0.0, 10.0):
        out = corrupt_samples(batch, [Corruption("audio", "noise", db)], preprocessors, FIELDS, random.Random(0))
        for before, after in zip(batch, out):
            snr = 10 * np.log10(np.mean(before["audio"] ** 2) / np.mean((after["audio"] - before["audio"]) ** 2))
            assert abs(snr - db) < 0.3
            assert after["image"] is before["image"]  # other modalities untouched
    noisy = corrupt_samples(batch, [Corruption("image", "noise", 0.0)], preprocessors, FIELDS, random.Random(0))
    assert isinstance(noisy[0]["image"], Image.Image) and noisy[0]["image"].size == batch[0]["image"].size
    again = corrupt_samples(batch, [Corruption("image", "noise", 0.0)], preprocessors, FIELDS, random.Random(0))
    assert np.array_equal(np.asarray(noisy[0]["image"]), np.asarray(again[0]["image"]))  # seeded


def test_conflict_gives_every_sample_another_samples_content(preprocessors: dict) -> None:
    rng = np.random.default_rng(2)
    batch = [make_sample(rng, f"s{i}", "digit", "1", image=True, audio=i != 2) for i in range(5)]
    out = corrupt_samples(batch, [Corruption("audio", "conflict")], preprocessors, FIELDS, random.Random(0))
    have = [i for i in range(5) if i != 2]
    for j, i in enumerate(have):
        assert out[i]["audio"] is batch[have[(j + 1) % len(have)]]["audio"]
    assert out[2]["audio"] is None  # a sample without audio stays without
    assert all(o["image"] is b["image"] for o, b in zip(out, batch))
    assert batch[0]["audio"] is not out[0]["audio"]  # the caller's samples are not changed


def test_evaluate_corrupt_through_the_cli(fault_run: Path, fault_data: dict, tmp_path: Path) -> None:
    model, shards = str(fault_run / "model"), str(fault_data["shards"])
    report = tmp_path / "r.json"
    done = run_cli("evaluate", "--checkpoint", model, "--shards", shards, "--corrupt", "audio:noise:0",
                   "image:conflict", "--json", str(report))
    assert done.returncode == 0, done.stderr
    assert json.loads(report.read_text())["corrupt"] == ["audio:noise:0", "image:conflict"]
    assert "corrupted audio:noise:0, corrupted image:conflict" in done.stdout


@pytest.mark.parametrize("args, message", [
    (["--corrupt", "text:noise:3"], "the text encoder has no noise corruption; use text:conflict"),
    (["--corrupt", "audio:noise:3", "--drop", "audio"], "it is also dropped"),
    (["--corrupt", "audio:noise", "audio:conflict"], "corrupted twice"),
    (["--corrupt", "smell:conflict"], "cannot corrupt 'smell'"),
    (["--corrupt", "audio:fuzz"], "MODALITY:noise"),
])
def test_evaluate_corrupt_errors_name_the_fix(fault_run: Path, fault_data: dict, args: list[str],
                                              message: str) -> None:
    done = run_cli("evaluate", "--checkpoint", str(fault_run / "model"), "--shards", str(fault_data["shards"]),
                   *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
