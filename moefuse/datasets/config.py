"""The `data:` section of the experiment config, and the loaders it builds (see loader.py for the semantics)."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import ClassVar

from moefuse.configutil import Config, ConfigError, check
from moefuse.datasets.loader import ShardLoader, loader_option_problems, make_loader


@dataclass
class DataConfig(Config):
    config_key: ClassVar[str] = "data"

    train_shards: list[str] = field(default_factory=list)
    """Training sources: dataset folders (from `moefuse build-shards`; their `train_split` is read), dataset.json
    paths/URLs, or shard patterns/URLs such as `data/train-{000000..000009}.tar`. Several are read as one stream."""
    val_shards: list[str] = field(default_factory=list)
    """Validation sources, same forms (their `val_split` is read from dataset folders); [] = no validation."""
    train_split: str = "train"
    """Split read from dataset folders in train_shards."""
    val_split: str = "val"
    """Split read from dataset folders in val_shards."""
    batch_size: int = 32
    """Training samples per batch, per process."""
    eval_batch_size: int = 64
    """Evaluation samples per batch, per process."""
    num_workers: int = 0
    """DataLoader worker processes per training process (0 = load in the main process)."""
    shuffle_buffer: int = 1000
    """Training samples held in webdataset's shuffle buffer (shards are shuffled too); 0 = no shuffling."""
    resampled: bool = False
    """Draw training shards at random with replacement, an endless stream cut into epochs of epoch_samples: the
    recommended mode for multi-node training (every rank gets the same number of batches)."""
    epoch_samples: int | None = None
    """Samples per training epoch across all ranks in resampled mode; null = the training split's size."""
    task_weights: dict[str, float] = field(default_factory=dict)
    """Share of each task in the training stream, e.g. {digit: 1, avqa: 3}; needs resampled: true and a weight
    for every training task. {} = proportional to the number of samples (every sample once per epoch)."""

    drop_modalities: list[str] = field(default_factory=list)
    """Modalities removed from every sample in training and validation, for ablations (e.g. [audio] with
    encoders.audio: null trains an image-only model on audio-visual shards); names are keys of `encoders:`,
    checked against them where the whole experiment config is known."""

    def __post_init__(self) -> None:
        self.check(all(isinstance(m, str) and m for m in self.drop_modalities), "drop_modalities",
                   f"must list modality names (the model's encoders: keys); got {self.drop_modalities}")
        for key in ("train_shards", "val_shards"):
            for i, spec in enumerate(getattr(self, key)):
                self.check(isinstance(spec, str) and spec.strip() != "", f"{key}[{i}]",
                           "must be a non-empty path, pattern or URL")
        # the loader's own rules (one place: loader_option_problems), checked now to name the config key
        problems = loader_option_problems(batch_size=self.batch_size, num_workers=self.num_workers,
                                          shuffle=self.shuffle_buffer, resampled=self.resampled,
                                          epoch_samples=self.epoch_samples, task_weights=self.task_weights)
        problems += [("eval_batch_size", p) for _, p in loader_option_problems(batch_size=self.eval_batch_size)]
        if problems:
            option, problem = problems[0]
            raise ConfigError(f"{self.key('shuffle_buffer' if option == 'shuffle' else option)}: {problem}")


def build_train_loader(cfg: DataConfig, collator: Callable, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                       audio_sample_rate: int | None = None, tasks: Collection[str] | None = None) -> ShardLoader:
    """The training loader; the trainer passes accelerator.process_index / num_processes as rank / world_size.
    tasks: keep only these tasks' samples (the config's task list); None keeps every task."""
    check(bool(cfg.train_shards), cfg.key("train_shards"), "is empty; give the dataset folder(s) to train on")
    return make_loader(cfg.train_shards, collator, cfg.batch_size, split=cfg.train_split,
                       num_workers=cfg.num_workers, shuffle=cfg.shuffle_buffer, resampled=cfg.resampled,
                       epoch_samples=cfg.epoch_samples, rank=rank, world_size=world_size, seed=seed,
                       audio_sample_rate=audio_sample_rate, task_weights=cfg.task_weights or None, tasks=tasks)


def build_eval_loader(cfg: DataConfig, collator: Callable, *, sources: list[str] | None = None,
                      split: str | None = None, rank: int = 0, world_size: int = 1,
                      audio_sample_rate: int | None = None, tasks: Collection[str] | None = None) -> ShardLoader:
    """An evaluation loader (no shuffle, every sample once across ranks) over `sources` (default: val_shards);
    tasks: keep only these tasks' samples; None keeps every task."""
    sources = cfg.val_shards if sources is None else sources
    check(bool(sources), cfg.key("val_shards"), "is empty; give the dataset folder(s) to evaluate on")
    return make_loader(sources, collator, cfg.eval_batch_size, split=split or cfg.val_split,
                       num_workers=cfg.num_workers, rank=rank, world_size=world_size,
                       audio_sample_rate=audio_sample_rate, tasks=tasks)
