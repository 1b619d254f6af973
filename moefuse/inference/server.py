"""An exported model behind an HTTP API, the library part of `moefuse serve` (FastAPI, run by uvicorn).

    GET  /health    {"status": "ok"}
    GET  /info      tasks with their vocabularies and types, modalities and the input fields they take, a summary
                    of the model's config, the calibration temperatures, the server's limits and batching
    POST /predict   one sample -> the JSON object `moefuse predict` writes for it (prediction, probability, top 5,
                    per-voter votes, agreement, modalities, routing summary)

A sample is given as multipart form fields `task`, `text`, `question` and files `image`, `audio` (a url-encoded
form for text alone), or as a JSON body with the same keys, the media base64-encoded. Media are read exactly as
`predict` reads files (each encoder's `read_input`, with the training shards' media settings), in a pool of
threads, so a slow decode never blocks other requests; the model runs in one place, fed by a DynamicBatcher that
batches concurrent requests.

Every bad request is a 4xx with `{"error": message, "field": the field or null}`: 413 for a body, file, clip or
text over a limit, 415 for another content type, 422 for an unknown task or field, no input, or media that cannot
be read; 503 when the queue is full, 504 past the request timeout. The request body is read with a cap before it
is parsed, so nothing a client sends makes the server hold more than `max_upload_mb` for it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import tempfile
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from moefuse.configutil import Config
from moefuse.datasets.media import MediaError, MediaTooLarge
from moefuse.errors import UserError
from moefuse.inference.batcher import DynamicBatcher, QueueFull
from moefuse.inference.predict import load_media_sample, predict_samples

if TYPE_CHECKING:
    from moefuse.fusion.model import MultimodalMoEModel


@dataclass
class ServeLimits(Config):
    """What one request may hold, and how requests are batched (`moefuse serve --help` names the flags)."""

    config_key = "serve"

    max_upload_mb: float = 20.0
    """Largest request body (all fields and files together), MiB."""
    max_audio_seconds: float = 30.0
    """Longest audio clip, seconds."""
    max_image_pixels: int = 20_000_000
    """Largest image, width x height."""
    max_text_chars: int = 2000
    """Longest text or question, characters."""
    timeout_s: float = 30.0
    """A request not answered within this many seconds gets a 504."""
    max_batch_size: int = 32
    """Most requests the model runs together."""
    max_wait_ms: float = 5.0
    """How long the first request of a batch waits for others."""
    max_queue: int = 256
    """Most requests waiting for the model; more get a 503."""
    max_connections: int = 64
    """Most connections served at once (uvicorn answers more with a 503); with max_upload_mb it bounds the memory
    that request bodies can hold (64 x 20 MiB by default)."""
    decode_threads: int = 1
    """Threads that read media (images, audio) beside the model, per worker (more threads contend for one
    process's GIL: on the 2-core VM 1 served 11 % more requests than 2 at concurrency 32, benchmarks/serve_load.py)."""

    def __post_init__(self) -> None:
        for name in ("max_upload_mb", "max_audio_seconds", "timeout_s"):
            self.check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        for name in ("max_image_pixels", "max_text_chars", "max_batch_size", "max_queue", "max_connections",
                     "decode_threads"):
            self.check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        self.check(self.max_wait_ms >= 0, "max_wait_ms", f"must be >= 0, got {self.max_wait_ms}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


class RequestError(Exception):
    """A request the server refuses: the HTTP status, the message and the field it is about (or None)."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is over `limit` bytes, declared or streamed."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the request is {int(declared)} bytes, over the limit of {limit} (max_upload_mb)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the request is over the limit of {limit} bytes (max_upload_mb)")
        chunks.append(chunk)
    return b"".join(chunks)


async def _form_fields(request: Request, body: bytes, files: set[str]) -> dict[str, str | tuple[bytes, str]]:
    """Multipart form -> {field: text | (file bytes, file name)}; a field given twice is an error."""
    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=len(files), max_fields=16)
    except Exception as e:  # starlette raises on malformed multipart bodies and on too many parts
        raise RequestError(422, f"the multipart body cannot be parsed: {e}") from None
    out: dict[str, str | tuple[bytes, str]] = {}
    try:
        for name, value in form.multi_items():
            if name in out:
                raise RequestError(422, f"field {name!r} is given twice", name)
            out[name] = (await value.read(), value.filename or "") if isinstance(value, UploadFile) else value
    finally:
        await form.close()
    return out


def _json_fields(body: bytes, files: set[str]) -> dict[str, str | tuple[bytes, str]]:
    """JSON object -> the same fields as a form, the media decoded from base64."""
    try:
        data = json.loads(body)
    except ValueError as e:
        raise RequestError(422, f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError(422, f"the JSON body must be an object of fields, got {type(data).__name__}")
    out: dict[str, str | tuple[bytes, str]] = {}
    for name, value in data.items():
        if value is None:
            continue
        if not isinstance(value, str):
            raise RequestError(422, f"field {name!r} must be a string, got {type(value).__name__}", name)
        if name in files:
            try:
                value = (base64.b64decode(value, validate=True), "")
            except (binascii.Error, ValueError):
                raise RequestError(422, f"field {name!r} is not valid base64", name) from None
        out[name] = value
    return out


async def request_fields(request: Request, body: bytes, files: set[str]) -> dict[str, str | tuple[bytes, str]]:
    """The request's fields: text as str, the `files` fields as (bytes, file name)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):  # the latter: text fields only
        return await _form_fields(request, body, files)
    if kind == "application/json":
        return _json_fields(body, files)
    raise RequestError(415, f"send multipart/form-data (or a url-encoded form) or application/json, not "
                            f"{kind or 'no content type'!r}")


class ModelServer:
    """The model, its media settings and limits, the decode pool and the batcher: what the app's routes use."""

    def __init__(self, model: MultimodalMoEModel, media: dict, limits: ServeLimits, name: str = "model"):
        self.model, self.limits, self.name = model.eval(), limits, name
        # the stricter of the training shards' limits and the server's
        self.media = {**media, "max_file_bytes": min(media["max_file_bytes"], limits.max_upload_bytes),
                      "max_audio_seconds": min(media["max_audio_seconds"], limits.max_audio_seconds),
                      "max_image_pixels": min(media["max_image_pixels"], limits.max_image_pixels)}
        self.inputs = [f for m in model.encoders for f in model.sample_fields[m]]  # the fields this model reads
        self.files = {f for enc in model.encoders.values() for f in enc.cfg.file_fields}  # those given as files
        self.decoder = ThreadPoolExecutor(limits.decode_threads, thread_name_prefix="moefuse-decode")
        self.batcher = DynamicBatcher(self._run, limits.max_batch_size, limits.max_wait_ms / 1000, limits.max_queue)

    def _run(self, samples: list[dict]) -> list[dict]:
        return predict_samples(self.model, samples, batch_size=self.limits.max_batch_size)

    def info(self) -> dict:
        cfg = self.model.cfg
        return {
            "model": self.name,
            "tasks": {t.name: {"type": t.type, "vocabulary": list(t.labels)} for t in cfg.tasks},
            "modalities": list(self.model.encoders),
            "fields": ["task", *self.inputs],
            "config": {"fusion": cfg.fusion.kind, "d_model": cfg.fusion.d_model, "layers": cfg.fusion.num_layers,
                       "experts": cfg.fusion.num_experts, "top_k": cfg.fusion.top_k,
                       "voters": list(self.model.voter_names), "combine": cfg.heads.combine},
            "temperature": {t: float(h.temperature) for t, h in self.model.heads.items()},
            "limits": asdict(self.limits),
            "recent_batch_sizes": self.batcher.batch_sizes[-20:],
        }

    def _check(self, fields: dict[str, str | tuple[bytes, str]]) -> str:
        """Field names, kinds and sizes; -> the task."""
        for name, value in fields.items():
            if name != "task" and name not in self.inputs:
                raise RequestError(422, f"unknown field {name!r}; this model takes {', '.join(['task', *self.inputs])}",
                                   name)
            if (name in self.files) != isinstance(value, tuple):
                kind = "a file" if name in self.files else "a string"
                raise RequestError(422, f"field {name!r} must be {kind}", name)
            if isinstance(value, str) and len(value) > self.limits.max_text_chars:
                raise RequestError(413, f"field {name!r} holds {len(value)} characters, over the limit of "
                                        f"{self.limits.max_text_chars} (max_text_chars)", name)
        task = fields.get("task") or (self.model.task_names[0] if len(self.model.task_names) == 1 else None)
        if task is None:
            raise RequestError(422, f"give the task: one of {', '.join(self.model.task_names)}", "task")
        return task  # type: ignore[return-value]

    def _decode(self, fields: dict[str, str | tuple[bytes, str]], task: str) -> dict:
        """The decoded sample (in a decode thread): media go through temporary files into the encoders' readers."""
        with tempfile.TemporaryDirectory(prefix="moefuse-serve-") as tmp:
            inputs: dict[str, object] = {f: fields.get(f) for f in self.inputs if f not in self.files}
            for f in self.inputs:
                if f in self.files and f in fields:
                    data, filename = fields[f]  # type: ignore[misc]
                    path = Path(tmp) / f"{f}{Path(filename).suffix[:16]}"
                    path.write_bytes(data)
                    inputs[f] = path
            try:
                return load_media_sample(self.model, uuid.uuid4().hex, task, media=self.media,
                                         spell="the field {!r}".format, **inputs)
            except (MediaError, UserError) as e:  # a file over a size limit is a 413, anything else a 422
                raise RequestError(413 if isinstance(e, MediaTooLarge) else 422,
                                   str(e).replace(f"{tmp}/", "uploaded "), getattr(e, "field", None)) from None

    async def predict(self, fields: dict[str, str | tuple[bytes, str]]) -> dict:
        task = self._check(fields)
        loop = asyncio.get_running_loop()
        sample = await loop.run_in_executor(self.decoder, self._decode, fields, task)
        result = await self.batcher.submit(sample)
        if "error" in result:
            raise RequestError(422, f"the model could not take this sample: {result['error']}")
        return result


def create_app(server: ModelServer) -> FastAPI:
    """The FastAPI app of `server` (its batcher starts and stops with the app)."""
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await server.batcher.start()
        yield
        await server.batcher.stop()
        server.decoder.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="moefuse", lifespan=lifespan)

    def refuse(status: int, message: str, field: str | None = None) -> JSONResponse:
        return JSONResponse({"error": message, "field": field}, status_code=status)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/info")
    async def info() -> dict:
        return server.info()

    @app.post("/predict", response_model=None)
    async def predict(request: Request) -> dict | JSONResponse:
        limits = server.limits
        try:
            async with asyncio.timeout(limits.timeout_s):
                body = await read_body(request, limits.max_upload_bytes)
                return await server.predict(await request_fields(request, body, server.files))
        except RequestError as e:
            return refuse(e.status, e.message, e.field)
        except QueueFull as e:
            return refuse(503, f"the server is busy ({e}); retry later")
        except TimeoutError:
            return refuse(504, f"no answer within {limits.timeout_s:g} s (timeout_s)")

    return app
