"""Faults met when media and manifests are read: resampling at any sample rate in bounded time and memory, images
over Pillow's own decompression-bomb limit, long or broken CSV cells, and manifests without targets (predict)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import tarfile
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import REPO
from PIL import Image

from moefuse.cli import main as cli
from moefuse.datasets.manifest import ManifestError, check_row, read_manifest
from moefuse.datasets.media import MediaError, load_audio, open_image, resample

# ---------------------------------------------------------------------------------------------------------------
# resampling: bounded time and memory at any rate

# (from, to): rates whose gcd with the other is tiny, so a windowed-sinc kernel of rate/gcd taps would be huge
# (torchaudio asked for 5.6 GB at 44101 -> 16000 and took 22 s at 8001 -> 16000).
AWKWARD = [(44101, 16000), (8001, 16000), (7919, 16000), (96001, 16000), (22051, 16000), (44101, 16001),
           (16000, 16001), (8000, 7919), (48000, 44101)]

# In a child process: for each (from, to, seconds), the wall time and the peak memory of one resample call over
# the resident memory before it (VmHWM reset through /proc/self/clear_refs; ru_maxrss delta where that cannot be
# written), under an address-space limit of 1 GiB above the start, so a runaway allocation fails fast.
CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import numpy as np
    from moefuse.datasets.media import resample

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))  # KiB

    resample(np.zeros(1000, np.float32), 44100, 16000)  # load the library once
    resource.setrlimit(resource.RLIMIT_AS, (status("VmSize") * 1024 + 2**30, resource.RLIM_INFINITY))
    results = []
    for orig, rate, seconds in json.loads(sys.argv[1]):
        wav = (np.random.default_rng(0).standard_normal(int(orig * seconds)) * 0.1).astype(np.float32)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak to the current resident set
            reset = True
        except OSError:
            reset = False
        before = status("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        out = resample(wav, orig, rate)
        seconds_taken = time.perf_counter() - start
        peak = status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        results.append({"from": orig, "to": rate, "in": len(wav), "out": len(out), "dtype": str(out.dtype),
                        "seconds": seconds_taken, "extra_mb": (peak - before) / 1024})
    print(json.dumps(results))
""")


def measure_resample(cases: list[tuple[int, int, float]]) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cases)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def resample_costs() -> dict[tuple[int, int, float], dict]:
    cases = [(a, b, 0.5) for a, b in AWKWARD] + [(44101, 16000, 10.0), (8001, 16000, 10.0)]
    return {(r["from"], r["to"], c[2]): r for c, r in zip(cases, measure_resample(cases))}


@pytest.mark.parametrize("orig,rate", AWKWARD)
def test_resample_awkward_rate_is_cheap(resample_costs: dict, orig: int, rate: int) -> None:
    r = resample_costs[(orig, rate, 0.5)]
    assert r["seconds"] < 2.0, r
    assert r["extra_mb"] < 100, r
    assert r["dtype"] == "float32" and abs(r["out"] - r["in"] * rate / orig) <= 1, r


@pytest.mark.parametrize("orig", [44101, 8001])
def test_resample_cost_grows_with_length_only(resample_costs: dict, orig: int) -> None:
    long = resample_costs[(orig, 16000, 10.0)]  # 20x the clip: still well under a second and a few MB
    assert long["seconds"] < 2.0 and long["extra_mb"] < 100, long
    assert long["out"] == 160000, long


def sine(rate: int, freq: float, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


def peak(wav: np.ndarray, rate: int) -> float:
    """Frequency in Hz of the strongest component (to within one spectrum bin)."""
    return int(np.argmax(np.abs(np.fft.rfft(wav * np.hanning(len(wav)))))) * rate / len(wav)


def sine_fit(wav: np.ndarray, rate: int, freq: float) -> tuple[float, float]:
    """(amplitude, RMS of what is left) of the least-squares fit of a sine at exactly `freq`."""
    t = np.arange(len(wav)) / rate
    basis = np.stack([np.sin(2 * np.pi * freq * t), np.cos(2 * np.pi * freq * t)], axis=1)
    coef, *_ = np.linalg.lstsq(basis, wav.astype(np.float64), rcond=None)
    return float(np.hypot(*coef)), float(np.sqrt(np.mean((wav - basis @ coef) ** 2)))


@pytest.mark.parametrize("orig,rate,freq", [(8000, 16000, 440.0), (44100, 16000, 1000.0), (44101, 16000, 1000.0),
                                            (16000, 16001, 3000.0), (7919, 16000, 2500.0)])
def test_resample_keeps_frequency_and_amplitude(orig: int, rate: int, freq: float) -> None:
    out = resample(sine(orig, freq), orig, rate)
    assert out.dtype == np.float32 and out.ndim == 1 and abs(len(out) - rate) <= 1
    amplitude, rest = sine_fit(out[200:-200], rate, freq)  # edges: the filter's start-up
    assert abs(amplitude - 0.5) < 0.005 and rest < 0.002  # the same sine, and nothing else
    assert abs(peak(out, rate) - freq) <= 2.0
    assert np.array_equal(out, resample(sine(orig, freq), orig, rate))  # deterministic


def test_resample_removes_what_the_new_rate_cannot_hold() -> None:
    out = resample(sine(44100, 10000.0), 44100, 16000)  # 10 kHz is above the 8 kHz Nyquist limit of 16 kHz
    assert np.abs(out[200:-200]).max() < 0.01  # filtered out, not folded back to 6 kHz


def test_resample_same_rate_is_identity_and_bad_input_is_named() -> None:
    wav = sine(16000, 440.0, 0.1)
    assert np.array_equal(resample(wav, 16000, 16000), wav)
    with pytest.raises(ValueError, match="mono"):
        resample(np.zeros((2, 100), np.float32), 8000, 16000)
    with pytest.raises(ValueError, match="rates"):
        resample(wav, 0, 16000)


def test_load_audio_at_an_awkward_rate(tmp_path: Path) -> None:
    path = tmp_path / "odd.wav"
    sf.write(path, sine(44101, 1000.0, 0.5), 44101, subtype="PCM_16")
    out = load_audio(path, 16000, 10.0)
    assert out.dtype == np.float32 and len(out) == 8000
    amplitude, rest = sine_fit(out[200:-200], 16000, 1000.0)
    assert abs(amplitude - 0.5) < 0.005 and rest < 0.002


def test_audio_too_short_for_one_output_sample(tmp_path: Path) -> None:
    path = tmp_path / "click.wav"
    sf.write(path, np.full(1, 0.5, np.float32), 96000, subtype="PCM_16")
    with pytest.raises(MediaError, match=r"click\.wav is too short"):
        load_audio(path, 16000, 10.0)


def shard_audio(out: Path) -> dict[str, np.ndarray]:
    """{id: audio} of every shard in dataset.json."""
    info = json.loads((out / "dataset.json").read_text())
    audio = {}
    for split in info["splits"].values():
        for shard in split["shards"]:
            with tarfile.open(out / shard["name"]) as tar:
                for m in tar.getmembers():
                    if m.name.endswith(".flac"):
                        audio[m.name.split(".")[0]] = sf.read(tar.extractfile(m), dtype="float32")[0]
    return audio


def test_build_shards_with_audio_at_44101_hz(tmp_path: Path) -> None:
    rows = []
    for i, (rate, split) in enumerate([(44101, "train"), (8001, "train"), (44101, "val"), (8001, "val")]):
        sf.write(tmp_path / f"a{i}.wav", sine(rate, 500.0 + 100 * i, 0.5), rate, subtype="PCM_16")
        rows.append({"id": f"s{i}", "task": "t", "audio": f"a{i}.wav", "label": str(i % 2), "split": split})
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "shards"
    assert cli(["build-shards", "--manifest", str(manifest), "--out", str(out), "--quiet", "--workers", "1"]) == 0
    audio = shard_audio(out)
    assert sorted(audio) == ["s0", "s1", "s2", "s3"]
    for i, rate in enumerate([44101, 8001, 44101, 8001]):
        assert len(audio[f"s{i}"]) == round(int(rate * 0.5) * 16000 / rate)  # 0.5 s at the default 16 kHz
        amplitude, rest = sine_fit(audio[f"s{i}"][200:-200], 16000, 500.0 + 100 * i)
        assert abs(amplitude - 0.5) < 0.005 and rest < 0.002  # 16-bit FLAC: 1.5e-5 of noise


# ---------------------------------------------------------------------------------------------------------------
# images over Pillow's decompression-bomb limit: --max-image-pixels is the only limit


def grey_png(path: Path, w: int, h: int) -> Path:
    Image.fromarray((np.arange(w * h) % 251).reshape(h, w).astype(np.uint8), mode="L").save(path)
    return path


@pytest.mark.parametrize("w,h", [(40, 30), (60, 50)])  # over Pillow's limit of 1000 (warning) and 2x (error)
def test_image_over_pillows_limit_within_max_pixels(tmp_path: Path, monkeypatch, w: int, h: int) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    img = open_image(grey_png(tmp_path / "big.png", w, h), max_pixels=10_000)
    assert img.size == (w, h) and np.asarray(img)[1, 2] == (w + 2) % 251
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored


@pytest.mark.parametrize("max_pixels", [2999, 1000, 1])
def test_image_over_max_pixels_names_file_and_flag(tmp_path: Path, monkeypatch, max_pixels: int) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = grey_png(tmp_path / "big.png", 60, 50)
    with pytest.raises(MediaError, match=r"big\.png is 60x50 = 3000 pixels, over the limit of .*--max-image-pixels"):
        open_image(path, max_pixels=max_pixels)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored after a failure too
    assert open_image(path, max_pixels=3000).size == (60, 50)  # exactly at the limit is fine


def bilevel_png(path: Path, w: int, h: int) -> Path:
    """A black 1-bit PNG, compressed row by row (the image is never held in memory): a few KB for 91M pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = bytes(1 + (w + 7) // 8)  # filter byte 0, then the packed bits
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_huge_image_header_is_checked_before_decoding(tmp_path: Path) -> None:
    # 13000 x 7000 = 91M pixels: over Pillow's default limit (89.5M), 11 KB as a 1-bit PNG, never decoded here.
    path = bilevel_png(tmp_path / "huge.png", 13000, 7000)
    assert path.stat().st_size < 100_000
    with pytest.warns(Image.DecompressionBombWarning), Image.open(path) as img:  # Pillow's own limit
        assert img.size == (13000, 7000) and img.mode == "1"
    with pytest.raises(MediaError, match=r"huge\.png is 13000x7000 = 91000000 pixels, over the limit of 64000000 "
                                         r"\(raise it with --max-image-pixels"):
        open_image(path, max_pixels=64_000_000)


def test_build_shards_max_image_pixels_above_pillows_limit(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # stands in for Pillow's 89M: workers=1 runs in-process
    rows = [{"id": f"s{i}", "task": "t", "image": f"i{i}.png", "label": str(i % 2), "split": split}
            for i, split in enumerate(["train", "train", "val", "val"])]
    for i in range(4):
        grey_png(tmp_path / f"i{i}.png", 60, 50)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["build-shards", "--manifest", str(manifest), "--quiet", "--workers", "1"]
    assert cli([*base, "--out", str(tmp_path / "ok"), "--max-image-pixels", "3000"]) == 0
    assert cli([*base, "--out", str(tmp_path / "small"), "--max-image-pixels", "2999"]) != 0
    err = capsys.readouterr().err
    assert "i0.png is 60x50 = 3000 pixels" in err and "--max-image-pixels" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------------------
# manifest: long CSV cells, broken CSV records, rows without targets


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8", newline="")
    return path


@pytest.mark.parametrize("length", [131_073, 1_000_000])
def test_csv_cell_over_the_csv_modules_default_limit(tmp_path: Path, length: int) -> None:
    import csv

    limit = csv.field_size_limit()
    long = "w" * length
    path = write_csv(tmp_path / "m.csv", f'id,task,text,label\na,t,{long},1\nb,t,"quoted {long}",2\n')
    rows = read_manifest(path)
    assert [r.errors for r in rows] == [[], []] and rows[0].text == long and rows[1].text == f"quoted {long}"
    assert csv.field_size_limit() == limit  # the process-wide setting is restored


@pytest.mark.parametrize("cell", ["hi\x00there", "\x00"])
def test_csv_nul_byte_is_a_row_error(tmp_path: Path, cell: str) -> None:
    path = write_csv(tmp_path / "m.csv", f"id,task,text,label\na,t,ok,1\nb,t,{cell},2\nc,t,ok,3\n")
    rows = read_manifest(path)
    assert [r.id for r in rows] == ["a", "b", "c"] and not rows[0].errors and not rows[2].errors
    assert rows[1].line == 3 and "NUL byte" in rows[1].errors[0]


def test_csv_error_becomes_a_row_error(tmp_path: Path, monkeypatch) -> None:
    from moefuse.datasets import manifest

    monkeypatch.setattr(manifest, "CSV_FIELD_LIMIT", 50)  # a real csv.Error, from the csv module itself
    path = write_csv(tmp_path / "m.csv", "id,task,text,label\na,t,ok,1\nb,t," + "x" * 60 + ",2\nc,t,ok,3\n")
    rows = read_manifest(path)
    assert [r.line for r in rows] == [2, 3, 4] and not rows[0].errors and not rows[2].errors
    assert rows[1].errors == ["not valid CSV: field larger than field limit (50)"]
    assert rows[1].raw == "b,t," + "x" * 60 + ",2"  # kept as written, for rejected.jsonl


def test_csv_error_in_header_names_file_and_line(tmp_path: Path, monkeypatch) -> None:
    from moefuse.datasets import manifest

    monkeypatch.setattr(manifest, "CSV_FIELD_LIMIT", 10)
    path = write_csv(tmp_path / "m.csv", "id,task,text,label_with_a_long_name\na,t,ok,1\n")
    with pytest.raises(ManifestError, match=r"m\.csv: line 1: the CSV header cannot be read"):
        read_manifest(path)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_unlabelled_rows_read_without_targets(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "a", "task": "digit", "text": "x"},
        {"id": "b", "task": "digit", "text": "x", "label": "3"},
        {"id": "c", "task": "avqa", "question": "what?"},
        {"id": "d", "task": "avqa", "text": "x", "answer": "4"},
        {"id": "e", "task": "avqa", "question": "what?", "answer": "5"},
    ])
    rows = read_manifest(path, require_target=False)
    assert [r.errors for r in rows] == [[]] * 5
    assert [r.type for r in rows] == [None, "classification", "qa", "qa", "qa"]
    assert [r.target for r in rows] == [None, "3", None, "4", "5"]
    strict = read_manifest(path)
    assert [bool(r.errors) for r in strict] == [True, False, True, True, False]
    assert "missing target" in strict[0].errors[0] and "answer is missing" in strict[2].errors[0]


@pytest.mark.parametrize("raw,error", [
    ({"id": "a", "task": "t", "text": "x", "colour": "red"}, "unknown field 'colour'"),
    ({"id": "a.b", "task": "t", "text": "x"}, "id 'a.b' may hold only"),
    ({"id": "a", "task": "t"}, "no input"),
    ({"id": "a", "task": "t", "text": "x", "split": "dev"}, "split must be one of"),
    ({"task": "t", "text": "x"}, "id is missing"),
    ({"id": "a", "task": "t", "text": "x", "label": "1", "answer": "2"}, "either label"),
    ({"id": "a", "task": "t", "text": "x", "label": ""}, "label is empty"),
    ({"id": "a", "task": "t", "text": "x", "meta": [1]}, "meta must be a JSON object"),
])
def test_unlabelled_rows_keep_every_other_check(tmp_path: Path, raw: dict, error: str) -> None:
    row = check_row(1, raw, tmp_path, require_target=False)
    assert len(row.errors) == 1 and error in row.errors[0], row.errors  # not hidden, and nothing about targets
    assert any(error in e for e in check_row(1, raw, tmp_path).errors)


def test_unlabelled_type_consistency_only_between_typed_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "a", "task": "t", "text": "x"},
        {"id": "b", "task": "t", "text": "x", "label": "1"},
        {"id": "c", "task": "t", "text": "x"},
        {"id": "d", "task": "t", "question": "q?"},
        {"id": "a", "task": "t", "text": "x"},
    ])
    rows = read_manifest(path, require_target=False)
    assert [bool(r.errors) for r in rows] == [False, False, False, True, True]
    assert "task 't' is classification (line 2) but this row is qa" in rows[3].errors[0]
    assert "duplicate id 'a'" in rows[4].errors[0]


def test_unlabelled_csv(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "m.csv", "id,task,text,label\na,t,hello,\nb,t,world,1\n")
    rows = read_manifest(path, require_target=False)
    assert [(r.errors, r.type) for r in rows] == [([], None), ([], "classification")]
    assert "missing target" in read_manifest(path)[0].errors[0]
