"""What a training run carries from step to step and across a resume: the trainer state saved in every checkpoint
(trainer_state.json, next to accelerate's model, optimizer, scheduler and RNG state), and `preserved_rng` for
replaying the data up to the saved position without disturbing the restored RNG."""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from moefuse.evaluation.loop import DATA_COUNTS, count_into


@dataclass
class TrainerState:
    """The trainer state of a run: where it is (step, epoch, batches taken in this epoch: the data position a
    resume fast-forwards to), the best validation metric so far and early stopping's count, and the data counts
    (DATA_COUNTS: corrupt, lost and other-task samples). Saved as trainer_state.json by `to_dict`; keys of an
    older or newer trainer_state.json that are not fields here are kept in `extra` and saved again."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    samples_seen: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    skipped_nonfinite: int = 0
    last_loss: float | None = None
    stop_reason: str | None = None
    last_val_metrics: dict | None = None
    distillation: dict | None = None  # with a teacher: {"tasks", "samples" answered, "missing_rows"} (train.distill)
    # the DATA_COUNTS of evaluation.py
    skipped_corrupt: int = 0
    lost_samples: int = 0
    skipped_other_task: int = 0
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainerState:
        """A saved trainer_state.json (parsed): missing keys take their defaults, unknown ones go to `extra`."""
        data = {**data}  # a TypeError for anything but a mapping
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        """The trainer_state.json object: every field in order, then the `extra` keys."""
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}, **self.extra}

    def data_counts(self) -> dict[str, int]:
        """{DATA_COUNTS name: count} so far."""
        return {k: getattr(self, k) for k in DATA_COUNTS}

    def add_counts(self, batch_or_counts: dict) -> None:
        """Add a batch's data counts (or a loader's `tail_counts`) to the run's."""
        totals = self.data_counts()
        count_into(totals, batch_or_counts)
        for k, v in totals.items():
            setattr(self, k, v)

    def finished_because(self, max_steps: int) -> str | None:
        """Why a restored run has nothing left to train (None when it has)."""
        if self.stop_reason and self.stop_reason.startswith("early stopping"):
            return self.stop_reason
        if self.step >= max_steps:
            return f"it reached train.max_steps={max_steps} (raise it to train longer)"
        return None


assert set(DATA_COUNTS) <= {f.name for f in fields(TrainerState)}, "TrainerState lacks a DATA_COUNTS field"


@contextmanager
def preserved_rng(enabled: bool = True) -> Iterator[None]:
    """Restore the torch (CPU and CUDA), numpy and Python RNG states on exit: replaying data on resume (creating a
    DataLoader iterator draws a base seed from torch's RNG) must not shift the RNG the checkpoint restored, nor
    may a validation shift the training's draws."""
    if not enabled:
        yield
        return
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


__all__ = ["TrainerState", "preserved_rng"]
