"""moefuse: multimodal mixture-of-experts fusion.

Packages by job, lowest first (an import runs down this list, never up: tests/test_layout.py):

    errors.py, configutil.py, outputs.py   how commands fail; typed YAML configs; typed module outputs
    datasets/     manifests, webdataset shards, streaming loaders, the collator and the demo data
    encoders/     one modality interface and the text (BERT), image (timm ViT) and audio (wav2vec2) encoders
    pretrained/   the model folder format (weights, config, architecture files, export.json, model card)
    inference/    predictions on raw inputs, the dynamic batcher and the HTTP server
    fusion/       the expert kernels, the sparse MoE layer, the fusion stack, the voting heads and the top model
    evaluation/   metrics, the evaluation report and its plots
    train/        the training recipe, its state, optimiser, checkpoints, FSDP and expert shards, pre-flight checks
    config.py     the experiment config (model + data + train)
    commands/     every `moefuse` command's `main`; cli.py: the `moefuse` console script

Public API (imported on first use, so `import moefuse` and every `moefuse --help` stay fast):

    from moefuse import MultimodalMoEModel
    model = MultimodalMoEModel.from_pretrained("outputs/demo/run/model")
    model.predict(task="digit", image="digit.png")      # the record `moefuse predict` writes
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

# public name -> the module that defines it
_API = {
    # the model, its config and outputs
    "MultimodalMoEModel": "moefuse.fusion.model", "ModelConfig": "moefuse.fusion.model",
    "ModelOutput": "moefuse.fusion.model", "EncodersConfig": "moefuse.fusion.model",
    "build_model": "moefuse.fusion.model", "build_collator": "moefuse.fusion.model",
    "load_inference_model": "moefuse.fusion.loading",
    # components
    "FusionConfig": "moefuse.fusion.stack", "FusionStack": "moefuse.fusion.stack",
    "MoEConfig": "moefuse.fusion.moe", "SparseMoE": "moefuse.fusion.moe",
    "HeadsConfig": "moefuse.fusion.heads", "TaskConfig": "moefuse.fusion.heads", "VotingHeads": "moefuse.fusion.heads",
    "TextEncoderConfig": "moefuse.encoders", "ImageEncoderConfig": "moefuse.encoders",
    "AudioEncoderConfig": "moefuse.encoders",
    # experiment configs
    "ExperimentConfig": "moefuse.config", "load_config": "moefuse.config", "DataConfig": "moefuse.datasets.config",
    "TrainConfig": "moefuse.train.config",
    # data
    "build_shards": "moefuse.datasets", "BuildOptions": "moefuse.datasets", "read_manifest": "moefuse.datasets",
    "make_demo_data": "moefuse.datasets", "build_train_loader": "moefuse.datasets",
    "build_eval_loader": "moefuse.datasets", "make_loader": "moefuse.datasets", "Collator": "moefuse.datasets",
    # inference, training (`moefuse.train` is the package; TrainRecipe(cfg).run() trains), evaluation
    "predict_samples": "moefuse.inference.predict", "load_media_sample": "moefuse.inference.predict",
    "TrainRecipe": "moefuse.train.recipe", "evaluate": "moefuse.evaluation.report",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'moefuse' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
