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
"""
