"""Inference on raw inputs: `predict` (files, images, arrays and strings -> decoded samples -> one result per
sample, errors kept per sample), `batcher` (the dynamic batcher of the server) and `server` (`moefuse serve`'s
HTTP API). Nothing here knows a model class: the model is passed in."""
