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

from moefuse.lazy import lazy_exports

__version__ = "0.2.0"

__getattr__, __dir__, _names = lazy_exports(__name__, {
    # the model, its config and outputs, and a model folder ready for inference
    "moefuse.fusion.model": ["MultimodalMoEModel", "ModelConfig", "ModelOutput", "EncodersConfig", "build_model",
                             "build_collator"],
    "moefuse.fusion.loading": ["load_inference_model"],
    "moefuse.fusion.ensemble": ["EnsembleModel"],
    # components
    "moefuse.fusion.stack": ["FusionConfig", "FusionStack"],
    "moefuse.fusion.moe": ["MoEConfig", "SparseMoE"],
    "moefuse.fusion.heads": ["HeadsConfig", "TaskConfig", "VotingHeads"],
    "moefuse.encoders": ["TextEncoderConfig", "ImageEncoderConfig", "AudioEncoderConfig"],
    # experiment configs
    "moefuse.config": ["ExperimentConfig", "load_config"],
    "moefuse.datasets.config": ["DataConfig"],
    "moefuse.train.config": ["TrainConfig"],
    # data
    "moefuse.datasets": ["build_shards", "BuildOptions", "read_manifest", "make_demo_data", "build_train_loader",
                         "build_eval_loader", "make_loader", "Collator"],
    # inference, training (`moefuse.train` is the package; TrainRecipe(cfg).run() trains), evaluation
    "moefuse.inference.predict": ["predict_samples", "load_media_sample"],
    "moefuse.train.recipe": ["TrainRecipe"],
    "moefuse.evaluation.report": ["evaluate"],
})
__all__ = ["__version__", *_names]
