"""The inference runtime flags that `evaluate`, `predict` and `serve` share (`--runtime`, `--quantize`, `--int8`),
light enough to import before a command's flags are checked (no torch): what each choice does is
`moefuse.fusion.runtime`, and `moefuse.fusion.loading.load_inference_model` applies it."""

from __future__ import annotations

import argparse

RUNTIMES: tuple[str, ...] = ("eager", "compiled")
"""eager PyTorch, or torch.compile (inductor) once per process."""
QUANTIZE: tuple[str, ...] = ("none", "int8", "bf16")
"""Weight precision: fp32, torch.ao dynamic int8, or bf16 under CPU autocast."""

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
