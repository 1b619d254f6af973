"""Fusion: the expert kernels, the sparse MoE layer, the fusion stack, the voting heads and the top multimodal
model."""

from moefuse.fusion.heads import HeadsConfig, TaskConfig, TaskOutput, VotingHeads
from moefuse.fusion.kernels import grouped_mm
from moefuse.fusion.model import (
    EncodersConfig,
    ModelConfig,
    ModelOutput,
    MultimodalMoEModel,
    build_collator,
    build_model,
)
from moefuse.fusion.moe import DenseFFN, MoEConfig, MoEOutput, SparseMoE
from moefuse.fusion.stack import FusionConfig, FusionOutput, FusionStack

__all__ = [
    "DenseFFN",
    "EncodersConfig",
    "FusionConfig",
    "FusionOutput",
    "FusionStack",
    "HeadsConfig",
    "ModelConfig",
    "ModelOutput",
    "MoEConfig",
    "MoEOutput",
    "MultimodalMoEModel",
    "SparseMoE",
    "TaskConfig",
    "TaskOutput",
    "VotingHeads",
    "build_collator",
    "build_model",
    "grouped_mm",
]
