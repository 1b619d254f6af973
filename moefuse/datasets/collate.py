"""Decoded samples -> a model batch: the contract between the data pipeline and the model.

A decoded sample is a dict (what the shard loader and `moefuse predict` produce):
    id: str, task: str, target: str | None, meta: dict, and the modalities' fields, None when absent:
    text: str, question: str, image: PIL.Image (RGB), audio: float32 numpy array [S] at the encoder's rate

`Collator(...)(samples)` returns the batch the model reads (B samples; any modality subset per sample):
    ids, tasks, targets, meta              lists of length B
    task_index [B] long                    index into the model's task list
    labels [B] long                        index into that task's vocabulary; -100 when unknown or absent
    present {modality: [B] bool}           for every modality the model has an encoder for
    inputs {modality: {name: [B, ...]}}    that encoder's keyword inputs, built by its Preprocessor
                                           (e.g. text: input_ids/attention_mask/token_type_ids [B, L];
                                           image: pixel_values [B, 3, H, W]; audio: input_values/sample_mask [B, S])
Absent modalities are zero-filled and flagged False; the model drops their tokens. What each modality's inputs
are is the business of its encoder (`moefuse.encoders`); this module only loops over them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch.utils.data import get_worker_info

from moefuse.configutil import ConfigError
from moefuse.datasets.corruption import Corruption, check_corruptions, corrupt_samples
from moefuse.datasets.loader import DataError

if TYPE_CHECKING:
    from moefuse.encoders.base import Preprocessor

IGNORE_INDEX = -100


def worker_seed(seed: int, epoch: int) -> tuple[int | None, int]:
    """(this DataLoader worker's id, None in the main process; the seed of its random draws in `epoch`): each
    worker holds a copy of a collator, and without its own seed every copy would draw the same crops, noise and
    partners."""
    info = get_worker_info()
    worker = info.id if info is not None else None
    return worker, (seed * 1_000_003 + epoch) * 1_009 + (worker or 0) + 1


@dataclass
class Collator:
    """Tokenises, transforms and pads a list of decoded samples into one batch (see the module docstring)."""

    task_names: list[str]
    """The model's tasks, in order."""
    vocabularies: list[list[str]]
    """Per task, its label (classification) or answer (QA) vocabulary."""
    preprocessors: dict[str, Preprocessor]
    """Per modality the model has an encoder for, in the model's order: its encoder's preprocessor."""
    sample_fields: dict[str, tuple[str, ...]]
    """Per modality the model knows (configured or not): the sample fields that hold it."""
    drop_modalities: tuple[str, ...] = ()
    """Modalities removed from every sample before collation (ablations such as image-only); dropping one clears
    all its fields (text: the text and, for QA samples, the question)."""
    corrupt: tuple[Corruption, ...] = ()
    """Corruptions applied to every sample after the drops (robustness evaluation: `moefuse evaluate --corrupt`)."""
    seed: int = 0
    _rng: random.Random = field(init=False, repr=False)
    _epoch: int = field(init=False, repr=False, default=0)
    _rng_worker: int | None = field(init=False, repr=False, default=None)
    _index: dict[str, dict[str, int]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        unknown = [m for m in (*self.preprocessors, *self.drop_modalities) if m not in self.sample_fields]
        if unknown:
            raise ConfigError(f"unknown modality {unknown[0]!r}; this model knows {', '.join(self.sample_fields)}")
        if self.preprocessors and set(self.preprocessors) <= set(self.drop_modalities):
            raise ConfigError(f"dropping {', '.join(self.preprocessors)} (--drop, data.drop_modalities) removes every "
                              f"modality the model reads, so no sample would have an input: keep at least one")
        check_corruptions(self.corrupt, self.preprocessors, self.drop_modalities)
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
        worker, seed = worker_seed(self.seed, self._epoch)
        if worker != self._rng_worker:
            self._rng = random.Random(seed)
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
            gone = {f: None for m in self.drop_modalities for f in self.sample_fields[m]}
            samples = [{**s, **gone} for s in samples]
        self._check_encoders(samples)
        rng = self._crop_rng()
        if self.corrupt:
            samples = corrupt_samples(samples, self.corrupt, self.preprocessors, self.sample_fields, rng)
        return {
            "ids": [s["id"] for s in samples],
            "tasks": [s["task"] for s in samples],
            "targets": [s.get("target") for s in samples],
            "meta": [s.get("meta") or {} for s in samples],
            "task_index": torch.tensor([self.task_names.index(s["task"]) for s in samples]),
            "labels": torch.tensor([self._index[s["task"]].get(s.get("target"), IGNORE_INDEX)
                                    if s.get("target") is not None else IGNORE_INDEX for s in samples]),
            "present": {m: torch.tensor([p.present(s) for s in samples]) for m, p in self.preprocessors.items()},
            "inputs": {m: p(samples, rng) for m, p in self.preprocessors.items()},
        }

    def _check_encoders(self, samples: Sequence[dict]) -> None:
        """A sample with a modality the model has no encoder for is an error naming both."""
        for m, names in self.sample_fields.items():
            if m in self.preprocessors:
                continue
            for s in samples:
                if any(has_value(s.get(f)) for f in names):
                    raise DataError(f"sample {s['id']!r} has {m} but the model has no {m} encoder (encoders.{m} is "
                                    f"null): remove {m} from every sample with data.drop_modalities=[{m}] (training) "
                                    f"or --drop {m} (evaluate), or configure encoders.{m}")


def has_value(value: object) -> bool:
    """Whether a sample field holds something (None and "" are absent)."""
    return value is not None and not (isinstance(value, str) and not value)
