"""A manifest -> webdataset tar shards plus `dataset.json`: `build_shards(manifest, out, BuildOptions(...))`,
run by `moefuse build-shards` (moefuse/commands/build_shards.py, whose flags are the options' names).

Steps: read and check every row (manifest.py); give rows without a split one (seeded, --val-fraction /
--test-fraction); decode, check and normalise the media of every row over --workers processes (media.py); write
the samples in manifest order, one shard series per split (`train-000000.tar`, ...), each shard closed once it
holds --maxcount samples or --maxsize bytes; then, only if nothing failed, rename the shards to their final names
and write `dataset.json` last. Without --skip-bad one bad row stops the build and nothing is written; with it,
every rejected row goes to `rejected.jsonl` with its reason.

Shard layout follows webdataset's TarWriter conventions: members `<id>.sample.json` (task, type, targets, split,
meta), `<id>.txt` (UTF-8 text), `<id>.png` or `<id>.jpg`, `<id>.flac`; ustar headers with fixed mtime, owner
and mode, so the same manifest and seed give byte-identical shards for any worker count. Since builder version 2,
`sample.json` lists the sample's other members (`"members": ["flac", "png", "txt"]`), so a reader can tell a
sample whose member was lost from one that never had it.

Failures (a full disk, a file in the way, Ctrl-C, SIGTERM) leave no temp file and no partial shard under a final
name, and an earlier build in --out stays as it was until the new one is complete: the new dataset.json and
rejected.jsonl are written to temp files before anything of the old build is replaced.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import re
import signal
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, get_args

from moefuse.configutil import sha256_file
from moefuse.datasets.manifest import SPLITS, ManifestRow, assign_splits, read_manifest
from moefuse.datasets.media import (
    MAX_IMAGE_SIZE,
    ImageFit,
    ImageFormat,
    MediaError,
    check_file,
    encode_flac,
    encode_image,
    load_audio,
    normalise_image,
    open_image,
)
from moefuse.errors import UserError, naming
from moefuse.progress import progress

if TYPE_CHECKING:
    import webdataset as wds

BUILDER_VERSION = 2  # 2: sample.json lists the sample's members
SHARD_MTIME = 0  # fixed member mtime: byte-identical rebuilds (webdataset's TarWriter uses time.time() otherwise)
SHARD_RE = re.compile(r"(train|val|test)-\d{6}\.tar")
TEMP_RE = re.compile(r"\.((train|val|test)-\d{6}\.tar|dataset\.json|rejected\.jsonl)\.\d+\.tmp")
MAX_LISTED = 20


class BuildError(UserError, RuntimeError):
    """The build cannot go on; the message says why and what to do."""


def _choice(flag: str, value: str, literal: Any) -> tuple[bool, str]:
    """A check of `BuildOptions.__post_init__`: `value` is one of the values of the Literal type."""
    allowed = get_args(literal)
    return value in allowed, f"{flag} must be {' or '.join(allowed)}, got {value!r}"


@dataclass
class BuildOptions:
    """build-shards options; the CLI flags have the same names (see `main`)."""

    maxcount: int = 1000
    maxsize: int = 256 * 2**20
    workers: int = 1
    val_fraction: float = 0.1
    test_fraction: float = 0.0
    seed: int = 0
    image_size: int = 64
    image_fit: ImageFit = "pad"
    image_format: ImageFormat = "png"
    sample_rate: int = 16000
    max_file_mb: float = 64.0
    max_image_pixels: int = 64_000_000
    max_audio_seconds: float = 60.0
    skip_bad: bool = False
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.maxcount >= 1, f"--maxcount must be >= 1, got {self.maxcount}"),
            (self.maxsize >= 1, f"--maxsize must be >= 1 byte, got {self.maxsize}"),
            (self.workers >= 1, f"--workers must be >= 1, got {self.workers}"),
            (0 <= self.val_fraction < 1, f"--val-fraction must be in [0, 1), got {self.val_fraction}"),
            (0 <= self.test_fraction < 1, f"--test-fraction must be in [0, 1), got {self.test_fraction}"),
            (self.val_fraction + self.test_fraction < 1, "--val-fraction + --test-fraction must be < 1"),
            (8 <= self.image_size <= MAX_IMAGE_SIZE, f"--image-size must be in [8, {MAX_IMAGE_SIZE}] pixels, got "
                                                     f"{self.image_size}"),
            _choice("--image-fit", self.image_fit, ImageFit),
            _choice("--image-format", self.image_format, ImageFormat),
            (self.sample_rate >= 1000, f"--sample-rate must be >= 1000 Hz, got {self.sample_rate}"),
            (0 < self.max_file_mb < math.inf, f"--max-file-mb must be a finite number > 0, got {self.max_file_mb}"),
            (self.max_image_pixels > 0, f"--max-image-pixels must be > 0, got {self.max_image_pixels}"),
            (0 < self.max_audio_seconds < math.inf,
             f"--max-audio-seconds must be a finite number > 0, got {self.max_audio_seconds}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise BuildError(msg)


# ---------------------------------------------------------------------------------------------------------------
# helpers


def vocabulary_order(value: str) -> tuple:
    """Integers numerically first ("2" before "10"), then the other strings alphabetically."""
    return (0, int(value), "") if re.fullmatch(r"-?\d+", value) else (1, 0, value)


def parse_size(text: str) -> int:
    """"256MB", "1G", "500k" or plain bytes -> bytes (binary multiples, like ShardWriter's maxsize)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 256MB, 1G or 1000000")
    size = int(float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2) or "_"))
    if size < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return size


def describe(row: ManifestRow) -> str:
    return f"line {row.line}" + (f", id {row.id!r}" if row.id else "") + ": " + "; ".join(row.errors)


def bad_rows_message(manifest: Path, out: Path, bad: list[ManifestRow], total: int, skip_bad: bool) -> str:
    lines = [f"{len(bad)} of {total} rows of {manifest} are bad; nothing was written."]
    lines += [f"  {describe(r)}" for r in bad[:MAX_LISTED]]
    if len(bad) > MAX_LISTED:
        lines.append(f"  ... and {len(bad) - MAX_LISTED} more ({len(bad)} bad rows in total)")
    if skip_bad:
        lines.append("Every row is bad, so there is nothing to write.")
    else:
        lines.append(f"Fix these rows, or pass --skip-bad to write the good rows and list the bad ones with their "
                     f"reasons in {out / 'rejected.jsonl'}.")
    return "\n".join(lines)


def sample_members(row: ManifestRow, opts: BuildOptions) -> dict[str, bytes]:
    """One row -> its tar members (without the key); `sample.json` lists the others under "members". Raises
    MediaError for a bad image or recording."""
    meta: dict[str, Any] = {"id": row.id, "task": row.task, "type": row.type, "split": row.split, "meta": row.meta}
    if row.type == "classification":
        meta["label"] = row.label
    else:
        meta.update(question=row.question, answer=row.answer)
    members = {"sample.json": b""}  # first, filled in below once the other members are known
    if row.text is not None:
        members["txt"] = row.text.encode("utf-8")
    max_bytes = int(opts.max_file_mb * 2**20)
    if row.image is not None:
        check_file(row.image, "image", max_bytes)
        img = open_image(row.image, opts.max_image_pixels)
        try:  # an exotic pixel format that decodes but does not convert is one bad row, not a crashed build
            members[opts.image_format] = encode_image(normalise_image(img, opts.image_size, opts.image_fit),
                                                      opts.image_format)
        except Exception as e:
            raise MediaError(f"image {row.image} ({img.mode}, {img.size[0]}x{img.size[1]}) cannot be converted to "
                             f"RGB: {type(e).__name__}: {e}") from None
    if row.audio is not None:
        check_file(row.audio, "audio", max_bytes)
        members["flac"] = encode_flac(load_audio(row.audio, opts.sample_rate, opts.max_audio_seconds),
                                      opts.sample_rate)
    meta["members"] = sorted(k for k in members if k != "sample.json")
    members["sample.json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return members


def _encode_job(row: ManifestRow, opts: BuildOptions) -> tuple[dict[str, bytes] | None, str | None]:
    """Worker entry point: (members, None) or (None, reason). Only MediaError (an expected bad file) is turned
    into a reason; anything else is a bug and propagates."""
    try:
        return sample_members(row, opts), None
    except MediaError as e:
        return None, str(e)


def _init_worker() -> None:
    # The parent handles Ctrl-C and SIGTERM and tears the pool down; one torch thread per process (no
    # oversubscription when several worker processes run at once).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------------
# blocks


class ShardSeries:
    """The shards of one split: `{split}-{i:06d}.tar`, each written to a hidden temp file in the output folder
    and renamed only by `commit` (so a final name always holds a complete shard)."""

    def __init__(self, out: Path, split: str, opts: BuildOptions):
        self.out, self.split, self.opts = out, split, opts
        self.shards: list[dict] = []  # {"name", "samples", "bytes", "sha256", "tasks"}
        self.temps: list[Path] = []
        self._file: BinaryIO | None = None
        self._tar: wds.TarWriter | None = None
        self._count = self._size = 0
        self._tasks: Counter = Counter()

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):06d}.tar"
        temp = self.out / f".{name}.{os.getpid()}.tmp"
        self.temps.append(temp)
        self._file = open(temp, "wb")
        import webdataset as wds  # here, not at the top: it imports torch, which `build-shards --help` need not

        self._tar = wds.TarWriter(self._file, encoder=False, mtime=SHARD_MTIME)
        self.shards.append({"name": name})
        self._count = self._size = 0
        self._tasks = Counter()

    def _close(self) -> None:
        if self._tar is None:
            return
        temp = self.temps[-1]
        with naming(temp):  # a full disk fails in flush() with an OSError that names no file
            self._tar.close()  # writes the end-of-archive blocks; the file object stays ours
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        self.shards[-1].update(samples=self._count, bytes=temp.stat().st_size, sha256=sha256_file(temp),
                               tasks=dict(sorted(self._tasks.items())))
        self._tar = self._file = None

    def write(self, key: str, task: str, members: dict[str, bytes]) -> None:
        # The same rule as webdataset's ShardWriter: start a new shard once this one is full.
        if self._tar is not None and (self._count >= self.opts.maxcount or self._size >= self.opts.maxsize):
            self._close()
        if self._tar is None:
            self._open()
        with naming(self.temps[-1]):
            self._size += self._tar.write({"__key__": key, **members})
        self._count += 1
        self._tasks[task] += 1

    def finish(self) -> None:
        self._close()

    def discard(self) -> None:
        """Remove every temp file (on failure); safe to call twice; never raises (it runs while another error
        unwinds, often a full disk that makes the closing flushes fail again)."""
        # Close the tar stream before its file, or it tries to write its end blocks when collected. Both closes
        # flush buffered data and may fail once more; the file is closed all the same.
        for close in (self._tar.close if self._tar is not None else None,
                      self._file.close if self._file is not None else None):
            try:
                if close is not None:
                    close()
            except Exception:
                pass
        self._tar = self._file = None
        for temp in self.temps:
            _remove_quietly(temp)
        self.temps = []

    def commit(self) -> None:
        for temp, shard in zip(self.temps, self.shards):
            os.replace(temp, self.out / shard["name"])
        self.temps = []


def _remove_quietly(path: Path) -> None:
    """Remove a temp file of this build; a failure is a warning (it runs while another error unwinds)."""
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        print(f"build-shards: warning: cannot remove the temp file {path}: {e.strerror or e}", file=sys.stderr)


def _write_temp(out: Path, name: str, text: str) -> Path:
    """`text` in a hidden temp file `out/.{name}.{pid}.tmp`, fsynced; renamed into place by the commit. A failure
    (a full disk) removes the temp file and raises an OSError that names it."""
    temp = out / f".{name}.{os.getpid()}.tmp"
    try:
        with naming(temp), open(temp, "wb") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _remove_quietly(temp)
        raise
    return temp


def existing_dataset(out: Path) -> list[Path]:
    """Files of an earlier build in `out`: dataset.json, shards, rejected.jsonl."""
    if not out.is_dir():
        return []
    names = [p for p in out.iterdir() if SHARD_RE.fullmatch(p.name)]
    names += [out / n for n in ("dataset.json", "rejected.jsonl") if (out / n).exists()]
    return sorted(names)


def prepare_output(out: Path, overwrite: bool) -> list[Path]:
    """Create `out`; refuse to mix with an earlier build unless --overwrite; clear temps of killed builds.
    Returns the earlier build's files (removed or replaced only after this build succeeds)."""
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out} is a file; give a folder")
    in_the_way = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if in_the_way is not None:
        raise BuildError(f"--out {out}: {in_the_way} is a file, not a folder; move it or choose another --out")
    old = existing_dataset(out)
    if old and not overwrite:
        raise BuildError(f"--out {out} already holds a built dataset ({old[0].name}, ...); pass --overwrite to "
                         f"replace it, or choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():
        if TEMP_RE.fullmatch(stale.name):  # left by a build that was killed (SIGKILL cannot be cleaned up after)
            stale.unlink(missing_ok=True)
    return old


def encoded_rows(rows: list[ManifestRow], opts: BuildOptions) -> Iterator[tuple[dict | None, str | None]]:
    """(members, reason) for each row, in row order, over `opts.workers` processes; with a progress bar."""
    job = partial(_encode_job, opts=opts)
    bar = progress(len(rows), "build-shards", "sample", enabled=opts.progress)
    try:
        if opts.workers == 1 or len(rows) < 2:
            for row in rows:
                result = job(row)
                bar.update()
                yield result
            return
        chunk = max(1, min(32, len(rows) // (opts.workers * 8)))
        with multiprocessing.Pool(opts.workers, initializer=_init_worker) as pool:
            # imap keeps row order, so shard contents do not depend on the worker count.
            for result in pool.imap(job, rows, chunksize=chunk):
                bar.update()
                yield result
    finally:
        bar.close()


def dataset_summary(rows: list[ManifestRow], series: dict[str, ShardSeries], manifest: Path,
                    opts: BuildOptions, rejected: int) -> dict:
    """The contents of dataset.json (see the module docstring of this file and the README)."""
    good = [r for r in rows if not r.errors]
    splits = [s for s in SPLITS if s in series and series[s].shards]
    tasks: dict[str, dict] = {}
    for name in sorted({r.task for r in good}):
        task_rows = [r for r in good if r.task == name]
        kind = task_rows[0].type
        train = {r.target for r in task_rows if r.split == "train"}
        source = "train" if train else "all splits"  # a task without train rows (e.g. a test-only build)
        vocab = sorted(train or {r.target for r in task_rows}, key=vocabulary_order)
        per_split = Counter(r.split for r in task_rows)
        tasks[name] = {"type": kind, ("labels" if kind == "classification" else "answers"): vocab,
                       "vocabulary_from": source, "samples": {s: per_split[s] for s in SPLITS if per_split[s]}}
    counts: dict[str, dict] = {}
    unseen: dict[str, dict] = {}
    for split in splits:
        by_task: dict[str, Counter] = defaultdict(Counter)
        missing: dict[str, Counter] = defaultdict(Counter)
        for r in good:
            if r.split != split:
                continue
            by_task[r.task][r.modalities()] += 1
            if split != "train" and tasks[r.task]["vocabulary_from"] == "train":
                vocab = tasks[r.task].get("labels") or tasks[r.task].get("answers")
                if r.target not in vocab:
                    missing[r.task][r.target] += 1
        counts[split] = {t: dict(sorted(c.items())) for t, c in sorted(by_task.items())}
        if missing:
            unseen[split] = {t: dict(sorted(c.items(), key=lambda kv: vocabulary_order(kv[0])))
                             for t, c in sorted(missing.items())}
    return {
        "builder_version": BUILDER_VERSION,
        "created_from": {"manifest": str(manifest.resolve()), "sha256": sha256_file(manifest)},
        "build": {"seed": opts.seed, "val_fraction": opts.val_fraction, "test_fraction": opts.test_fraction,
                  "maxcount": opts.maxcount, "maxsize": opts.maxsize, "max_image_pixels": opts.max_image_pixels,
                  "max_audio_seconds": opts.max_audio_seconds},
        "media": {"image_size": opts.image_size, "image_fit": opts.image_fit, "image_format": opts.image_format,
                  "sample_rate": opts.sample_rate, "audio_format": "flac", "audio_subtype": "PCM_16"},
        "splits": {s: {"samples": sum(sh["samples"] for sh in series[s].shards), "shards": series[s].shards}
                   for s in splits},
        "tasks": tasks,
        "counts": counts,
        "unseen_targets": unseen,
        "rejected": rejected,
    }


def warn_unseen(unseen: dict) -> None:
    for split, by_task in unseen.items():
        for task, values in by_task.items():
            shown = ", ".join(f"{v!r} ({n})" for v, n in list(values.items())[:10])
            more = f" and {len(values) - 10} more values" if len(values) > 10 else ""
            print(f"build-shards: warning: {sum(values.values())} {split} samples of task {task!r} have a target that "
                  f"never occurs in train: {shown}{more}; the model cannot predict them (counted in dataset.json "
                  f"unseen_targets)", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# main things


def build_shards(manifest: str | Path, out: str | Path, opts: BuildOptions | None = None) -> dict:
    """Build webdataset shards and dataset.json from a manifest; returns the dataset.json contents.

    Raises ManifestError (the file as a whole is unusable), BuildError (bad rows without skip_bad, an output
    folder that holds another build, ...) or OSError naming the path (a full disk). On any failure, Ctrl-C
    included, no shard, temp file or new dataset.json is left, and an earlier build in `out` is unchanged."""
    opts = opts or BuildOptions()
    manifest, out = Path(manifest), Path(out)
    rows = read_manifest(manifest)
    created = not out.exists()
    old = prepare_output(out, opts.overwrite)
    good = [r for r in rows if not r.errors]
    assign_splits(good, opts.val_fraction, opts.test_fraction, opts.seed)
    series = {s: ShardSeries(out, s, opts) for s in SPLITS}
    results = encoded_rows(good, opts)
    try:
        # Rows with field errors stop the writing at once (without --skip-bad); their media are still checked.
        _write_rows(good, results, series, writing=opts.skip_bad or len(good) == len(rows), skip_bad=opts.skip_bad)
        bad = [r for r in rows if r.errors]
        if len(bad) == len(rows) or (bad and not opts.skip_bad):
            raise BuildError(bad_rows_message(manifest, out, bad, len(rows), opts.skip_bad))
        for s in series.values():
            s.finish()
        info = dataset_summary(rows, series, manifest, opts, rejected=len(bad))
        _commit(out, series, info, bad, old)
    except BaseException:
        _clean_up(results, series, out if created else None)
        raise
    warn_unseen(info["unseen_targets"])
    return info


def _write_rows(good: list[ManifestRow], results: Iterator[tuple[dict | None, str | None]],
                series: dict[str, ShardSeries], *, writing: bool, skip_bad: bool) -> None:
    """Write each good row's members to its split's shards; a row whose media fail gets the reason in its
    errors. Without skip_bad, the first bad medium stops the writing, but the media of the other rows are still
    checked, so that one run lists every bad row."""
    for row, (members, reason) in zip(good, results):
        if reason is not None:
            row.errors.append(reason)
            if writing and not skip_bad:
                writing = False  # keep checking the remaining rows, but nothing will be written
                for s in series.values():
                    s.discard()
            continue
        if writing:
            series[row.split].write(row.id, row.task, members)


def _commit(out: Path, series: dict[str, ShardSeries], info: dict, bad: list[ManifestRow], old: list[Path]) -> None:
    """Put the finished build in place. Everything that writes data (and so can fail on a full disk) happens
    first, into temp files; only then is the earlier build touched: its dataset.json goes first (a folder without
    one is "being built"), shards are renamed into place, stale files of the old build are removed, and the new
    dataset.json comes last."""
    temps: list[Path] = []
    try:
        temps.append(_write_temp(out, "dataset.json", json.dumps(info, indent=2, ensure_ascii=False) + "\n"))
        if bad:
            temps.append(_write_temp(out, "rejected.jsonl", "".join(
                json.dumps({"line": r.line, "id": r.id, "reason": "; ".join(r.errors), "row": r.raw},
                           ensure_ascii=False, default=str) + "\n" for r in bad)))
        (out / "dataset.json").unlink(missing_ok=True)
        for s in series.values():
            s.commit()
        if bad:
            os.replace(temps[1], out / "rejected.jsonl")
        new = {out / sh["name"] for s in series.values() for sh in s.shards}
        for path in old:
            if path not in new and path.name != "dataset.json" and not (bad and path.name == "rejected.jsonl"):
                path.unlink(missing_ok=True)
        os.replace(temps[0], out / "dataset.json")
    except BaseException:
        for temp in temps:
            _remove_quietly(temp)
        raise


def _clean_up(results: Iterator, series: dict[str, ShardSeries], created: Path | None) -> None:
    """After a failure: stop the worker pool, remove every temp shard, and the output folder if this build
    created it and it is empty. Never raises, so the error that caused the failure is the one reported."""
    try:
        results.close()  # terminates the worker pool
    except Exception:
        pass
    for s in series.values():
        s.discard()
    try:
        if created is not None and created.is_dir() and not any(created.iterdir()):
            created.rmdir()
    except OSError:
        pass


__all__ = ["BUILDER_VERSION", "BuildError", "BuildOptions", "ShardSeries", "build_shards", "parse_size"]
