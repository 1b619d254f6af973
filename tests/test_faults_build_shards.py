"""Faults as a user meets them: damaged shards and dataset.json through the loader (with the batch counts), and
build-shards under a full disk and with paths of the wrong kind (through the CLI)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from test_data_helpers import build, make_rows, write_jsonl

from moefuse.cli import main as cli_main
from moefuse.datasets import DataConfig, build_train_loader, make_loader
from moefuse.datasets.loader import COUNT_KEYS, DataError
from moefuse.datasets.shards import BuildOptions, ShardSeries

REPO = Path(__file__).resolve().parents[1]


def summary(samples: list[dict]) -> dict:
    """A stand-in collator (the real one needs the encoders' tokenizer)."""
    return {"ids": [s["id"] for s in samples], "tasks": [s["task"] for s in samples]}


def run_epoch(loader) -> tuple[list[dict], dict[str, int]]:
    """The batches of one epoch and the totals of their counts plus the loader's tail counts."""
    batches = list(loader)
    totals = {k: sum(b[k] for b in batches) + loader.tail_counts[k] for k in COUNT_KEYS}
    return batches, totals


def ids(batches: list[dict]) -> list[str]:
    return [i for b in batches for i in b["ids"]]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 rows: train 18 samples in shards of 4, 4, 4, 4, 2; val 6 in shards of 4, 2."""
    folder = tmp_path_factory.mktemp("faults")
    build(write_jsonl(folder / "manifest.jsonl", make_rows(folder, 24)), folder / "shards", maxcount=4)
    return folder / "shards"


@pytest.fixture
def shards(built: Path, tmp_path: Path) -> Path:
    """A copy of the built dataset that a test may damage."""
    return Path(shutil.copytree(built, tmp_path / "shards"))


def declared(folder: Path, split: str = "train") -> dict[str, int]:
    info = json.loads((folder / "dataset.json").read_text())
    return {s["name"]: s["samples"] for s in info["splits"][split]["shards"]}


def rewrite_shard(path: Path, edit) -> None:
    """Rewrite a shard, passing each sample (extension -> bytes) through `edit`."""
    with tarfile.open(path) as tar:
        samples: dict[str, dict] = {}
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(m).read()
    with wds.TarWriter(str(path), encoder=False) as out:
        for sample in samples.values():
            out.write(edit(sample))


# ---------------------------------------------------------------------------------------------------------------
# missing, truncated and damaged shards


@pytest.mark.parametrize("num_workers", [0, 2])
def test_missing_shard_counts_its_samples_lost(shards: Path, num_workers: int) -> None:
    (shards / "train-000001.tar").unlink()
    batches, totals = run_epoch(make_loader(shards, summary, 4, num_workers=num_workers))
    assert totals == {"skipped": 0, "lost": 4, "other_task": 0}  # not "skipped 1"
    assert len(ids(batches)) == 14 and all(b["ids"] for b in batches)


@pytest.mark.parametrize("member", [1, "middle", -1])
def test_truncated_shard_accounts_for_every_sample(shards: Path, member: int | str) -> None:
    path = shards / "train-000002.tar"
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    cut = members[len(members) // 2 if member == "middle" else member]
    path.write_bytes(path.read_bytes()[: cut.offset_data + cut.size // 2])  # cut inside that member's data
    batches, totals = run_epoch(make_loader(shards, summary, 5))
    if member == -1:  # the last sample lacks its last member: read but corrupt
        assert totals == {"skipped": 1, "lost": 0, "other_task": 0}
    else:
        assert totals["lost"] > 0
    assert len(ids(batches)) + totals["skipped"] + totals["lost"] == 18


def test_member_removed_from_a_tar_is_a_corrupt_sample(shards: Path) -> None:
    gone: list[str] = []

    def drop_first_png(sample: dict) -> dict:
        if "png" in sample and not gone:
            gone.append(sample["__key__"])
            del sample["png"]
        return sample

    rewrite_shard(shards / "train-000000.tar", drop_first_png)
    batches, totals = run_epoch(make_loader(shards, summary, 4))
    assert totals == {"skipped": 1, "lost": 0, "other_task": 0}
    assert gone[0] not in ids(batches) and len(ids(batches)) == 17


def test_version_1_shards_without_a_member_list_still_load(shards: Path) -> None:
    def unlist(sample: dict) -> dict:
        meta = json.loads(sample["sample.json"])
        del meta["members"]
        sample["sample.json"] = json.dumps(meta).encode()
        return sample

    for name in declared(shards):
        rewrite_shard(shards / name, unlist)
    info = json.loads((shards / "dataset.json").read_text())
    (shards / "dataset.json").write_text(json.dumps({**info, "builder_version": 1}))
    batches, totals = run_epoch(make_loader(shards, summary, 4))
    assert len(ids(batches)) == 18 and totals == {"skipped": 0, "lost": 0, "other_task": 0}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_counts_after_the_last_batch_go_to_tail_counts(shards: Path, num_workers: int) -> None:
    (shards / "train-000004.tar").unlink()  # read last (2 samples); the batches before it are full
    loader = make_loader(shards, summary, 4, num_workers=num_workers)
    for _ in range(2):  # tail_counts starts again with each iteration
        batches = list(loader)
        assert all(b["ids"] for b in batches) and sum(b["lost"] for b in batches) == 0
        assert loader.tail_counts == {"skipped": 0, "lost": 2, "other_task": 0}


def test_every_shard_missing_gives_no_batch_but_counts(shards: Path) -> None:
    for name in declared(shards):
        (shards / name).unlink()
    loader = make_loader(shards, summary, 4)
    assert list(loader) == []
    assert loader.tail_counts == {"skipped": 0, "lost": 18, "other_task": 0}


def test_a_count_only_batch_is_folded_into_the_next_batch(shards: Path) -> None:
    """Two workers, batches taken from them in turn: worker 0 reads shards 0, 2, 4 (10 samples), worker 1 shards
    1 and 3 (8). Without shard 3, worker 1's loss comes after its only batch, as a count-only batch; the loader
    folds it into worker 0's last batch."""
    (shards / "train-000003.tar").unlink()
    loader = make_loader(shards, summary, 4, num_workers=2)
    batches = list(loader)
    assert [len(b["ids"]) for b in batches] == [4, 4, 4, 2]
    assert [b["lost"] for b in batches] == [0, 0, 0, 4] and loader.tail_counts["lost"] == 0


# ---------------------------------------------------------------------------------------------------------------
# the tasks filter


@pytest.mark.parametrize("num_workers", [0, 2])
def test_tasks_filter_drops_and_counts_other_tasks(built: Path, num_workers: int) -> None:
    batches, totals = run_epoch(make_loader(built, summary, 4, tasks=["cls"], num_workers=num_workers))
    assert {t for b in batches for t in b["tasks"]} == {"cls"}
    assert len(ids(batches)) == 9 and totals == {"skipped": 0, "lost": 0, "other_task": 9}
    cfg = DataConfig(train_shards=[str(built)], batch_size=4, shuffle_buffer=0)
    batches, totals = run_epoch(build_train_loader(cfg, summary, tasks={"qa"}))
    assert {t for b in batches for t in b["tasks"]} == {"qa"} and totals["other_task"] == 9


def test_tasks_filter_in_resampled_mode(built: Path) -> None:
    loader = make_loader(built, summary, 3, resampled=True, tasks=["cls"])
    batches = list(loader)
    assert len(ids(batches)) == 9 and {t for b in batches for t in b["tasks"]} == {"cls"}  # epoch: 9 cls samples
    with pytest.raises(DataError, match="no shard holds a sample of the tasks nope"):
        make_loader(built, summary, 3, resampled=True, tasks=["nope"])


@pytest.mark.parametrize("tasks", ["cls", [], [1]])
def test_tasks_must_be_a_list_of_names(built: Path, tasks) -> None:
    with pytest.raises(DataError, match="tasks must be a non-empty list of task names"):
        make_loader(built, summary, 4, tasks=tasks)


# ---------------------------------------------------------------------------------------------------------------
# dataset.json


def _edit(info: dict, path: str, value) -> dict:
    """Set (or delete, value=...) the key at a dotted path such as splits.train.shards.0.name."""
    *parents, last = path.split(".")
    node = info
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if value is ...:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return info


BAD_INFO = [
    ("no tasks", "tasks", ..., r"tasks is missing"),
    ("split as a list", "splits.train", [{"name": "train-000000.tar"}], r"splits\.train must be a mapping"),
    ("newer builder", "builder_version", 99, r"written by a newer moefuse \(builder_version 99"),
    ("builder as text", "builder_version", "2", r"builder_version must be an integer >= 1, got '2'"),
    ("no builder", "builder_version", ..., r"builder_version is missing"),
    ("parent shard", "splits.train.shards.0.name", "../x.tar", r"splits\.train\.shards\[0\]\.name must be a plain"),
    ("absolute shard", "splits.train.shards.0.name", "/abs/x.tar", r"shards\[0\]\.name must be a plain file name"),
    ("backslash shard", "splits.val.shards.1.name", "..\\x.tar", r"splits\.val\.shards\[1\]\.name"),
    ("negative count", "splits.train.shards.2.samples", -1, r"shards\[2\]\.samples must be an integer >= 0"),
    ("count as text", "splits.train.samples", "18", r"splits\.train\.samples must be an integer >= 0"),
    ("counts disagree", "splits.train.samples", 17, r"splits\.train\.samples must be the sum of its shards' samples"),
    ("no shards", "splits.val.shards", ..., r"splits\.val\.shards is missing"),
    ("task type", "tasks.cls.type", "regression", r"tasks\.cls\.type must be classification or qa"),
    ("labels as text", "tasks.cls.labels", "0 1 2", r"tasks\.cls\.labels must be a list of strings"),
    ("no answers", "tasks.qa.answers", ..., r"tasks\.qa\.answers is missing"),
    ("not an object", None, [1, 2], r"holds a JSON list, not an object"),
]


@pytest.mark.parametrize("path,value,message", [b[1:] for b in BAD_INFO], ids=[b[0] for b in BAD_INFO])
def test_bad_dataset_json_names_the_file_and_key(shards: Path, path: str | None, value, message: str) -> None:
    info = json.loads((shards / "dataset.json").read_text())
    (shards / "dataset.json").write_text(json.dumps(value if path is None else _edit(info, path, value)))
    for split in ("train", "val"):
        with pytest.raises(DataError, match=message) as caught:
            make_loader(shards, summary, 4, split=split)
        assert str(shards / "dataset.json") in str(caught.value)
    with pytest.raises(DataError, match=message):
        make_loader(str(shards / "dataset.json"), summary, 4)


def test_a_shard_outside_the_dataset_folder_is_never_read(shards: Path) -> None:
    shutil.copy(shards / "train-000000.tar", shards.parent / "x.tar")  # a real shard, one folder up
    info = json.loads((shards / "dataset.json").read_text())
    (shards / "dataset.json").write_text(json.dumps(_edit(info, "splits.train.shards.0.name", "../x.tar")))
    with pytest.raises(DataError, match="plain file name inside the dataset folder"):
        list(make_loader(shards, summary, 4))


# ---------------------------------------------------------------------------------------------------------------
# build-shards on a full disk


def _full_disk(limit: int):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # no file of the child grows past `limit`
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so a write fails with EFBIG instead of killing it

    return preexec


def build_cli(manifest: Path, out: Path, *extra: str, limit: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moefuse.cli", "build-shards", "--manifest", str(manifest),
                           "--out", str(out), "--quiet", "--workers", "1", *extra], preexec_fn=_full_disk(limit),
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def assert_one_line_error(proc: subprocess.CompletedProcess, *names: str) -> None:
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("build-shards: error: "), proc.stderr
    assert all(n in lines[0] for n in names) and "File too large" in lines[0], proc.stderr


def test_full_disk_while_writing_shards_leaves_nothing(tmp_path: Path) -> None:
    manifest = write_jsonl(tmp_path / "m.jsonl", make_rows(tmp_path, 24))
    out = tmp_path / "out"
    proc = build_cli(manifest, out, "--maxcount", "20", limit=20_000)
    assert_one_line_error(proc, str(out / ".train-000000.tar."))
    assert not out.exists()  # the build created the folder: no temp shard left, the folder gone too


def test_full_disk_during_an_overwrite_keeps_the_earlier_build(tmp_path: Path) -> None:
    manifest = write_jsonl(tmp_path / "m.jsonl", make_rows(tmp_path, 24))
    out = tmp_path / "out"
    build(manifest, out, maxcount=3)
    before = snapshot(out)
    proc = build_cli(manifest, out, "--overwrite", "--maxcount", "20", limit=20_000)
    assert_one_line_error(proc, str(out))
    assert snapshot(out) == before  # the same files, byte for byte; no temp file


def test_full_disk_while_writing_dataset_json_keeps_the_earlier_build(tmp_path: Path) -> None:
    # Shards of one short sample stay under the limit (a tar stream is padded to 10 KiB); dataset.json, which
    # lists 40 long labels, does not.
    rows = [{"id": f"r{i}", "task": "t", "text": "x", "label": f"{i}-" + "y" * 400, "split": "train"}
            for i in range(40)]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    out = tmp_path / "out"
    build(write_jsonl(tmp_path / "small.jsonl", rows[:2]), out, maxcount=1)
    before = snapshot(out)
    proc = build_cli(manifest, out, "--overwrite", "--maxcount", "1", limit=12_000)
    assert_one_line_error(proc, str(out / ".dataset.json."))
    assert snapshot(out) == before


def test_discard_never_raises_and_removes_every_temp(tmp_path: Path) -> None:
    series = ShardSeries(tmp_path, "train", BuildOptions(maxcount=1, progress=False))
    for i in range(3):
        series.write(f"k{i}", "t", {"sample.json": b"{}", "txt": b"x" * 100})
    assert len(series.temps) == 3

    class FailingFile:
        def __init__(self, real) -> None:
            self.real = real

        def write(self, data: bytes) -> int:
            raise OSError(27, "File too large")

        def close(self) -> None:
            self.real.close()
            raise OSError(27, "File too large")

    series._file = series._tar.tarstream.fileobj.fileobj = FailingFile(series._file)
    series.discard()
    series.discard()  # twice is fine too
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# paths of the wrong kind


def run_build(capsys: pytest.CaptureFixture, manifest: Path, out: Path) -> tuple[int, str]:
    rc = cli_main(["build-shards", "--manifest", str(manifest), "--out", str(out), "--quiet", "--workers", "1"])
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def test_out_whose_parent_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    manifest = write_jsonl(tmp_path / "m.jsonl", make_rows(tmp_path, 6))
    (tmp_path / "afile").write_text("mine")
    rc, text = run_build(capsys, manifest, tmp_path / "afile" / "sub" / "out")
    assert rc == 1 and "Traceback" not in text
    assert f"{tmp_path / 'afile'} is a file, not a folder" in text and "another --out" in text
    assert (tmp_path / "afile").read_text() == "mine"


def test_out_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    manifest = write_jsonl(tmp_path / "m.jsonl", make_rows(tmp_path, 6))
    (tmp_path / "out").write_text("mine")
    rc, text = run_build(capsys, manifest, tmp_path / "out")
    assert rc == 1 and text.strip() == f"build-shards: error: --out {tmp_path / 'out'} is a file; give a folder"
    assert (tmp_path / "out").read_text() == "mine"


def test_manifest_that_is_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "m.jsonl").mkdir()
    rc, text = run_build(capsys, tmp_path / "m.jsonl", tmp_path / "out")
    assert rc == 1 and "is a folder" in text and text.count("\n") == 1 and "Traceback" not in text
    assert not (tmp_path / "out").exists()
