"""build-shards: round trip to the shard files, dataset.json, determinism, atomicity, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from test_data_helpers import (
    build,
    final_files,
    make_manifest,
    make_rows,
    shard_ids,
    write_csv,
    write_jsonl,
    write_png,
    write_wav,
)

from moefuse.commands.build_shards import main
from moefuse.datasets import shards as shards_mod
from moefuse.datasets.manifest import ManifestError
from moefuse.datasets.shards import BuildError

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    rc = main([*map(str, args), "--quiet", "--workers", "1"])
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


# ---------------------------------------------------------------------------------------------------------------
# the happy path


def test_build_writes_every_row_once_with_its_members(tmp_path: Path) -> None:
    rows = make_rows(tmp_path, 24)
    manifest = write_jsonl(tmp_path / "manifest.jsonl", rows)
    out = tmp_path / "out"
    info = build(manifest, out, maxcount=5)
    ids = shard_ids(out)
    assert sorted(ids["train"] + ids["val"]) == sorted(r["id"] for r in rows)
    assert ids["val"] == [r["id"] for r in rows if r["split"] == "val"]  # manifest order is kept
    assert [s["name"] for s in info["splits"]["train"]["shards"]] == [f"train-{i:06d}.tar" for i in range(4)]
    assert [s["samples"] for s in info["splits"]["train"]["shards"]] == [5, 5, 5, 3]
    assert final_files(out) == sorted(["dataset.json", *(f"train-{i:06d}.tar" for i in range(4)),
                                       "val-000000.tar", "val-000001.tar"])
    with tarfile.open(out / "val-000000.tar") as tar:
        names = tar.getnames()
        sample = json.loads(tar.extractfile("s012.sample.json").read())
        qa = json.loads(tar.extractfile("s003.sample.json").read())
        assert all(m.mtime == 0 for m in tar.getmembers())
    assert sample == {"id": "s012", "task": "cls", "type": "classification", "label": "0", "split": "val",
                      "meta": {"n": 12}, "members": ["flac", "png", "txt"]}
    assert qa == {"id": "s003", "task": "qa", "type": "qa", "question": "what is 3?", "answer": "3", "split": "val",
                  "meta": {"n": 3}, "members": ["txt"]}
    assert {"s012.txt", "s012.png", "s012.flac", "s004.png", "s004.flac"} <= set(names)
    assert "s004.txt" not in names and "s003.png" not in names
    assert info["tasks"]["cls"] == {"type": "classification", "labels": ["0", "1", "2"], "vocabulary_from": "train",
                                    "samples": {"train": 9, "val": 3}}
    assert info["tasks"]["qa"]["answers"] == ["1", "3"]
    assert info["counts"]["val"]["cls"] == {"audio": 1, "image+audio": 1, "text+image+audio": 1}
    assert info["media"]["image_size"] == 64 and info["media"]["sample_rate"] == 16000
    assert info["rejected"] == 0 and info["unseen_targets"] == {}
    assert json.loads((out / "dataset.json").read_text()) == info


def test_media_are_normalised(tmp_path: Path) -> None:
    import io

    import soundfile as sf
    from PIL import Image

    write_png(tmp_path / "wide.png", 0, size=(40, 10))
    write_wav(tmp_path / "a.wav", 0, rate=8000, seconds=0.5)
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "task": "t", "image": "wide.png", "audio":
                                                   str(tmp_path / "a.wav"), "label": 1, "split": "train"}])
    build(manifest, tmp_path / "out", image_size=32, sample_rate=16000)
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        img = Image.open(io.BytesIO(tar.extractfile("a.png").read()))
        wav, rate = sf.read(io.BytesIO(tar.extractfile("a.flac").read()))
        meta = json.loads(tar.extractfile("a.sample.json").read())
    assert img.size == (32, 32) and img.mode == "RGB"
    pixels = img.load()
    assert pixels[16, 0] == (0, 0, 0) and pixels[16, 31] == (0, 0, 0)  # letterbox padding, top and bottom
    assert rate == 16000 and abs(len(wav) - 8000) <= 1 and wav.ndim == 1
    assert meta["label"] == "1"  # an integer label becomes a string


def test_csv_manifest_builds_like_jsonl(tmp_path: Path) -> None:
    rows = make_rows(tmp_path, 12)
    build(write_jsonl(tmp_path / "m.jsonl", rows), tmp_path / "a")
    build(write_csv(tmp_path / "m.csv", rows), tmp_path / "b")
    for name in ("train-000000.tar", "val-000000.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_split_assignment_without_split_column(tmp_path: Path) -> None:
    manifest = make_manifest(tmp_path, 20, with_split=False)
    info = build(manifest, tmp_path / "out", val_fraction=0.2, test_fraction=0.1, seed=3)
    assert {s: v["samples"] for s, v in info["splits"].items()} == {"train": 14, "val": 4, "test": 2}
    again = build(manifest, tmp_path / "again", val_fraction=0.2, test_fraction=0.1, seed=3)
    assert shard_ids(tmp_path / "out") == shard_ids(tmp_path / "again")
    build(manifest, tmp_path / "other", val_fraction=0.2, test_fraction=0.1, seed=4)
    assert shard_ids(tmp_path / "other")["val"] != shard_ids(tmp_path / "out")["val"]
    assert again["splits"] == info["splits"]


# ---------------------------------------------------------------------------------------------------------------
# determinism and atomicity


def test_builds_are_byte_identical_for_any_worker_count(tmp_path: Path) -> None:
    manifest = make_manifest(tmp_path, 24)
    a = build(manifest, tmp_path / "a", maxcount=4, workers=1)
    b = build(manifest, tmp_path / "b", maxcount=4, workers=2)
    assert final_files(tmp_path / "a") == final_files(tmp_path / "b")
    for name in final_files(tmp_path / "a"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert a == b


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_a_build_that_fails_midway_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   error: type[BaseException]) -> None:
    manifest = make_manifest(tmp_path, 24)
    real, calls = shards_mod.sample_members, []

    def failing(row, opts):
        calls.append(row.id)
        if len(calls) == 15:
            raise error("killed")
        return real(row, opts)

    monkeypatch.setattr(shards_mod, "sample_members", failing)
    out = tmp_path / "out"
    with pytest.raises(error):
        build(manifest, out, maxcount=4)
    assert len(calls) == 15  # it failed after three shards were complete
    assert not out.exists()  # no shard, no temp file, no dataset.json; the folder it created is gone too


def _many_images(folder: Path, n: int = 150) -> Path:
    """A manifest whose build takes a few seconds: many rows that share one large image."""
    write_png(folder / "big.png", 0, size=(640, 480))
    rows = [{"id": f"k{i}", "task": "t", "image": "big.png", "label": str(i % 2), "split": "train"} for i in range(n)]
    return write_jsonl(folder / "m.jsonl", rows)


def _start_and_wait_for_a_temp_shard(manifest: Path, out: Path, workers: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "moefuse.cli", "build-shards", "--manifest", str(manifest),
                             "--out", str(out), "--maxcount", "10", "--workers", str(workers), "--quiet"],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and any(p.name.endswith(".tmp") for p in out.iterdir()):
            break
        time.sleep(0.01)
    return proc


def test_killed_build_leaves_no_partial_shard_under_a_final_name(tmp_path: Path) -> None:
    manifest, out = _many_images(tmp_path), tmp_path / "out"
    proc = _start_and_wait_for_a_temp_shard(manifest, out, workers=1)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    left = final_files(out)
    if left:  # killed while renaming: whatever has a final name is complete and identical to a full build
        reference = tmp_path / "reference"
        build(manifest, reference, maxcount=10)
        for name in left:
            assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert "dataset.json" not in left
    build(manifest, out, maxcount=10)  # the next build cleans the killed one's temp files up
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert final_files(out) == ["dataset.json", *(f"train-{i:06d}.tar" for i in range(15))]


def test_sigterm_removes_temp_shards(tmp_path: Path) -> None:
    manifest, out = _many_images(tmp_path), tmp_path / "out"
    proc = _start_and_wait_for_a_temp_shard(manifest, out, workers=2)
    proc.terminate()
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert not out.exists()  # the build created the folder, so it removes it too


def test_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    manifest = make_manifest(tmp_path, 24)
    out = tmp_path / "out"
    build(manifest, out, maxcount=3)
    assert len(shard_ids(out)["train"]) == 18
    with pytest.raises(BuildError, match="already holds a built dataset.*--overwrite"):
        build(manifest, out, maxcount=8)
    rc, text = run_cli(capsys, "--manifest", manifest, "--out", out, "--maxcount", "8")
    assert rc == 1 and "--overwrite" in text
    build(manifest, out, maxcount=8, overwrite=True)
    assert final_files(out) == ["dataset.json", "train-000000.tar", "train-000001.tar", "train-000002.tar",
                                "val-000000.tar"]


# ---------------------------------------------------------------------------------------------------------------
# bad input


def _bad_corrupt_png(folder: Path) -> dict:
    data = write_png(folder / "bad.png", 1, size=(30, 30)).read_bytes()
    (folder / "bad.png").write_bytes(data[: len(data) // 2])
    return {"image": "bad.png"}


def _bad_corrupt_jpeg(folder: Path) -> dict:
    data = write_png(folder / "bad.jpg", 1, size=(30, 30), fmt="JPEG").read_bytes()
    (folder / "bad.jpg").write_bytes(data[: len(data) * 2 // 3])
    return {"image": "bad.jpg"}


def _bad_not_an_image(folder: Path) -> dict:
    (folder / "notes.png").write_text("this is text, not a picture")
    return {"image": "notes.png"}


def _bad_truncated_wav(folder: Path) -> dict:
    data = write_wav(folder / "bad.wav", 1, seconds=0.5).read_bytes()
    (folder / "bad.wav").write_bytes(data[: len(data) // 2])
    return {"audio": "bad.wav"}


def _bad_folder(folder: Path) -> dict:
    (folder / "adir").mkdir()
    return {"image": "adir"}


# (name, the bad row's fields merged into a good row or a raw line, the expected reason)
BAD_ROWS = [
    ("corrupt png", _bad_corrupt_png, "is corrupt"),
    ("corrupt jpeg", _bad_corrupt_jpeg, "is corrupt"),
    ("not an image", _bad_not_an_image, "not an image Pillow can read"),
    ("truncated wav", _bad_truncated_wav, "truncated WAV"),
    ("folder as file", _bad_folder, "is a folder, not a file"),
    ("missing file", lambda f: {"image": "nope.png"}, "does not exist"),
    ("non-utf8 text", lambda f: b'{"id": "BAD", "task": "cls", "text": "caf\xe9", "label": "0"}', "not valid UTF-8"),
    ("not json", lambda f: '{"id": "BAD", "task": "cls", ', "not valid JSON"),
    ("not an object", lambda f: "[1, 2]", "must be a JSON object"),
    ("unknown field", lambda f: {"colour": "red"}, "unknown field 'colour'"),
    ("missing target", lambda f: {"label": None}, "missing target"),
    ("half a qa target", lambda f: {"label": None, "question": "why?"}, "answer is missing"),
    ("both targets", lambda f: {"question": "why?", "answer": "so"}, "not both"),
    ("duplicate id", lambda f: {"id": "s001"}, "duplicate id 's001' (first on line 2)"),
    ("empty text", lambda f: {"text": "  "}, "text is empty"),
    ("bad id", lambda f: {"id": "a.b"}, "may hold only letters"),
    ("bad split", lambda f: {"split": "dev"}, "split must be one of train, val, test"),
    ("no input", lambda f: {"text": None}, "no input"),
    ("task changes type", lambda f: {"task": "qa", "label": "0"}, "has one type throughout"),
    ("audio too long", lambda f: {"audio": str(write_wav(f / "long.wav", 2, seconds=3.0))}, "over the limit"),
]


def _manifest_with_bad_row(folder: Path, make_bad) -> tuple[Path, int]:
    rows: list = make_rows(folder, 12)
    bad = make_bad(folder)
    if isinstance(bad, dict):
        row = {"id": "BAD", "task": "cls", "text": "a caption", "label": "0", "split": "train", **bad}
        bad = json.dumps({k: v for k, v in row.items() if v is not None})
    rows.insert(6, bad)
    path = folder / "manifest.jsonl"
    path.write_bytes(b"".join((r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode())
                              + b"\n" for r in rows))
    return path, 7


@pytest.mark.parametrize("make_bad,reason", [b[1:] for b in BAD_ROWS], ids=[b[0] for b in BAD_ROWS])
def test_bad_row_stops_the_build_or_is_rejected(tmp_path: Path, capsys: pytest.CaptureFixture, make_bad,
                                                 reason: str) -> None:
    manifest, line = _manifest_with_bad_row(tmp_path, make_bad)
    out = tmp_path / "out"
    extra = ["--max-audio-seconds", "1"]
    rc, text = run_cli(capsys, "--manifest", manifest, "--out", out, *extra)
    assert rc == 1
    assert f"line {line}" in text and reason in text and "nothing was written" in text and "--skip-bad" in text
    assert not out.exists()
    rc, text = run_cli(capsys, "--manifest", manifest, "--out", out, "--skip-bad", *extra)
    assert rc == 0 and "1 rows rejected" in text
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == 1 and rejected[0]["line"] == line and reason in rejected[0]["reason"]
    assert rejected[0]["row"]  # the row as it was read: nothing is lost
    ids = shard_ids(out)
    assert sorted(ids["train"] + ids["val"]) == sorted(f"s{i:03d}" for i in range(12))  # every good row
    assert json.loads((out / "dataset.json").read_text())["rejected"] == 1


def test_many_bad_rows_are_listed_up_to_twenty(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = make_rows(tmp_path, 4) + [{"id": f"x{i}", "task": "cls", "text": "t"} for i in range(25)]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    rc, text = run_cli(capsys, "--manifest", manifest, "--out", tmp_path / "out")
    assert rc == 1 and "25 of 29 rows" in text and "line 24, id 'x19'" in text and "line 25," not in text
    assert "and 5 more (25 bad rows in total)" in text


def test_every_row_bad_with_skip_bad_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    manifest = write_jsonl(tmp_path / "m.jsonl", ["nope", "also nope"])
    rc, text = run_cli(capsys, "--manifest", manifest, "--out", tmp_path / "out", "--skip-bad")
    assert rc == 1 and "Every row is bad" in text and not (tmp_path / "out").exists()


@pytest.mark.parametrize("content,message", [(b"", "holds no rows"), (b"\n  \n", "holds no rows"),
                                             (b"id,task,colour\n", "unknown CSV column 'colour'")])
def test_unusable_manifests(tmp_path: Path, capsys: pytest.CaptureFixture, content: bytes, message: str) -> None:
    manifest = tmp_path / ("m.csv" if b"," in content else "m.jsonl")
    manifest.write_bytes(content)
    rc, text = run_cli(capsys, "--manifest", manifest, "--out", tmp_path / "out")
    assert rc == 1 and message in text and not (tmp_path / "out").exists()


def test_manifest_path_errors(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="is a folder"):
        build(tmp_path, tmp_path / "out")
    with pytest.raises(ManifestError, match="does not exist"):
        build(tmp_path / "none.jsonl", tmp_path / "out")
    (tmp_path / "m.txt").write_text("{}")
    with pytest.raises(ManifestError, match="unknown format '.txt'"):
        build(tmp_path / "m.txt", tmp_path / "out")


def test_csv_bad_rows(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = make_rows(tmp_path, 6)
    manifest = write_csv(tmp_path / "m.csv", rows)
    data = manifest.read_bytes().replace(b"caption 0", b"caption \xff0")  # not UTF-8, on the row of s000
    manifest.write_bytes(data + b"s100,cls,,,,,,,train,{bad json\n")
    rc, text = run_cli(capsys, "--manifest", manifest, "--out", tmp_path / "out", "--skip-bad")
    assert rc == 0
    rejected = {r["line"]: r for r in map(json.loads, (tmp_path / "out" / "rejected.jsonl").read_text().splitlines())}
    assert sorted(rejected) == [2, 8]
    assert "not valid UTF-8" in rejected[2]["reason"] and "\\xff" in rejected[2]["row"]["text"]
    assert "meta is not valid JSON" in rejected[8]["reason"]


def test_unseen_val_targets_warn_and_are_counted(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = make_rows(tmp_path, 12)
    rows[4]["label"] = "never-in-train"  # a val row of task cls
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    rc, text = run_cli(capsys, "--manifest", manifest, "--out", tmp_path / "out")
    assert rc == 0 and "warning" in text and "never occurs in train" in text and "'never-in-train' (1)" in text
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert info["unseen_targets"] == {"val": {"cls": {"never-in-train": 1}}}
    assert "never-in-train" not in info["tasks"]["cls"]["labels"]


def test_vocabulary_order_numbers_first() -> None:
    values = ["yes", "10", "2", "no", "-1", "0"]
    assert sorted(values, key=shards_mod.vocabulary_order) == ["-1", "0", "2", "10", "no", "yes"]


def test_parse_size() -> None:
    assert shards_mod.parse_size("256MB") == 256 * 2**20
    assert shards_mod.parse_size("1g") == 2**30 and shards_mod.parse_size("1000") == 1000
    with pytest.raises(Exception, match="not a size"):
        shards_mod.parse_size("lots")
