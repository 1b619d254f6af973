"""A self-contained synthetic multimodal dataset (no downloads), written as a manifest plus media files so that
the demo goes through the real `build-shards` path: `make_demo_data(out, count, seed)`, run by `moefuse demo-data`
(moefuse/commands/demo_data.py).

Media: a digit rendered with Pillow's embedded font (Aileron; random size, rotation, position, grey levels and
pixel noise) as a 64x64 PNG; the digit as a DTMF tone pair (ITU-T Q.23 row + column frequencies; random onset,
length and level, white noise) in a 1 s, 16 kHz, 16-bit WAV; short captions that name the digit half the time.
Tasks: `digit` (classification, label "0".."9"; each sample carries a random subset of image, audio and caption
of the same digit, so the missing-modality paths are exercised) and `avqa` (QA over an image of digit a and a
recording of digit b drawn independently, b = a half the time for `same` questions: the written digit, the
spoken digit, their sum, whether they match; answers "0".."18", "yes", "no"). Splits train/val/test 80/10/10
per task. The same --seed and --count give byte-identical files; the manifest is written last, atomically.

demo-data never deletes or overwrites a file it did not write. It keeps a record of its files, OUT/.demo-data.json
(relative path -> sha256), written before any medium (so an interrupted run is still known) and completed after
the manifest. Before writing anything it checks every path it will write: a file there that the record does not
list, or that was changed since demo-data wrote it, stops the run with an error naming it (nothing is written);
a file of an earlier run needs --overwrite. A rerun removes only stale files of its own, unchanged since written.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw, ImageFont

from moefuse.configutil import atomic_write_bytes, atomic_write_text, sha256_file
from moefuse.errors import UserError, naming
from moefuse.progress import progress as progress_bar

SAMPLE_RATE = 16000
CLIP_SECONDS = 1.0
IMAGE_SIZE = 64
# ITU-T Q.23 DTMF: digit -> (row frequency, column frequency) in Hz.
DTMF = {0: (941, 1336), 1: (697, 1209), 2: (697, 1336), 3: (697, 1477), 4: (770, 1209), 5: (770, 1336),
        6: (770, 1477), 7: (852, 1209), 8: (852, 1336), 9: (852, 1477)}
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# (modalities, weight) of `digit` samples; every sample has at least one medium, text never comes alone.
DIGIT_SUBSETS = ((("image", "audio", "text"), 3), (("image", "audio"), 2), (("image",), 2), (("audio",), 2),
                 (("image", "text"), 1), (("audio", "text"), 1))
CAPTIONS_WITH_DIGIT = ("the digit {w}", "a written {w}", "this is the number {w}", "a picture and a sound of {w}")
CAPTIONS_WITHOUT = ("a digit", "what number is this", "a small picture of a number", "a number and a sound")
QUESTIONS = {
    "written": ("what digit is written in the image?", "which number does the picture show?"),
    "spoken": ("what digit is spoken in the audio?", "which number do you hear in the recording?"),
    "sum": ("what is the sum of the written digit and the spoken digit?", "add the two digits: what is the total?"),
    "same": ("are the written digit and the spoken digit the same?", "is the heard digit equal to the written one?"),
}
SPLIT_SHARES = (("train", 0.8), ("val", 0.1), ("test", 0.1))
RECORD = ".demo-data.json"  # what demo-data wrote under --out: {"files": {relative path: [sha256, ...]}}
MANIFEST = "manifest.jsonl"
FOLDERS = ("media", "media/image", "media/audio")
MIN_COUNT, MAX_COUNT = 20, 1_000_000
"""Samples demo-data writes: at least 20 (each task needs train, val and test samples), at most a million (more
adds nothing to a synthetic demo and fills the disk with a few million files)."""
CHUNK = 128  # samples rendered (and recorded) before their files are written


class DemoError(UserError, RuntimeError):
    """The demo data cannot be written; the message says why."""


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str | None:
    """sha256 of a regular file (not a link); None for anything else."""
    if path.is_symlink() or not path.is_file():
        return None
    with naming(path):
        return sha256_file(path)


def _own_path(rel: str) -> bool:
    """A relative path demo-data may write: manifest.jsonl or media/{image,audio}/<name> (never outside --out)."""
    parts = rel.split("/")
    return rel == MANIFEST or (len(parts) == 3 and parts[0] == "media" and parts[1] in ("image", "audio")
                               and parts[2] not in ("", ".", "..") and "\\" not in rel)


def _load_record(out: Path) -> dict[str, list[str]]:
    """{relative path: sha256s demo-data wrote there}; {} when there is no record."""
    path = out / RECORD
    if not os.path.lexists(path):
        return {}
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        bad = [k for k, v in files.items() if not (_own_path(k) and isinstance(v, list)
                                                    and all(isinstance(h, str) for h in v))]
        if bad:
            raise ValueError(f"the entry {bad[0]!r} is not a file demo-data writes")
    except OSError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DemoError(f"{path} is not a demo-data record ({type(e).__name__}: {e}); move it, or choose another "
                        f"--out") from None
    return files


def _save_record(out: Path, files: dict[str, list[str]]) -> None:
    atomic_write_text(out / RECORD, json.dumps({"files": dict(sorted(files.items()))}, indent=1) + "\n")


def render_digit(digit: int, rng: np.random.Generator) -> Image.Image:
    """A grey digit on a darker background, randomly sized, rotated and placed, with mild pixel noise."""
    bg, fg = int(rng.integers(0, 70)), int(rng.integers(170, 256))
    scale = 2  # draw large and downsample: smooth edges at any rotation
    canvas = Image.new("L", (IMAGE_SIZE * scale, IMAGE_SIZE * scale), bg)
    font = ImageFont.load_default(size=int(rng.integers(34, 48)) * scale)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=font)
    cx, cy = (IMAGE_SIZE * scale - (right - left)) / 2, (IMAGE_SIZE * scale - (bottom - top)) / 2
    dx, dy = rng.integers(-4, 5, size=2) * scale
    draw.text((cx - left + dx, cy - top + dy), str(digit), fill=fg, font=font, stroke_width=scale, stroke_fill=fg)
    canvas = canvas.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BICUBIC, fillcolor=bg)
    small = np.asarray(canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX), dtype=np.float64)
    noisy = small + rng.normal(0.0, float(rng.uniform(3, 12)), small.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8), mode="L").convert("RGB")


def dtmf_tone(digit: int, rng: np.random.Generator) -> np.ndarray:
    """1 s of noise with the digit's DTMF tone pair at a random onset and length (float32 in [-1, 1])."""
    n = int(SAMPLE_RATE * CLIP_SECONDS)
    wav = rng.normal(0.0, float(rng.uniform(0.005, 0.03)), n)
    length = int(SAMPLE_RATE * rng.uniform(0.2, 0.45))
    start = int(rng.integers(0, n - length))
    t = np.arange(length) / SAMPLE_RATE
    low, high = DTMF[digit]
    phase = rng.uniform(0, 2 * np.pi, size=2)
    tone = np.sin(2 * np.pi * low * t + phase[0]) + np.sin(2 * np.pi * high * t + phase[1])
    ramp = min(length // 2, int(0.005 * SAMPLE_RATE))  # 5 ms raised-cosine edges: no clicks
    envelope = np.ones(length)
    envelope[:ramp] = envelope[length - ramp:][::-1] = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
    wav[start:start + length] += float(rng.uniform(0.15, 0.35)) * tone * envelope
    return np.clip(wav, -1.0, 1.0).astype(np.float32)


def caption(digit: int, rng: np.random.Generator) -> str:
    if rng.random() < 0.5:
        return CAPTIONS_WITH_DIGIT[int(rng.integers(len(CAPTIONS_WITH_DIGIT)))].format(w=WORDS[digit])
    return CAPTIONS_WITHOUT[int(rng.integers(len(CAPTIONS_WITHOUT)))]


def assign_splits(count: int, seed: int, task_code: int) -> list[str]:
    """80/10/10 by a seeded permutation of the task's sample indices (exact shares)."""
    order = np.random.default_rng([seed, task_code, 999]).permutation(count)
    bounds = np.cumsum([share for _, share in SPLIT_SHARES]) * count
    splits = [""] * count
    for rank, index in enumerate(order):
        splits[index] = SPLIT_SHARES[int(np.searchsorted(bounds.round(), rank, side="right"))][0]
    return splits


# ---------------------------------------------------------------------------------------------------------------
# blocks


def digit_row(i: int, seed: int, media: dict[str, bytes] | None, split: str) -> dict:
    """Sample i of `digit`; its media go to `media`. With media=None nothing is rendered: only the row's id and
    media paths are meaningful (the plan of the files a run writes)."""
    rng = np.random.default_rng([seed, 0, i])
    digit = int(rng.integers(10))
    subsets, weights = zip(*DIGIT_SUBSETS)
    subset = subsets[int(rng.choice(len(subsets), p=np.array(weights) / sum(weights)))]
    sid = f"digit-{i:05d}"
    row: dict = {"id": sid, "task": "digit"}
    if "text" in subset:
        row["text"] = caption(digit, rng)
    if "image" in subset:
        row["image"] = f"media/image/{sid}.png"
        if media is not None:
            media[row["image"]] = png_bytes(render_digit(digit, rng))
    if "audio" in subset:
        row["audio"] = f"media/audio/{sid}.wav"
        if media is not None:
            media[row["audio"]] = wav_bytes(dtmf_tone(digit, rng))
    row.update(label=str(digit), split=split)
    return row


def avqa_row(i: int, seed: int, media: dict[str, bytes] | None, split: str) -> dict:
    """Sample i of `avqa`; media=None as in `digit_row` (only the id and media paths are meaningful then)."""
    rng = np.random.default_rng([seed, 1, i])
    qtype = list(QUESTIONS)[int(rng.integers(len(QUESTIONS)))]
    a = int(rng.integers(10))
    b = a if (qtype == "same" and rng.random() < 0.5) else int(rng.integers(10))
    answer = {"written": str(a), "spoken": str(b), "sum": str(a + b), "same": "yes" if a == b else "no"}[qtype]
    sid = f"avqa-{i:05d}"
    row = {"id": sid, "task": "avqa", "image": f"media/image/{sid}.png", "audio": f"media/audio/{sid}.wav"}
    if media is None:
        return row
    media[row["image"]] = png_bytes(render_digit(a, rng))
    media[row["audio"]] = wav_bytes(dtmf_tone(b, rng))
    wordings = QUESTIONS[qtype]
    row.update(question=wordings[int(rng.integers(len(wordings)))], answer=answer, split=split,
               meta={"qtype": qtype, "image_digit": a, "audio_digit": b})
    return row


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(wav: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wav, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# main things


Job = tuple[Callable[[int, int, "dict[str, bytes] | None", str], dict], int, str]


def _jobs(count: int, seed: int) -> list[Job]:
    n_digit = count // 2
    jobs: list[Job] = [(digit_row, i, split) for i, split in enumerate(assign_splits(n_digit, seed, 0))]
    jobs += [(avqa_row, i, split) for i, split in enumerate(assign_splits(count - n_digit, seed, 1))]
    return jobs


def _media_paths(row: dict) -> list[str]:
    return [row[k] for k in ("image", "audio") if k in row]


def _check_folders(out: Path) -> None:
    """A file where demo-data needs a folder (--out, one of its parents, media/, media/image, media/audio)."""
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out} is a file; give a folder")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise DemoError(f"{parent} is a file where the folder of --out {out} should be; move it or choose another "
                        f"--out")
    for sub in FOLDERS:
        if os.path.lexists(out / sub) and not (out / sub).is_dir():
            raise DemoError(f"{out / sub} is a file where demo-data writes a folder; move it, or choose another --out")
    if os.path.lexists(out / RECORD) and (out / RECORD).is_dir():
        raise DemoError(f"{out / RECORD} is a folder where demo-data keeps its record; move it, or choose another "
                        f"--out")


def _check_paths(out: Path, rels: list[str], record: dict[str, list[str]], overwrite: bool) -> set[str]:
    """Every existing file among `rels` must be demo-data's own, unchanged, and --overwrite given; returns the
    relative paths of demo-data's unchanged files (those of `rels` and the record's others). Raises DemoError."""
    ours, foreign, wanted = set(), [], set(rels)
    for rel in dict.fromkeys([*rels, *record]):
        path = out / rel
        if not os.path.lexists(path):
            continue
        if rel in record and _file_sha256(path) in record[rel]:
            ours.add(rel)
        elif rel in wanted and path.is_dir() and not path.is_symlink():
            raise DemoError(f"{path} is a folder where demo-data writes a file; move it, or choose another --out")
        elif rel in wanted:
            foreign.append((path, "was changed since demo-data wrote it" if rel in record else
                            "was not written by demo-data"))
    if foreign:
        (path, why), more = foreign[0], len(foreign) - 1
        raise DemoError(f"{path} {why}" + (f" (and {more} more files in the way)" if more else "") + "; demo-data "
                        "never overwrites such files: move it, or choose another --out (nothing was written)")
    if ours and not overwrite:
        raise DemoError(f"{out} holds the files of an earlier demo-data run (e.g. {out / sorted(ours)[0]}); pass "
                        f"--overwrite to regenerate it, or choose another folder")
    return ours


def _write_media(out: Path, jobs: list[Job], seed: int, files: dict[str, list[str]], planned: set[str],
                 progress: bool) -> list[dict]:
    """Render the samples CHUNK at a time; each chunk's hashes join the record before its files are written.
    Only `planned` paths (those checked) are written."""
    rows: list[dict] = []
    bar = progress_bar(len(jobs), "demo-data", "sample", enabled=progress)
    try:
        for start in range(0, len(jobs), CHUNK):
            media: dict[str, bytes] = {}
            rows += [make(i, seed, media, split) for make, i, split in jobs[start:start + CHUNK]]
            if not planned.issuperset(media):
                raise RuntimeError(f"demo-data bug: {sorted(set(media) - planned)[0]} was not planned")
            for rel, data in media.items():
                files[rel] = list(dict.fromkeys([*files.get(rel, []), _sha256(data)]))
            _save_record(out, files)
            for rel, data in media.items():
                # no fsync: thousands of small media files that a rerun regenerates (the record and the
                # manifest are written with fsync)
                atomic_write_bytes(out / rel, data, fsync=False)
            bar.update(len(jobs[start:start + CHUNK]))
    finally:
        bar.close()
    return rows


def make_demo_data(out: str | Path, count: int = 2000, seed: int = 0, overwrite: bool = False,
                   progress: bool = True) -> Path:
    """Write `count` samples (half `digit`, half `avqa`) under `out`; returns the manifest path. See the module
    docstring for which files it may overwrite or remove."""
    out = Path(out)
    if not MIN_COUNT <= count <= MAX_COUNT:
        raise DemoError(f"--count must be in [{MIN_COUNT}, {MAX_COUNT}] (each task needs train, val and test samples; "
                        f"a synthetic demo gains nothing from more), got {count}")
    if not 0 <= seed < 2**32:
        raise DemoError(f"--seed must be in [0, 2**32 - 1], got {seed}")
    _check_folders(out)
    record = _load_record(out)
    jobs = _jobs(count, seed)
    planned = [rel for make, i, split in jobs for rel in _media_paths(make(i, seed, None, split))]
    ours = _check_paths(out, [*planned, MANIFEST], record, overwrite)
    # From here on the record lists every file demo-data may have written (old and new hashes), so an interrupted
    # run leaves nothing that a rerun would take for the user's.
    files = {rel: record[rel] for rel in ours}
    for sub in FOLDERS:
        (out / sub).mkdir(parents=True, exist_ok=True)
    rows = _write_media(out, jobs, seed, files, set(planned), progress)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    files[MANIFEST] = list(dict.fromkeys([*files.get(MANIFEST, []), _sha256(text.encode("utf-8"))]))
    _save_record(out, files)
    atomic_write_text(out / MANIFEST, text)
    keep = {*planned, MANIFEST}
    for rel in sorted(ours - keep):  # stale files of an earlier, larger run, unchanged since written
        if _file_sha256(out / rel) in record[rel]:
            (out / rel).unlink()
    _save_record(out, {rel: files[rel][-1:] for rel in keep})
    return out / MANIFEST


__all__ = ["DTMF", "DemoError", "dtmf_tone", "make_demo_data", "render_digit"]
