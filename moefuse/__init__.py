"""moefuse: multimodal mixture-of-experts fusion.

    encoders/   one modality interface and the text (BERT), image (timm ViT) and audio (wav2vec2) encoders
    fusion/     the expert kernels, the sparse MoE layer, the fusion stack, the voting heads and the top model
    datasets/   manifests, webdataset shards, streaming loaders, the collator and the demo data
    train/      the `moefuse` commands (entry points) and the training, evaluation and inference code they run
    config.py   the experiment config; configutil.py: typed YAML configs with dotted overrides
    errors.py   how every command fails; cli.py: the `moefuse` console script
"""
