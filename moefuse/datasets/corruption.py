"""Corrupted modalities for robustness evaluation (`moefuse evaluate --corrupt MODALITY:KIND[:DB]`).

    noise      white Gaussian noise at a stated signal-to-noise ratio in dB (default 0 dB: as much noise as
               signal); how noise is added to a modality is its encoder preprocessor's business (`add_noise`)
    conflict   the modality's content is taken from another sample of the batch: the next sample that has it, in
               a cycle, so no sample keeps its own when two or more have it (a conflicting modality)

Both draw from the collator's RNG, so an evaluation with the same seed corrupts the same way every time.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from moefuse.configutil import ConfigError

KINDS = ("noise", "conflict")


def corruption_arg(text: str) -> Corruption:
    """argparse type of the commands' corruption flags: MODALITY:noise[:SNR_DB] or MODALITY:conflict."""
    import argparse

    try:
        return Corruption.parse(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


@dataclass(frozen=True)
class Corruption:
    """What happens to one modality of every sample."""

    modality: str
    kind: Literal["noise", "conflict"]
    snr_db: float = 0.0
    """For noise: the signal-to-noise ratio in dB (lower is stronger)."""

    def __str__(self) -> str:
        return f"{self.modality}:noise:{self.snr_db:g}" if self.kind == "noise" else f"{self.modality}:conflict"

    @classmethod
    def parse(cls, text: str) -> Corruption:
        """`audio:noise:5`, `image:noise` (0 dB) or `audio:conflict`."""
        parts = text.split(":")
        if len(parts) < 2 or parts[1] not in KINDS or (parts[1] == "conflict" and len(parts) != 2) or len(parts) > 3:
            raise ConfigError(f"corruption {text!r} must be MODALITY:noise[:SNR_DB] or MODALITY:conflict, e.g. "
                              f"audio:noise:5 or image:conflict")
        snr = 0.0
        if len(parts) == 3:
            try:
                snr = float(parts[2])
            except ValueError:
                raise ConfigError(f"corruption {text!r}: the SNR {parts[2]!r} is not a number of dB") from None
            if not -40.0 <= snr <= 80.0:
                raise ConfigError(f"corruption {text!r}: the SNR must be in [-40, 80] dB, got {snr:g}")
        return cls(parts[0], parts[1], snr)  # type: ignore[arg-type]


def check_corruptions(corruptions: Sequence[Corruption], preprocessors: Mapping, dropped: Sequence[str]) -> None:
    """Each corruption must name a modality the model reads, not dropped, once, with a kind its encoder supports."""
    seen: set[str] = set()
    for c in corruptions:
        if c.modality not in preprocessors:
            raise ConfigError(f"cannot corrupt {c.modality!r}: the model reads {', '.join(preprocessors)}")
        if c.modality in dropped:
            raise ConfigError(f"cannot corrupt {c.modality!r}: it is also dropped; give it to only one of --drop and "
                              f"--corrupt")
        if c.modality in seen:
            raise ConfigError(f"{c.modality!r} is corrupted twice; give one corruption per modality")
        seen.add(c.modality)
        if c.kind == "noise" and not hasattr(preprocessors[c.modality], "add_noise"):
            raise ConfigError(f"the {c.modality} encoder has no noise corruption; use {c.modality}:conflict")


def corrupt_samples(samples: Sequence[dict], corruptions: Sequence[Corruption], preprocessors: Mapping,
                    sample_fields: Mapping[str, tuple[str, ...]], rng: random.Random) -> list[dict]:
    """Copies of the samples with each corruption applied (samples lacking the modality are left as they are)."""
    out = [dict(s) for s in samples]
    for c in corruptions:
        pre = preprocessors[c.modality]
        have = [i for i, s in enumerate(out) if pre.present(s)]
        if c.kind == "noise":
            for i in have:
                out[i] = pre.add_noise(out[i], c.snr_db, rng)
            continue
        fields = sample_fields[c.modality]
        donors = [{f: out[i].get(f) for f in fields} for i in have]
        for j, i in enumerate(have):  # sample have[j] gets the content of have[j + 1] (cyclically)
            out[i].update(donors[(j + 1) % len(have)])
    return out
