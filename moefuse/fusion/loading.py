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

from moefuse.fusion.ensemble import EnsembleModel
from moefuse.fusion.ensemble_folder import is_ensemble_folder
from moefuse.fusion.model import MultimodalMoEModel
from moefuse.fusion.runtime import prepare_inference, warm_up


def load_inference_model(path: str | Path, device: str | torch.device = "cpu", int8: bool = False,
                         cache_encoders: list[str] | None = None, runtime: str = "eager", quantize: str = "none",
                         warm: bool = True) -> MultimodalMoEModel | EnsembleModel:
    """`from_pretrained`, then set up for inference as evaluate, predict and serve use it. `cache_encoders`: the
    modalities whose encoder outputs are reused for inputs seen before (None: those whose encoder was frozen in
    training, a fixed feature extractor that mostly sees repeated prompts). `runtime` eager | compiled and
    `quantize` none | int8 | bf16 (`int8=True` is `quantize="int8"`): `moefuse.fusion.runtime`; a compiled model is
    compiled and warmed up here unless `warm` is false, and `model.startup_s` says how long that took.

    An ensemble folder (`moefuse.fusion.ensemble_folder`: it holds ensemble.json) loads as an EnsembleModel, each
    member set up the same way (`cache_encoders` restricted to the modalities it encodes)."""
    if is_ensemble_folder(path):
        return _load_ensemble(path, device, cache_encoders, runtime, "int8" if int8 else quantize, warm)
    model = MultimodalMoEModel.from_pretrained(path, device=device)
    model.cache_encoders(frozen_encoders(model) if cache_encoders is None else cache_encoders)
    return prepare_inference(model, runtime, "int8" if int8 else quantize, warm=warm)


def frozen_encoders(model: MultimodalMoEModel) -> list[str]:
    """The modalities whose encoder was frozen in training: a fixed feature extractor that mostly sees repeated
    prompts, whose outputs the encoder cache reuses by default."""
    return [m for m, enc in model.encoders.items() if enc.cfg.finetune == "frozen"]


def _load_ensemble(path: str | Path, device: str | torch.device, cache_encoders: list[str] | None, runtime: str,
                   quantize: str, warm: bool) -> EnsembleModel:
    """An ensemble folder's model, each member cached and prepared as a single model would be, then the whole
    ensemble warmed up when compiled."""
    model = EnsembleModel.from_pretrained(path, device=device)
    if cache_encoders is not None:
        model.cache_encoders(cache_encoders)  # checks the names against the ensemble's modalities
    for name, member in list(model.members.items()):
        member.cache_encoders(frozen_encoders(member) if cache_encoders is None
                              else [m for m in cache_encoders if m in member.encoders])
        model.members[name] = prepare_inference(member, runtime, quantize, warm=False)
    model.startup_s = warm_up(model) if runtime == "compiled" and warm else 0.0
    return model


def say_startup(model: MultimodalMoEModel, prog: str) -> None:
    """On stderr, what a compiled model's compilation and warm-up took (nothing for an eager one)."""
    if getattr(model, "startup_s", 0.0):
        print(f"{prog}: compiled and warmed up in {model.startup_s:.1f} s", file=sys.stderr, flush=True)
