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

Every refusal, whatever refuses, is `{"error": message, "field": the field or null}` (JSON): 400 a request that is
not HTTP, 404 and 405 another route or method, 408 headers not sent in time, 413 a body, file, clip or text over a
limit, 415 another content type, 422 an unknown task or field, no input, a body that cannot be parsed whole (bad or
deeply nested JSON, a key given twice, a multipart body cut before its closing boundary) or a sample that cannot
be read or run, 431 headers over their limit, 503 when the server is full, 504 past the request timeout. One
sample's failure, whatever raised it, is that request's 4xx: every other sample of its batch is answered. The
request body is read with a cap before it is parsed, so nothing a client sends makes the server hold more than
`max_upload_mb` for it; messages show no path of the server and at most 64 characters of a client's field name.
How connections are bounded (time to send the headers, their size, waiting sockets): moefuse.inference.connections.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import re
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote_to_bytes

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartParser
from starlette.requests import ClientDisconnect

from moefuse.datasets.media import MediaError, MediaTooLarge
from moefuse.errors import UserError
from moefuse.inference.batcher import DynamicBatcher, QueueFull
from moefuse.inference.limits import ServeLimits
from moefuse.inference.predict import describe, load_media_sample, predict_samples

if TYPE_CHECKING:
    from moefuse.fusion.model import MultimodalMoEModel


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


NAME_CHARS = 64  # the most of a client's field name that a message repeats


def shown(name: str) -> str:
    """A client's field name as messages quote it: at most NAME_CHARS characters, escaped (repr)."""
    return repr(name if len(name) <= NAME_CHARS else name[:NAME_CHARS] + "...")


def field_label(name: str | None) -> str | None:
    """A client's field name as the `field` of an answer: at most NAME_CHARS characters, valid UTF-8."""
    if name is None:
        return None
    name = name if len(name) <= NAME_CHARS else name[:NAME_CHARS] + "..."
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


_PATH = re.compile(r"(?<![\w.])/(?:[\w.+~-]+/)+[\w.+~-]*")  # an absolute path of two or more parts


def public(message: str, tmp: str | None = None) -> str:
    """A message as a client may see it: an upload's temporary folder shown as "uploaded", any other absolute
    path of the server hidden, at most 1000 characters, valid UTF-8."""
    if tmp:
        message = message.replace(f"{tmp}/", "uploaded ")
    message = _PATH.sub("<path>", message)
    message = message if len(message) <= 1000 else message[:997] + "..."
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


class _MultiPartParser(MultiPartParser):
    """starlette's multipart parser, noting whether the closing boundary came (python-multipart accepts a body cut
    short, and the part it was in would be dropped without a word), and refusing a text field that is not valid
    UTF-8 (starlette would read it as latin-1: an answer on input the client did not send)."""

    ended = False

    def on_end(self) -> None:
        self.ended = True

    def on_part_end(self) -> None:
        if self._current_part.file is None:
            _strict_text(bytes(self._current_part.data), self._current_part.field_name)
        super().on_part_end()


def _strict_text(data: bytes, field: str) -> str:
    """A form field's bytes as text, or a 422 naming the field when they are not valid UTF-8 (RFC 7578 §5.1)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(422, f"field {shown(field)} is not valid UTF-8 text (byte {e.start}); send UTF-8",
                           field) from None


def _urlencoded_fields(body: bytes) -> list[tuple[str, str]]:
    """An application/x-www-form-urlencoded body, strictly: every name and value valid UTF-8 once unquoted
    (starlette would replace bad bytes with U+FFFD and answer on the altered text), at most 16 fields."""
    try:
        pairs = [pair.split(b"=", 1) if b"=" in pair else [pair, b""] for pair in body.split(b"&") if pair]
    except ValueError:
        raise RequestError(422, "the form body cannot be parsed") from None
    if len(pairs) > 16:
        raise RequestError(422, f"the form body has {len(pairs)} fields, over the limit of 16")
    fields = []
    for raw_name, raw_value in pairs:
        name = _strict_text(unquote_to_bytes(raw_name.replace(b"+", b" ")), "a field name")
        fields.append((name, _strict_text(unquote_to_bytes(raw_value.replace(b"+", b" ")), name)))
    return fields


async def _form_fields(request: Request, body: bytes, files: set[str], limit: int
                       ) -> dict[str, str | tuple[bytes, str]]:
    """Multipart or url-encoded form -> {field: text | (file bytes, file name)}; a field given twice is an error,
    and so is a multipart body that does not end with its closing boundary (RFC 2046 §5.1.1)."""
    async def stream() -> AsyncIterator[bytes]:
        yield body

    multipart = request.headers.get("content-type", "").lower().startswith("multipart/")
    try:
        if multipart:
            parser = _MultiPartParser(request.headers, stream(), max_files=len(files), max_fields=16,
                                      max_part_size=limit)
            form = await parser.parse()
            if not parser.ended:
                await form.close()
                raise RequestError(422, "the multipart body ends before its closing boundary: it was cut short; "
                                        "send the whole body")
        else:
            form = FormData(_urlencoded_fields(body))
    except RequestError:
        raise
    except Exception as e:  # starlette and python-multipart raise on malformed bodies and on too many parts
        raise RequestError(422, f"the form body cannot be parsed: {describe(e, 200)}") from None
    out: dict[str, str | tuple[bytes, str]] = {}
    try:
        for name, value in form.multi_items():
            if name in out:
                raise RequestError(422, f"field {shown(name)} is given twice", name)
            out[name] = (await value.read(), value.filename or "") if isinstance(value, UploadFile) else value
    finally:
        await form.close()
    return out


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """json.loads' object hook: a key given twice is refused, not silently the last one (RFC 8259 §4: names
    SHOULD be unique, and parsers disagree on which value wins)."""
    out: dict[str, object] = {}
    for name, value in pairs:
        if name in out:
            raise RequestError(422, f"the JSON body gives the key {shown(name)} twice", name)
        out[name] = value
    return out


def _json_fields(body: bytes, files: set[str]) -> dict[str, str | tuple[bytes, str]]:
    """JSON object -> the same fields as a form, the media decoded from base64."""
    try:
        data = json.loads(body, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise RequestError(422, "the JSON body is nested too deeply; send an object of string fields") from None
    except ValueError as e:
        raise RequestError(422, f"the body is not valid JSON: {describe(e, 200)}") from None
    if not isinstance(data, dict):
        raise RequestError(422, f"the JSON body must be an object of fields, got {type(data).__name__}")
    out: dict[str, str | tuple[bytes, str]] = {}
    for name, value in data.items():
        if value is None:
            continue
        if not isinstance(value, str):
            raise RequestError(422, f"field {shown(name)} must be a string, got {type(value).__name__}", name)
        if name in files:
            try:
                value = (base64.b64decode(value, validate=True), "")
            except (binascii.Error, ValueError):
                raise RequestError(422, f"field {shown(name)} is not valid base64", name) from None
        out[name] = value
    return out


async def request_fields(request: Request, body: bytes, files: set[str], limit: int
                         ) -> dict[str, str | tuple[bytes, str]]:
    """The request's fields: text as str, the `files` fields as (bytes, file name); `limit`: the largest part."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):  # the latter: text fields only
        return await _form_fields(request, body, files, limit)
    if kind == "application/json":
        return _json_fields(body, files)
    raise RequestError(415, f"send multipart/form-data (or a url-encoded form) or application/json, not "
                            f"{shown(kind) if kind else 'no content type'}")


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
        self.active = 0  # requests being served, from when they have fully arrived to their answer

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """One of the max_connections places for a request that has arrived; a 503 when none is free."""
        if self.active >= self.limits.max_connections:
            raise RequestError(503, f"the server is serving {self.active} requests, its limit (max_connections); "
                                    f"retry later")
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1

    def _run(self, samples: list[dict]) -> list[dict]:
        return predict_samples(self.model, samples, batch_size=self.limits.max_batch_size)

    def info(self) -> dict:
        cfg = self.model.cfg
        return {
            "model": self.name,
            "tasks": {t.name: {"type": t.type, "vocabulary": list(t.labels)} for t in cfg.tasks},
            "modalities": list(self.model.encoders),
            "fields": ["task", *self.inputs],
            "config": self.model.serving_config(),
            "temperature": self.model.temperatures(),
            "limits": asdict(self.limits),
            "recent_batch_sizes": self.batcher.batch_sizes[-20:],
        }

    def _check(self, fields: dict[str, str | tuple[bytes, str]]) -> str:
        """Field names, kinds and sizes; -> the task."""
        for name, value in fields.items():
            if name != "task" and name not in self.inputs:
                raise RequestError(422, f"unknown field {shown(name)}; this model takes "
                                        f"{', '.join(['task', *self.inputs])}", name)
            if (name in self.files) != isinstance(value, tuple):
                kind = "a file" if name in self.files else "a string"
                raise RequestError(422, f"field {shown(name)} must be {kind}", name)
            if isinstance(value, str) and len(value) > self.limits.max_text_chars:
                raise RequestError(413, f"field {shown(name)} holds {len(value)} characters, over the limit of "
                                        f"{self.limits.max_text_chars} (max_text_chars)", name)
        task = fields.get("task") or (self.model.task_names[0] if len(self.model.task_names) == 1 else None)
        if task not in self.model.task_names:
            given = f"unknown task {shown(task)}; " if task else ""  # type: ignore[arg-type]
            raise RequestError(422, f"{given}give the task: one of {', '.join(self.model.task_names)}", "task")
        return task  # type: ignore[return-value]

    def _decode(self, fields: dict[str, str | tuple[bytes, str]], task: str) -> dict:
        """The decoded sample (in a decode thread): media go through temporary files into the encoders' readers."""
        with tempfile.TemporaryDirectory(prefix="moefuse-serve-") as tmp:
            inputs: dict[str, object] = {f: fields.get(f) for f in self.inputs if f not in self.files}
            for f in self.inputs:
                if f in self.files and f in fields:
                    data, filename = fields[f]  # type: ignore[misc]
                    suffix = Path(filename).suffix  # the client's: kept only if a plain extension (a format hint)
                    path = Path(tmp) / (f + (suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,15}", suffix) else ""))
                    path.write_bytes(data)
                    inputs[f] = path
            try:
                return load_media_sample(self.model, uuid.uuid4().hex, task, media=self.media,
                                         spell="the field {!r}".format, **inputs)
            except (MediaError, UserError) as e:  # a file over a size limit is a 413, anything else a 422
                raise RequestError(413 if isinstance(e, MediaTooLarge) else 422,
                                   public(str(e), tmp), getattr(e, "field", None)) from None
            except Exception as e:  # whatever else fails on this sample is this request's, not the server's
                raise RequestError(422, f"the sample cannot be read: {public(describe(e), tmp)}") from None

    async def predict(self, fields: dict[str, str | tuple[bytes, str]]) -> dict:
        """The answer for one request's fields; whatever fails on this sample is a RequestError (its 4xx)."""
        task = self._check(fields)
        loop = asyncio.get_running_loop()
        try:
            sample = await loop.run_in_executor(self.decoder, self._decode, fields, task)
        except RequestError:
            raise
        except OSError:  # the temporary folder of the upload: the server's disk, not the request
            raise RequestError(503, "the server cannot store the upload now (its disk); retry later") from None
        except Exception as e:
            raise RequestError(422, f"the sample cannot be read: {public(describe(e))}") from None
        try:
            result = await self.batcher.submit(sample)
        except (QueueFull, asyncio.CancelledError):
            raise
        except Exception as e:  # this sample failed even when run alone (the batcher reran it)
            raise RequestError(422, f"the model could not take this sample: {public(describe(e))}") from None
        if "error" in result:
            raise RequestError(422, f"the model could not take this sample: {public(result['error'])}")
        return result


ROUTES = "GET /health, GET /info and POST /predict"


def refuse(status: int, message: str, field: str | None = None, close: bool = False) -> JSONResponse:
    """The API's error answer; `close`: end the connection after it."""
    headers = {"connection": "close"} if close else {}
    if status == 503:
        headers["retry-after"] = "1"
    return JSONResponse({"error": public(message), "field": field_label(field)}, status_code=status, headers=headers)


def create_app(server: ModelServer) -> FastAPI:
    """The FastAPI app of `server` (its batcher starts and stops with the app). No /docs, /redoc or
    /openapi.json: the routes are documented in this module, and FastAPI's pages load their scripts from a CDN."""
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await server.batcher.start()
        yield
        await server.batcher.stop()
        server.decoder.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="moefuse", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/info", response_model=None)
    async def info() -> dict | JSONResponse:
        try:
            with server.serving():
                return server.info()
        except RequestError as e:
            return refuse(e.status, e.message, e.field)

    @app.post("/predict", response_model=None)
    async def predict(request: Request) -> dict | JSONResponse:
        limits = server.limits
        try:
            async with asyncio.timeout(limits.timeout_s):
                body = await read_body(request, limits.max_upload_bytes)  # not yet served: it has not all come
                with server.serving():
                    fields = await request_fields(request, body, server.files, limits.max_upload_bytes)
                    return await server.predict(fields)
        except RequestError as e:  # the rest of a body not read is discarded as it comes, header_timeout_s at most
            return refuse(e.status, e.message, e.field)
        except QueueFull as e:
            return refuse(503, f"the server is busy ({e}); retry later")
        except TimeoutError:
            return refuse(504, f"no answer within {limits.timeout_s:g} s (timeout_s)")
        except ClientDisconnect:
            return refuse(400, "the client closed the connection before its request had arrived", close=True)

    return app


def add_error_handlers(app: FastAPI) -> None:
    """Routing errors (404, 405), validation errors and any failure of the app itself answer the API's JSON too,
    not FastAPI's `{"detail"}` or a plain-text 500."""
    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        status = getattr(exc, "status_code", 500)
        message = {404: f"no such route; the routes are {ROUTES}",
                   405: f"this route does not take {shown(request.method)}; the routes are {ROUTES}"}
        response = refuse(status, message.get(status, str(getattr(exc, "detail", exc))))
        response.headers.update(getattr(exc, "headers", None) or {})  # 405's Allow
        return response

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        return refuse(422, "the request is not what this route takes")

    async def failed(request: Request, exc: Exception) -> JSONResponse:
        return refuse(500, "the server failed on this request (a bug: its log has the details)", close=True)

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(Exception, failed)
