"""Fusion: the expert kernels, the sparse MoE layer, the fusion stack, the voting heads and the top multimodal
model.

Names are imported from their modules on first use (`moefuse.lazy`)."""

from moefuse.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "moefuse.fusion.ensemble": ["EnsembleModel"],
    "moefuse.fusion.ensemble_combine": ["TaskCombiner"],
    "moefuse.fusion.heads": ["HeadsConfig", "TaskConfig", "TaskOutput", "VotingHeads"],
    "moefuse.fusion.kernels": ["grouped_mm"],
    "moefuse.fusion.model": ["EncodersConfig", "ModelConfig", "ModelOutput", "MultimodalMoEModel", "build_collator",
                             "build_model"],
    "moefuse.fusion.moe": ["DenseFFN", "MoEConfig", "MoEOutput", "SparseMoE"],
    "moefuse.fusion.stack": ["FusionConfig", "FusionOutput", "FusionStack"],
})
