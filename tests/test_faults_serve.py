"""Faults met by `moefuse serve` (issue #24), one class per defect class, each with variants: a real server on a
free loopback port (started once for the module) for what goes through HTTP and sockets, and the app in process
(ASGI) where a fault must be injected into the model. Every socket is closed and the server killed at the end."""

from __future__ import annotations

import asyncio
import base64
import json
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import REPO

from moefuse.cli import main as cli
from moefuse.inference.batcher import DynamicBatcher

MAX_CONNECTIONS = 8
HEADER_TIMEOUT = 1.0
TIMEOUT = 6.0
FLAGS = ["--max-connections", str(MAX_CONNECTIONS), "--header-timeout-s", str(HEADER_TIMEOUT), "--timeout-s",
         str(TIMEOUT), "--max-upload-mb", "0.5", "--max-text-chars", "200", "--max-wait-ms", "30"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(fault_run: Path) -> Iterator[tuple[str, int]]:
    """A real `moefuse serve` with small limits -> (its URL, its port), once it answers /health."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moefuse.cli", "serve", "--checkpoint", str(fault_run / "model"),
                             "--port", str(port), *FLAGS], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"moefuse serve exited: {proc.stderr.read()}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            pytest.fail("moefuse serve did not answer /health within 90 s")
        yield url, port
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stderr.close()


@pytest.fixture(scope="module")
def image(fault_data: dict) -> bytes:
    rows = [json.loads(line) for line in fault_data["manifest"].read_text().splitlines()]
    return (fault_data["manifest"].parent / next(r["image"] for r in rows if r.get("image"))).read_bytes()


def is_api_error(answer: httpx.Response, status: int) -> dict:
    """The answer is `status` with exactly the API's JSON error body; -> that body."""
    assert answer.status_code == status, answer.text[:300]
    assert answer.headers["content-type"].startswith("application/json"), answer.headers
    body = answer.json()
    assert set(body) == {"error", "field"} and isinstance(body["error"], str) and body["error"], body
    return body


# -- raw sockets ---------------------------------------------------------------------------------------------------


def connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(TIMEOUT + 10)
    sock.connect(("127.0.0.1", port))
    return sock


def read_to_close(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection (fails past limit_s) -> (bytes, seconds)."""
    start, out = time.monotonic(), b""
    sock.settimeout(limit_s)
    try:
        while chunk := sock.recv(65536):
            out += chunk
            if time.monotonic() - start > limit_s:
                break
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the server held the connection over {limit_s} s; it sent {out[:200]!r}")
    return out, time.monotonic() - start


def raw_error(data: bytes) -> tuple[int, dict]:
    """A raw HTTP response holding one API error -> (status, body)."""
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"content-type: application/json" in head.lower(), head
    parsed = json.loads(body)
    assert set(parsed) == {"error", "field"} and parsed["error"], parsed
    return status, parsed


def sockets(n: int, port: int, first: bytes = b"") -> list[socket.socket]:
    out = []
    for _ in range(n):
        out.append(connect(port))
        if first:
            out[-1].sendall(first)
    return out


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


# == 1. one request's failure stays its own =======================================================================


def post_json(url: str, body: dict) -> httpx.Response:
    """A JSON body as JSON text (json.dumps escapes lone surrogates, which httpx's encoder refuses)."""
    return httpx.post(f"{url}/predict", content=json.dumps(body).encode(), timeout=60,
                      headers={"content-type": "application/json"})


class TestABadSampleAmongConcurrentRequests:
    """Text the tokenizer cannot take (a lone surrogate made it raise TypeError, failing the whole dynamic batch
    with 500s): its request gets a 422 naming the field; the valid requests sent with it are all answered."""

    @pytest.mark.parametrize("bad, field", [
        ({"task": "digit", "text": "\ud800"}, "text"),
        ({"task": "avqa", "question": "which digit?\udfff", "text": "seven"}, "question"),
        ({"task": "avqa", "question": "which digit?", "text": "half a pair \udbff"}, "text"),
        ({"task": "digit", "text": "a", "\udc80": "b"}, "\\udc80"),
        ({"task": "digit\ud800", "text": "a"}, "task"),
    ])
    def test_only_the_bad_request_is_refused(self, served: tuple[str, int], bad: dict, field: str) -> None:
        url, _ = served
        good = [{"task": "digit", "text": f"the digit {i % 3}"} for i in range(MAX_CONNECTIONS - 2)]
        with ThreadPoolExecutor(MAX_CONNECTIONS) as pool:  # within --max-connections: no 503 for being many
            answers = list(pool.map(lambda b: post_json(url, b), [*good[:3], bad, *good[3:]]))
        assert is_api_error(answers[3], 422)["field"] == field
        valid = answers[:3] + answers[4:]
        assert all(a.status_code == 200 for a in valid), [a.text for a in valid if a.status_code != 200][:1]
        assert {a.json()["prediction"] for a in valid[0::3]} == {valid[0].json()["prediction"]}  # same text, answer


class Poisoned:
    """A tokenizer that raises `error` on any text holding POISON (as it raised TypeError on a lone surrogate)."""

    POISON = "poison"

    def __init__(self, tokenizer, error: Exception):
        self.tokenizer, self.error = tokenizer, error

    def __call__(self, text: str, text_pair: str | None = None, **kwargs):
        if self.POISON in text or self.POISON in (text_pair or ""):
            raise self.error
        return self.tokenizer(text, text_pair=text_pair, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)


@pytest.fixture(scope="module")
def model(fault_run: Path):
    from moefuse.fusion.loading import load_inference_model

    return load_inference_model(fault_run / "model", cache_encoders=[])


def serve_in_process(model, bodies: list[dict], **limits) -> tuple[list[httpx.Response], list[int]]:
    """The app of `model`, in this process: the bodies posted at once -> (answers, the batch sizes that ran)."""
    from moefuse.inference.predict import DEFAULT_MEDIA
    from moefuse.inference.server import ModelServer, ServeLimits, create_app

    server = ModelServer(model, dict(DEFAULT_MEDIA), ServeLimits(**{"max_wait_ms": 100.0, **limits}))
    app = create_app(server)

    async def scenario() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://moefuse") as client:
                return await asyncio.gather(*(client.post("/predict", json=b) for b in bodies))

    return asyncio.run(scenario()), server.batcher.batch_sizes


class TestAnyFailureOfOneSampleInTheModel:
    """Whatever one sample makes raise while its batch is prepared or run (any exception type, not only
    ValueError/RuntimeError), that request alone gets a 422 naming the error, and every other sample of the same
    dynamic batch is answered, as if alone; a model that fails on whole batches is rerun sample by sample."""

    @pytest.mark.parametrize("error", [TypeError("TextEncodeInput must be Union[...]"), KeyError("input_ids"),
                                       ZeroDivisionError("division by zero"), AssertionError(), IndexError("range")])
    def test_the_poisoned_request_fails_alone(self, model, monkeypatch, error: Exception) -> None:
        text = model.encoders["text"]
        bodies = [{"task": "digit", "text": f"digit {i}"} for i in range(6)]
        bodies.insert(2, {"task": "digit", "text": f"{Poisoned.POISON} pill"})
        clean, _ = serve_in_process(model, bodies[:2] + bodies[3:])
        monkeypatch.setattr(text, "tokenizer", Poisoned(text.tokenizer, error))
        answers, sizes = serve_in_process(model, bodies)
        assert max(sizes) > 1  # the poisoned sample shared a batch with others
        refused = is_api_error(answers[2], 422)
        assert type(error).__name__ in refused["error"] and refused["field"] is None
        others = answers[:2] + answers[3:]
        assert [a.status_code for a in others] == [200] * 6
        assert [a.json()["prediction"] for a in others] == [a.json()["prediction"] for a in clean]

    @pytest.mark.parametrize("error", [RuntimeError("out of memory"), OSError("device lost"), MemoryError()])
    def test_a_model_that_fails_on_batches_is_rerun_sample_by_sample(self, model, monkeypatch, error) -> None:
        forward = model.forward

        def fails_on_batches(batch: dict, *args, **kwargs):
            if len(batch["ids"]) > 1:
                raise error
            return forward(batch, *args, **kwargs)

        monkeypatch.setattr(model, "forward", fails_on_batches)
        answers, sizes = serve_in_process(model, [{"task": "digit", "text": f"digit {i}"} for i in range(5)])
        assert max(sizes) > 1 and [a.status_code for a in answers] == [200] * 5

    def test_the_batcher_reruns_a_failed_batch_item_by_item(self) -> None:
        """Below the server: a run_batch that raises on any batch holding a bad item fails that item's caller
        only; the others get their results."""
        def run(items: list[int]) -> list[int]:
            if any(x < 0 for x in items):
                raise ValueError(f"negative item in {items}")
            return [x * 10 for x in items]

        async def main() -> list:
            batcher = DynamicBatcher(run, max_batch_size=8, max_wait_s=0.05)
            await batcher.start()
            try:
                return await asyncio.gather(*(batcher.submit(x) for x in [1, 2, -3, 4, -5]), return_exceptions=True)
            finally:
                await batcher.stop()

        results = asyncio.run(main())
        assert results[:2] == [10, 20] and results[3] == 40
        assert all(isinstance(results[i], ValueError) and "[" in str(results[i]) for i in (2, 4))


class TestPredictKeepsEveryOtherSample:
    """`moefuse predict`: a sample that makes the model's preparation raise (any type) is one error line, every
    other row is predicted; text that cannot be tokenized is refused by name before the model runs."""

    @pytest.mark.parametrize("error", [TypeError("not a str"), KeyError("x"), ZeroDivisionError("zero")])
    def test_a_poisoned_row_is_one_error_line(self, fault_run: Path, model, monkeypatch, tmp_path: Path, capsys,
                                              error: Exception) -> None:
        import moefuse.fusion.loading as loading  # `moefuse predict` imports it from there once its flags are checked

        monkeypatch.setattr(loading, "load_inference_model", lambda *args, **kwargs: model)
        monkeypatch.setattr(model.encoders["text"], "tokenizer", Poisoned(model.encoders["text"].tokenizer, error))
        rows = [{"id": f"r{i}", "task": "digit", "text": f"digit {i}"} for i in range(5)]
        rows.insert(3, {"id": "bad", "task": "digit", "text": f"{Poisoned.POISON} pill"})
        manifest = tmp_path / "m.jsonl"
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
        code = cli(["predict", "--checkpoint", str(fault_run / "model"), "--manifest", str(manifest)])
        captured = capsys.readouterr()
        lines = [json.loads(line) for line in captured.out.splitlines()]
        assert code == 1 and [r["id"] for r in lines] == [r["id"] for r in rows]
        assert type(error).__name__ in lines[3]["error"] and "prediction" not in lines[3]
        assert all("prediction" in r for i, r in enumerate(lines) if i != 3)
        assert "Traceback" not in captured.err and "(id bad)" in captured.err

    @pytest.mark.parametrize("flag, task", [("--text", "digit"), ("--question", "avqa")])
    def test_undecodable_text_on_the_command_line(self, fault_run: Path, capsys, flag: str, task: str) -> None:
        """Bytes that are not UTF-8 in argv reach Python as lone surrogates (\\udcff): refused, by flag."""
        args = ["predict", "--checkpoint", str(fault_run / "model"), "--task", task, flag, "bad \udcff text"]
        if flag == "--question":
            args += ["--text", "fine"]
        assert cli(args) == 2
        err = capsys.readouterr().err
        assert f"{flag} is not valid UTF-8" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1

    def test_surrogates_in_a_manifest_are_rows_errors(self, fault_run: Path, tmp_path: Path, capsys) -> None:
        rows = [{"id": "a", "task": "digit", "text": "ok"}, {"id": "b", "task": "digit", "text": "\ud800"},
                {"id": "c", "task": "avqa", "question": "\udc00?", "text": "x"}, {"id": "d", "task": "digit",
                                                                                 "text": "fine"}]
        manifest = tmp_path / "m.jsonl"
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert cli(["predict", "--checkpoint", str(fault_run / "model"), "--manifest", str(manifest)]) == 1
        lines = {r["id"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
        assert "prediction" in lines["a"] and "prediction" in lines["d"]
        assert "UTF-8" in lines["b"]["error"] and "UTF-8" in lines["c"]["error"]


# == 2. no client can take the service from the others ============================================================


class TestSilentAndSlowClients:
    """Sockets that send nothing, or their request too slowly, or do not read their answers, are closed in
    bounded time and never take the places of clients that send whole requests (64 silent sockets made /health
    answer 503 for as long as they were held)."""

    def test_silent_sockets(self, served: tuple[str, int]) -> None:
        url, port = served
        silent = sockets(3 * MAX_CONNECTIONS, port)
        try:
            assert httpx.get(f"{url}/health", timeout=2).status_code == 200
            assert post_json(url, {"task": "digit", "text": "seven"}).status_code == 200
            assert read_to_close(silent[0], 1)[0] == b""  # the longest waiting, closed at once for the new ones
            data, took = read_to_close(silent[-1], HEADER_TIMEOUT + 3)
            assert data == b"" and took < HEADER_TIMEOUT + 3  # nothing came: closed without an answer
        finally:
            close_all(silent)

    def test_trickled_headers(self, served: tuple[str, int]) -> None:
        _, port = served
        sock = connect(port)
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            start = time.monotonic()
            for i in range(60):  # a header line every 0.1 s: each comes in time, the headers never complete
                if select.select([sock], [], [], 0.1)[0]:  # answered: stop (more would reset the connection)
                    break
                sock.sendall(b"X-Slow-%d: y\r\n" % i)
            data, _ = read_to_close(sock, 3)
            assert raw_error(data)[0] == 408 and time.monotonic() - start < HEADER_TIMEOUT + 3
        finally:
            sock.close()

    def test_stalled_bodies(self, served: tuple[str, int]) -> None:
        """As many stalled uploads as --max-connections: valid requests are served meanwhile (the uploads hold
        none of their places); each upload ends in a 504 after timeout_s, or is closed for a newer connection."""
        url, port = served
        head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 900\r\n\r\n{"
        slow = sockets(MAX_CONNECTIONS, port, head)
        try:
            time.sleep(0.2)
            with httpx.Client(base_url=url, timeout=30) as client:  # one connection: it makes room once
                answers = [client.post("/predict", json={"task": "digit", "text": f"d{i}"}) for i in range(6)]
            assert [a.status_code for a in answers] == [200] * 6
            ends = [read_to_close(sock, TIMEOUT + 5)[0] for sock in slow]
            assert all(data == b"" or raw_error(data)[0] == 504 for data in ends)
            assert sum(data != b"" for data in ends) >= MAX_CONNECTIONS - 2
        finally:
            close_all(slow)

    def test_idle_keep_alive(self, served: tuple[str, int]) -> None:
        _, port = served
        sock = connect(port)
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            data, took = read_to_close(sock, HEADER_TIMEOUT + 6)  # answered, then closed when idle
            assert data.startswith(b"HTTP/1.1 200") and data.endswith(b'{"status":"ok"}')
            assert took < HEADER_TIMEOUT + 2  # the header deadline, not uvicorn's keep-alive timeout (5 s)
        finally:
            sock.close()

    @pytest.mark.parametrize("burst", [1, 100])
    def test_a_client_that_does_not_read_its_answers(self, served: tuple[str, int], burst: int) -> None:
        """Pipelined requests whose answers are never read: once the answers fill the buffers, the request under
        way is cut off timeout_s + header_timeout_s after it started, and a client that queues more than 32
        requests ahead of their answers at once; others are served meanwhile. The client learns it from a reset
        when it sends again (a closed connection resets what comes)."""
        url, port = served
        sock = connect(port, rcvbuf=4096)
        sock.settimeout(60)
        ended: list[str] = []

        def send() -> None:
            stop = time.monotonic() + TIMEOUT + HEADER_TIMEOUT + 20
            try:
                while time.monotonic() < stop:
                    sock.sendall(b"GET /info HTTP/1.1\r\nHost: x\r\n\r\n" * burst)
                    time.sleep(0.0005 * burst)
                ended.append("still held")
            except OSError as e:
                ended.append(type(e).__name__)

        sender = threading.Thread(target=send, daemon=True)
        try:
            sender.start()
            time.sleep(0.5)
            assert httpx.get(f"{url}/health", timeout=5).status_code == 200
            assert post_json(url, {"task": "digit", "text": "three"}).status_code == 200
            sender.join(TIMEOUT + HEADER_TIMEOUT + 25)
            assert ended in (["BrokenPipeError"], ["ConnectionResetError"]), ended
        finally:
            sock.close()
            sender.join(10)

    def test_the_request_deadline_cuts_off_a_reader_that_stopped(self) -> None:
        """The guard itself, on uvicorn in this process with an app whose answer (8 MiB) outgrows the socket
        buffers: a client that reads none of it is cut off request_timeout_s after its request, not held."""
        from moefuse.inference.connections import ConnectionLimits, GuardedConfig, listen_socket, run_in_thread

        async def big(scope, receive, send) -> None:
            if scope["type"] == "http":
                await send({"type": "http.response.start", "status": 200, "headers": []})
                for _ in range(128):
                    await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
                await send({"type": "http.response.body", "body": b""})

        sock = listen_socket("127.0.0.1", 0)
        config = GuardedConfig(big, lifespan="off", log_level="critical",
                               limits=ConnectionLimits(header_timeout_s=1, request_timeout_s=1.5))
        with run_in_thread(config, sock):
            client = connect(sock.getsockname()[1], rcvbuf=4096)
            try:
                client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                start = time.monotonic()
                with pytest.raises((BrokenPipeError, ConnectionResetError)):
                    while time.monotonic() - start < 10:
                        time.sleep(0.25)
                        client.sendall(b"\r\n")  # the reset of a closed connection answers
                assert 1.2 < time.monotonic() - start < 5
            finally:
                client.close()

    def test_a_flood_of_half_requests(self, served: tuple[str, int]) -> None:
        """More connections waiting for their request than --max-connections: the longest waiting is closed, with
        a 408 since part of its request came (the server will not wait for it: not a failure of the server, so no
        5xx), as soon as a new one arrives."""
        url, port = served
        half = sockets(MAX_CONNECTIONS, port, b"GET /health HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.2)  # their bytes have come
        half += sockets(3, port, b"GET /health HTTP/1.1\r\nHost: x\r\n")
        try:
            for sock in half[:3]:
                data, took = read_to_close(sock, HEADER_TIMEOUT / 2)
                assert raw_error(data)[0] == 408 and "room" in raw_error(data)[1]["error"]
            assert httpx.get(f"{url}/health", timeout=2).status_code == 200
        finally:
            close_all(half)


class TestHeaderLimits:
    """The request line and headers are bounded in size and count: 431 (RFC 6585), as JSON, and a legitimate
    large header block that comes in many pieces is not miscounted."""

    @pytest.mark.parametrize("request_bytes", [
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-N%d: v\r\n" % i for i in range(150)) + b"\r\n",
        b"GET /health?" + b"q" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Unfinished: " + b"a" * 40_000,
        b"POST /predict HTTP/1.1\r\nHost: x\r\n" + b"Cookie: " + b"c=1; " * 4000 + b"\r\nContent-Length: 2\r\n\r\n{}",
    ], ids=["one-huge-header", "150-headers", "huge-url", "unfinished-huge-header", "huge-cookie"])
    def test_over_the_limit_is_431(self, served: tuple[str, int], request_bytes: bytes) -> None:
        _, port = served
        sock = connect(port)
        try:
            sock.sendall(request_bytes)
            status, body = raw_error(read_to_close(sock, 3)[0])
            assert status == 431 and "16384 bytes" in body["error"]
        finally:
            sock.close()

    def test_a_large_header_block_in_pieces_is_served(self, served: tuple[str, int]) -> None:
        _, port = served
        block = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100)
                                                                 for i in range(80)) + b"Connection: close\r\n\r\n"
        sock = connect(port)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for i in range(0, len(block), 700):
                sock.sendall(block[i : i + 700])
                time.sleep(0.01)
            assert read_to_close(sock, 3)[0].startswith(b"HTTP/1.1 200")
        finally:
            sock.close()


# == 3. every answer is the documented JSON; a body is parsed whole or refused ====================================


class TestEveryRefusalIsJson:
    """Whatever refuses a request (the router, the HTTP parser, a limit), the answer is `{"error", "field"}`."""

    @pytest.mark.parametrize("how, status", [
        (("GET", "/nothing-here", {}), 404),
        (("GET", "/predict", {}), 405),
        (("DELETE", "/health", {}), 405),
        (("POST", "/predict", {"content": b"x" * 600_000, "headers": {"content-type": "application/json"}}), 413),
        (("POST", "/predict", {"content": b"task=digit", "headers": {"content-type": "text/csv"}}), 415),
        (("POST", "/predict", {"content": b"{", "headers": {"content-type": "application/json"}}), 422),
        (("GET", "/docs", {}), 404),
        (("GET", "/openapi.json", {}), 404),
    ])
    def test_http_refusals(self, served: tuple[str, int], how: tuple, status: int) -> None:
        url, _ = served
        method, path, kwargs = how
        answer = httpx.request(method, f"{url}{path}", timeout=30, **kwargs)
        is_api_error(answer, status)
        assert "server" not in answer.headers  # no software banner either

    @pytest.mark.parametrize("data, status", [
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        (b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400),
        (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\nContent-Type: application/json\r\n"
         b"\r\n{", 413),
    ])
    def test_protocol_refusals(self, served: tuple[str, int], data: bytes, status: int) -> None:
        _, port = served
        sock = connect(port)
        try:
            sock.sendall(data)
            assert raw_error(read_to_close(sock, 3)[0])[0] == status
        finally:
            sock.close()

    def test_busy_timeout_and_failure_answers(self, model, monkeypatch) -> None:
        """503 (every place taken), 504 (past timeout_s) and 500 (a bug in the app) in process: the same body."""
        from moefuse.inference.predict import DEFAULT_MEDIA
        from moefuse.inference.server import ModelServer, ServeLimits, create_app

        server = ModelServer(model, dict(DEFAULT_MEDIA), ServeLimits(max_connections=1, timeout_s=0.001))
        app = create_app(server)

        async def scenario() -> list[httpx.Response]:
            async with app.router.lifespan_context(app):
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                             base_url="http://moefuse") as client:
                    timed_out = await client.post("/predict", json={"task": "digit", "text": "x"})
                    server.active = 1  # the one place is taken
                    busy = [await client.get("/info"), await client.post("/predict", json={"task": "digit"})]
                    health = await client.get("/health")
                    server.active = 0
                    monkeypatch.setattr(server, "info", lambda: 1 / 0)
                    return [timed_out, *busy, health, await client.get("/info")]

        timed_out, busy_info, busy_predict, health, failed = asyncio.run(scenario())
        assert "timeout_s" in is_api_error(timed_out, 504)["error"]
        assert "max_connections" in is_api_error(busy_info, 503)["error"] and busy_info.headers["retry-after"]
        is_api_error(busy_predict, 503)
        assert health.status_code == 200  # never refused
        assert "ZeroDivision" not in is_api_error(failed, 500)["error"]


def multipart(fields: dict, files: dict) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x/predict", data=fields, files=files)
    return request.read(), request.headers["content-type"]


class TestBodiesAreParsedWholeOrRefused:
    """A body is answered only when it was parsed whole: deeply nested or ambiguous JSON and multipart bodies cut
    short are 422s (never a 500, never an answer on part of the input)."""

    @pytest.mark.parametrize("body", [
        b"[" * 100_000,
        b'{"a":' * 50_000,
        b'{"task": "digit", "text": [' + b"[" * 20_000 + b"]}",
        b'{"task": "digit", "text": "a", "text": "b"}',
        b'{"task": "digit", "task": "avqa", "text": "a"}',
        b'{"task": "digit", "text": "a", "x": {"k": 1, "k": 2}}',
        b'{"task": "digit", "text": "' + b"\xff\xfe" + b'"}',
        b'{"task": 1' + b"0" * 5000 + b"}",
    ], ids=["deep-array", "deep-object", "deep-in-a-field", "duplicate-text", "duplicate-task", "duplicate-nested",
            "invalid-utf8", "huge-integer"])
    def test_json(self, served: tuple[str, int], body: bytes) -> None:
        url, _ = served
        answer = httpx.post(f"{url}/predict", content=body, headers={"content-type": "application/json"}, timeout=30)
        is_api_error(answer, 422)

    @pytest.mark.parametrize("text", [b"\xed\xa0\x80", b"a\xff", b"\xc3", b"ok \xe2\x82"],
                             ids=["surrogate-utf8", "ff", "cut-sequence", "cut-3-byte"])
    @pytest.mark.parametrize("kind", ["multipart", "urlencoded"])
    def test_text_that_is_not_utf8(self, served: tuple[str, int], text: bytes, kind: str) -> None:
        """A form field that is not UTF-8 is a 422 naming it (starlette would read it as latin-1, or replace the
        bad bytes, and the model would answer text the client never sent)."""
        url, _ = served
        if kind == "multipart":
            body, ctype = multipart({"task": "digit", "text": "placeholder"}, {"image": ("x.png", b"not parsed")})
            assert ctype.startswith("multipart/form-data")
            body = body.replace(b"placeholder", text)
        else:
            body, ctype = b"task=digit&text=" + b"".join(b"%%%02X" % c for c in text), \
                "application/x-www-form-urlencoded"
        answer = httpx.post(f"{url}/predict", content=body, headers={"content-type": ctype}, timeout=30)
        assert is_api_error(answer, 422)["field"] == "text"

    def test_a_urlencoded_form_is_answered(self, served: tuple[str, int]) -> None:
        url, _ = served
        answer = httpx.post(f"{url}/predict", content=b"task=avqa&question=what+digit%3F&text=seven+%C3%A9",
                            headers={"content-type": "application/x-www-form-urlencoded"}, timeout=30)
        assert answer.status_code == 200, answer.text

    @pytest.mark.parametrize("cut", ["in-the-image", "before-the-closing-boundary", "after-a-part-header",
                                     "empty"])
    def test_multipart_cut_short(self, served: tuple[str, int], image: bytes, cut: str) -> None:
        url, _ = served
        body, kind = multipart({"task": "digit", "text": "a digit"}, {"image": ("x.png", image)})
        at = {"in-the-image": body.index(image[:64]) + len(image) // 2, "before-the-closing-boundary":
              body.rindex(b"--", 0, len(body) - 4), "after-a-part-header": body.index(b"\r\n\r\n") + 4, "empty": 0}
        answer = httpx.post(f"{url}/predict", content=body[: at[cut]], headers={"content-type": kind}, timeout=30)
        assert "closing boundary" in is_api_error(answer, 422)["error"]

    @pytest.mark.parametrize("filename", ["x\0.png", "\0", "../../etc/passwd", "a" * 900 + ".png", "x.p\0ng",
                                          "cr\r\nlf.png"])
    def test_odd_file_names_are_only_names(self, served: tuple[str, int], image: bytes, filename: str) -> None:
        """The client's file name is at most a format hint: the image is read and answered as with a plain name."""
        url, _ = served
        plain = httpx.post(f"{url}/predict", data={"task": "digit"}, files={"image": ("x.png", image)}, timeout=30)
        body, kind = multipart({"task": "digit"}, {"image": (filename, image)})
        odd = httpx.post(f"{url}/predict", content=body, headers={"content-type": kind}, timeout=30)
        assert odd.status_code == 200, odd.text
        assert odd.json()["prediction"] == plain.json()["prediction"] and odd.json()["modalities"] == "image"

    def test_the_whole_body_is_answered(self, served: tuple[str, int], image: bytes) -> None:
        """The control: the same multipart body, whole, is answered with the image read."""
        url, _ = served
        body, kind = multipart({"task": "digit", "text": "a digit"}, {"image": ("x.png", image)})
        answer = httpx.post(f"{url}/predict", content=body, headers={"content-type": kind}, timeout=30)
        assert answer.status_code == 200 and set(answer.json()["modalities"].split("+")) == {"text", "image"}


    def test_a_whole_json_body_with_base64_media_is_answered(self, served: tuple[str, int], image: bytes) -> None:
        """The control for the JSON variants: a whole, valid JSON body with base64 media is answered."""
        url, _ = served
        answer = post_json(url, {"task": "digit", "image": base64.b64encode(image).decode()})
        assert answer.status_code == 200 and answer.json()["modalities"] == "image"


class TestNothingOfTheServerLeaks:
    """Answers show no path of the server and never echo a client's long field name whole."""

    def test_info_holds_no_path(self, served: tuple[str, int], fault_run: Path) -> None:
        url, _ = served
        info = httpx.get(f"{url}/info").text
        assert str(fault_run) not in info and "/model" not in info and str(Path.home()) not in info

    @pytest.mark.parametrize("how", ["json", "form", "multipart-file"])
    def test_a_megabyte_field_name_is_cut(self, served: tuple[str, int], how: str) -> None:
        url, _ = served
        name = "n" * 300_000
        if how == "json":
            answer = httpx.post(f"{url}/predict", json={"task": "digit", name: "x"}, timeout=30)
        elif how == "form":
            answer = httpx.post(f"{url}/predict", data={"task": "digit", name: "x"}, timeout=30)
        else:
            answer = httpx.post(f"{url}/predict", data={"task": "digit"}, files={name: ("x.png", b"x")}, timeout=30)
        assert answer.status_code in (413, 422) and len(answer.content) < 1000, answer.text[:200]
        body = is_api_error(answer, answer.status_code)
        assert body["field"] is None or len(body["field"]) < 100

    @pytest.mark.parametrize("body", [{"task": "digit", "\ud800" * 3: "x"}, {"task": "\udfff"},
                                      {"task": "digit", "text": "a", "x\udc00y": "z"}])
    def test_surrogates_are_echoed_as_valid_json(self, served: tuple[str, int], body: dict) -> None:
        url, _ = served
        answer = post_json(url, body)
        answer.content.decode("utf-8")  # strict: a lone surrogate cannot be encoded
        is_api_error(answer, 422)

    def test_no_temporary_path_in_a_read_error(self, served: tuple[str, int]) -> None:
        url, _ = served
        answer = httpx.post(f"{url}/predict", data={"task": "digit"},
                            files={"image": ("x.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 64)}, timeout=30)
        error = is_api_error(answer, 422)["error"]
        assert "/tmp" not in error and "moefuse-serve-" not in error and "uploaded" in error


# == 4. start-up failures are one line with a documented exit code ================================================


class TestStartUpFailures:
    """An address serve cannot listen on is one `moefuse serve: error:` line and exit code 2, before the model
    loads; `moefuse serve --help` renders (a `%` in a limit's doc crashed it)."""

    @pytest.fixture
    def taken(self) -> Iterator[int]:
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            yield holder.getsockname()[1]

    def test_port_in_use(self, fault_run: Path, taken: int, capsys) -> None:
        assert cli(["serve", "--checkpoint", str(fault_run / "model"), "--port", str(taken)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("moefuse serve: error:") and f"127.0.0.1:{taken}" in err and "in use" in err
        assert len(err.strip().splitlines()) == 1

    @pytest.mark.parametrize("host, says", [("no-such-host.invalid", "neither an IP address"),
                                            ("999.1.2.3", "neither an IP address"),
                                            ("192.0.2.1", "not an address of this machine"),
                                            ("", "empty"), ("   ", "empty")])
    def test_bad_host(self, tmp_path: Path, capsys, host: str, says: str) -> None:
        """Checked before the model folder is even read (this one does not exist)."""
        assert cli(["serve", "--checkpoint", str(tmp_path / "none"), "--host", host, "--port", str(free_port())]) == 2
        err = capsys.readouterr().err
        assert err.startswith("moefuse serve: error:") and says in err and len(err.strip().splitlines()) == 1

    @pytest.mark.parametrize("port", ["70000", "-1"])
    def test_not_a_port(self, tmp_path: Path, capsys, port: str) -> None:
        try:
            code = cli(["serve", "--checkpoint", str(tmp_path / "none"), "--port", port])
        except SystemExit as e:  # argparse may refuse it first, with its usage line
            code = e.code
        err = capsys.readouterr().err
        assert code == 2
        assert "Traceback" not in err  # argparse's usage, then one error line naming the flag
        assert err.strip().splitlines()[-1].startswith("moefuse serve: error: argument --port:")

    def test_help_renders(self, capsys) -> None:
        with pytest.raises(SystemExit) as done:
            cli(["serve", "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert done.value.code == 0 and "--header-timeout-s" in out and "11 % more" in out

    def test_a_real_process_in_use_port(self, fault_run: Path, taken: int) -> None:
        """The same through the `moefuse` process: one line on stderr, exit code 2."""
        done = subprocess.run([sys.executable, "-m", "moefuse.cli", "serve", "--checkpoint", str(fault_run / "model"),
                               "--port", str(taken)], cwd=REPO, capture_output=True, text=True, timeout=120)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("moefuse serve: error:")

