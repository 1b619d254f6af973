"""`moefuse demo-data`: a self-contained synthetic multimodal dataset (no downloads), written as a manifest plus
media files so that the demo goes through the real `build-shards` path.

    moefuse demo-data --out outputs/demo/data [--count 2000] [--seed 0]

Media: a digit rendered with Pillow's embedded font (Aileron; random size, rotation, position, grey levels and
pixel noise) as a 64x64 PNG; the digit as a DTMF tone pair (ITU-T Q.23 row + column frequencies; random onset,
length and level, white noise) in a 1 s, 16 kHz, 16-bit WAV; short captions that name the digit half the time.
Tasks: `digit` (classification, label "0".."9"; each sample carries a random subset of image, audio and caption
of the same digit, so the missing-modality paths are exercised) and `avqa` (QA over an image of digit a and a
recording of digit b drawn independently, b = a half the time for `same` questions: the written digit, the
spoken digit, their sum, whether they match; answers "0".."18", "yes", "no"). Splits train/val/test 80/10/10
per task. The same --seed and --count give byte-identical files; the manifest is written last, atomically.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from moefuse.configutil import atomic_write_text
from moefuse.errors import UserError

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


class DemoError(UserError, RuntimeError):
    """The demo data cannot be written; the message says why."""


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def digit_row(i: int, seed: int, media: dict[str, bytes], split: str) -> dict:
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
        media[row["image"]] = png_bytes(render_digit(digit, rng))
    if "audio" in subset:
        row["audio"] = f"media/audio/{sid}.wav"
        media[row["audio"]] = wav_bytes(dtmf_tone(digit, rng))
    row.update(label=str(digit), split=split)
    return row


def avqa_row(i: int, seed: int, media: dict[str, bytes], split: str) -> dict:
    rng = np.random.default_rng([seed, 1, i])
    qtype = list(QUESTIONS)[int(rng.integers(len(QUESTIONS)))]
    a = int(rng.integers(10))
    b = a if (qtype == "same" and rng.random() < 0.5) else int(rng.integers(10))
    answer = {"written": str(a), "spoken": str(b), "sum": str(a + b), "same": "yes" if a == b else "no"}[qtype]
    sid = f"avqa-{i:05d}"
    row = {"id": sid, "task": "avqa", "image": f"media/image/{sid}.png", "audio": f"media/audio/{sid}.wav"}
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


def make_demo_data(out: str | Path, count: int = 2000, seed: int = 0, overwrite: bool = False,
                   progress: bool = True) -> Path:
    """Write `count` samples (half `digit`, half `avqa`) under `out`; returns the manifest path."""
    out = Path(out)
    if count < 20:
        raise DemoError(f"--count must be >= 20 (each task needs train, val and test samples), got {count}")
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out} is a file; give a folder")
    manifest = out / "manifest.jsonl"
    if manifest.exists() and not overwrite:
        raise DemoError(f"{manifest} already exists; pass --overwrite to regenerate it, or choose another folder")
    for sub in ("media/image", "media/audio"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    n_digit = count // 2
    n_avqa = count - n_digit
    jobs = [(digit_row, i, split) for i, split in enumerate(assign_splits(n_digit, seed, 0))]
    jobs += [(avqa_row, i, split) for i, split in enumerate(assign_splits(n_avqa, seed, 1))]
    rows, written = [], set()
    for make, i, split in tqdm(jobs, desc="demo-data", unit="sample", disable=not progress, file=sys.stderr):
        media: dict[str, bytes] = {}
        rows.append(make(i, seed, media, split))
        for rel, data in media.items():
            _atomic_write_bytes(out / rel, data)
            written.add(out / rel)
    for sub in ("media/image", "media/audio"):  # media of an earlier, larger run
        for path in (out / sub).iterdir():
            if path not in written and not path.name.startswith("."):
                path.unlink()
    atomic_write_text(manifest, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moefuse demo-data", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="folder for manifest.jsonl and media/")
    p.add_argument("--count", type=int, default=2000, help="samples in all, half per task")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    p.add_argument("--overwrite", action="store_true", help="regenerate over an earlier demo-data run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        manifest = make_demo_data(args.out, args.count, args.seed, args.overwrite, progress=not args.quiet)
    except DemoError as e:
        print(f"demo-data: error: {e}", file=sys.stderr)
        return 1
    print(f"demo-data: wrote {manifest} ({args.count} samples); next: moefuse build-shards --manifest {manifest} "
          f"--out {Path(args.out) / 'shards'}")
    return 0


__all__ = ["DTMF", "DemoError", "dtmf_tone", "main", "make_demo_data", "render_digit"]
