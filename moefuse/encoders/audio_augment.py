"""Training-time audio augmentation, drawn in the loader from the epoch's seeded RNG (never in evaluation).

On the waveform, per clip: speed perturbation (Ko et al. 2015, "Audio augmentation for speech recognition"), a gain
with clipping, and additive white noise at a random signal-to-noise ratio, re-drawn every epoch. On the encoder's
frames: SpecAugment-style time and frequency masks (Park et al. 2019), drawn here as keep-masks and applied by the
audio encoder to its log-mel frames (`apply_spec_masks`). The same `add_noise` corrupts audio at a stated SNR for
`moefuse evaluate --corrupt audio:noise:DB`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import soxr
import torch

from moefuse.encoders.base import AugmentConfig


@dataclass
class AudioAugmentConfig(AugmentConfig):
    """`encoders.audio.augment`: what the training loader does to each clip. The defaults change nothing."""

    config_key = "encoders.audio.augment"

    speed: tuple[float, float] = (1.0, 1.0)
    """Range of the speed factor drawn per clip (tempo and pitch change together, as in Kaldi's 0.9/1.0/1.1 speed
    perturbation); (1, 1) = off."""
    gain_db: float = 0.0
    """A gain drawn in [-gain_db, +gain_db] dB, then clipped to [-1, 1] as a recorder clips. The encoder normalises
    every clip to unit variance, so a gain on its own is undone: what this adds is the clipping of loud takes.
    0 = off."""
    noise_snr_db: tuple[float, float] | None = None
    """Additive white Gaussian noise at a signal-to-noise ratio drawn uniformly from this range (dB), re-drawn every
    epoch; None = off."""
    noise_prob: float = 0.5
    """Share of clips that get noise (when noise_snr_db is set)."""
    time_masks: int = 0
    """SpecAugment time masks per clip: each blanks up to time_mask_frames consecutive frames. 0 = off."""
    time_mask_frames: int = 8
    """Largest width of one time mask, in encoder frames (20 ms each)."""
    freq_masks: int = 0
    """SpecAugment frequency masks per clip: each blanks up to freq_mask_bins consecutive mel bands
    (needs frontend logmel). 0 = off."""
    freq_mask_bins: int = 8
    """Largest width of one frequency mask, in mel bands."""

    def __post_init__(self) -> None:
        lo, hi = self.speed
        self.check(0.5 <= lo <= hi <= 2.0, "speed", f"must be [low, high] with 0.5 <= low <= high <= 2, got "
                   f"{list(self.speed)}")
        self.check(0.0 <= self.gain_db <= 40.0, "gain_db", f"must be in [0, 40], got {self.gain_db}")
        if self.noise_snr_db is not None:
            lo, hi = self.noise_snr_db
            self.check(-20.0 <= lo <= hi <= 80.0, "noise_snr_db", f"must be [low, high] dB with -20 <= low <= high "
                       f"<= 80, or null, got {list(self.noise_snr_db)}")
        self.check(0.0 <= self.noise_prob <= 1.0, "noise_prob", f"must be in [0, 1], got {self.noise_prob}")
        for name in ("time_masks", "freq_masks"):
            self.check(0 <= getattr(self, name) <= 20, name, f"must be in [0, 20], got {getattr(self, name)}")
        for name in ("time_mask_frames", "freq_mask_bins"):
            self.check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        super().__post_init__()

    @property
    def waveform_active(self) -> bool:
        return self.speed != (1.0, 1.0) or self.gain_db > 0 or (self.noise_snr_db is not None and self.noise_prob > 0)

    @property
    def masks_active(self) -> bool:
        return self.time_masks > 0 or self.freq_masks > 0


def add_noise(wav: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """Mono float32 [S] plus white Gaussian noise at `snr_db` dB below the clip's mean power."""
    power = float(np.mean(np.square(wav, dtype=np.float64))) if len(wav) else 0.0
    if power <= 0.0:
        return wav
    noise = rng.standard_normal(len(wav)) * math.sqrt(power / 10 ** (snr_db / 10))
    return (wav + noise).astype(np.float32)


def perturb_waveform(wav: np.ndarray, cfg: AudioAugmentConfig, sample_rate: int, rng: random.Random) -> np.ndarray:
    """One training clip [S] -> its speed-perturbed, gained and noised version [S'] (S' = S / speed)."""
    lo, hi = cfg.speed
    if hi > lo or lo != 1.0:
        factor = rng.uniform(lo, hi)  # > 1 plays faster: treat the clip as sampled at rate * factor
        wav = np.asarray(soxr.resample(wav, sample_rate * factor, sample_rate, quality="HQ"), dtype=np.float32)
    if cfg.gain_db > 0:
        wav = np.clip(wav * 10 ** (rng.uniform(-cfg.gain_db, cfg.gain_db) / 20), -1.0, 1.0).astype(np.float32)
    if cfg.noise_snr_db is not None and rng.random() < cfg.noise_prob:
        wav = add_noise(wav, rng.uniform(*cfg.noise_snr_db), np.random.default_rng(rng.getrandbits(64)))
    return wav


def _blank(keep: torch.Tensor, count: int, widest: int, length: int, rng: random.Random) -> None:
    """Set `count` random runs of up to `widest` entries of keep[:length] to False."""
    for _ in range(count):
        width = rng.randint(0, min(widest, length))
        start = rng.randint(0, length - width)
        keep[start : start + width] = False


def draw_spec_masks(cfg: AudioAugmentConfig, real_frames: list[int], frames: int, bands: int,
                    rng: random.Random) -> dict[str, torch.Tensor]:
    """Keep-masks for B clips: spec_time_keep [B, F] (time masks within each clip's real frames) and
    spec_freq_keep [B, C] (C = the frame's channels: mel bands for frontend logmel)."""
    time_keep = torch.ones(len(real_frames), frames, dtype=torch.bool)  # [B, F]
    freq_keep = torch.ones(len(real_frames), bands, dtype=torch.bool)  # [B, C]
    for i, n in enumerate(real_frames):
        _blank(time_keep[i], cfg.time_masks, cfg.time_mask_frames, min(n, frames), rng)
        _blank(freq_keep[i], cfg.freq_masks, cfg.freq_mask_bins, bands, rng)
    return {"spec_time_keep": time_keep, "spec_freq_keep": freq_keep}


def apply_spec_masks(features: torch.Tensor, time_keep: torch.Tensor, freq_keep: torch.Tensor) -> torch.Tensor:
    """Frames [B, C, F] with the blanked entries set to their frame's mean over C (after the feature projection's
    LayerNorm a fully blanked frame carries nothing, as SpecAugment's zeroed frames after mean normalisation)."""
    if features.shape[0] != time_keep.shape[0] or features.shape[2] != time_keep.shape[1] \
            or features.shape[1] != freq_keep.shape[1]:
        raise ValueError(f"SpecAugment masks {tuple(time_keep.shape)} (time) and {tuple(freq_keep.shape)} (frequency) "
                         f"do not fit frames {tuple(features.shape)} [B, C, F]")
    keep = time_keep[:, None, :] & freq_keep[:, :, None]  # [B, C, F]
    return torch.where(keep, features, features.mean(dim=1, keepdim=True))
