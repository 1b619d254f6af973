"""Faults met by `moefuse demo-data`, through the CLI: it never deletes or overwrites a file it did not write (or
that was changed since), checks every path before writing anything, and fails on a full disk with one line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO

from moefuse.cli import main as cli


def demo(out: Path, *extra: str, count: int = 20) -> int:
    return cli(["demo-data", "--out", str(out), "--count", str(count), "--quiet", *extra])


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones included) -> its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def media_of_manifest(out: Path) -> set[str]:
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    return {r[k] for r in rows for k in ("image", "audio") if k in r}


def demo_media(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in (out / "media").rglob("*") if p.is_file() and p.name.startswith(
        ("digit-", "avqa-"))}


def error_of(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("demo-data: error: "), err
    return err


@pytest.mark.parametrize("mine", ["media/image/mine.png", "media/audio/take-1.wav", "notes.txt",
                                  "media/image/.hidden", "shards/train-000000.tar"])
def test_users_other_files_survive_runs_and_reruns(tmp_path: Path, mine: str) -> None:
    out = tmp_path / "demo"
    (out / mine).parent.mkdir(parents=True)
    (out / mine).write_bytes(b"the user's own bytes")
    assert demo(out) == 0
    assert demo(out, "--overwrite", count=22) == 0
    assert demo(out, "--overwrite", count=20) == 0  # smaller: removes its own stale files only
    assert (out / mine).read_bytes() == b"the user's own bytes"
    assert demo_media(out) == media_of_manifest(out)


@pytest.mark.parametrize("planned", ["media/image/avqa-00000.png", "media/audio/avqa-00003.wav", "manifest.jsonl"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_users_file_at_a_planned_name_stops_the_run(tmp_path: Path, capsys, planned: str, overwrite: bool) -> None:
    out = tmp_path / "demo"
    (out / planned).parent.mkdir(parents=True, exist_ok=True)
    (out / planned).write_bytes(b"mine")
    before = snapshot(out)
    assert demo(out, *(["--overwrite"] if overwrite else [])) == 1
    err = error_of(capsys)
    assert f"{out / planned} was not written by demo-data" in err and "choose another --out" in err
    assert snapshot(out) == before  # unchanged, nothing else written (no record, no media, no manifest)


def test_users_file_at_a_name_only_a_larger_rerun_plans(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert demo(out) == 0
    (out / "media/image/avqa-00011.png").write_bytes(b"mine")  # count 20 has avqa 0..9, count 24 has 0..11
    before = snapshot(out)
    assert demo(out, "--overwrite", count=24) == 1
    assert f"{out / 'media/image/avqa-00011.png'} was not written by demo-data" in error_of(capsys)
    assert snapshot(out) == before


@pytest.mark.parametrize("edit", ["append", "replace", "empty"])
def test_demo_file_edited_by_the_user_is_not_overwritten(tmp_path: Path, capsys, edit: str) -> None:
    out = tmp_path / "demo"
    assert demo(out) == 0
    path = out / "media/audio/avqa-00001.wav"
    path.write_bytes({"append": path.read_bytes() + b"x", "replace": b"my recording", "empty": b""}[edit])
    before = snapshot(out)
    assert demo(out, "--overwrite") == 1
    assert f"{path} was changed since demo-data wrote it" in error_of(capsys)
    assert snapshot(out) == before


def test_edited_manifest_is_not_overwritten(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert demo(out) == 0
    with open(out / "manifest.jsonl", "a") as f:
        f.write('{"id": "mine", "task": "digit", "text": "my row", "label": "1"}\n')
    before = snapshot(out)
    assert demo(out, "--overwrite") == 1
    assert f"{out / 'manifest.jsonl'} was changed since demo-data wrote it" in error_of(capsys)
    assert snapshot(out) == before


def test_smaller_rerun_removes_only_its_own_unchanged_stale_files(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert demo(out, count=24) == 0
    edited, stale = out / "media/image/avqa-00011.png", out / "media/image/avqa-00010.png"
    edited.write_bytes(b"now mine")
    assert demo(out, "--overwrite", count=20) == 0
    assert not stale.exists() and edited.read_bytes() == b"now mine"  # an edited stale file is the user's now
    assert demo_media(out) - media_of_manifest(out) == {"media/image/avqa-00011.png"}
    assert "media/image/avqa-00011.png" not in json.loads((out / ".demo-data.json").read_text())["files"]
    assert demo(out, "--overwrite", count=24) == 1  # and a later run that needs its name stops
    assert edited.read_bytes() == b"now mine"


def test_rerun_without_overwrite_asks_for_it(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert demo(out) == 0
    (out / "manifest.jsonl").unlink()  # even without the manifest, the media of the earlier run are known
    before = snapshot(out)
    assert demo(out) == 1
    assert "holds the files of an earlier demo-data run" in error_of(capsys) and snapshot(out) == before
    assert demo(out, "--overwrite") == 0 and demo_media(out) == media_of_manifest(out)


def test_a_link_at_a_planned_name_is_not_followed(tmp_path: Path, capsys) -> None:
    out, target = tmp_path / "demo", tmp_path / "precious.png"
    target.write_bytes(b"precious")
    (out / "media/image").mkdir(parents=True)
    (out / "media/image/avqa-00000.png").symlink_to(target)
    assert demo(out) == 1
    assert "avqa-00000.png was not written by demo-data" in error_of(capsys)
    assert target.read_bytes() == b"precious" and (out / "media/image/avqa-00000.png").is_symlink()


@pytest.mark.parametrize("where", ["out", "media", "media/image", "media/audio", "parent"])
def test_a_file_where_a_folder_is_expected(tmp_path: Path, capsys, where: str) -> None:
    out = tmp_path / "demo"
    if where == "out":
        blocker = out
    elif where == "parent":
        blocker, out = tmp_path / "file", tmp_path / "file" / "demo"
    else:
        blocker = out / where
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_bytes(b"mine")
    before = snapshot(tmp_path)
    assert demo(out) == 1
    assert str(blocker) in error_of(capsys)
    assert snapshot(tmp_path) == before


def test_a_folder_at_a_planned_file_name(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    (out / "media/image/avqa-00002.png").mkdir(parents=True)
    (out / "manifest.jsonl").mkdir()
    assert demo(out) == 1
    err = error_of(capsys)
    assert "is a folder where demo-data writes a file" in err and "avqa-00002.png" in err
    assert sorted(p.name for p in out.rglob("*")) == ["avqa-00002.png", "image", "manifest.jsonl", "media"]


@pytest.mark.parametrize("record", ['{"files": [1]}', "not json", '{"files": {"manifest.jsonl": "b"}}',
                                    '{"files": {"../outside.txt": ["%s"]}}' % ("0" * 64),
                                    '{"files": {"media/image/../../x": []}}', "[]"])
def test_a_broken_record_stops_the_run(tmp_path: Path, capsys, record: str) -> None:
    out = tmp_path / "demo"
    out.mkdir()
    (out / ".demo-data.json").write_text(record)
    assert demo(out) == 1
    assert f"{out / '.demo-data.json'} is not a demo-data record" in error_of(capsys)
    assert sorted(p.name for p in out.iterdir()) == [".demo-data.json"]


# One child process, several disk-size limits: RLIMIT_FSIZE makes a write past N bytes fail with EFBIG (SIGXFSZ
# ignored), as a full disk would. 2000 bytes: the record fails; 20000: a 32 KB WAV fails after some PNGs.
FULL_DISK = textwrap.dedent("""
    import contextlib, io, json, resource, signal, sys
    from moefuse.cli import main
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    results = []
    for limit, out in json.loads(sys.argv[1]):
        err = io.StringIO()
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        with contextlib.redirect_stderr(err):
            rc = main(["demo-data", "--out", out, "--count", "20", "--quiet"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        results.append({"rc": rc, "err": err.getvalue()})
    print(json.dumps(results))
""")


def test_full_disk(tmp_path: Path, capsys) -> None:
    limits = [2000, 20000]
    outs = [tmp_path / f"demo-{n}" for n in limits]
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, json.dumps([[n, str(o)] for n, o in zip(limits, outs)])],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for out, result in zip(outs, results):
        assert result["rc"] == 2, result
        line = result["err"].strip()
        assert line.startswith(f"demo-data: error: {out}/") and "size limit" in line and "\n" not in line, line
        assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
        assert not (out / "manifest.jsonl").exists()
    assert ".demo-data.json" in results[0]["err"]  # the record comes first
    assert "media/audio/" in results[1]["err"] and list((outs[1] / "media/image").glob("*.png"))
    # what an interrupted run wrote is known as demo-data's own: --overwrite finishes the job
    assert demo(outs[1]) == 1 and "--overwrite" in capsys.readouterr().err
    assert demo(outs[1], "--overwrite") == 0 and demo_media(outs[1]) == media_of_manifest(outs[1])
