"""The experiment config: every component's dataclass composed into one, loaded from `configs/*.yaml` with
dotted `key.sub=value` overrides (torchtune style). Unknown keys and wrong types are errors naming the key.

    cfg = load_config("configs/tiny.yaml", ["fusion.num_experts=16", "train.max_steps=50"])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moefuse.configutil import apply_overrides, from_dict, load_yaml, save_yaml
from moefuse.datasets.config import DataConfig
from moefuse.fusion.heads import HeadsConfig, TaskConfig
from moefuse.fusion.model import EncodersConfig, ModelConfig
from moefuse.fusion.stack import FusionConfig
from moefuse.train.config import TrainConfig


@dataclass
class ExperimentConfig:
    encoders: EncodersConfig = field(default_factory=EncodersConfig)
    """Modality encoders (moefuse.encoders); a null entry means the model takes no such input."""
    fusion: FusionConfig = field(default_factory=FusionConfig)
    """The shared fusion stack: moe | dense | concat, experts, routing and its losses."""
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    """Ensemble voting heads per task."""
    tasks: list[TaskConfig] = field(default_factory=list)
    """Tasks to train; empty = every task in the training shards' dataset.json, vocabularies from there too."""
    data: DataConfig = field(default_factory=DataConfig)
    """Shards, batching and loader workers."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, evaluation and checkpointing."""

    def model_config(self) -> ModelConfig:
        return ModelConfig(encoders=self.encoders, fusion=self.fusion, heads=self.heads, tasks=self.tasks)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """YAML file (or defaults when None) + dotted overrides -> a validated ExperimentConfig."""
    data = load_yaml(path) if path is not None else {}
    return from_dict(ExperimentConfig, apply_overrides(data, overrides or []))


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    save_yaml(cfg, path)
