"""An exported model folder's model, ready for inference: what `evaluate`, `predict` and `serve` load.

The folder is read by `MultimodalMoEModel.from_pretrained` (`moefuse.pretrained.folder`); then the encoder cache
(`moefuse.fusion.encoder_cache`) is turned on for the chosen modalities, and the model is set up for its runtime
(eager or compiled) and weight precision (fp32, bf16 or int8): `moefuse.fusion.runtime`. The flags that choose
them are `moefuse.inference.options`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from moefuse.fusion.model import MultimodalMoEModel
from moefuse.fusion.runtime import prepare_inference


def load_inference_model(path: str | Path, device: str | torch.device = "cpu", int8: bool = False,
                         cache_encoders: list[str] | None = None, runtime: str = "eager", quantize: str = "none",
                         warm: bool = True) -> MultimodalMoEModel:
    """`from_pretrained`, then set up for inference as evaluate, predict and serve use it. `cache_encoders`: the
    modalities whose encoder outputs are reused for inputs seen before (None: those whose encoder was frozen in
    training, a fixed feature extractor that mostly sees repeated prompts). `runtime` eager | compiled and
    `quantize` none | int8 | bf16 (`int8=True` is `quantize="int8"`): `moefuse.fusion.runtime`; a compiled model is
    compiled and warmed up here unless `warm` is false, and `model.startup_s` says how long that took."""
    model = MultimodalMoEModel.from_pretrained(path, device=device)
    if cache_encoders is None:
        cache_encoders = [m for m, enc in model.encoders.items() if enc.cfg.finetune == "frozen"]
    model.cache_encoders(cache_encoders)
    return prepare_inference(model, runtime, "int8" if int8 else quantize, warm=warm)


def say_startup(model: MultimodalMoEModel, prog: str) -> None:
    """On stderr, what a compiled model's compilation and warm-up took (nothing for an eager one)."""
    if getattr(model, "startup_s", 0.0):
        print(f"{prog}: compiled and warmed up in {model.startup_s:.1f} s", file=sys.stderr, flush=True)
