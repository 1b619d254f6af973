"""An exported model folder's model, ready for inference: what `evaluate`, `predict` and `serve` load.

The folder is read by `MultimodalMoEModel.from_pretrained` (`moefuse.pretrained.folder`); then the encoder cache
(`moefuse.fusion.encoder_cache`) is turned on for the chosen modalities, and with `int8` the linear layers and
experts are quantised (`moefuse.fusion.quant`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from moefuse.fusion.model import MultimodalMoEModel
from moefuse.fusion.quant import quantize_int8


def load_inference_model(path: str | Path, device: str | torch.device = "cpu", int8: bool = False,
                         cache_encoders: list[str] | None = None) -> MultimodalMoEModel:
    """`from_pretrained`, then with `int8` the dynamic-int8 quantised model (CPU only), as evaluate, predict and
    serve use. `cache_encoders`: the modalities whose encoder outputs are reused for inputs seen before (None: those
    whose encoder was frozen in training, a fixed feature extractor that mostly sees repeated prompts)."""
    model = MultimodalMoEModel.from_pretrained(path, device=device)
    if cache_encoders is None:
        cache_encoders = [m for m, enc in model.encoders.items() if enc.cfg.finetune == "frozen"]
    model.cache_encoders(cache_encoders)
    if int8:
        model = quantize_int8(model)
    return model
