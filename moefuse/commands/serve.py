"""`moefuse serve --checkpoint DIR [--host 127.0.0.1] [--port 8000]`: an exported model behind an HTTP API.

    curl -s localhost:8000/health
    curl -s localhost:8000/info
    curl -s -F task=avqa -F "question=what digit is spoken?" -F audio=@clip.wav localhost:8000/predict

The routes, the request formats and the errors: `moefuse.inference.server`, the library this entry point runs.
With --workers N, uvicorn starts N processes that each build their app with `app_from_environment` below.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from moefuse.configutil import field_docs
from moefuse.errors import command, positive_int
from moefuse.fusion.loading import add_runtime_flags, load_inference_model, runtime_options, say_startup
from moefuse.inference.predict import export_media
from moefuse.inference.server import ModelServer, ServeLimits, create_app

if TYPE_CHECKING:
    from fastapi import FastAPI

SETTINGS_ENV = "MOEFUSE_SERVE_SETTINGS"  # what every worker process builds its app from (JSON)


@dataclass
class ServeSettings:
    """What a worker process loads: the model folder and how, its torch threads, the limits."""

    checkpoint: str
    runtime: str = "eager"
    quantize: str = "none"
    cache_encoders: list[str] | None = None
    threads: int = 1
    limits: dict | None = None


def app_from_environment() -> FastAPI:
    """The app of one worker process (uvicorn's factory): the model loaded as $MOEFUSE_SERVE_SETTINGS says. Each
    worker holds its own model and batcher: Python runs one thread at a time per process, so on several cores
    processes, not threads, serve more requests (one process's GIL serialises decoding, HTTP and the model's
    Python)."""
    settings = ServeSettings(**json.loads(os.environ[SETTINGS_ENV]))
    torch.set_num_threads(settings.threads)
    model = load_inference_model(settings.checkpoint, cache_encoders=settings.cache_encoders,
                                 runtime=settings.runtime, quantize=settings.quantize)
    say_startup(model, f"moefuse serve (worker {os.getpid()})")
    server = ModelServer(model, export_media(settings.checkpoint), ServeLimits(**(settings.limits or {})),
                         name=settings.checkpoint)
    return create_app(server)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


@command("moefuse serve")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moefuse serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="exported model folder (a run's model/)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    add_runtime_flags(p)
    p.add_argument("--cache-encoders", nargs="*", metavar="MODALITY", default=None,
                   help="modalities whose encoder outputs are reused for inputs seen before, e.g. a repeated question "
                        "(default: the encoders frozen in training; the flag alone turns the cache off)")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="server processes, each with its own model and batcher, sharing the port: for throughput on "
                        "several cores (one process's GIL serialises its requests' Python); default 1")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads per worker (default: the cores divided among the workers)")
    defaults, docs = ServeLimits(), field_docs(ServeLimits)
    for name, kind in (("max_upload_mb", _number), ("max_audio_seconds", _number), ("max_image_pixels", positive_int),
                       ("max_text_chars", positive_int), ("timeout_s", _number), ("max_batch_size", positive_int),
                       ("max_wait_ms", _number), ("max_queue", positive_int), ("max_connections", positive_int),
                       ("decode_threads", positive_int)):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=getattr(defaults, name),
                       help=f"{docs.get(name, name)} (default {getattr(defaults, name)})")
    args = p.parse_args(argv)
    limits = ServeLimits(**{k: getattr(args, k) for k in ServeLimits.__dataclass_fields__ if hasattr(args, k)})
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    torch.set_num_threads(threads)
    how = runtime_options(args)
    # With several workers each compiles its own model: here the folder and the flags are only checked.
    model = load_inference_model(args.checkpoint, cache_encoders=args.cache_encoders, warm=args.workers == 1, **how)
    if args.workers == 1:
        say_startup(model, "moefuse serve")
    import uvicorn  # imported here: `moefuse serve --help` stays fast

    print(f"moefuse serve: {args.checkpoint} on http://{args.host}:{args.port} (tasks {', '.join(model.task_names)}; "
          f"workers {args.workers}, torch threads {threads} each)", file=sys.stderr, flush=True)
    options = dict(host=args.host, port=args.port, log_level="warning", limit_concurrency=limits.max_connections,
                   timeout_keep_alive=5)
    if args.workers == 1:  # this process serves, with the model it has loaded
        server = ModelServer(model, export_media(args.checkpoint), limits, name=str(args.checkpoint))
        uvicorn.run(create_app(server), **options)
        return 0
    del model  # each worker process loads its own
    os.environ[SETTINGS_ENV] = json.dumps(asdict(ServeSettings(
        checkpoint=str(args.checkpoint), runtime=how["runtime"], quantize=how["quantize"],
        cache_encoders=args.cache_encoders, threads=threads,
        limits=asdict(limits))))
    uvicorn.run("moefuse.commands.serve:app_from_environment", factory=True, workers=args.workers, **options)
    return 0

