"""The experiment config: every component's dataclass composed into one, loaded from `configs/*.yaml` with
dotted `key.sub=value` overrides (torchtune style). Unknown keys and wrong types are errors naming the key.

    cfg = load_config("configs/tiny.yaml", ["fusion.num_experts=16", "train.max_steps=50"])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moefuse.configutil import apply_overrides, from_dict, load_yaml, save_yaml
from moefuse.datasets.config import DataConfig
from moefuse.fusion.model import ModelConfig
from moefuse.train.config import TrainConfig
from moefuse.train.distill import DistillConfig


@dataclass
class ExperimentConfig(ModelConfig):
    """The model's config (encoders, fusion, heads, tasks: `ModelConfig`) plus how to train it."""

    data: DataConfig = field(default_factory=DataConfig)
    """Shards, batching and loader workers."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, evaluation and checkpointing."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Knowledge distillation from a teacher model folder (`moefuse.train.distill`); off unless a teacher is given."""

    def __post_init__(self) -> None:
        super().__post_init__()
        known = list(self.encoders.slots())
        self.check(set(self.data.drop_modalities) <= set(known), "data.drop_modalities",
                   f"must list only {', '.join(known)}; got {self.data.drop_modalities}")
        read = list(self.encoders.configured())
        self.check(not read or not set(read) <= set(self.data.drop_modalities), "data.drop_modalities",
                   f"drops every modality the model reads ({', '.join(read)}), so no sample would have an input: "
                   f"keep at least one")

    def model_config(self) -> ModelConfig:
        """The part of the config that the model is built from (and exported with)."""
        return ModelConfig(encoders=self.encoders, fusion=self.fusion, heads=self.heads, tasks=self.tasks)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """YAML file (or defaults when None) + dotted overrides -> a validated ExperimentConfig."""
    data = load_yaml(path) if path is not None else {}
    return from_dict(ExperimentConfig, apply_overrides(data, overrides or []))


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    save_yaml(cfg, path)
