"""Build the AV-digits benchmark (tasks `digit` and `avqa`) from real FSDD recordings and MNIST test images.

Usage::

    python benchmarks/avdigits/prepare.py --fsdd ../shared/data/fsdd --mnist ../shared/data/mnist --out data/avd

writes ``OUT/images/<id>.png`` (28x28 grayscale), ``OUT/audio/<id>.wav`` (8 kHz mono PCM_16), ``OUT/prepare.json``
(arguments, counts, corruption parameters, sources used) and, last, ``OUT/manifest.jsonl`` (the project's JSON Lines
manifest: ``id``, ``task``, ``image``, ``audio``, ``label`` or ``question``/``answer``, ``split``, ``meta``).

Tasks
-----
``digit`` (classification, label ``"0"``..``"9"``): an MNIST image and an FSDD recording of the *same* digit, both
corrupted so that neither modality alone is reliable but the pair usually is:

* image: ``IMAGE_RECTS`` = 1 or 2 rectangles (equally likely) together covering a fraction drawn uniformly from
  ``IMAGE_OCCLUSION`` = [0.3, 0.6] of the digit's bounding box (pixels > 0.1), each rectangle with aspect ratio
  log-uniform in [1/2, 2], placed uniformly inside the box (not overlapping the first where possible) and filled with
  one grey level drawn uniformly from [0, 1]; then additive Gaussian pixel noise of std ``IMAGE_NOISE_STD`` = 0.3
  (intensity range [0, 1]), clipped to [0, 1] and rounded to uint8;
* audio: additive white Gaussian noise at an SNR drawn uniformly from ``AUDIO_SNR_DB`` = [3, 15] dB (signal power =
  mean square of the whole recording; FSDD recordings are trimmed to the spoken word), the mix scaled down as a
  whole if its peak exceeds 0.99 (which keeps the SNR).

Chosen with proxy classifiers scored on ``val`` (details in README.md): a small CNN reaches about 0.69 accuracy from
the corrupted image alone (0.99 clean), a log-mel CNN about 0.43 from the noisy audio alone (0.67 clean: the new
speaker is hard even without noise), and their late fusion about 0.77.

``avqa`` (QA): an image of digit a and a recording of digit b drawn independently (for the ``same`` question, b = a
with probability 0.5, else one of the nine other digits), and one of five question types, balanced
(``QUESTION_TEMPLATES``, four wordings each):
``written`` (a), ``spoken`` (b), ``sum`` (a + b), ``same`` (yes/no), ``larger`` (is b > a: yes/no). Answers are
``"0"``..``"18"``, ``"yes"``, ``"no"``. Media are clean (unmodified MNIST pixels and FSDD samples), so the task tests
reasoning over the modalities rather than denoising.

Splits (speaker- and image-disjoint)
------------------------------------
``train``: speakers george, jackson, lucas, nicolas, MNIST test indices 0..6999; ``val``: speaker theo, indices
7000..7999. ``reserved`` (speaker yweweler, indices 8000..9999) is read only when ``--split reserved`` is given; its
rows get ``"split": "test"`` and go to ``manifest-reserved.jsonl``.

Randomness comes only from ``--seed`` (numpy ``default_rng`` seeded per split, task and sample), so the same
arguments give byte-identical files, and ``--limit`` keeps a prefix of the full-size sample list. Every file is
written to a temporary name and renamed; manifests are removed at the start and written last, so a killed run never
leaves a manifest that names missing files.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import math
import os
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import soundfile as sf
from PIL import Image

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is a project dependency
    tqdm = None

# ----------------------------------------------------------------------------------------------------------------
# Fixed benchmark definition.

TRAIN_SPEAKERS = ("george", "jackson", "lucas", "nicolas")
VAL_SPEAKERS = ("theo",)
RESERVED_SPEAKERS = ("yweweler",)
SPLITS: dict[str, dict[str, Any]] = {
    # split name -> speakers, MNIST index range [lo, hi), value written to the manifest's `split` field
    "train": {"speakers": TRAIN_SPEAKERS, "mnist": (0, 7000), "manifest_split": "train"},
    "val": {"speakers": VAL_SPEAKERS, "mnist": (7000, 8000), "manifest_split": "val"},
    "reserved": {"speakers": RESERVED_SPEAKERS, "mnist": (8000, 10000), "manifest_split": "test"},
}
SPLIT_CODES = {"train": 0, "val": 1, "reserved": 2}
TASK_CODES = {"digit": 0, "avqa": 1}

IMAGE_RECTS = (1, 2)
IMAGE_OCCLUSION = (0.3, 0.6)
IMAGE_ASPECT = (0.5, 2.0)
IMAGE_FILL = (0.0, 1.0)
IMAGE_NOISE_STD = 0.3
AUDIO_SNR_DB = (3.0, 15.0)
AUDIO_PEAK = 0.99
AVQA_SAME_PROB = 0.5

QTYPES = ("written", "spoken", "sum", "same", "larger")
QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "written": (
        "What digit is written?",
        "Which digit is shown in the image?",
        "What number does the picture show?",
        "Read the handwritten digit: which one is it?",
    ),
    "spoken": (
        "What digit is spoken?",
        "Which digit do you hear in the recording?",
        "What number does the speaker say?",
        "Listen to the audio: which digit is said?",
    ),
    "sum": (
        "What is the sum of the written digit and the spoken digit?",
        "Add the digit in the image to the digit in the audio. What do you get?",
        "What do the shown digit and the heard digit add up to?",
        "If you add the spoken number to the written number, what is the result?",
    ),
    "same": (
        "Are the written digit and the spoken digit the same?",
        "Does the recording say the digit shown in the image?",
        "Is the heard digit equal to the written one?",
        "Do the image and the audio show the same number?",
    ),
    "larger": (
        "Is the spoken digit larger than the written digit?",
        "Is the number you hear greater than the number you see?",
        "Does the audio say a bigger digit than the image shows?",
        "Is the heard digit higher than the written one?",
    ),
}
ANSWERS = tuple(str(i) for i in range(19)) + ("yes", "no")

FSDD_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")
MNIST_IMAGES = "t10k-images-idx3-ubyte"
MNIST_LABELS = "t10k-labels-idx1-ubyte"


class PrepareError(ValueError):
    """Bad input (folder, file, option); the message names the offending thing."""


class Recording(NamedTuple):
    """One FSDD recording: `{digit}_{speaker}_{index}.wav`."""

    path: Path
    digit: int
    speaker: str
    index: int


# ----------------------------------------------------------------------------------------------------------------
# Reading the sources.


def _read_maybe_gz(folder: Path, stem: str) -> tuple[Path, bytes]:
    for name in (stem + ".gz", stem):
        path = folder / name
        if path.is_file():
            raw = path.read_bytes()
            return path, gzip.decompress(raw) if name.endswith(".gz") else raw
    raise PrepareError(f"MNIST file {stem}.gz not found in --mnist folder {folder}")


def load_mnist(folder: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read the MNIST test set (IDX files, gzipped or not) as (uint8 images N x 28 x 28, uint8 labels N)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PrepareError(f"--mnist folder {folder} does not exist or is not a folder")
    if not any(folder.iterdir()):
        raise PrepareError(f"--mnist folder {folder} is empty")
    img_path, img = _read_maybe_gz(folder, MNIST_IMAGES)
    lab_path, lab = _read_maybe_gz(folder, MNIST_LABELS)
    for path, data, expected, kind in ((img_path, img, 2051, "image"), (lab_path, lab, 2049, "label")):
        found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
        if found != expected:
            raise PrepareError(f"{path}: wrong MNIST magic number {found} (expected {expected} for a {kind} file)")
    if len(img) < 16 or len(lab) < 8:
        raise PrepareError(f"{img_path} or {lab_path}: truncated IDX header")
    n, rows, cols = np.frombuffer(img, dtype=">u4", count=3, offset=4).astype(int)
    (n_lab,) = np.frombuffer(lab, dtype=">u4", count=1, offset=4).astype(int)
    if len(img) != 16 + n * rows * cols:
        raise PrepareError(f"{img_path}: size {len(img)} bytes does not match header {n} x {rows} x {cols}")
    if len(lab) != 8 + n_lab or n_lab != n:
        raise PrepareError(f"{lab_path}: {n_lab} labels ({len(lab)} bytes) do not match {n} images in {img_path}")
    images = np.frombuffer(img, dtype=np.uint8, offset=16).reshape(n, rows, cols)
    labels = np.frombuffer(lab, dtype=np.uint8, offset=8)
    if labels.max(initial=0) > 9:
        raise PrepareError(f"{lab_path}: label {int(labels.max())} outside 0..9")
    return images, labels


def find_recordings(folder: str | os.PathLike[str]) -> list[Recording]:
    """List FSDD recordings in `folder` or in its `recordings/` subfolder, sorted by (speaker, digit, index)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PrepareError(f"--fsdd folder {folder} does not exist or is not a folder")
    if not any(folder.iterdir()):
        raise PrepareError(f"--fsdd folder {folder} is empty")
    where = folder / "recordings" if (folder / "recordings").is_dir() else folder
    recs = []
    for path in where.iterdir():
        m = FSDD_NAME.match(path.name)
        if m and path.is_file():
            recs.append(Recording(path, int(m.group(1)), m.group(2), int(m.group(3))))
    if not recs:
        raise PrepareError(f"--fsdd folder {folder}: no recordings named {{digit}}_{{speaker}}_{{index}}.wav found")
    return sorted(recs, key=lambda r: (r.speaker, r.digit, r.index))


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """Read a WAV file as mono float32 in [-1, 1] and its sample rate."""
    x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    x = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
    if x.size == 0:
        raise PrepareError(f"{path}: empty recording")
    return np.ascontiguousarray(x), int(sr)


# ----------------------------------------------------------------------------------------------------------------
# Corruptions (pure functions of the input and a numpy Generator).


def corrupt_image(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """Occlude 1-2 rectangles of the digit's bounding box and add Gaussian pixel noise; returns uint8 and info."""
    x = img.astype(np.float64) / 255.0
    h, w = x.shape
    ys, xs = np.nonzero(x > 0.1)
    if ys.size:
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    else:
        y0, y1, x0, x1 = 0, h, 0, w
    bh, bw = y1 - y0, x1 - x0
    k = int(rng.choice(IMAGE_RECTS))
    target = float(rng.uniform(*IMAGE_OCCLUSION))
    mask = np.zeros((h, w), dtype=bool)
    for _ in range(k):
        area = target / k * bh * bw
        aspect = math.exp(rng.uniform(math.log(IMAGE_ASPECT[0]), math.log(IMAGE_ASPECT[1])))
        rh = int(np.clip(round(math.sqrt(area * aspect)), 1, bh))
        rw = int(np.clip(round(area / rh), 1, bw))
        for _try in range(20):  # avoid overlapping the first rectangle where possible, so coverage ~ target
            ty = y0 + int(rng.integers(0, bh - rh + 1))
            tx = x0 + int(rng.integers(0, bw - rw + 1))
            if not mask[ty : ty + rh, tx : tx + rw].any():
                break
        fill = float(rng.uniform(*IMAGE_FILL))
        x[ty : ty + rh, tx : tx + rw] = fill
        mask[ty : ty + rh, tx : tx + rw] = True
    x = x + rng.normal(0.0, IMAGE_NOISE_STD, size=x.shape)
    out = np.clip(np.rint(np.clip(x, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)
    covered = float(mask[y0:y1, x0:x1].mean())
    return out, {"occlusion_rects": k, "occlusion_fraction": round(covered, 4)}


def corrupt_audio(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """Add white Gaussian noise at a random SNR (dB); rescale if the peak would clip. Returns float32 and info."""
    snr_db = float(rng.uniform(*AUDIO_SNR_DB))
    power = float(np.mean(np.square(x, dtype=np.float64)))
    noise_std = math.sqrt(max(power, 1e-12) / 10.0 ** (snr_db / 10.0))
    y = x.astype(np.float64) + rng.normal(0.0, noise_std, size=x.shape)
    peak = float(np.max(np.abs(y)))
    if peak > AUDIO_PEAK:
        y *= AUDIO_PEAK / peak
    return y.astype(np.float32), {"snr_db": round(snr_db, 3)}


# ----------------------------------------------------------------------------------------------------------------
# Writing files atomically.


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp alone makes 0600 files nobody else can read


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_png(path: Path, img: np.ndarray) -> None:
    """Write a uint8 grayscale image as PNG (deterministic bytes), atomically."""
    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="PNG")
    _atomic_write_bytes(path, buf.getvalue())


def write_wav(path: Path, x: np.ndarray, sr: int) -> None:
    """Write mono float audio as 16-bit PCM WAV, atomically."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(x, -1.0, 1.0), sr, subtype="PCM_16", format="WAV")
    _atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------------------------
# Sample plans: which recording / image goes into which sample (no file I/O).


def _split_recordings(recs: list[Recording], split: str, fsdd: Path) -> dict[str, list[Recording]]:
    by_speaker: dict[str, list[Recording]] = {}
    for speaker in SPLITS[split]["speakers"]:
        chosen = [r for r in recs if r.speaker == speaker]
        if not chosen:
            raise PrepareError(f"no recordings found for speaker {speaker!r} (split {split}) in --fsdd folder {fsdd}")
        missing = sorted(set(range(10)) - {r.digit for r in chosen})
        if missing:
            raise PrepareError(f"speaker {speaker!r} has no recordings of digit(s) {missing} in --fsdd folder {fsdd}")
        by_speaker[speaker] = chosen
    return by_speaker


def _image_pools(labels: np.ndarray, split: str) -> dict[int, np.ndarray]:
    lo, hi = SPLITS[split]["mnist"]
    hi = min(hi, len(labels))
    idx = np.arange(lo, hi)
    pools = {d: idx[labels[lo:hi] == d] for d in range(10)}
    empty = [d for d, p in pools.items() if p.size == 0]
    if empty:
        raise PrepareError(f"MNIST indices {lo}..{hi - 1} (split {split}) hold no image of digit(s) {empty}")
    return pools


def _draw_without_replacement(pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` items of `pool`, each used once before any is reused (whole permutations concatenated)."""
    reps = -(-n // len(pool)) if n else 0
    return np.concatenate([rng.permutation(pool) for _ in range(reps)] or [pool[:0]])[:n]


def plan_digit(recs: dict[str, list[Recording]], pools: dict[int, np.ndarray], split: str, seed: int,
               per_speaker_digit: int | None) -> list[dict[str, Any]]:
    """Every (or `per_speaker_digit` per speaker and digit) recording once, with a random same-digit image."""
    rng = np.random.default_rng([seed, TASK_CODES["digit"], SPLIT_CODES[split], 0])
    chosen: list[Recording] = []
    for speaker in sorted(recs):
        for d in range(10):
            group = [r for r in recs[speaker] if r.digit == d]
            if per_speaker_digit is not None and per_speaker_digit < len(group):
                keep = np.sort(rng.choice(len(group), size=per_speaker_digit, replace=False))
                group = [group[i] for i in keep]
            chosen.extend(group)
    order = rng.permutation(len(chosen))
    chosen = [chosen[i] for i in order]
    images: dict[int, np.ndarray] = {}
    for d in range(10):
        images[d] = _draw_without_replacement(pools[d], sum(r.digit == d for r in chosen), rng)
    used = Counter()
    plan = []
    for rec in chosen:
        plan.append({"rec": rec, "mnist_index": int(images[rec.digit][used[rec.digit]])})
        used[rec.digit] += 1
    return plan


def plan_avqa(recs: dict[str, list[Recording]], pools: dict[int, np.ndarray], split: str, seed: int,
              count: int) -> list[dict[str, Any]]:
    """`count` (image a, recording b, question) triples; qtypes balanced; for `same`, b = a with probability 0.5."""
    rng = np.random.default_rng([seed, TASK_CODES["avqa"], SPLIT_CODES[split], 0])
    speakers = sorted(recs)
    by_digit = {(s, d): [r for r in recs[s] if r.digit == d] for s in speakers for d in range(10)}
    qtypes = [QTYPES[i % len(QTYPES)] for i in range(count)]  # balanced question types, in random order
    plan = []
    for i in rng.permutation(count):
        qtype = qtypes[int(i)]
        a = int(rng.integers(10))
        if qtype != "same":
            b = int(rng.integers(10))
        elif rng.random() < AVQA_SAME_PROB:
            b = a
        else:  # a different digit, so exactly AVQA_SAME_PROB of `same` questions are "yes" in expectation
            b = int((a + rng.integers(1, 10)) % 10)
        speaker = speakers[int(rng.integers(len(speakers)))]
        group = by_digit[(speaker, b)]
        rec = group[int(rng.integers(len(group)))]
        pool = pools[a]
        mnist_index = int(pool[int(rng.integers(len(pool)))])
        wording = int(rng.integers(len(QUESTION_TEMPLATES[qtype])))
        plan.append({"rec": rec, "mnist_index": mnist_index, "qtype": qtype, "a": a, "b": b, "wording": wording})
    return plan


def avqa_answer(qtype: str, a: int, b: int) -> str:
    """The answer string for question type `qtype` about written digit `a` and spoken digit `b`."""
    if qtype == "written":
        return str(a)
    if qtype == "spoken":
        return str(b)
    if qtype == "sum":
        return str(a + b)
    if qtype == "same":
        return "yes" if a == b else "no"
    if qtype == "larger":
        return "yes" if b > a else "no"
    raise ValueError(f"unknown question type {qtype!r}")


# ----------------------------------------------------------------------------------------------------------------
# Command line.


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        prog="prepare.py",
        description="Build the AV-digits benchmark (tasks digit and avqa) from FSDD recordings and MNIST images.",
    )
    p.add_argument("--fsdd", required=True, help="FSDD folder (holding the WAVs or a recordings/ subfolder)")
    p.add_argument("--mnist", required=True, help="folder with t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--split", nargs="+", choices=list(SPLITS), default=["train", "val"],
                   help="splits to write (default: train val); 'reserved' only on explicit request, to "
                        "manifest-reserved.jsonl with split=test")
    p.add_argument("--task", nargs="+", choices=list(TASK_CODES), default=list(TASK_CODES),
                   help="tasks to write (default: digit avqa)")
    p.add_argument("--seed", type=int, default=0, help="seed of all randomness (default 0)")
    p.add_argument("--digit-per-speaker-digit", type=int, default=None, metavar="N",
                   help="digit task: use N recordings per speaker and digit (default: all 50)")
    p.add_argument("--avqa-count", type=int, default=4000, metavar="N", help="avqa samples for train (default 4000)")
    p.add_argument("--avqa-eval-count", type=int, default=1000, metavar="N",
                   help="avqa samples for val and for reserved, each (default 1000)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="keep at most the first N samples per split and task (for quick tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check_args(args: argparse.Namespace) -> None:
    for name in ("digit_per_speaker_digit", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise PrepareError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("avqa_count", "avqa_eval_count"):
        if getattr(args, name) < 0:
            raise PrepareError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")


def corruption_params() -> dict[str, Any]:
    """The corruption parameters, as recorded in prepare.json."""
    return {
        "digit": {
            "image": {
                "occlusion_rects": list(IMAGE_RECTS),
                "occlusion_fraction_of_digit_bbox": list(IMAGE_OCCLUSION),
                "rect_aspect_loguniform": list(IMAGE_ASPECT),
                "rect_fill_uniform": list(IMAGE_FILL),
                "gaussian_noise_std": IMAGE_NOISE_STD,
                "intensity_range": [0.0, 1.0],
            },
            "audio": {"noise": "white gaussian", "snr_db_uniform": list(AUDIO_SNR_DB), "peak_limit": AUDIO_PEAK},
        },
        "avqa": {"image": "clean", "audio": "clean", "same_prob_for_same_question": AVQA_SAME_PROB},
    }


def _make_row(task: str, split: str, sid: str, item: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    rec: Recording = item["rec"]
    meta: dict[str, Any] = {
        "speaker": rec.speaker,
        "fsdd_file": rec.path.name,
        "spoken_digit": rec.digit,
        "mnist_index": item["mnist_index"],
    }
    row: dict[str, Any] = {"id": sid, "task": task, "image": f"images/{sid}.png", "audio": f"audio/{sid}.wav"}
    if task == "digit":
        row["label"] = str(rec.digit)
    else:
        qtype, a, b = item["qtype"], item["a"], item["b"]
        row["question"] = QUESTION_TEMPLATES[qtype][item["wording"]]
        row["answer"] = avqa_answer(qtype, a, b)
        meta = {"qtype": qtype, "image_digit": a, **meta, "wording": item["wording"]}
    row["split"] = SPLITS[split]["manifest_split"]
    row["meta"] = meta
    return row, meta


def main(argv: Sequence[str] | None = None) -> int:
    """Run the preparation; returns 0. Bad inputs raise SystemExit with a message naming the bad thing."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except PrepareError as e:
        raise SystemExit(f"prepare.py: error: {e}") from e


def _run(args: argparse.Namespace) -> int:
    _check_args(args)
    t0 = time.perf_counter()
    fsdd, mnist, out = Path(args.fsdd), Path(args.mnist), Path(args.out)
    splits = [s for s in SPLITS if s in args.split]
    tasks = [t for t in TASK_CODES if t in args.task]
    recs = find_recordings(fsdd)
    images, labels = load_mnist(mnist)

    plans: list[tuple[str, str, list[dict[str, Any]]]] = []
    for split in splits:
        split_recs = _split_recordings(recs, split, fsdd)
        pools = _image_pools(labels, split)
        for task in tasks:
            if task == "digit":
                plan = plan_digit(split_recs, pools, split, args.seed, args.digit_per_speaker_digit)
            else:
                count = args.avqa_count if split == "train" else args.avqa_eval_count
                plan = plan_avqa(split_recs, pools, split, args.seed, count)
            if args.limit is not None:
                plan = plan[: args.limit]
            plans.append((split, task, plan))

    manifest_names = {"manifest.jsonl": [s for s in splits if s != "reserved"],
                      "manifest-reserved.jsonl": [s for s in splits if s == "reserved"]}
    for name, used in manifest_names.items():
        if used:  # a manifest about to be rewritten must not outlive the files it names if this run is killed
            (out / name).unlink(missing_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "audio").mkdir(parents=True, exist_ok=True)

    rows: dict[str, list[dict[str, Any]]] = {s: [] for s in splits}
    counts: dict[str, dict[str, Any]] = {s: {} for s in splits}
    total = sum(len(p) for _, _, p in plans)
    bar = tqdm(total=total, unit="sample", disable=args.no_progress, file=sys.stderr) if tqdm else None
    for split, task, plan in plans:
        if bar is not None:
            bar.set_description(f"{split}/{task}")
        c_qtype: Counter[str] = Counter()
        c_answer: Counter[str] = Counter()
        c_speaker: Counter[str] = Counter()
        for i, item in enumerate(plan):
            sid = f"{task}_{split}_{i:05d}"
            rng = np.random.default_rng([args.seed, TASK_CODES[task], SPLIT_CODES[split], 1, i])
            row, meta = _make_row(task, split, sid, item)
            img = images[item["mnist_index"]]
            audio, sr = read_audio(item["rec"].path)
            if task == "digit":
                if int(labels[item["mnist_index"]]) != item["rec"].digit:  # pragma: no cover - plan invariant
                    raise AssertionError(f"{sid}: image label does not match the spoken digit")
                img, img_info = corrupt_image(img, rng)
                audio, audio_info = corrupt_audio(audio, rng)
                meta.update(img_info)
                meta.update(audio_info)
                c_answer[row["label"]] += 1
            else:
                c_qtype[row["meta"]["qtype"]] += 1
                c_answer[row["answer"]] += 1
            c_speaker[item["rec"].speaker] += 1
            write_png(out / row["image"], np.ascontiguousarray(img))
            write_wav(out / row["audio"], audio, sr)
            rows[split].append(row)
            if bar is not None:
                bar.update(1)
        entry: dict[str, Any] = {"total": len(plan), "speakers": dict(sorted(c_speaker.items()))}
        if task == "avqa":
            entry["qtype"] = {q: c_qtype[q] for q in QTYPES}
        entry["label" if task == "digit" else "answer"] = dict(sorted(c_answer.items(), key=lambda kv: _key(kv[0])))
        counts[split][task] = entry
    if bar is not None:
        bar.close()

    info = {
        "args": {k: v for k, v in sorted(vars(args).items()) if k != "no_progress"},
        "manifests": {name: [SPLITS[s]["manifest_split"] for s in used] for name, used in manifest_names.items()
                      if used},
        "counts": counts,
        "sources": {
            s: {"speakers": list(SPLITS[s]["speakers"]),
                "mnist_index_range": [SPLITS[s]["mnist"][0], min(SPLITS[s]["mnist"][1], len(labels)) - 1],
                "manifest_split": SPLITS[s]["manifest_split"]}
            for s in splits
        },
        "corruption": corruption_params(),
        "question_templates": QUESTION_TEMPLATES,
    }
    _atomic_write_bytes(out / "prepare.json", (json.dumps(info, indent=2) + "\n").encode())
    for name, used in manifest_names.items():
        if used:
            lines = [json.dumps(r, separators=(",", ":")) for s in used for r in rows[s]]
            _atomic_write_bytes(out / name, ("\n".join(lines) + "\n").encode() if lines else b"")
    elapsed = time.perf_counter() - t0
    summary = ", ".join(f"{s}/{t}={len(p)}" for s, t, p in plans)
    print(f"wrote {total} samples ({summary}) to {out} in {elapsed:.1f} s", file=sys.stderr)
    return 0


def _key(answer: str) -> tuple[int, str]:
    return (int(answer), "") if answer.isdigit() else (100, answer)


if __name__ == "__main__":
    sys.exit(main())
