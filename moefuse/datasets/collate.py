"""Decoded samples -> a model batch: the contract between the data pipeline and the model.

A decoded sample is a dict (what the shard loader and `moefuse predict` produce):
    id: str, task: str, text: str | None, question: str | None, image: PIL.Image (RGB) | None,
    audio: float32 numpy array [S] at the audio encoder's sample rate | None, target: str | None, meta: dict

`Collator(...)(samples)` returns the batch the model reads (B samples; any modality subset per sample):
    ids, tasks, targets, meta              lists of length B
    task_index [B] long                    index into the model's task list
    labels [B] long                        index into that task's vocabulary; -100 when unknown or absent
    text_present, image_present, audio_present [B] bool
    text: {input_ids, attention_mask, token_type_ids} [B, L]     only when the text encoder is configured
    image [B, 3, H, W] float                                      only when the image encoder is configured
    audio [B, S] float, audio_mask [B, S] bool                    only when the audio encoder is configured
Absent modalities are zero-filled (text: an empty "[CLS] [SEP]") and flagged False; the model drops their tokens.
A QA sample's question is the first text segment and its optional `text` the second (BERT sentence pairs).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import get_worker_info

IGNORE_INDEX = -100


@dataclass
class Collator:
    """Tokenises, transforms and pads a list of decoded samples into one batch (see the module docstring)."""

    task_names: list[str]
    """The model's tasks, in order."""
    vocabularies: list[list[str]]
    """Per task, its label (classification) or answer (QA) vocabulary."""
    tokenizer: Callable | None = None
    """The text encoder's tokenizer; None when no text encoder is configured."""
    text_max_length: int = 64
    image_transform: Callable | None = None
    """PIL image -> [3, H, W] tensor (the image encoder's timm eval transform); None = no image encoder."""
    image_size: tuple[int, int, int] | None = None
    """(3, H, W), for the zeros of samples without an image."""
    audio_max_samples: int | None = None
    """Crop/pad length in samples; None = no audio encoder."""
    random_crop: bool = False
    """Crop long audio at a random offset (training) instead of from the start (evaluation)."""
    drop_modalities: tuple[str, ...] = ()
    """Modalities removed from every sample before collation (ablations such as image-only); "text" removes the
    text and, for QA samples, the question."""
    seed: int = 0
    _rng: random.Random = field(init=False, repr=False)
    _epoch: int = field(init=False, repr=False, default=0)
    _rng_worker: int | None = field(init=False, repr=False, default=None)
    _index: dict[str, dict[str, int]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._index = {t: {v: i for i, v in enumerate(vocab)} for t, vocab in zip(self.task_names, self.vocabularies)}

    def set_epoch(self, epoch: int) -> None:
        """Reseed the crop RNG per epoch, so a resumed run replays an epoch's crops exactly."""
        self._epoch = epoch
        self._rng = random.Random(self.seed * 1_000_003 + epoch)
        self._rng_worker = None

    def _crop_rng(self) -> random.Random:
        """The epoch's RNG, reseeded once inside each DataLoader worker (each worker holds a copy of this
        collator; without this they would all draw the same crops)."""
        info = get_worker_info()
        worker = info.id if info is not None else None
        if worker != self._rng_worker:
            self._rng = random.Random((self.seed * 1_000_003 + self._epoch) * 1_009 + (worker or 0) + 1)
            self._rng_worker = worker
        return self._rng

    def __call__(self, samples: Sequence[dict]) -> dict:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        unknown = sorted({s["task"] for s in samples} - set(self._index))
        if unknown:
            raise ValueError(f"sample task {unknown[0]!r} is not one of the model's tasks: "
                             f"{', '.join(self.task_names)}")
        if self.drop_modalities:
            fields = {"text": ("text", "question"), "image": ("image",), "audio": ("audio",)}
            gone = {f: None for m in self.drop_modalities for f in fields[m]}
            samples = [{**s, **gone} for s in samples]
        configured = {"text": self.tokenizer, "image": self.image_transform, "audio": self.audio_max_samples}
        for s in samples:
            for modality, has in (("text", s.get("text") or s.get("question")), ("image", s.get("image") is not None),
                                  ("audio", s.get("audio") is not None)):
                if has and configured[modality] is None:
                    raise ValueError(f"sample {s['id']!r} has {modality} but the model has no {modality} encoder "
                                     f"(encoders.{modality} is null); configure one or drop that field")
        batch: dict = {
            "ids": [s["id"] for s in samples],
            "tasks": [s["task"] for s in samples],
            "targets": [s.get("target") for s in samples],
            "meta": [s.get("meta") or {} for s in samples],
            "task_index": torch.tensor([self.task_names.index(s["task"]) for s in samples]),
            "labels": torch.tensor([self._index[s["task"]].get(s.get("target"), IGNORE_INDEX)
                                    if s.get("target") is not None else IGNORE_INDEX for s in samples]),
        }
        batch["text_present"] = torch.tensor([bool(s.get("text") or s.get("question")) for s in samples])
        batch["image_present"] = torch.tensor([s.get("image") is not None for s in samples])
        batch["audio_present"] = torch.tensor([s.get("audio") is not None for s in samples])
        if self.tokenizer is not None:
            batch["text"] = self._text(samples)
        if self.image_transform is not None:
            batch["image"] = self._images(samples)
        if self.audio_max_samples is not None:
            batch["audio"], batch["audio_mask"] = self._audio(samples)
        return batch

    def _text(self, samples: Sequence[dict]) -> dict[str, torch.Tensor]:
        encoded = []
        for s in samples:
            first, second = (s.get("question"), s.get("text")) if s.get("question") else (s.get("text") or "", None)
            encoded.append(self.tokenizer(first, text_pair=second or None, truncation=True,
                                          max_length=self.text_max_length))
        padded = self.tokenizer.pad(encoded, padding=True, return_tensors="pt")  # [B, L] each
        if "token_type_ids" not in padded:
            padded["token_type_ids"] = torch.zeros_like(padded["input_ids"])
        return {k: padded[k] for k in ("input_ids", "attention_mask", "token_type_ids")}

    def _images(self, samples: Sequence[dict]) -> torch.Tensor:
        images = []
        for s in samples:
            img = s.get("image")
            images.append(self.image_transform(img) if img is not None else torch.zeros(self.image_size))
        return torch.stack(images)  # [B, 3, H, W]

    def _audio(self, samples: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.audio_max_samples
        audio = torch.zeros(len(samples), n)  # [B, S]
        mask = torch.zeros(len(samples), n, dtype=torch.bool)  # [B, S]
        for i, s in enumerate(samples):
            wav = s.get("audio")
            if wav is None or len(wav) == 0:
                continue
            wav = np.asarray(wav, dtype=np.float32).reshape(-1)
            start = self._crop_rng().randint(0, len(wav) - n) if (self.random_crop and len(wav) > n) else 0
            clip = torch.from_numpy(wav[start : start + n].copy())
            audio[i, : len(clip)] = clip
            mask[i, : len(clip)] = True
        return audio, mask
