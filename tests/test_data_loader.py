"""The streaming loader: round trip, epochs, rank/worker splitting, resampling, corrupt data, the collator."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from test_data_helpers import build, make_rows, write_jsonl

from moefuse.configutil import ConfigError, from_dict
from moefuse.datasets import DataConfig, build_eval_loader, build_train_loader, collect_tasks, make_loader
from moefuse.datasets.loader import DataError


def summary(samples: list[dict]) -> dict:
    """A stand-in collator that keeps what the tests check (the real one needs the encoders' tokenizer)."""
    return {"ids": [s["id"] for s in samples], "targets": [s["target"] for s in samples],
            "samples": [{k: v for k, v in s.items()} for s in samples]}


def ids_of(loader) -> list[str]:
    return [i for batch in loader for i in batch["ids"]]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """24 rows, train in 6 shards of 3, val in 2 shards."""
    folder = tmp_path_factory.mktemp("data")
    rows = make_rows(folder, 24)
    build(write_jsonl(folder / "manifest.jsonl", rows), folder / "shards", maxcount=3)
    return folder / "shards", rows


# ---------------------------------------------------------------------------------------------------------------
# round trip and splitting


@pytest.mark.parametrize("num_workers", [0, 2])
def test_round_trip_every_id_and_target_once(dataset: tuple[Path, list[dict]], num_workers: int) -> None:
    shards, rows = dataset
    for split in ("train", "val"):
        loader = make_loader(shards, summary, 4, split=split, num_workers=num_workers, shuffle=5)
        got = [(i, t) for batch in loader for i, t in zip(batch["ids"], batch["targets"])]
        want = [(r["id"], r.get("label", r.get("answer"))) for r in rows if r["split"] == split]
        assert sorted(got) == sorted(want)
    assert all(batch["skipped"] == batch["lost"] == batch["other_task"] == 0 for batch in loader)


def test_decoded_samples_follow_the_collate_contract(dataset: tuple[Path, list[dict]]) -> None:
    shards, rows = dataset
    by_id = {r["id"]: r for r in rows}
    samples = [s for b in make_loader(shards, summary, 50, split="train") for s in b["samples"]]
    assert len(samples) == 18
    for s in samples:
        row = by_id[s["id"]]
        assert set(s) == {"id", "task", "text", "question", "image", "audio", "target", "meta"}
        assert s["task"] == row["task"] and s["text"] == row.get("text") and s["question"] == row.get("question")
        assert s["meta"] == {"n": int(s["id"][1:])}
        if "image" in row:
            assert s["image"].mode == "RGB" and s["image"].size == (64, 64)
        else:
            assert s["image"] is None
        if "audio" in row:
            assert s["audio"].dtype == np.float32 and s["audio"].ndim == 1 and abs(len(s["audio"]) - 800) <= 1
        else:
            assert s["audio"] is None
    eight_k = next(b for b in make_loader(shards, summary, 50, split="train", audio_sample_rate=8000))
    assert {len(s["audio"]) for s in eight_k["samples"] if s["audio"] is not None} == {400}  # resampled on load


def test_two_ranks_with_two_workers_see_every_sample_once(dataset: tuple[Path, list[dict]]) -> None:
    shards, rows = dataset
    seen = [ids_of(make_loader(shards, summary, 2, rank=rank, world_size=2, num_workers=2, shuffle=4, seed=7))
            for rank in (0, 1)]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(r["id"] for r in rows if r["split"] == "train")
    assert all(len(s) == len(set(s)) for s in seen)


def test_epochs_reshuffle_reproducibly(dataset: tuple[Path, list[dict]]) -> None:
    shards, _ = dataset
    loader = make_loader(shards, summary, 4, shuffle=10, seed=1)
    first, second = ids_of(loader), ids_of(loader)
    assert sorted(first) == sorted(second) and first != second
    again = make_loader(shards, summary, 4, shuffle=10, seed=1)
    assert ids_of(again) == first
    again.set_epoch(1)
    assert ids_of(again) == second
    assert ids_of(make_loader(shards, summary, 4)) == ids_of(make_loader(shards, summary, 4))  # no shuffle


def test_fewer_shards_than_readers_warns(dataset: tuple[Path, list[dict]]) -> None:
    shards, rows = dataset
    with pytest.warns(UserWarning, match="2 shards for 2 ranks x 2 workers"):
        loaders = [make_loader(shards, summary, 4, split="val", rank=r, world_size=2, num_workers=2) for r in (0, 1)]
    seen = [i for loader in loaders for i in ids_of(loader)]
    assert sorted(seen) == sorted(r["id"] for r in rows if r["split"] == "val")


# ---------------------------------------------------------------------------------------------------------------
# resampled mode


@pytest.mark.parametrize("num_workers,world_size,batches", [(0, 1, 5), (2, 1, 6), (0, 2, 3)])
def test_resampled_epoch_length(dataset: tuple[Path, list[dict]], num_workers: int, world_size: int,
                                batches: int) -> None:
    shards, _ = dataset
    loader = make_loader(shards, summary, 4, resampled=True, epoch_samples=20, num_workers=num_workers,
                         world_size=world_size, shuffle=4)
    epochs = [[b["ids"] for b in loader] for _ in range(2)]
    assert [len(e) for e in epochs] == [batches, batches]
    assert all(len(ids) == 4 for e in epochs for ids in e)  # an endless stream has no partial batch
    assert epochs[0] != epochs[1]


def test_resampled_defaults_to_the_split_size(dataset: tuple[Path, list[dict]]) -> None:
    shards, _ = dataset
    assert len(list(make_loader(shards, summary, 6, resampled=True))) == 3  # 18 train samples


def test_task_weights(dataset: tuple[Path, list[dict]]) -> None:
    shards, _ = dataset
    only_cls = make_loader(shards, summary, 5, resampled=True, epoch_samples=40, task_weights={"cls": 1, "qa": 0})
    tasks = [s["task"] for b in only_cls for s in b["samples"]]
    assert len(tasks) == 40 and set(tasks) == {"cls"}
    mixed = make_loader(shards, summary, 10, resampled=True, epoch_samples=400, task_weights={"cls": 1, "qa": 3})
    tasks = [s["task"] for b in mixed for s in b["samples"]]
    assert 0.6 < tasks.count("qa") / len(tasks) < 0.9
    with pytest.raises(DataError, match="missing: qa"):
        make_loader(shards, summary, 5, resampled=True, task_weights={"cls": 1})
    with pytest.raises(DataError, match="need resampled"):
        make_loader(shards, summary, 5, task_weights={"cls": 1, "qa": 1})


# ---------------------------------------------------------------------------------------------------------------
# corrupt data


def _rewrite_shard(src: Path, dst: Path, corrupt_key: str) -> None:
    """Copy a shard, replacing one sample's image with bytes that are not an image."""
    with tarfile.open(src) as tar, wds.TarWriter(str(dst), encoder=False) as out:
        samples: dict[str, dict] = {}
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(m).read()
        for key, sample in samples.items():
            if key == corrupt_key:
                sample["png"] = b"\x89PNG\r\n\x1a\n this is not an image"
            out.write(sample)


def _image_key(shard: Path) -> str:
    with tarfile.open(shard) as tar:
        return next(m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".png"))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_sample_is_skipped_and_counted(dataset: tuple[Path, list[dict]], tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture, num_workers: int) -> None:
    shards, _ = dataset
    first = shards / "train-000000.tar"
    bad_key = _image_key(first)
    _rewrite_shard(first, tmp_path / "train-000000.tar", bad_key)
    shutil.copy(shards / "train-000001.tar", tmp_path / "train-000001.tar")
    with caplog.at_level(logging.WARNING, logger="moefuse.data"):
        batches = list(make_loader(str(tmp_path / "train-{000000..000001}.tar"), summary, 2, num_workers=num_workers))
    ids = [i for b in batches for i in b["ids"]]
    assert len(ids) == 5 and bad_key not in ids
    assert sum(b["skipped"] for b in batches) == 1
    if num_workers == 0:  # worker processes log to their own stderr, not to the test's handler
        assert any(bad_key in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)


def test_truncated_and_missing_shards_are_counted(dataset: tuple[Path, list[dict]], tmp_path: Path) -> None:
    shards, _ = dataset
    data = (shards / "train-000000.tar").read_bytes()
    (tmp_path / "a.tar").write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    shutil.copy(shards / "train-000001.tar", tmp_path / "b.tar")
    # Shard paths carry no sample counts: each read error counts as one skipped sample.
    batches = list(make_loader([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], summary, 10))
    assert sum(b["skipped"] for b in batches) >= 1 and sum(b["lost"] for b in batches) == 0
    assert len([i for b in batches for i in b["ids"]]) >= 3  # the other shard is read in full
    # A dataset folder declares them: the samples of a truncated or missing shard are lost, not skipped.
    folder = Path(shutil.copytree(shards, tmp_path / "copy"))
    (folder / "train-000000.tar").write_bytes(data[: len(data) // 2 + 100])
    (folder / "train-000001.tar").unlink()
    loader = make_loader(folder, summary, 4)
    batches = list(loader)
    totals = {k: sum(b[k] for b in batches) + loader.tail_counts[k] for k in ("skipped", "lost", "other_task")}
    delivered = len([i for b in batches for i in b["ids"]])
    assert totals["lost"] >= 3 and delivered + totals["skipped"] + totals["lost"] == 18


# ---------------------------------------------------------------------------------------------------------------
# sources, tasks, config


def test_sources(dataset: tuple[Path, list[dict]], tmp_path: Path) -> None:
    shards, _ = dataset
    via_json = ids_of(make_loader(str(shards / "dataset.json"), summary, 4, split="val"))
    via_pattern = ids_of(make_loader(str(shards / "val-{000000..000001}.tar"), summary, 4))
    assert via_json == via_pattern and len(via_json) == 6
    with pytest.raises(DataError, match="no 'test' split; it has: train, val"):
        make_loader(shards, summary, 4, split="test")
    with pytest.raises(DataError, match="folder without dataset.json"):
        make_loader(tmp_path, summary, 4)
    with pytest.raises(DataError, match="does not exist"):
        make_loader(str(tmp_path / "x-{000000..000002}.tar"), summary, 4)
    with pytest.raises(DataError, match="rank must be in"):
        make_loader(shards, summary, 4, rank=2, world_size=2)


def test_collect_tasks_merges_vocabularies(dataset: tuple[Path, list[dict]], tmp_path: Path) -> None:
    shards, _ = dataset
    rows = [{"id": "z1", "task": "cls", "text": "t", "label": "10", "split": "train"},
            {"id": "z2", "task": "other", "text": "t", "label": "x", "split": "train"}]
    build(write_jsonl(tmp_path / "m.jsonl", rows), tmp_path / "more")
    tasks = collect_tasks([str(shards), str(tmp_path / "more")])
    assert tasks == {"cls": {"type": "classification", "vocabulary": ["0", "1", "2", "10"]},
                     "other": {"type": "classification", "vocabulary": ["x"]},
                     "qa": {"type": "qa", "vocabulary": ["1", "3"]}}


def test_data_config(dataset: tuple[Path, list[dict]]) -> None:
    shards, rows = dataset
    cfg = from_dict(DataConfig, {"train_shards": [str(shards)], "val_shards": [str(shards)], "batch_size": 4,
                                 "shuffle_buffer": 8})
    train = build_train_loader(cfg, summary, rank=0, world_size=1, seed=3)
    assert sorted(ids_of(train)) == sorted(r["id"] for r in rows if r["split"] == "train")
    val = build_eval_loader(cfg, summary)
    assert ids_of(val) == [r["id"] for r in rows if r["split"] == "val"]  # shard order, no shuffle
    with pytest.raises(ConfigError, match="data.epoch_samples"):
        DataConfig(epoch_samples=100)
    with pytest.raises(ConfigError, match="data.task_weights: needs resampled"):
        DataConfig(task_weights={"a": 1.0})
    with pytest.raises(ConfigError, match="data.batch_size"):
        DataConfig(batch_size=0)
    with pytest.raises(ConfigError, match="unknown config key"):
        from_dict(DataConfig, {"shards": []})
    with pytest.raises(ConfigError, match="data.train_shards: is empty"):
        build_train_loader(DataConfig(), summary)


def test_real_collator_batches_mixed_modalities(dataset: tuple[Path, list[dict]]) -> None:
    from transformers import BertTokenizer

    from moefuse.datasets import Collator
    from moefuse.encoders import ImageEncoderConfig, build_image_encoder
    from moefuse.encoders.audio import AudioPreprocessor
    from moefuse.encoders.text import TextPreprocessor, tiny_vocab

    shards, rows = dataset
    image = build_image_encoder(ImageEncoderConfig())
    tasks = collect_tasks([str(shards)])
    preprocessors = {"text": TextPreprocessor(BertTokenizer(vocab=tiny_vocab()), 64),
                     "image": image.preprocessor(False), "audio": AudioPreprocessor(1000, random_crop=False)}
    collator = Collator(task_names=list(tasks), vocabularies=[t["vocabulary"] for t in tasks.values()],
                        preprocessors=preprocessors,
                        sample_fields={"text": ("text", "question"), "image": ("image",), "audio": ("audio",)})
    batch = next(iter(make_loader(shards, collator, 12, split="train")))
    n = len(batch["ids"])
    inputs, present = batch["inputs"], batch["present"]
    assert n == 12 and batch["skipped"] == 0
    assert inputs["image"]["pixel_values"].shape == (n, 3, 32, 32)
    assert inputs["audio"]["input_values"].shape == (n, 1000)
    assert inputs["text"]["input_ids"].shape[0] == n and batch["labels"].shape == (n,)
    by_id = {r["id"]: r for r in rows}
    assert present["image"].tolist() == ["image" in by_id[i] for i in batch["ids"]]
    assert present["audio"].tolist() == ["audio" in by_id[i] for i in batch["ids"]]
    assert inputs["audio"]["sample_mask"].sum(1).tolist() == [800 if "audio" in by_id[i] else 0 for i in batch["ids"]]
    assert (batch["labels"] >= 0).all()  # every target is in the vocabulary
    assert len(set(batch["tasks"])) == 2 and len({tuple(by_id[i]) for i in batch["ids"]}) > 2


def test_dataset_json_lists_shards_with_hashes(dataset: tuple[Path, list[dict]]) -> None:
    import hashlib

    shards, _ = dataset
    info = json.loads((shards / "dataset.json").read_text())
    for split in info["splits"].values():
        for shard in split["shards"]:
            data = (shards / shard["name"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                assert len([m for m in tar.getnames() if m.endswith(".sample.json")]) == shard["samples"]


def test_batches_per_rank(dataset: tuple[Path, list[dict]]) -> None:
    shards, _ = dataset
    assert make_loader(shards, summary, 4, resampled=True, epoch_samples=20, num_workers=2).batches_per_rank() == 6
    assert make_loader(shards, summary, 4, world_size=2).batches_per_rank() == 3  # 18 samples / 2 ranks / 4


def test_shards_of_another_kind_stop_with_a_clear_error(tmp_path: Path) -> None:
    with wds.TarWriter(str(tmp_path / "other.tar"), encoder=False) as out:
        for i in range(60):
            out.write({"__key__": f"k{i}", "cls": b"1", "txt": b"hello"})
    with pytest.raises(DataError, match="written by `moefuse build-shards`"):
        list(make_loader(str(tmp_path / "other.tar"), summary, 4))


def test_jpeg_and_crop_options_round_trip(tmp_path: Path) -> None:
    rows = make_rows(tmp_path, 8)
    info = build(write_jsonl(tmp_path / "m.jsonl", rows), tmp_path / "out", image_format="jpg", image_fit="crop",
                 image_size=16, sample_rate=8000)
    assert info["media"] == {"image_size": 16, "image_fit": "crop", "image_format": "jpg", "sample_rate": 8000,
                             "audio_format": "flac", "audio_subtype": "PCM_16"}
    samples = [s for b in make_loader(tmp_path / "out", summary, 8, audio_sample_rate=None) for s in b["samples"]]
    images = [s["image"] for s in samples if s["image"] is not None]
    assert images and all(img.size == (16, 16) and img.mode == "RGB" for img in images)
    assert {len(s["audio"]) for s in samples if s["audio"] is not None} == {400}  # stored at 8 kHz, kept
