"""`moefuse serve --checkpoint DIR [--host 127.0.0.1] [--port 8000]`: an exported model behind an HTTP API.

    curl -s localhost:8000/health
    curl -s localhost:8000/info
    curl -s -F task=avqa -F "question=what digit is spoken?" -F audio=@clip.wav localhost:8000/predict

The routes, the request formats and the errors: `moefuse.train.server`, the library this entry point runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

import torch

from moefuse.configutil import field_docs
from moefuse.errors import Number, command, help_text, port, positive_int, process_count
from moefuse.train.checkpoint import load_inference_model
from moefuse.train.inference import export_media
from moefuse.train.server import SETTINGS_ENV, ModelServer, ServeLimits, ServeSettings, create_app

_LIMIT_TYPES = {
    "max_upload_mb": Number(float, 0, 2**20, low_open=True, unit="MiB"), "max_image_pixels": positive_int,
    "max_audio_seconds": Number(float, 0, 86400, low_open=True, unit="s"), "max_text_chars": positive_int,
    "timeout_s": Number(float, 0, 3600, low_open=True, unit="s"), "max_batch_size": positive_int,
    "max_wait_ms": Number(float, 0, 60_000, unit="ms"), "max_queue": positive_int, "max_connections": positive_int,
    "decode_threads": process_count,
}
"""The argparse type of each ServeLimits flag: finite, in range (a day of audio, an hour per request, a TiB per
upload at most), so nan, inf and typos are refused before the model is loaded."""


@command("moefuse serve")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moefuse serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="exported model folder (a run's model/)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=port, default=8000, help="TCP port to listen on, 1-65535 (default 8000)")
    p.add_argument("--int8", action="store_true", help="dynamic int8 quantisation of every linear layer and expert")
    p.add_argument("--cache-encoders", nargs="*", metavar="MODALITY", default=None,
                   help="modalities whose encoder outputs are reused for inputs seen before, e.g. a repeated question "
                        "(default: the encoders frozen in training; the flag alone turns the cache off)")
    p.add_argument("--workers", type=process_count, default=1,
                   help="server processes, each with its own model and batcher, sharing the port: for throughput on "
                        "several cores (one process's GIL serialises its requests' Python); 1-256, default 1")
    p.add_argument("--threads", type=process_count, default=None,
                   help="torch threads per worker, 1-256 (default: the cores divided among the workers)")
    defaults, docs = ServeLimits(), field_docs(ServeLimits)
    for name, kind in _LIMIT_TYPES.items():
        default = getattr(defaults, name)
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=default,
                       help=help_text(f"{docs.get(name, name)} ({kind.range_text()}; default {default})"))
    args = p.parse_args(argv)
    if args.max_wait_ms >= args.timeout_s * 1000:  # every request would wait out its timeout: a server of 504s
        p.error(f"argument --max-wait-ms: must be under --timeout-s ({args.timeout_s:g} s), got {args.max_wait_ms:g}")
    limits = ServeLimits(**{k: getattr(args, k) for k in ServeLimits.__dataclass_fields__ if hasattr(args, k)})
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    torch.set_num_threads(threads)
    model = load_inference_model(args.checkpoint, int8=args.int8, cache_encoders=args.cache_encoders)  # checked here
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
        checkpoint=str(args.checkpoint), int8=args.int8, cache_encoders=args.cache_encoders, threads=threads,
        limits=asdict(limits))))
    uvicorn.run("moefuse.train.server:app_from_environment", factory=True, workers=args.workers, **options)
    return 0

