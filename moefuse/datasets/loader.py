"""Streaming loader: webdataset shards -> decoded samples (collate.py's contract) -> model batches.

    loader = make_loader(["data/shards"], collator, batch_size=32, split="train", shuffle=1000,
                         rank=accelerator.process_index, world_size=accelerator.num_processes, num_workers=2)
    for batch in loader:          # a new epoch (shard order, shuffle) each time the loader is iterated
        skipped += batch["skipped"]; lost += batch["lost"]; other += batch["other_task"]
    skipped += loader.tail_counts["skipped"]  # counts that came after the last batch (same for lost, other_task)

A source is a dataset folder (its dataset.json names the shards of each split), a path or URL of a dataset.json,
or anything webdataset opens: a brace pattern `data/train-{000000..000009}.tar`, an http(s)/gs/pipe: URL.

Splitting (the standard webdataset recipe, done here explicitly): in the finite mode the shard list (shuffled
per epoch with a seed every rank shares) is dealt out to the `world_size * num_workers` (rank, worker) slots,
shard i to slot i mod slots, so every sample is read exactly once per epoch across all processes. Rank and
world size come from the caller (the trainer passes accelerator.process_index / num_processes), never from
environment variables or torch.distributed: reading those as well as letting accelerate shard again is how
webdataset pipelines double-shard (webdataset#188, #194, #303). Do not pass the loader to
`accelerator.prepare`: it would wrap it again and dispatch batches from rank 0 (accelerate#3547); move the
batches to the device yourself. Ranks may get different numbers of batches (shards differ in size): fine for
evaluation (sum the metrics), but distributed training needs either `resampled=True` or a loop that stops all
ranks together.

Resampled mode (`resampled=True`, for multi-node training): every slot draws shards at random with replacement
(like webdataset's ResampledShards, but weighted by the shards' sample counts when known and seeded per epoch,
rank and worker), an endless stream cut into epochs of `epoch_samples` samples across all ranks (default: the
split's size): each worker yields ceil(epoch_samples / (world_size * max(1, num_workers) * batch_size)) full
batches (webdataset's `with_epoch` counted per worker), so every rank gets the same number of batches.
`task_weights` ({task: weight}) sets each task's share of the stream in this mode: a task is drawn by weight,
then the next sample of that task from the shards that hold it.

`tasks` (a collection of task names) keeps only the samples of those tasks: the others are dropped before
decoding (only their small sample.json is parsed) and counted in `other_task`, so a config's task list may be a
subset of the shards' tasks.

Corrupt data never stops training; nothing is dropped silently. Every batch carries three ints, counted in its
worker since that worker's previous batch, each also logged (logger `moefuse.data`):

* `batch["skipped"]`: corrupt samples: read but not decodable, or lacking a member their sample.json lists (a
  `.png` removed from the tar); for sources without dataset.json (shard patterns), also each read error.
* `batch["lost"]`: samples lost from missing or truncated shards of sources with a dataset.json: the shard's
  declared sample count minus the samples read from it (a shard-level read error is not also `skipped`).
* `batch["other_task"]`: samples dropped because their task is not in `tasks`.

So for a source with dataset.json, delivered + skipped + lost + other_task = the declared samples. Counts that
arise after a worker's last batch (say the last shard is truncated) reach `ShardLoader.__iter__` in a count-only
batch (`ids == []` plus the three counts), which folds them into the next batch it yields; consumers never see
a batch without samples. The counts still pending when an iteration ends are in `loader.tail_counts`
({"skipped", "lost", "other_task"}, reset at the start of each iteration): the sum over batches plus
`tail_counts` is the total of the epoch (sum it over ranks too).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls

from moefuse.datasets.media import decode_audio, decode_image
from moefuse.errors import UserError

log = logging.getLogger("moefuse.data")

COUNT_KEYS = ("skipped", "lost", "other_task")
"""The counts every batch carries (see the module docstring)."""
TASK_TYPES = {"classification": "labels", "qa": "answers"}
"""Task type -> the dataset.json key of its vocabulary."""
_MISSING = object()


class DataError(UserError, ValueError):
    """Shards or a dataset.json cannot be used; the message names the source and the fix."""


@dataclass
class ShardSource:
    """One source resolved to its shard URLs; per-shard sample and task counts when it has a dataset.json."""

    spec: str
    urls: list[str]
    samples: list[int] | None = None
    tasks: list[dict[str, int]] | None = None
    info: dict | None = None


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _is_url(spec: str) -> bool:
    return "://" in spec or spec.startswith("pipe:")


def _read_info(location: str) -> dict:
    """dataset.json from a local path or any URL webdataset's gopen reads."""
    try:
        if _is_url(location):
            with wds.gopen(location, "rb") as f:
                data = f.read()
        else:
            data = Path(location).read_bytes()
        info = json.loads(data)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read dataset description {location}: {e}") from None
    return validate_dataset_info(info, location)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _plain_name(name: str) -> bool:
    """A file name inside the dataset folder: no folder part, not `.`/`..`, not absolute (also not C:x)."""
    return (name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
            and not (len(name) > 1 and name[1] == ":"))


def _check(ok: bool, location: str, key: str, want: str, value: object) -> None:
    """Raise a DataError naming the file and the key path unless `ok`."""
    if ok:
        return
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    problem = f"is missing (it must be {want})" if value is _MISSING else f"must be {want}, got {shown}"
    raise DataError(f"{location}: {key} {problem}; this file was not written by `moefuse build-shards` or was "
                    f"edited: rebuild the dataset with `moefuse build-shards`")


def _check_splits(splits: object, location: str) -> None:
    _check(isinstance(splits, dict), location, "splits", "a mapping split -> {samples, shards}", splits)
    for split, entry in splits.items():
        key = f"splits.{split}"
        _check(isinstance(entry, dict), location, key, "a mapping {samples, shards}", entry)
        total = entry.get("samples", _MISSING)
        _check(_is_count(total), location, f"{key}.samples", "an integer >= 0", total)
        shards = entry.get("shards", _MISSING)
        _check(isinstance(shards, list), location, f"{key}.shards", "a list of {name, samples}", shards)
        for i, shard in enumerate(shards):
            at = f"{key}.shards[{i}]"
            _check(isinstance(shard, dict), location, at, "a mapping {name, samples, ...}", shard)
            name = shard.get("name", _MISSING)
            _check(isinstance(name, str) and _plain_name(name), location, f"{at}.name",
                   "a plain file name inside the dataset folder (no /, \\, .. or absolute path)", name)
            _check(_is_count(shard.get("samples", _MISSING)), location, f"{at}.samples", "an integer >= 0",
                   shard.get("samples", _MISSING))
            tasks = shard.get("tasks", {})
            _check(isinstance(tasks, dict) and all(isinstance(t, str) and _is_count(n) for t, n in tasks.items()),
                   location, f"{at}.tasks", "a mapping task -> number of samples", tasks)
        held = sum(shard["samples"] for shard in shards)
        _check(held == total, location, f"{key}.samples", f"the sum of its shards' samples ({held})", total)


def _check_tasks(tasks: object, location: str) -> None:
    _check(isinstance(tasks, dict), location, "tasks", "a mapping task -> {type, labels or answers}", tasks)
    for name, task in tasks.items():
        key = f"tasks.{name}"
        _check(isinstance(task, dict), location, key, "a mapping {type, labels or answers}", task)
        kind = task.get("type", _MISSING)
        _check(isinstance(kind, str) and kind in TASK_TYPES, location, f"{key}.type", "classification or qa", kind)
        vocab = task.get(TASK_TYPES[kind], _MISSING)
        _check(isinstance(vocab, list) and all(isinstance(v, str) for v in vocab), location,
               f"{key}.{TASK_TYPES[kind]}", "a list of strings", vocab)


def validate_dataset_info(info: object, location: str) -> dict:
    """Check the contents of a dataset.json (read from `location`) before anything uses them: builder_version
    (an integer, not newer than this moefuse writes), `splits` (split -> {samples, shards: [{name, samples,
    tasks}]}, shard names plain file names inside the dataset folder) and `tasks` (name -> {type, labels or
    answers}). Returns `info`; each problem is a DataError naming the file and the key path."""
    from moefuse.datasets.shards import BUILDER_VERSION

    if not isinstance(info, dict):
        raise DataError(f"{location} is not a dataset.json written by `moefuse build-shards`: it holds a JSON "
                        f"{type(info).__name__}, not an object")
    version = info.get("builder_version", _MISSING)
    _check(_is_count(version) and version >= 1, location, "builder_version", "an integer >= 1", version)
    if version > BUILDER_VERSION:
        raise DataError(f"{location} was written by a newer moefuse (builder_version {version}; this one reads up to "
                        f"{BUILDER_VERSION}): upgrade moefuse, or rebuild the dataset with this one")
    _check_splits(info.get("splits", _MISSING), location)
    _check_tasks(info.get("tasks", _MISSING), location)
    return info


def load_dataset_info(spec: str) -> dict:
    """The dataset.json of a dataset folder, or of a path/URL that names the dataset.json itself."""
    if spec.endswith("dataset.json"):
        return _read_info(spec)
    if Path(spec).is_dir():
        if not (Path(spec) / "dataset.json").is_file():
            raise DataError(f"{spec} is a folder without dataset.json: build it with `moefuse build-shards "
                            f"--manifest M --out {spec}`, or give a shard pattern such as "
                            f"{spec}/train-{{000000..000009}}.tar")
        return _read_info(str(Path(spec) / "dataset.json"))
    raise DataError(f"{spec} is neither a dataset folder nor a dataset.json")


def resolve_source(spec: str, split: str) -> ShardSource:
    """A dataset folder or dataset.json (with `split`), or a shard pattern/URL (split ignored) -> ShardSource."""
    if spec.endswith("dataset.json") or Path(spec).is_dir():
        info = load_dataset_info(spec)
        if split not in info["splits"]:
            raise DataError(f"{spec} has no {split!r} split; it has: {', '.join(info['splits']) or 'none'}")
        base = spec.rsplit("/", 1)[0] if spec.endswith("dataset.json") else spec.rstrip("/")
        shards = info["splits"][split]["shards"]
        return ShardSource(spec, [f"{base}/{s['name']}" for s in shards], [s["samples"] for s in shards],
                           [s.get("tasks", {}) for s in shards], info)
    urls = expand_urls(spec)
    missing = [u for u in urls if not _is_url(u) and not Path(u).is_file()]
    if missing:
        raise DataError(f"shard {missing[0]} (from {spec!r}) does not exist" +
                        (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return ShardSource(spec, urls)


def shard_urls(dataset_dir: str | Path, split: str) -> list[str]:
    """The shard paths of one split of a dataset folder, in order (from its dataset.json)."""
    return resolve_source(str(dataset_dir), split).urls


def collect_tasks(specs: Sequence[str]) -> dict[str, dict]:
    """{task: {"type", "vocabulary"}} merged over the dataset.json of each source, tasks sorted by name. A task's
    vocabulary is the union of its labels/answers, in the builder's order (integers first, then text)."""
    from moefuse.datasets.shards import vocabulary_order

    merged: dict[str, dict] = {}
    for spec in specs:
        for name, task in load_dataset_info(spec)["tasks"].items():
            vocab = task.get("labels") or task.get("answers") or []
            entry = merged.setdefault(name, {"type": task["type"], "vocabulary": set(), "from": spec})
            if entry["type"] != task["type"]:
                raise DataError(f"task {name!r} is {entry['type']} in {entry['from']} but {task['type']} in {spec}")
            entry["vocabulary"].update(vocab)
    return {name: {"type": e["type"], "vocabulary": sorted(e["vocabulary"], key=vocabulary_order)}
            for name, e in sorted(merged.items())}


def decode_sample(raw: dict, audio_rate: int | None) -> dict:
    """A webdataset sample (member extension -> bytes) -> a decoded sample (collate.py's contract). Raises
    DataError when sample.json is missing or a member it lists (builder version >= 2) is not in the sample."""
    key = raw.get("__key__")
    if "sample.json" not in raw:
        raise DataError(f"sample {key!r} in {raw.get('__url__')} has no sample.json member")
    meta = json.loads(raw["sample.json"])
    listed = meta.get("members")
    if listed is not None:  # shards of builder version 1 do not list the members
        if not isinstance(listed, list):
            raise DataError(f"sample {key!r} in {raw.get('__url__')}: sample.json members must be a list, got "
                            f"{listed!r}")
        missing = [f"{key}.{m}" for m in listed if m not in raw]
        if missing:
            raise DataError(f"sample {key!r} in {raw.get('__url__')} lacks {', '.join(missing)}, listed in its "
                            f"sample.json: the shard is damaged; rebuild it")
    image = raw.get("png", raw.get("jpg", raw.get("jpeg")))
    audio = raw.get("flac", raw.get("wav"))
    return {
        "id": meta["id"],
        "task": meta["task"],
        "text": raw["txt"].decode("utf-8") if "txt" in raw else None,
        "question": meta.get("question"),
        "image": decode_image(image) if image is not None else None,
        "audio": decode_audio(audio, audio_rate) if audio is not None else None,
        "target": meta.get("label", meta.get("answer")),
        "meta": meta.get("meta") or {},
    }


def zero_counts() -> dict[str, int]:
    """{"skipped": 0, "lost": 0, "other_task": 0}."""
    return dict.fromkeys(COUNT_KEYS, 0)


class SkipCounter:
    """The counts of samples that reach no batch (COUNT_KEYS, see the module docstring), in one worker process
    for one iteration. Calling it is a webdataset exception handler: it logs the error and counts one skipped
    sample, and the pipeline continues. `take()` hands the counts since its last call to the batch being built."""

    def __init__(self) -> None:
        self.pending = zero_counts()
        self.total = zero_counts()

    def __call__(self, exn: BaseException) -> bool:
        self.add("skipped")
        log.warning("skipped a corrupt sample or shard (%d so far in this process): %s: %s", self.total["skipped"],
                    type(exn).__name__, exn)
        return True  # continue

    def add(self, kind: str, n: int = 1) -> None:
        self.pending[kind] += n
        self.total[kind] += n

    def has_pending(self) -> bool:
        return any(self.pending.values())

    def take(self) -> dict[str, int]:
        taken, self.pending = self.pending, zero_counts()
        return taken


# ---------------------------------------------------------------------------------------------------------------
# blocks


class ShardStream(IterableDataset):
    """The webdataset pipeline: shards -> (split, resample, mix) -> shuffle -> decode -> batches. See the module
    docstring for the splitting and epoch rules. `epoch` is the epoch the next iteration runs."""

    def __init__(self, sources: list[ShardSource], collator: Callable, batch_size: int, *, shuffle: int = 0,
                 resampled: bool = False, epoch_samples: int | None = None, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, seed: int = 0, audio_sample_rate: int | None = 16000,
                 task_weights: dict[str, float] | None = None, tasks: Collection[str] | None = None):
        super().__init__()
        self.sources, self.collator, self.batch_size = sources, collator, batch_size
        self.shuffle, self.resampled, self.seed = shuffle, resampled, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.audio_sample_rate = audio_sample_rate
        self.task_weights = dict(task_weights or {})
        self.tasks = None if tasks is None else frozenset(tasks)
        self.urls = [u for s in sources for u in s.urls]
        self.shard_tasks = [t for s in sources for t in (s.tasks or [{}] * len(s.urls))]
        self.weights = [self._kept(n, tasks_in) for s in sources
                        for n, tasks_in in zip(s.samples or [1] * len(s.urls), s.tasks or [{}] * len(s.urls))]
        self.declared = {u: n for s in sources if s.samples is not None for u, n in zip(s.urls, s.samples)}
        self.epoch = 0
        self.counts = SkipCounter()
        self.batches_per_worker: int | None = None
        if resampled:
            if not any(self.weights):
                raise DataError("resampled loading needs samples to draw, but " +
                                ("the sources hold none" if self.tasks is None else
                                 f"no shard holds a sample of the tasks {', '.join(sorted(self.tasks))}"))
            known = all(s.samples is not None for s in sources)
            if epoch_samples is None and not known:
                raise DataError("resampled loading needs epoch_samples: the sources are shard patterns without a "
                                "dataset.json, so the number of samples is unknown")
            epoch_samples = epoch_samples if epoch_samples is not None else sum(self.weights)
            slots = world_size * max(1, num_workers)
            self.batches_per_worker = max(1, math.ceil(epoch_samples / (slots * batch_size)))
        if task_weights:
            self._check_task_weights()

    def _kept(self, samples: int, tasks_in: dict[str, int]) -> int:
        """A shard's samples of the wanted tasks (all when no `tasks` filter or the shard's tasks are unknown)."""
        if self.tasks is None or not tasks_in:
            return samples
        return sum(n for t, n in tasks_in.items() if t in self.tasks)

    def _check_task_weights(self) -> None:
        """The task_weights rules that need the sources (the others are in `loader_option_problems`)."""
        if any(s.tasks is None for s in self.sources):
            raise DataError("task_weights need dataset folders (with dataset.json) as sources, so the tasks in each "
                            "shard are known")
        present = sorted({t for tasks in self.shard_tasks for t in tasks if self.tasks is None or t in self.tasks})
        unknown = sorted(set(self.task_weights) - set(present))
        missing = sorted(set(present) - set(self.task_weights))
        if unknown or missing:
            raise DataError(f"task_weights must give a weight to each task in the training data ({', '.join(present)})"
                            + (f"; unknown: {', '.join(unknown)}" if unknown else "")
                            + (f"; missing: {', '.join(missing)}" if missing else ""))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches_per_rank(self) -> int | None:
        """Batches one rank gets per epoch: exact in resampled mode; in the finite mode an estimate from the
        sample counts (shards differ in size, and each worker ends with a partial batch); None when unknown."""
        workers = max(1, self.num_workers)
        if self.batches_per_worker is not None:
            return self.batches_per_worker * workers
        if any(s.samples is None for s in self.sources):
            return None
        return math.ceil(sum(self.weights) / self.world_size / self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        # A plain function (not a generator) so the epoch is read now, when the DataLoader starts the iteration.
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self._batches(self.epoch, worker, workers)

    def _read_shard(self, url: str) -> Iterator[dict]:
        """The raw samples of one shard. When dataset.json declares how many it holds, read errors (a missing
        or truncated shard) are counted as the samples `lost` (declared - read) once the shard ends, and logged
        naming the shard and the error; otherwise each read error counts as one `skipped` sample."""
        declared = self.declared.get(url)
        errors: list[BaseException] = []

        def note(exn: BaseException) -> bool:
            errors.append(exn)
            return True  # continue with what can still be read

        read = 0
        for sample in wds.tarfile_samples([{"url": url}], handler=self.counts if declared is None else note):
            read += 1
            yield sample
        if declared is None:
            return
        lost = max(0, declared - read)
        if lost or errors:
            self.counts.add("lost", lost)
            why = f"{type(errors[0]).__name__}: {errors[0]}" if errors else "it ends early"
            log.warning("shard %s: lost %d of its %d samples (%d read): %s", url, lost, declared, read, why)

    def _shard_samples(self, urls: Iterator[str], endless: bool) -> Iterator[dict]:
        """Raw samples of the given shards, bad ones skipped. An endless stream stops with an error when many
        shards in a row give no sample at all (all corrupt or unreachable), instead of spinning forever."""
        empty = 0
        for url in urls:
            n = 0
            for sample in self._read_shard(url):
                n += 1
                yield sample
            empty = 0 if n else empty + 1
            if endless and empty >= max(20, 2 * len(self.urls)):
                raise DataError(f"{empty} shards in a row gave no readable sample (last: {url}); check the shards")

    def _only_task(self, samples: Iterator[dict], task: str) -> Iterator[dict]:
        """The samples of one task (only the small sample.json is parsed here; media stay undecoded)."""
        for sample in samples:
            try:
                keep = json.loads(sample["sample.json"])["task"] == task
            except Exception as e:
                self.counts(DataError(f"sample {sample.get('__key__')!r} in {sample.get('__url__')}: "
                                      f"{type(e).__name__}: {e}"))
                continue
            if keep:
                yield sample

    def _of_tasks(self, samples: Iterator[dict]) -> Iterator[dict]:
        """Drop the samples of tasks not in `self.tasks` (counted as other_task); only sample.json is parsed. A
        sample whose sample.json does not parse is passed on: decoding reports it as corrupt."""
        for sample in samples:
            try:
                task = json.loads(sample["sample.json"])["task"]
            except Exception:
                yield sample
                continue
            if task in self.tasks:
                yield sample
            else:
                self.counts.add("other_task")

    def _draw(self, rng: random.Random, weights: list[float]) -> Iterator[str]:
        while True:
            yield rng.choices(self.urls, weights=weights)[0]

    def _samples(self, epoch: int, worker: int, workers: int) -> Iterator[dict]:
        slot, slots = self.rank * workers + worker, self.world_size * workers
        if not self.resampled:
            urls = list(self.urls)
            if self.shuffle:
                random.Random(f"shards:{self.seed}:{epoch}").shuffle(urls)  # the same order on every rank
            yield from self._shard_samples(iter(urls[slot::slots]), endless=False)
            return
        rng = random.Random(f"resample:{self.seed}:{epoch}:{self.rank}:{worker}")
        if not self.task_weights:
            yield from self._shard_samples(self._draw(rng, self.weights), endless=True)
            return
        tasks = [t for t, w in self.task_weights.items() if w > 0]
        streams = {}
        for t in tasks:
            weights = [tasks_in.get(t, 0) for tasks_in in self.shard_tasks]
            streams[t] = self._only_task(self._shard_samples(self._draw(rng, weights), endless=True), t)
        while True:
            task = rng.choices(tasks, weights=[self.task_weights[t] for t in tasks])[0]
            yield next(streams[task])

    def _decoded(self, raw: Iterator[dict]) -> Iterator[dict]:
        good = bad = 0
        for sample in raw:
            try:
                decoded = decode_sample(sample, self.audio_sample_rate)
            except Exception as e:
                self.counts(DataError(f"sample {sample.get('__key__')!r} in {sample.get('__url__')}: "
                                      f"{type(e).__name__}: {e}"))
                bad += 1
                if bad >= 50 and good == 0:  # not a few corrupt samples: the wrong kind of shards
                    raise DataError(f"none of the first {bad} samples could be decoded (last from "
                                    f"{sample.get('__url__')}); are these shards written by `moefuse build-shards`?"
                                    ) from e
                continue
            good += 1
            yield decoded

    def _batched(self, decoded: Iterator[dict]) -> Iterator[dict]:
        """Collated batches of batch_size samples (the last one may be smaller), each with the counts since the
        previous one. A full batch is yielded at once, before anything more is read (unlike wds.batched, which
        reads the next sample first): counts that arise later go to the next batch, or the count-only one."""
        def collate(samples: list[dict]) -> dict:
            out = self.collator(samples)
            out.update(self.counts.take())
            return out

        batch: list[dict] = []
        for sample in decoded:
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield collate(batch)
                batch = []
        if batch:
            yield collate(batch)

    def _batches(self, epoch: int, worker: int, workers: int) -> Iterator[dict]:
        """The batches of one worker for one epoch, each with its counts (COUNT_KEYS); counts left after the
        last batch come in a count-only batch (`ids == []`) that ShardLoader folds into the next one."""
        self.counts = SkipCounter()  # nothing of an abandoned earlier iteration leaks into this one
        samples = self._samples(epoch, worker, workers)
        if self.tasks is not None:
            samples = self._of_tasks(samples)
        if self.shuffle:
            rng = random.Random(f"shuffle:{self.seed}:{epoch}:{self.rank}:{worker}")
            samples = wds.shuffle(self.shuffle, initial=min(self.shuffle, 100), rng=rng)(samples)
        batches = self._batched(self._decoded(samples))
        if self.batches_per_worker is not None:
            batches = itertools.islice(batches, self.batches_per_worker)
        yield from batches
        if self.counts.has_pending():
            yield {"ids": [], **self.counts.take()}


def _as_is(batch: dict) -> dict:
    # DataLoader's default (batch_size=None) would run default_convert, turning tuples into lists and arrays into
    # tensors; batches leave the stream exactly as the collator made them.
    return batch


def _is_count_only(batch: dict) -> bool:
    ids = batch.get("ids")
    return isinstance(ids, list) and not ids


class ShardLoader(DataLoader):
    """A DataLoader (batch_size=None: the stream batches) that starts the next epoch of its ShardStream each time
    it is iterated; `set_epoch(n)` sets the next epoch explicitly (e.g. when resuming). It folds the workers'
    count-only batches into the next batch it yields; `tail_counts` holds the counts not yet handed to a batch
    (after an iteration: those that came after its last batch)."""

    dataset: ShardStream

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tail_counts = zero_counts()

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def batches_per_rank(self) -> int | None:
        return self.dataset.batches_per_rank()

    def __iter__(self) -> Iterator[dict]:
        it = super().__iter__()  # the workers copy the dataset, with its current epoch, here
        self.dataset.set_epoch(self.dataset.epoch + 1)
        self.tail_counts = zero_counts()
        return self._folded(it, self.tail_counts)

    @staticmethod
    def _folded(batches: Iterator[dict], pending: dict[str, int]) -> Iterator[dict]:
        """Batches with samples only; the counts of count-only batches go to the next one. `pending` (the
        loader's tail_counts of this iteration) always holds the counts not yet handed on."""
        for batch in batches:
            for k in COUNT_KEYS:
                pending[k] += int(batch.get(k, 0))
            if _is_count_only(batch):
                continue
            batch.update(pending)
            for k in COUNT_KEYS:
                pending[k] = 0
            yield batch


# ---------------------------------------------------------------------------------------------------------------
# main things


def loader_option_problems(*, batch_size: int, num_workers: int = 0, shuffle: int = 0, resampled: bool = False,
                           epoch_samples: int | None = None,
                           task_weights: Mapping[str, float] | None = None) -> list[tuple[str, str]]:
    """(option, problem) for each rule of the loader options that these values break, in a fixed order: the one
    place of these rules. `make_loader` raises the first as a DataError; DataConfig checks its values with it
    when the config is read, as a ConfigError naming its own key."""
    weights = task_weights or {}
    rules = [
        ("batch_size", batch_size >= 1, f"must be >= 1, got {batch_size}"),
        ("num_workers", num_workers >= 0, f"must be >= 0, got {num_workers}"),
        ("shuffle", shuffle >= 0, f"must be >= 0, got {shuffle}"),
        ("epoch_samples", epoch_samples is None or resampled,
         "applies only with resampled: true (a finite epoch reads every sample once)"),
        ("epoch_samples", epoch_samples is None or epoch_samples >= 1, f"must be >= 1, got {epoch_samples}"),
        ("task_weights", not weights or resampled,
         "needs resampled: true (task shares need resampled loading: a finite epoch reads every sample once)"),
        ("task_weights", all(w >= 0 for w in weights.values()), "weights must be >= 0"),
        ("task_weights", not weights or sum(weights.values()) > 0, "at least one weight must be > 0"),
    ]
    return [(option, problem) for option, ok, problem in rules if not ok]


def make_loader(sources: str | Sequence[str], collator: Callable, batch_size: int, *, split: str = "train",
                num_workers: int = 0, shuffle: int = 0, resampled: bool = False, epoch_samples: int | None = None,
                rank: int = 0, world_size: int = 1, seed: int = 0, audio_sample_rate: int | None = 16000,
                task_weights: dict[str, float] | None = None, pin_memory: bool = False,
                tasks: Collection[str] | None = None) -> ShardLoader:
    """A loader over one or more sources (see the module docstring); `split` picks the split of dataset folders.

    shuffle: sample shuffle buffer size, 0 = keep shard order (evaluation); shards are also shuffled per epoch
    when > 0. audio_sample_rate: the audio encoder's rate (None keeps the stored rate). tasks: keep only the
    samples of these tasks (the others are counted in batch["other_task"]); None keeps every task."""
    specs = [sources] if isinstance(sources, (str, Path)) else list(sources)
    if not specs:
        raise DataError("no shard sources given")
    if tasks is not None and (isinstance(tasks, str) or not tasks or not all(isinstance(t, str) for t in tasks)):
        raise DataError(f"tasks must be a non-empty list of task names (or None for every task), got {tasks!r}")
    problems = loader_option_problems(batch_size=batch_size, num_workers=num_workers, shuffle=shuffle,
                                      resampled=resampled, epoch_samples=epoch_samples, task_weights=task_weights)
    if problems:
        option, problem = problems[0]
        raise DataError(f"{option}: {problem}")
    if not (world_size >= 1 and 0 <= rank < world_size):
        raise DataError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
    if num_workers > 0:
        # Fast (Rust) tokenizers used in the parent and then forked into workers warn and may deadlock; the
        # collator tokenises inside the workers, so their own thread pool is not needed.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    resolved = [resolve_source(str(s), split) for s in specs]
    stream = ShardStream(resolved, collator, batch_size, shuffle=shuffle, resampled=resampled,
                         epoch_samples=epoch_samples, rank=rank, world_size=world_size, num_workers=num_workers,
                         seed=seed, audio_sample_rate=audio_sample_rate, task_weights=task_weights, tasks=tasks)
    slots = world_size * max(1, num_workers)
    if not resampled and len(stream.urls) < slots:
        warnings.warn(f"{len(stream.urls)} shards for {world_size} ranks x {max(1, num_workers)} workers: "
                      f"{slots - len(stream.urls)} of the {slots} reader slots get no shard and stay idle (every "
                      f"sample is still read once); rebuild with a smaller --maxcount for more shards, or use fewer "
                      f"workers", stacklevel=2)
    return ShardLoader(stream, batch_size=None, collate_fn=_as_is, num_workers=num_workers, pin_memory=pin_memory,
                       persistent_workers=False)


__all__ = ["COUNT_KEYS", "DataError", "ShardLoader", "ShardSource", "ShardStream", "SkipCounter", "collect_tasks",
           "decode_sample", "load_dataset_info", "loader_option_problems", "make_loader", "resolve_source",
           "shard_urls", "validate_dataset_info", "zero_counts"]
