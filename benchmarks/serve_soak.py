"""`moefuse serve` soaked: valid requests mixed with hostile ones, and idle and trickling sockets (issue #24).

What runs: a real `moefuse serve` on a free 127.0.0.1 port (its own flags: `--max-upload-mb 1`, so that oversize
bodies are cheap to send, then --serve-flags), fed from this one asyncio process over raw sockets:

* Valid requests: --rows evenly spaced rows of --split of the manifest, each posted as multipart (built by
  serve_load's encode_request, once) on the client's keep-alive connection, round-robin. Every answer is compared
  with offline `predict` (`predict_samples` at batch 32 on the same rows, in this process before the server starts):
  the same prediction and a probability within --tolerance.
* Phases: a warm-up (every row once, untimed); a clean run (--clean-seconds, valid requests only, --concurrency
  clients); then the soak (--minutes): the same clients, each request bad with probability --bad-share, the bad
  ones round-robin over every class below, each on a new connection (a client holds one connection at a time);
  beside them --idle-sockets connections that send nothing and --slow-sockets that trickle a request one byte
  every --trickle-s (half stall in the headers, half in the body), each held until the server answers or closes
  it or --hold-s pass, then opened again a second later. With the defaults, 32 + 32 held sockets are the issue's
  64 silent connections (today's `--max-connections` default): a server that keeps them all refuses the clients.
  A valid request on a reused connection that the server had closed (no byte back) is sent once more on a new
  one, as HTTP clients do (RFC 9112 §9.3.1; predict has no side effects); the retries are counted.
* Bad classes (issue #24): a text with a lone surrogate; deeply nested JSON; a NUL byte in a multipart file name;
  a multipart body cut before its closing boundary; duplicate JSON keys; oversize bodies (413); wrong content
  types (415); unknown routes (404); wrong methods (405); invalid fields (422); oversize or too many headers (431);
  corrupt media files. Each must be answered as documented: a 4xx whose body is a JSON object with "error" (a
  non-empty string) and "field", at most 4 KiB (no echo of a client's megabyte), never a reset or a 5xx.
* Server memory: the RSS of its process tree (/proc) after the clean run (the soak's start) and at its end.

Every loop is bounded in count and in time, every socket is closed, and the server is killed in a `finally`. The
script prints every table, then the targets with PASS/FAIL, and exits 1 if a target fails: every valid request
answered, each equal to offline predict's, p99 latency of valid requests at most 3x the clean run's, RSS growth at
most 5 %, no 5xx, every bad request answered as documented, the server alive at the end.

    python benchmarks/serve_soak.py                        # a tiny model built here, 10 minutes
    python benchmarks/serve_soak.py --minutes 0.5          # a smoke run (about 2 minutes in all)
    python benchmarks/serve_soak.py --checkpoint runs/avdigits/moe/model --manifest runs/avdigits/data/manifest.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import math
import random
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from _bench import REPO, command_line, demo_shards, start_server, stop_server
from serve_load import encode_request, rows_of

from moefuse.fusion.loading import load_inference_model
from moefuse.inference.predict import export_media, load_media_sample, predict_samples

LIMIT = 2**20  # longest response head line the client reads
MAX_BODY = 16 * 2**20  # most response body bytes the client reads
DOC_MAX = 4096  # largest body a refusal may have
CONNECT_S = 10.0


# -- a model and its expected answers --------------------------------------------------------------------------


def tiny_model(work: Path) -> tuple[Path, Path]:
    """As the tests build theirs (tests/conftest.py fault_run): 400 demo samples -> shards -> 2 training steps of
    configs/tiny.yaml -> (the exported model folder, the demo manifest)."""
    from moefuse.config import load_config
    from moefuse.train.recipe import train

    shards = demo_shards(work, count=400, seed=0)
    out = work / "run"
    overrides = [f"data.train_shards=[{shards}]", f"data.val_shards=[{shards}]", f"train.output_dir={out}",
                 "data.batch_size=16", "encoders.audio.max_seconds=0.5", "train.tensorboard=false",
                 "train.warmup_steps=1", "train.max_steps=2", "train.eval_every=2", "train.save_every=2"]
    train(load_config(REPO / "configs" / "tiny.yaml", overrides))
    return out / "model", work / "data" / "manifest.jsonl"


def offline_answers(checkpoint: Path, manifest: Path, split: str, count: int) -> tuple[list[dict], dict]:
    """The rows (with their files' bytes), each with `expected`: offline predict's answer (batch 32); and what
    the bad requests need to know of the model: its task names, its text fields and its file fields."""
    import torch

    torch.set_num_threads(1)
    model, media = load_inference_model(checkpoint), export_media(checkpoint)
    rows = rows_of(manifest, split, count, model)
    samples = [load_media_sample(model, r["id"], r["task"], media=media, text=r.get("text"),
                                 question=r.get("question"), **r["files"]) for r in rows]
    for r, result in zip(rows, predict_samples(model, samples, batch_size=32)):
        r["expected"] = result
    files = [f for enc in model.encoders.values() for f in enc.cfg.file_fields]
    inputs = [f for m in model.encoders for f in model.sample_fields[m]]
    return rows, {"tasks": list(model.task_names), "texts": [f for f in inputs if f not in files], "files": files}


# -- HTTP/1.1 on raw asyncio streams ----------------------------------------------------------------------------


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response (RFC 9112 §6.3: by Content-Length, chunked, or up to the close), its body capped at MAX_BODY."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = b""
        for _ in range(MAX_BODY):
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0 or len(body) + size > MAX_BODY:
                break
            body += (await reader.readexactly(size + 2))[:-2]
        return status, headers, body
    if "content-length" in headers:
        return status, headers, await reader.readexactly(min(int(headers["content-length"]), MAX_BODY))
    body = b""
    for _ in range(MAX_BODY // 65536 + 1):
        chunk = await reader.read(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


Outcome = tuple[int | str, dict[str, str], bytes]  # status (or how the connection failed), headers, body


def failure(e: BaseException) -> str:
    """How an exchange ended without a response."""
    if isinstance(e, TimeoutError):
        return "timeout"
    if isinstance(e, asyncio.IncompleteReadError):
        return "closed" if not e.partial else "cut response"
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, OSError):
        return "reset"
    return "unreadable response"


async def exchange(host: str, port: int, payload: bytes, timeout: float) -> Outcome:
    """Send `payload` on a new connection and read one response; the connection is closed after it."""
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, limit=LIMIT)
            try:
                writer.write(payload)
                await writer.drain()
            except ConnectionError:
                pass  # the server may answer and close before it has read everything: read what it said
            return await read_response(reader)
    except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
        return failure(e), {}, b""
    finally:
        if writer is not None:
            writer.close()


class KeepAlive:
    """A client's keep-alive connection for valid requests, opened again when the server closed it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.retries = 0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, payload: bytes, timeout: float) -> Outcome:
        """One request; a reused connection the server had closed before it answered (no byte back) is retried
        once on a new one, as a client may (RFC 9112 §9.3.1)."""
        for attempt in range(2):
            reused = self.writer is not None
            try:
                async with asyncio.timeout(timeout):
                    if not reused:
                        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=LIMIT)
                    self.writer.write(payload)
                    await self.writer.drain()
                    status, headers, body = await read_response(self.reader)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
                self.close()
                stale = isinstance(e, ConnectionError) or (isinstance(e, asyncio.IncompleteReadError) and not e.partial)
                if reused and stale and attempt == 0:
                    self.retries += 1
                    continue
                return failure(e), {}, b""
            if headers.get("connection", "").lower() == "close":
                self.close()
            return status, headers, body
        return "closed", {}, b""


# -- the bad requests -------------------------------------------------------------------------------------------

BOUNDARY = b"soak9Xq2boundary7MA4YWxkTrZu0gW"


@dataclass
class Kit:
    """What the bad requests are made of: the server's address, a valid row, the model's fields, the body limit."""

    host: str
    row: dict
    model: dict
    limit: int

    def texts(self) -> dict[str, str]:
        return {k: self.row[k] for k in ("task", *self.model["texts"]) if self.row.get(k)}

    def uploads(self) -> dict[str, tuple[bytes, bytes]]:
        """{file field: (file name, bytes)} of the row."""
        return {f: (f"x{Path(str(self.row[f])).suffix}".encode(), data) for f, data in self.row["uploads"].items()}

    def raw(self, method: str, path: str, body: bytes = b"", headers: list[str] = (), length: int | None = None
            ) -> bytes:
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}", "Connection: close", *headers]
        if body or method in ("POST", "PUT"):
            head.append(f"Content-Length: {len(body) if length is None else length}")
        return "\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + body

    def json(self, text: str) -> bytes:
        return self.raw("POST", "/predict", text.encode("utf-8"), ["Content-Type: application/json"])

    def json_fields(self, **changes: object) -> str:
        """The row as a JSON body (media base64), with `changes`."""
        data = {**self.texts(), **{f: base64.b64encode(d).decode() for f, (_, d) in self.uploads().items()}}
        return json.dumps({**data, **changes})

    def parts(self, **changes: bytes | tuple[bytes, bytes]) -> list[tuple[bytes, bytes | None, bytes]]:
        """The row as multipart parts (name, file name or None, content), `changes` in place of its own: a field's
        text, or (file name, content) for a file."""
        parts = {k: (None, v.encode()) for k, v in self.texts().items()} | self.uploads()
        parts |= {k: v if isinstance(v, tuple) else (None, v) for k, v in changes.items()}
        return [(k.encode(), name, data) for k, (name, data) in parts.items()]

    def form(self, parts: list[tuple[bytes, bytes | None, bytes]], cut: Callable[[bytes], bytes] = lambda b: b
             ) -> bytes:
        """A multipart/form-data POST /predict (RFC 7578) of `parts`, its body through `cut`."""
        body = b""
        for name, filename, data in parts:
            disposition = b'Content-Disposition: form-data; name="' + name + b'"'
            if filename is not None:
                disposition += b'; filename="' + filename + b'"\r\nContent-Type: application/octet-stream'
            body += b"--" + BOUNDARY + b"\r\n" + disposition + b"\r\n\r\n" + data + b"\r\n"
        body = cut(body + b"--" + BOUNDARY + b"--\r\n")
        return self.raw("POST", "/predict", body, [f"Content-Type: multipart/form-data; boundary={BOUNDARY.decode()}"])


def surrogate(kit: Kit) -> list[tuple[str, bytes]]:
    out = [(f"json {f}", kit.json(kit.json_fields(**{f: "seven \ud800 eight"}))) for f in kit.model["texts"]]
    return out + [(f"form {f}, the surrogate UTF-8-encoded", kit.form(kit.parts(**{f: b"seven \xed\xa0\x80"})))
                  for f in kit.model["texts"]]


def deep_json(kit: Kit) -> list[tuple[str, bytes]]:
    n = 100_000
    return [("arrays", kit.json("[" * n + "]" * n)), ("objects", kit.json('{"a":' * n + "1" + "}" * n)),
            ("in a field", kit.json(kit.json_fields()[:-1] + ', "nested": ' + "[" * n + "]" * n + "}"))]


def nul_filename(kit: Kit) -> list[tuple[str, bytes]]:
    f = kit.model["files"][0]
    data = kit.row["uploads"].get(f, b"\x00" * 64)
    return [(name.decode("latin-1").replace("\x00", "\\0"), kit.form(kit.parts(**{f: (name, data)})))
            for name in (b"a\x00.png", b"\x00", b"x.wav\x00.exe")]


def cut_multipart(kit: Kit) -> list[tuple[str, bytes]]:
    closing = len(b"--" + BOUNDARY + b"--\r\n")
    return [("before the closing boundary", kit.form(kit.parts(), lambda b: b[:-closing])),
            ("in the closing boundary", kit.form(kit.parts(), lambda b: b[:-4])),
            ("inside the last part", kit.form(kit.parts(), lambda b: b[: len(b) * 2 // 3]))]


def duplicate_keys(kit: Kit) -> list[tuple[str, bytes]]:
    body = kit.json_fields()[1:]
    tasks = kit.model["tasks"]
    out = [("task", kit.json(f'{{"task": {json.dumps(tasks[-1])}, ' + body)),
           ("file", kit.json(kit.json_fields()[:-1] + f', {json.dumps(kit.model["files"][0])}: "AAAA"}}'))]
    return out + [(f, kit.json(f'{{{json.dumps(f)}: "one", ' + body)) for f in kit.texts() if f != "task"]


def oversize(kit: Kit) -> list[tuple[str, bytes]]:
    head = kit.raw("POST", "/predict", headers=["Content-Type: application/json"], length=kit.limit + 1)
    chunk = b"x" * 65536
    chunked = (kit.raw("POST", "/predict", headers=["Content-Type: application/json", "Transfer-Encoding: chunked"])
               .replace(b"Content-Length: 0\r\n", b"")
               + b"".join(b"10000\r\n" + chunk + b"\r\n" for _ in range(kit.limit // 65536 + 2)) + b"0\r\n\r\n")
    f = kit.model["files"][0]
    return [("declared, body not sent", head + b"{" * 1024), ("chunked", chunked),
            ("a file", kit.form([(f.encode(), b"big.bin", b"\x00" * (kit.limit + 1))])),
            *[(f"{t} of 100000 characters", kit.json(kit.json_fields(**{t: "x" * 100_000})))
              for t in kit.model["texts"]]]


def content_type(kit: Kit) -> list[tuple[str, bytes]]:
    body = kit.json_fields().encode()
    return [(kind or "none", kit.raw("POST", "/predict", body, [f"Content-Type: {kind}"] if kind else []))
            for kind in ("text/plain", "application/xml", "", "multipart/mixed; boundary=x", "image/png")]


def unknown_route(kit: Kit) -> list[tuple[str, bytes]]:
    return [(f"{m} {p}", kit.raw(m, p, kit.json_fields().encode() if m == "POST" else b""))
            for m, p in (("GET", "/nope"), ("POST", "/predict/extra"), ("GET", "/%2e%2e/etc/passwd"),
                         ("GET", "/docs/x"))]


def wrong_method(kit: Kit) -> list[tuple[str, bytes]]:
    return [(f"{m} {p}", kit.raw(m, p)) for m, p in (("GET", "/predict"), ("PUT", "/predict"), ("DELETE", "/health"),
                                                      ("POST", "/health"), ("PATCH", "/info"))]


def invalid_fields(kit: Kit) -> list[tuple[str, bytes]]:
    f = kit.model["files"][0]
    out = [("unknown task", kit.json(kit.json_fields(task="weather"))),
           ("unknown field", kit.json(kit.json_fields(colour="red"))),
           ("unknown field of 64 KiB", kit.json(kit.json_fields(**{"f" * 65536: "x"}))),
           ("a number for a file", kit.json(kit.json_fields(**{f: 5}))),
           ("invalid base64", kit.json(kit.json_fields(**{f: "%%% not base64"}))),
           ("an array body", kit.json('["task", "digit"]')),
           ("no input", kit.json(json.dumps({"task": kit.row["task"]}))),
           ("the task given as a file", kit.form(kit.parts(task=(b"t.txt", kit.row["task"].encode()))))]
    return out + [(f"{t} a number", kit.json(kit.json_fields(**{t: 7}))) for t in kit.model["texts"]]


def big_headers(kit: Kit) -> list[tuple[str, bytes]]:
    return [("one header of 64 KiB", kit.raw("GET", "/health", headers=["X-Big: " + "a" * 65536])),
            ("a cookie of 32 KiB", kit.raw("GET", "/health", headers=["Cookie: c=" + "b" * 32768])),
            ("1000 headers", kit.raw("GET", "/health", headers=[f"X-H{i}: {i}" for i in range(1000)])),
            ("200 headers on /predict", kit.json(kit.json_fields()).replace(
                b"\r\n\r\n", b"\r\n" + b"".join(b"X-P%d: p\r\n" % i for i in range(200)) + b"\r\n", 1))]


def corrupt_media(kit: Kit) -> list[tuple[str, bytes]]:
    out = []
    noise = random.Random(0).randbytes(4096)
    for f, (name, data) in kit.uploads().items():
        for how, broken in (("random bytes", noise), ("truncated to half", data[: len(data) // 2]),
                            ("its first 16 bytes", data[:16]), ("its header, then noise", data[:64] + noise)):
            out.append((f"{f}: {how}", kit.form(kit.parts(**{f: (name, broken)}))))
    return out


CLASSES: list[tuple[str, str, Callable[[Kit], list[tuple[str, bytes]]]]] = [
    ("lone surrogate in a text", "422", surrogate), ("deeply nested JSON", "422", deep_json),
    ("NUL in a file name", "422", nul_filename), ("multipart cut short", "400/422", cut_multipart),
    ("duplicate JSON keys", "422", duplicate_keys), ("oversize body", "413", oversize),
    ("wrong content type", "415", content_type), ("unknown route", "404", unknown_route),
    ("wrong method", "405", wrong_method), ("invalid field", "422", invalid_fields),
    ("oversize/too many headers", "431", big_headers), ("corrupt media", "422", corrupt_media),
]


def documented(outcome: Outcome) -> bool:
    """A refusal as documented: a 4xx JSON object with a non-empty string "error" and a "field", at most 4 KiB."""
    status, head, body = outcome
    if not isinstance(status, int) or not 400 <= status < 500 or len(body) > DOC_MAX:
        return False
    if not head.get("content-type", "").startswith("application/json"):
        return False
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict) and "field" in data and isinstance(data.get("error"), str) and bool(data["error"])


# -- the load ---------------------------------------------------------------------------------------------------


@dataclass
class Phase:
    """What one phase sent and got back."""

    name: str
    limit: int  # most valid + bad requests, over all clients
    bad_share: float = 0.0
    sent: int = 0
    valid: Counter = field(default_factory=Counter)  # status or failure -> count
    latencies: list[float] = field(default_factory=list)  # seconds, of the valid requests answered 200
    same: int = 0  # answers equal to offline predict's
    differ: list[str] = field(default_factory=list)  # the first few that are not
    bad: dict[str, Counter] = field(default_factory=dict)  # class -> status or failure -> count
    undocumented: Counter = field(default_factory=Counter)  # class -> count
    examples: dict[str, dict] = field(default_factory=dict)  # class -> status -> its first undocumented answer
    held: dict[str, Counter] = field(default_factory=dict)  # socket kind -> outcome -> count
    held_s: dict[str, list[float]] = field(default_factory=dict)  # socket kind -> seconds until the server acted
    retries: int = 0
    rss: list[int] = field(default_factory=list)  # the server's RSS, bytes, sampled during the phase


@dataclass
class Soak:
    """The server's address, the valid rows, the bad variants, and the run's settings."""

    host: str
    port: int
    rows: list[dict]
    bad: list[tuple[str, list[tuple[str, bytes]]]]
    args: argparse.Namespace
    alive: Callable[[], bool]
    counter: itertools.count = field(default_factory=itertools.count)

    def check(self, phase: Phase, row: dict, outcome: Outcome, seconds: float) -> None:
        status, _, body = outcome
        phase.valid[status] += 1
        if status != 200:
            return
        phase.latencies.append(seconds)
        try:
            got = json.loads(body)
            ok = (got["prediction"] == row["expected"]["prediction"]
                  and abs(got["probability"] - row["expected"]["probability"]) <= self.args.tolerance)
        except (ValueError, KeyError, TypeError):
            got, ok = body[:80], False
        if ok:
            phase.same += 1
        elif len(phase.differ) < 3:
            phase.differ.append(f"{row['id']}: {str(got)[:120]} (offline: {row['expected'].get('prediction')})")

    async def bad_request(self, phase: Phase, n: int) -> int | str:
        name, variants = self.bad[n % len(self.bad)]
        variant, payload = variants[(n // len(self.bad)) % len(variants)]
        outcome = await exchange(self.host, self.port, payload, self.args.request_timeout)
        phase.bad.setdefault(name, Counter())[outcome[0]] += 1
        if not documented(outcome):
            phase.undocumented[name] += 1
            seen = phase.examples.setdefault(name, {})
            if outcome[0] not in seen:
                seen[outcome[0]] = f"{variant}: {outcome[0]} {outcome[2][:90]!r}"
        return outcome[0]

    async def client(self, phase: Phase, k: int, deadline: float) -> None:
        """One client: valid requests on its keep-alive connection, a bad one on a new connection instead."""
        rng, conn = random.Random(k), KeepAlive(self.host, self.port)
        try:
            for _ in range(phase.limit):
                if phase.sent >= phase.limit or time.monotonic() >= deadline or not self.alive():
                    return
                n = phase.sent
                phase.sent += 1
                if rng.random() < phase.bad_share:
                    conn.close()  # a client holds one connection at a time: --concurrency connections in all
                    status = await self.bad_request(phase, next(self.counter))
                else:
                    row = self.rows[n % len(self.rows)]
                    start = time.perf_counter()
                    outcome = await conn.request(row["request"], self.args.request_timeout)
                    self.check(phase, row, outcome, time.perf_counter() - start)
                    status = outcome[0]
                if status == 503 or isinstance(status, str):  # busy, or no answer: back off as a client would
                    await asyncio.sleep(0.1)
        finally:
            phase.retries += conn.retries
            conn.close()

    async def hold(self, phase: Phase, kind: str, deadline: float) -> None:
        """One held socket, opened again (after a second) each time the server ends it, until `deadline`."""
        request = self.rows[0]["request"]
        head, _, body = request.partition(b"\r\n\r\n")
        first, trickle = {"idle": (b"", b""), "slow headers": (b"", request),
                          "slow body": (head + b"\r\n\r\n", body)}[kind]
        counts, seconds = phase.held.setdefault(kind, Counter()), phase.held_s.setdefault(kind, [])
        for _ in range(int(self.args.minutes * 60) + 1):
            if time.monotonic() + 1 >= deadline or not self.alive():
                return
            start = time.monotonic()
            outcome = await self.hold_one(first, trickle, min(deadline, start + self.args.hold_s))
            counts[outcome] += 1
            if outcome not in ("held to the limit", "refused"):
                seconds.append(time.monotonic() - start)
            await asyncio.sleep(1.0)

    async def hold_one(self, first: bytes, trickle: bytes, until: float) -> str:
        """Open, send `first`, then `trickle` a byte every --trickle-s until the server answers or closes, or
        `until` -> what ended it."""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port, limit=LIMIT),
                                                    CONNECT_S)
        except (TimeoutError, OSError):
            return "refused"
        watcher = asyncio.create_task(read_response(reader))
        try:
            writer.write(first)
            for i in range(len(trickle) + 1):
                left = until - time.monotonic()
                if watcher.done() or left <= 0:
                    break
                if i < len(trickle):
                    writer.write(trickle[i : i + 1])
                await asyncio.wait({watcher}, timeout=min(self.args.trickle_s, left) if i < len(trickle) else left)
        except ConnectionError:
            await asyncio.wait({watcher}, timeout=1.0)
        finally:
            writer.close()
        if not watcher.done():
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            return "held to the limit"
        if watcher.exception() is not None:
            return "closed by the server" if failure(watcher.exception()) == "closed" else failure(watcher.exception())
        return f"answered {watcher.result()[0]}"


async def run_phase(state: Soak, phase: Phase, seconds: float, sockets: dict[str, int], pid: int) -> float:
    """--concurrency clients (and `sockets` held) for `seconds` or phase.limit requests, the server's RSS sampled
    ten times -> the wall time."""
    start = time.monotonic()
    deadline = start + seconds

    async def sample() -> None:
        for _ in range(10):
            await asyncio.sleep(seconds / 10)
            if time.monotonic() >= deadline or not state.alive():
                return
            phase.rss.append(tree_rss(pid))

    tasks = [state.client(phase, k, deadline) for k in range(state.args.concurrency)]
    tasks += [state.hold(phase, kind, deadline) for kind, n in sockets.items() for _ in range(n)]
    sampler = asyncio.create_task(sample())
    await asyncio.gather(*tasks)
    wall = time.monotonic() - start
    sampler.cancel()  # the clients are done (all their requests sent, or the server gone)
    with contextlib.suppress(asyncio.CancelledError):
        await sampler
    return wall


# -- the server's memory ----------------------------------------------------------------------------------------


def tree_rss(pid: int) -> int:
    """The resident set of a process and all its descendants, bytes (VmRSS of /proc/PID/status; shared pages
    count once per process)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        todo += children.get(p, [])
        try:
            total += next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{p}/status").read_text().splitlines()
                          if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total


# -- the report -------------------------------------------------------------------------------------------------


def counts(c: Counter) -> str:
    return ", ".join(f"{k}×{v}" for k, v in sorted(c.items(), key=lambda kv: -kv[1])) or "-"


def quantile_ms(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank), ms; nan for none."""
    if not values:
        return math.nan
    s = sorted(values)
    return 1000 * s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def report_valid(phases: list[Phase], walls: dict[str, float]) -> None:
    print("\nValid requests (answers compared with offline predict)")
    print("| phase | seconds | valid sent | answered 200 | as offline | p50 ms | p99 ms | statuses "
          "| keep-alive retries |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for ph in phases:
        n, p50, p99 = sum(ph.valid.values()), quantile_ms(ph.latencies, 0.5), quantile_ms(ph.latencies, 0.99)
        print(f"| {ph.name} | {walls[ph.name]:.0f} | {n} | {ph.valid[200]} | {ph.same} | {p50:.0f} | {p99:.0f} "
              f"| {counts(ph.valid)} | {ph.retries} |")
    for ph in phases:
        for line in ph.differ:
            print(f"  {ph.name}: differs from offline: {line}")


def report_bad(ph: Phase, expected: dict[str, str]) -> None:
    print('\nBad requests in the soak (each must be a 4xx JSON {"error", "field"} of at most 4 KiB)')
    print("| class | sent | expected | statuses | not as documented |")
    print("|---|---:|---|---|---:|")
    for name, statuses in ph.bad.items():
        print(f"| {name} | {sum(statuses.values())} | {expected[name]} | {counts(statuses)} "
              f"| {ph.undocumented[name]} |")
    print("Not as documented, the first of each status:")
    for name, seen in ph.examples.items():
        print(f"  {name}: " + " | ".join(seen.values()))
    print("\nHeld sockets in the soak (opened again a second after each end)")
    print("| kind | opened | outcomes | median seconds until the server ended it |")
    print("|---|---:|---|---:|")
    for kind, c in ph.held.items():
        s = ph.held_s.get(kind) or []
        print(f"| {kind} | {sum(c.values())} | {counts(c)} | {statistics.median(s) if s else math.nan:.1f} |")


def server_log(path: Path, keep: bool) -> None:
    """The server's output, summarised: its lines, its tracebacks and the exceptions they end in."""
    text = path.read_text(errors="replace") if path.exists() else ""
    errors = Counter(m.group(0)[:100] for m in re.finditer(r"(?m)^[\w.]*(Error|Exception)\b.*$", text))
    kept = "" if keep else ", removed at exit: --log FILE keeps it"
    print(f"\nServer log ({path}{kept}): {len(text.splitlines())} lines, "
          f"{text.count('Traceback (most recent call last)')} tracebacks, "
          f"{text.count('Invalid HTTP request')} 'Invalid HTTP request' warnings")
    for line, n in errors.most_common(6):
        print(f"  {n}× {line}")


def targets(phases: list[Phase], memory: dict[str, int], alive: bool) -> bool:
    """Print the targets with PASS/FAIL -> whether all pass."""
    clean, mixed = phases[1], phases[2]
    valid = sum(sum(ph.valid.values()) for ph in phases)
    answered = sum(ph.valid[200] for ph in phases)
    same = sum(ph.same for ph in phases)
    bad, undocumented = sum(sum(c.values()) for c in mixed.bad.values()), sum(mixed.undocumented.values())
    fivexx = sum(n for ph in phases for c in [ph.valid, *ph.bad.values(), *ph.held.values()] for k, n in c.items()
                 if (isinstance(k, int) and k >= 500) or str(k).startswith("answered 5"))
    ratio = quantile_ms(mixed.latencies, 0.99) / quantile_ms(clean.latencies, 0.99)
    growth = memory["end"] / memory["start"] - 1 if memory["start"] and memory["end"] else math.nan  # 0: gone
    rows = [("valid requests answered (200)", f"{100 * answered / max(1, valid):.2f} % of {valid}", "100 %",
             valid > 0 and answered == valid),
            ("answers equal to offline predict", f"{100 * same / max(1, answered):.2f} % of {answered}", "100 %",
             answered > 0 and same == answered),
            ("p99 of valid requests, soak / clean", f"{ratio:.2f}x ({quantile_ms(mixed.latencies, 0.99):.0f} / "
             f"{quantile_ms(clean.latencies, 0.99):.0f} ms)", "<= 3x", ratio <= 3),
            ("server RSS growth over the soak", f"{100 * growth:+.1f} % ({memory['start'] / 2**20:.0f} -> "
             f"{memory['end'] / 2**20:.0f} MiB)", "<= 5 %", growth <= 0.05),
            ("5xx responses (all phases, every request)", str(fivexx), "0", fivexx == 0),
            ("bad requests answered as documented", f"{100 * (bad - undocumented) / max(1, bad):.2f} % of {bad}",
             "100 %", bad > 0 and not undocumented),
            ("server alive and answering /health at the end", "yes" if alive else "no", "yes", alive)]
    print("\nTargets")
    print("| target | measured | goal | |")
    print("|---|---|---|---|")
    for name, value, goal, ok in rows:
        print(f"| {name} | {value} | {goal} | {'PASS' if ok else 'FAIL'} |")
    return all(ok for *_, ok in rows)


# -- main -------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("--checkpoint", type=Path, help="exported model folder (default: a tiny one built here, ~30 s)")
    a.add_argument("--manifest", type=Path, help="manifest of the valid requests' rows (required with --checkpoint)")
    a.add_argument("--split", default="val", help="the manifest split to take rows from (default val)")
    a.add_argument("--rows", type=int, default=64, help="valid inputs, evenly spaced rows (default 64)")
    a.add_argument("--minutes", type=float, default=10.0, help="length of the soak (default 10; 0.5 for a smoke run)")
    a.add_argument("--clean-seconds", type=float, help="the clean run before it (default: a fifth of the soak, "
                                                       "10 to 60 s)")
    a.add_argument("--concurrency", type=int, default=32, help="clients, each one request at a time (default 32)")
    a.add_argument("--bad-share", type=float, default=0.5, help="share of the soak's requests that are bad (0.5)")
    a.add_argument("--idle-sockets", type=int, default=32, help="silent connections held in the soak (default 32)")
    a.add_argument("--slow-sockets", type=int, default=32, help="trickling connections held in the soak (default 32)")
    a.add_argument("--trickle-s", type=float, default=1.0, help="seconds between a slow socket's bytes (default 1)")
    a.add_argument("--hold-s", type=float, default=120.0,
                   help="longest hold of a socket before it is opened again, s (120)")
    a.add_argument("--request-timeout", type=float, default=60.0, help="longest wait for one response, s (60)")
    a.add_argument("--max-requests", type=int, default=2_000_000, help="most requests per phase, a bound (2000000)")
    a.add_argument("--tolerance", type=float, default=1e-4, help="largest probability difference from offline (1e-4)")
    a.add_argument("--max-upload-mb", type=float, default=1.0, help="the server's body limit (default 1 MiB)")
    a.add_argument("--serve-flags", default="", help="more `moefuse serve` flags, e.g. '--workers 2 --threads 1'")
    a.add_argument("--log", type=Path, help="keep the server's output in this file (default: a temporary one)")
    args = a.parse_args(argv)
    if args.checkpoint and not args.manifest:
        a.error("--checkpoint needs --manifest (the rows the valid requests are made of)")
    args.built = False
    for name in ("minutes", "trickle_s", "hold_s", "request_timeout", "max_upload_mb"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):
            a.error(f"--{name.replace('_', '-')} must be a finite number > 0, got {getattr(args, name)}")
    for name, low in (("rows", 1), ("concurrency", 1), ("max_requests", 1), ("idle_sockets", 0), ("slow_sockets", 0)):
        if getattr(args, name) < low:
            a.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if not 0 <= args.bad_share <= 1 or not 0 <= args.tolerance < 1:
        a.error(f"--bad-share must be in [0, 1] and --tolerance in [0, 1), got {args.bad_share}, {args.tolerance}")
    if args.clean_seconds is None:
        args.clean_seconds = max(10.0, min(60.0, args.minutes * 12))
    if not (math.isfinite(args.clean_seconds) and args.clean_seconds > 0):
        a.error(f"--clean-seconds must be a finite number > 0, got {args.clean_seconds}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="moefuse-soak-") as tmp:
        work = Path(tmp)
        if args.checkpoint is None:
            print("no --checkpoint: building a tiny model (demo data -> shards -> 2 steps of configs/tiny.yaml) in "
                  f"{work}", flush=True)
            args.checkpoint, args.manifest = tiny_model(work)
            args.built = True
        rows, model = offline_answers(args.checkpoint, args.manifest, args.split, args.rows)
        log_path = args.log or work / "server.log"
        with log_path.open("w") as log:
            flags = ["--max-upload-mb", str(args.max_upload_mb), *shlex.split(args.serve_flags)]
            proc, url = start_server(args.checkpoint, flags, log=log)
            try:
                phases, walls, memory, alive = soak(proc, url, rows, model, args)
            finally:
                stop_server(proc)
        return report(args, phases, walls, memory, alive, log_path)


def soak(proc: subprocess.Popen, url: str, rows: list[dict], model: dict, args: argparse.Namespace
         ) -> tuple[list[Phase], dict[str, float], dict[str, int], bool]:
    """Warm-up, clean run, soak; the memory at each step and whether the server still answers at the end."""
    host, port = "127.0.0.1", httpx.URL(url).port
    for r in rows:
        r["request"] = encode_request(url, r)
    kit = Kit(f"{host}:{port}", rows[0], model, int(args.max_upload_mb * 2**20))
    bad = [(name, made) for name, _, make in CLASSES if (made := make(kit))]
    state = Soak(host, port, rows, bad, args, alive=lambda: proc.poll() is None)
    phases = [Phase("warm-up", len(rows)), Phase("clean", args.max_requests),
              Phase("soak", args.max_requests, bad_share=args.bad_share)]
    walls, memory = {}, {"loaded": tree_rss(proc.pid)}
    sockets = {"idle": args.idle_sockets, "slow headers": args.slow_sockets // 2,
               "slow body": args.slow_sockets - args.slow_sockets // 2}
    try:
        limits = httpx.get(f"{url}/info", timeout=10).json().get("limits") or {}
    except (httpx.HTTPError, ValueError, AttributeError):
        limits = {}
    print(f"server {url} (pid {proc.pid}; max_connections {limits.get('max_connections', '?')}, timeout_s "
          f"{limits.get('timeout_s', '?')}); {len(rows)} rows; {sum(len(v) for _, v in bad)} bad variants in "
          f"{len(bad)} classes", flush=True)
    for ph, seconds, held in ((phases[0], 600.0, {}), (phases[1], args.clean_seconds, {}),
                              (phases[2], args.minutes * 60, sockets)):
        if ph.name == "soak":
            memory["start"] = tree_rss(proc.pid)
        walls[ph.name] = asyncio.run(run_phase(state, ph, seconds, held, proc.pid))
        print(f"{ph.name}: {walls[ph.name]:.0f} s, {ph.sent} requests", flush=True)
    time.sleep(2.0)  # let the last connections close
    memory["end"] = tree_rss(proc.pid)
    try:
        alive = proc.poll() is None and httpx.get(f"{url}/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        alive = False
    return phases, walls, memory, alive


def report(args: argparse.Namespace, phases: list[Phase], walls: dict[str, float], memory: dict[str, int],
           alive: bool, log_path: Path) -> int:
    built = " (a tiny model built for this run, 2 training steps)" if args.built else ""
    print(f"\nmoefuse serve soak: {args.checkpoint}{built}, {args.minutes:g} min at concurrency {args.concurrency} "
          f"(bad share {args.bad_share:g}; held: {args.idle_sockets} idle, {args.slow_sockets} slow), after a clean "
          f"run of {args.clean_seconds:g} s (valid requests only, same concurrency)")
    report_valid(phases, walls)
    report_bad(phases[2], {name: expected for name, expected, _ in CLASSES})
    print(f"\nServer RSS (process tree): loaded {memory['loaded'] / 2**20:.0f} MiB, soak start (after the clean run) "
          f"{memory['start'] / 2**20:.0f} MiB, end {memory['end'] / 2**20:.0f} MiB; during the soak, every "
          f"{args.minutes * 6:g} s: {', '.join(f'{b / 2**20:.0f}' for b in phases[2].rss)} MiB")
    server_log(log_path, args.log is not None)
    ok = targets(phases, memory, alive)
    print(f"\ncommand: {command_line()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
