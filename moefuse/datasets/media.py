"""Media normalisation shared by the shard builder and the loader: decode, check, resize/resample, encode.

Images (Pillow): EXIF orientation applied, converted to RGB (transparency composited onto black), resized so
that the longer side equals `size` and padded to a black square (`fit="pad"`, letterboxing; nothing is cut off)
or resized so that the shorter side equals `size` and centre-cropped (`fit="crop"`, like torchvision's
Resize + CenterCrop), then stored as PNG (lossless) or JPEG (quality 95). The only size limit is `max_pixels`
(build-shards' --max-image-pixels): Pillow's own decompression-bomb limit (about 89M pixels) is lifted for it.
Audio (soundfile/libsndfile: wav, flac, ogg, mp3): averaged to mono, resampled with libsoxr (python-soxr, the
resampler librosa uses; "HQ" quality, float32, deterministic; time and memory grow with the clip's length only,
not with the ratio of the rates, so a file at 44101 Hz costs what one at 44100 Hz does), clipped to [-1, 1] and
stored as 16-bit FLAC.
Every failure raises MediaError with a message that names the problem, never a bare library exception.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile as sf
import soxr
from PIL import Image, ImageOps, UnidentifiedImageError

from moefuse.errors import UserError

ImageFit = Literal["pad", "crop"]
ImageFormat = Literal["png", "jpg"]
MAX_IMAGE_SIZE = 4096
"""The largest square side images are fitted to (`build-shards --image-size`, a model folder's media settings):
a 4096 x 4096 RGB image is 48 MiB, and every sample of a batch holds one."""
JPEG_QUALITY = 95


class MediaError(UserError, ValueError):
    """An image or audio file (or shard member) that cannot be used; the message says why."""


class MediaTooLarge(MediaError):
    """A file over a size limit: bytes, pixels or seconds (the server answers 413, not 422)."""


# ---------------------------------------------------------------------------------------------------------------
# helpers


def check_file(path: Path, kind: str, max_bytes: int) -> None:
    """Cheap checks before decoding: it exists, is a regular file, is readable and not over the size limit."""
    if not path.exists():
        raise MediaError(f"{kind} file {path} does not exist")
    if path.is_dir():
        raise MediaError(f"{kind} path {path} is a folder, not a file")
    if not path.is_file():
        raise MediaError(f"{kind} path {path} is not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise MediaError(f"{kind} file {path} is empty (0 bytes)")
    if size > max_bytes:
        raise MediaTooLarge(f"{kind} file {path} is {size / 2**20:.1f} MiB, over the limit of {max_bytes / 2**20:.1f} "
                         f"MiB (raise it with --max-file-mb)")
    if not os.access(path, os.R_OK):
        raise MediaError(f"{kind} file {path} is not readable (permission denied)")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB. 16-bit and float greyscale are scaled to 8 bits (Pillow's own convert would clip
    them); transparent pixels become black, the same colour as the padding."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64) / 257.0  # 16-bit range -> 8-bit range
        img = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.size and arr.max() <= 1.0 else 1.0  # float images are usually in [0, 1]
        img = Image.fromarray(np.clip(arr * scale, 0, 255).round().astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _riff_truncation(path: Path) -> str | None:
    """libsndfile silently reads a truncated WAV up to where the data stops; the RIFF header still says how
    long the `data` chunk should be, so compare. Returns a reason or None."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
            return None
        endian = "<" if head[:4] == b"RIFF" else ">"
        file_size = path.stat().st_size
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            cid, size = chunk[:4], struct.unpack(endian + "I", chunk[4:])[0]
            if cid == b"data":
                available = file_size - f.tell()
                # 0 and 0xFFFFFFFF are the placeholders of streamed WAVs (e.g. ffmpeg to a pipe), not truncation.
                if size not in (0, 0xFFFFFFFF) and size > available:
                    return f"truncated WAV: the header declares {size} bytes of audio but the file holds {available}"
                return None
            f.seek(size + (size & 1), 1)  # chunks are padded to even sizes


# ---------------------------------------------------------------------------------------------------------------
# images


_PILLOW_LIMIT_LOCK = threading.Lock()  # Image.MAX_IMAGE_PIXELS is process-wide: one open_image at a time edits it


def open_image(path: Path, max_pixels: int) -> Image.Image:
    """Decode an image file fully (so truncation and corruption show up here, not at training time).

    `max_pixels` is the only size limit: Pillow's decompression-bomb limit (about 89M pixels) is lifted while the
    header is read, the size is checked here, and during decoding Pillow's limit is `max_pixels` (it also checks
    frames and tiles); it is restored afterwards."""
    flag = "raise it with --max-image-pixels, or shrink the image"
    try:
        with _PILLOW_LIMIT_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            saved = Image.MAX_IMAGE_PIXELS
            try:
                Image.MAX_IMAGE_PIXELS = None  # the check below names the file and the flag
                with Image.open(path) as img:
                    w, h = img.size
                    if w * h > max_pixels:
                        raise MediaTooLarge(f"image {path} is {w}x{h} = {w * h} pixels, over the limit of "
                                            f"{max_pixels} ({flag})")
                    Image.MAX_IMAGE_PIXELS = max_pixels
                    img.load()
                    return ImageOps.exif_transpose(img)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except MediaError:
        raise
    except UnidentifiedImageError:
        raise MediaError(f"image {path} is not an image Pillow can read (corrupt, or an unknown format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MediaTooLarge(f"image {path} holds a frame or layer over the limit of {max_pixels} pixels ({flag}): "
                            f"{e}") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... on corrupt data
        raise MediaError(f"image {path} is corrupt: {type(e).__name__}: {e}") from None


def normalise_image(img: Image.Image, size: int, fit: ImageFit = "pad") -> Image.Image:
    """RGB, `size` x `size`: letterbox (pad) or centre crop, see the module docstring."""
    img = _to_rgb(img)
    w, h = img.size
    if fit == "pad":
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        resized = img.resize((nw, nh), Image.Resampling.BICUBIC) if (nw, nh) != (w, h) else img
        canvas = Image.new("RGB", (size, size), (0, 0, 0))
        canvas.paste(resized, ((size - nw) // 2, (size - nh) // 2))
        return canvas
    if fit == "crop":
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        resized = img.resize((nw, nh), Image.Resampling.BICUBIC) if (nw, nh) != (w, h) else img
        left, top = (nw - size) // 2, (nh - size) // 2
        return resized.crop((left, top, left + size, top + size))
    raise ValueError(f"image fit must be 'pad' or 'crop', got {fit!r}")


def encode_image(img: Image.Image, fmt: ImageFormat = "png") -> bytes:
    """PNG (lossless) or JPEG; both encoders are deterministic for a given Pillow/zlib/libjpeg version."""
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=6)
    elif fmt == "jpg":
        img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        raise ValueError(f"image format must be 'png' or 'jpg', got {fmt!r}")
    return buf.getvalue()


def decode_image(data: bytes) -> Image.Image:
    """Shard member bytes -> PIL RGB image (the loader's decoder)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except Exception as e:
        raise MediaError(f"corrupt image in shard: {type(e).__name__}: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# audio


def resample(wav: np.ndarray, orig_rate: int, rate: int) -> np.ndarray:
    """Mono float32 [S] at `orig_rate` -> float32 [round(S * rate / orig_rate)] at `rate`, with libsoxr's "HQ"
    band-limited resampler. Single-threaded and deterministic; time and memory are linear in the clip's length
    whatever the two rates are (a windowed-sinc kernel of rate/gcd taps would need gigabytes at 44101 Hz)."""
    wav = np.ascontiguousarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise ValueError(f"resample expects mono audio of shape [samples], got shape {wav.shape}")
    if orig_rate <= 0 or rate <= 0:
        raise ValueError(f"sample rates must be > 0, got {orig_rate} -> {rate}")
    if orig_rate == rate:
        return wav
    return np.asarray(soxr.resample(wav, orig_rate, rate, quality="HQ"), dtype=np.float32)


def load_audio(path: Path, rate: int, max_seconds: float) -> np.ndarray:
    """Decode an audio file to mono float32 at `rate`. Truncated, empty, over-long or non-finite audio raises."""
    try:
        info = sf.info(str(path))
    except Exception as e:
        raise MediaError(f"audio {path} is not audio libsndfile can read (corrupt, or an unsupported format): "
                         f"{e}") from None
    if info.samplerate <= 0 or info.channels <= 0:
        raise MediaError(f"audio {path} has an invalid header ({info.samplerate} Hz, {info.channels} channels)")
    if info.frames > 0 and info.frames / info.samplerate > max_seconds:
        raise MediaTooLarge(f"audio {path} lasts {info.frames / info.samplerate:.1f} s, over the limit of "
                            f"{max_seconds:g} s (raise it with --max-audio-seconds, or cut the recording)")
    truncated = _riff_truncation(path) if info.format == "WAV" or info.format == "WAVEX" else None
    if truncated:
        raise MediaError(f"audio {path}: {truncated}")
    try:
        with sf.SoundFile(str(path)) as f:
            declared = f.frames
            wav = f.read(dtype="float32", always_2d=True)  # [S, C]
    except Exception as e:
        raise MediaError(f"audio {path} is corrupt: {e}") from None
    if 0 < len(wav) < declared:
        raise MediaError(f"audio {path} is truncated: {len(wav)} of {declared} frames could be read")
    if len(wav) == 0:
        raise MediaError(f"audio {path} holds no samples")
    if not np.isfinite(wav).all():
        raise MediaError(f"audio {path} contains NaN or infinite sample values")
    out = resample(wav.mean(axis=1), info.samplerate, rate)  # [S]
    if len(out) == 0:
        raise MediaError(f"audio {path} is too short: {len(wav)} samples at {info.samplerate} Hz make no sample "
                         f"at {rate} Hz")
    return np.clip(out, -1.0, 1.0)


def image_in_memory(value: object, kind: str, max_pixels: int) -> Image.Image:
    """A PIL image or an array ([H, W] grey or [H, W, 3 | 4], uint8 0-255 or float 0-1) given in memory, checked
    like a file: a size limit on its pixels."""
    if isinstance(value, np.ndarray):
        array = value
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)) or 0 in array.shape:
            raise MediaError(f"{kind}: an image array must be [H, W] or [H, W, 1|3|4], got shape {array.shape}")
        if array.dtype != np.uint8:
            if not np.isfinite(array).all():
                raise MediaError(f"{kind}: the image array holds NaN or infinite values")
            array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
        value = Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array)
    if not isinstance(value, Image.Image):
        raise MediaError(f"{kind}: give a file path, a PIL image or an array, got {type(value).__name__}")
    if value.width * value.height > max_pixels:
        raise MediaTooLarge(f"{kind}: the image has {value.width * value.height} pixels, over the limit of "
                            f"{max_pixels}")
    return value


def audio_in_memory(value: object, kind: str, rate: int, max_seconds: float) -> np.ndarray:
    """Audio given in memory -> mono float32 at `rate`: an array ([S] mono or [S, C]) at `rate`, or
    (array, its sample rate), which is resampled (`resample`). Checked like a file: finite, not empty, not over
    `max_seconds`."""
    wav, orig = value if isinstance(value, tuple) and len(value) == 2 else (value, rate)
    if not isinstance(wav, np.ndarray) or not isinstance(orig, int) or isinstance(orig, bool) or orig <= 0:
        raise MediaError(f"{kind}: give a file path, an array at {rate} Hz or (array, sample rate in Hz), got "
                         f"{type(value).__name__}")
    if wav.ndim not in (1, 2) or wav.size == 0:
        raise MediaError(f"{kind}: an audio array must be [samples] or [samples, channels], got shape {wav.shape}")
    wav = wav.astype(np.float32)
    if not np.isfinite(wav).all():
        raise MediaError(f"{kind}: the audio array holds NaN or infinite values")
    if len(wav) / orig > max_seconds:
        raise MediaTooLarge(f"{kind}: the audio lasts {len(wav) / orig:.1f} s, over the limit of {max_seconds:g} s")
    mono = wav if wav.ndim == 1 else wav.mean(axis=1)
    return np.clip(resample(mono, orig, rate), -1.0, 1.0)


def encode_flac(wav: np.ndarray, rate: int) -> bytes:
    """16-bit FLAC (lossless for 16-bit sources, about half the size of WAV). Clipped first: libsndfile wraps
    float values outside [-1, 1] around instead of clipping them."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(wav, -1.0, 1.0), rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def decode_audio(data: bytes, rate: int | None) -> np.ndarray:
    """Shard member bytes -> mono float32 [S] at `rate` (None keeps the stored rate; the loader's decoder)."""
    try:
        wav, orig = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)  # [S, C]
    except Exception as e:
        raise MediaError(f"corrupt audio in shard: {e}") from None
    mono = wav.mean(axis=1)
    return mono if rate is None else resample(mono, orig, rate)
