"""`moefuse serve --checkpoint DIR [--host 127.0.0.1] [--port 8000]`: an exported model behind an HTTP API.

    curl -s localhost:8000/health
    curl -s localhost:8000/info
    curl -s -F task=avqa -F "question=what digit is spoken?" -F audio=@clip.wav localhost:8000/predict

The routes, the request formats and the errors: `moefuse.inference.server`, the library this entry point runs; how
connections are bounded: `moefuse.inference.connections`.

Exit codes: 2 when it cannot start, with one `moefuse serve: error:` line naming the cause: a bad flag or model
folder, or an address it cannot listen on (the port in use, a host that is neither an address nor a known name, an
address not of this machine, a port that needs privileges), checked before the model loads; 1 when the server
stopped before serving; after SIGINT, 130, and after SIGTERM, death by that signal (143 in a shell), each once the
requests under way are answered (uvicorn's graceful shutdown).
With --workers N, uvicorn starts N processes that each build their app with `app_from_environment` below.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moefuse.configutil import field_docs
from moefuse.errors import Number, command, help_text, positive_int, process_count
from moefuse.errors import port as port_number
from moefuse.inference.limits import ServeLimits
from moefuse.inference.options import add_runtime_flags, runtime_options

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
    import torch

    from moefuse.fusion.loading import load_inference_model, say_startup
    from moefuse.inference.predict import export_media
    from moefuse.inference.server import ModelServer, create_app

    settings = ServeSettings(**json.loads(os.environ[SETTINGS_ENV]))
    torch.set_num_threads(settings.threads)
    model = load_inference_model(settings.checkpoint, cache_encoders=settings.cache_encoders,
                                 runtime=settings.runtime, quantize=settings.quantize)
    say_startup(model, f"moefuse serve (worker {os.getpid()})")
    server = ModelServer(model, export_media(model), ServeLimits(**(settings.limits or {})),
                         name=Path(settings.checkpoint).name)  # the folder's name, not its path
    return create_app(server)


_LIMIT_TYPES = {
    "max_upload_mb": Number(float, 0, 2**20, low_open=True, unit="MiB"), "max_image_pixels": positive_int,
    "max_audio_seconds": Number(float, 0, 86400, low_open=True, unit="s"), "max_text_chars": positive_int,
    "timeout_s": Number(float, 0, 3600, low_open=True, unit="s"), "max_batch_size": positive_int,
    "max_wait_ms": Number(float, 0, 60_000, unit="ms"), "max_queue": positive_int, "max_connections": positive_int,
    "header_timeout_s": Number(float, 0, 600, low_open=True, unit="s"), "decode_threads": process_count,
}
"""The argparse type of each ServeLimits flag: finite, in range (a day of audio, an hour per request, a TiB per
upload at most), so nan, inf and typos are refused before the model is loaded."""


@command("moefuse serve")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moefuse serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="exported model folder (a run's model/)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port to listen on, 1-65535 (default 8000)")
    add_runtime_flags(p)
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
    # imported once the flags are checked, so that `moefuse serve --help` answers at once
    import torch

    from moefuse.fusion.loading import load_inference_model, say_startup
    from moefuse.inference.connections import ConnectionLimits, GuardedConfig, listen_socket, run
    from moefuse.inference.predict import export_media
    from moefuse.inference.server import ModelServer, create_app

    sock = listen_socket(args.host, args.port)  # before the model loads: an address in use fails at once
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    torch.set_num_threads(threads)
    how = runtime_options(args)
    # With several workers each compiles its own model: here the folder and the flags are only checked.
    model = load_inference_model(args.checkpoint, cache_encoders=args.cache_encoders, warm=args.workers == 1, **how)
    if args.workers == 1:
        say_startup(model, "moefuse serve")
    host, port = sock.getsockname()[:2]
    print(f"moefuse serve: {args.checkpoint} on http://{host if ':' not in host else f'[{host}]'}:{port} (tasks "
          f"{', '.join(model.task_names)}; workers {args.workers}, torch threads {threads} each)", file=sys.stderr,
          flush=True)
    connection_limits = ConnectionLimits(header_timeout_s=limits.header_timeout_s,
                                         request_timeout_s=limits.timeout_s + limits.header_timeout_s,
                                         max_waiting=limits.max_connections)
    options = dict(host=host, port=port, log_level="warning", timeout_keep_alive=5, ws="none", lifespan="on",
                   proxy_headers=False, server_header=False, limits=connection_limits)
    if args.workers == 1:  # this process serves, with the model it has loaded
        server = ModelServer(model, export_media(model), limits, name=Path(args.checkpoint).name)
        served = run(GuardedConfig(create_app(server), **options), sock)
    else:
        del model  # each worker process loads its own
        os.environ[SETTINGS_ENV] = json.dumps(asdict(ServeSettings(
            checkpoint=str(args.checkpoint), runtime=how["runtime"], quantize=how["quantize"],
            cache_encoders=args.cache_encoders, threads=threads, limits=asdict(limits))))
        served = run(GuardedConfig("moefuse.commands.serve:app_from_environment", factory=True, workers=args.workers,
                                   **options), sock)
    if not served:
        print("moefuse serve: error: the server stopped before it served (its log above says why)", file=sys.stderr)
        return 1
    return 0

