"""An exported model folder's model, ready for inference: what `evaluate`, `predict` and `serve` load.

The folder is read by `MultimodalMoEModel.from_pretrained` (`moefuse.pretrained.folder`); then the encoder cache
(`moefuse.fusion.encoder_cache`) is turned on for the chosen modalities, and the model is set up for its runtime
(eager or compiled) and weight precision (fp32, bf16 or int8): `moefuse.fusion.runtime`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from moefuse.fusion.model import MultimodalMoEModel
from moefuse.fusion.runtime import QUANTIZE, RUNTIMES, prepare_inference


def load_inference_model(path: str | Path, device: str | torch.device = "cpu", int8: bool = False,
                         cache_encoders: list[str] | None = None, runtime: str = "eager", quantize: str = "none",
                         warm: bool = True) -> MultimodalMoEModel:
    """`from_pretrained`, then set up for inference as evaluate, predict and serve use it. `cache_encoders`: the
    modalities whose encoder outputs are reused for inputs seen before (None: those whose encoder was frozen in
    training, a fixed feature extractor that mostly sees repeated prompts). `runtime` eager | compiled and
    `quantize` none | int8 | bf16 (`int8=True` is `quantize="int8"`): `moefuse.fusion.runtime`; a compiled model is
    compiled and warmed up here unless `warm` is false, and `model.startup_s` says how long that took."""
    model = MultimodalMoEModel.from_pretrained(path, device)
    if cache_encoders is None:
        cache_encoders = [m for m, enc in model.encoders.items() if enc.cfg.finetune == "frozen"]
    model.cache_encoders(cache_encoders)
    return prepare_inference(model, runtime, "int8" if int8 else quantize, warm=warm)


# What predict, serve and evaluate run by default: chosen on the measurements in README (Benchmarks, Compression).
DEFAULT_RUNTIME = "eager"
DEFAULT_QUANTIZE = "none"


def add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    """--runtime, --quantize (and --int8, the earlier spelling of --quantize int8) for a command that loads a model."""
    parser.add_argument("--runtime", choices=RUNTIMES, default=DEFAULT_RUNTIME,
                        help="eager PyTorch, or compiled with torch.compile (inductor) once at start-up, warmed up "
                             f"before the first sample (default {DEFAULT_RUNTIME})")
    parser.add_argument("--quantize", choices=QUANTIZE, default=DEFAULT_QUANTIZE,
                        help="weights in fp32 (none), bf16 (linear layers, convolutions and experts; matmuls under "
                             "autocast) or int8 (torch.ao dynamic quantisation; eager only) "
                             f"(default {DEFAULT_QUANTIZE})")
    parser.add_argument("--int8", action="store_true", help="the same as --quantize int8")


def runtime_options(args: argparse.Namespace) -> dict:
    """The load_inference_model keyword arguments of the flags of add_runtime_flags."""
    return {"runtime": args.runtime, "quantize": "int8" if args.int8 else args.quantize}


def say_startup(model: MultimodalMoEModel, prog: str) -> None:
    """On stderr, what a compiled model's compilation and warm-up took (nothing for an eager one)."""
    if getattr(model, "startup_s", 0.0):
        print(f"{prog}: compiled and warmed up in {model.startup_s:.1f} s", file=sys.stderr, flush=True)
