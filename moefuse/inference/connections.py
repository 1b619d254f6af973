"""How `moefuse serve` accepts connections and bounds what one client can hold (uvicorn with httptools).

uvicorn bounds neither the time a client may take to send its request's headers nor their size, and its
`limit_concurrency` counts every open connection, so silent sockets took the server from everyone else (64 of them
made even /health answer 503 for as long as they were held). `GuardedHttpToolsProtocol` is uvicorn's httptools
protocol with the guards a public server puts before its application (nginx's client_header_timeout,
large_client_header_buffers and send_timeout, Apache's LimitRequestFields; RFC 9110 §15.5.9 408, RFC 6585 §5 431):

* a connection waits for its request: from when it is opened, or from the end of its last answer, its request's
  headers must be complete within `header_timeout_s`, else it is closed (with a 408 if part of a request came);
* the request line and headers together are at most MAX_HEADER_BYTES, in at most MAX_HEADERS fields: 431;
* at most MAX_PIPELINED requests wait behind the one being answered (HTTP/1.1 pipelining): more close the
  connection, so a client cannot queue a request per 18 bytes it sends;
* connections waiting for their request (its headers or its body) are at most `max_waiting`: one more closes
  the one that has waited longest, so a flood of silent or trickling sockets never blocks a new client;
* a request holds its connection at most `request_timeout_s` (the app answers 504 at its own timeout, the body
  read or not; this cuts off a client that does not read its answer);
* what the HTTP parser refuses is a 400, and every refusal here is the API's JSON `{"error", "field"}`.

Requests being served (their body read) are counted by the application (`ModelServer.serving`), not here: a
socket that never completes its request never takes a place from a client that has.
`listen_socket` binds the address before anything else starts, so an address in use or an unknown host is one
error line, and `run` serves a bound socket with one process or several.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from moefuse.errors import UserError

MAX_HEADER_BYTES = 16 * 1024  # the request line and headers together (uvicorn's h11 and Node's default)
MAX_HEADERS = 100  # header fields per request (Apache's LimitRequestFields)
MAX_PIPELINED = 32  # requests queued behind the one being answered on one connection


@dataclass
class ConnectionLimits:
    """What one connection may hold, and for how long."""

    header_timeout_s: float = 5.0
    request_timeout_s: float = 35.0
    max_waiting: int = 64
    max_header_bytes: int = MAX_HEADER_BYTES
    max_headers: int = MAX_HEADERS


class GuardedConfig(uvicorn.Config):
    """uvicorn's Config with the connection limits the protocol reads (a class, so worker processes unpickle it)."""

    def __init__(self, app: Any, *, limits: ConnectionLimits, **kwargs: Any):
        super().__init__(app, http=GuardedHttpToolsProtocol, limit_concurrency=None, **kwargs)
        self.connection_limits = limits


class Refusal(Exception):
    """A request refused from inside the parser's callbacks (raising stops the parser): the status and why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def json_response(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 response with the API's error body, closing the connection."""
    body = json.dumps({"error": message, "field": None}).encode()
    head = f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    return STATUS_LINE[status] + head.encode() + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline, header limits, a cap on waiting connections, a
    request deadline and JSON refusals (see the module's docstring)."""

    def __init__(self, config: uvicorn.Config, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None):
        super().__init__(config, server_state, app_state, _loop)
        self.limits: ConnectionLimits = getattr(config, "connection_limits", None) or ConnectionLimits()
        self.limit_concurrency = None  # requests served are counted by the app, once they have arrived
        if not hasattr(server_state, "waiting"):
            server_state.waiting = {}  # connections waiting for their request, oldest first (a dict keeps order)
        self.waiting: dict[GuardedHttpToolsProtocol, None] = server_state.waiting
        self.header_timer: asyncio.TimerHandle | None = None
        self.request_timer: asyncio.TimerHandle | None = None
        self.in_headers = False  # part of a request has come, its headers are not complete
        self.in_message = False  # a request is being received (its headers or its body)
        self.field_bytes = self.raw_bytes = self.header_count = self.messages = 0  # of the request's headers

    # -- waiting for a request ------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._wait()
        while len(self.waiting) > self.limits.max_waiting:  # make room: close the one that has waited longest
            # 408 (RFC 9110 §15.5.9): the server will not wait longer for this request; it is not the server failing
            next(iter(self.waiting))._close(408, "the server closed this connection, which sent no complete request, "
                                                 "to make room for others; send the request at once")

    def _wait(self) -> None:
        """From now, the next request's headers must be complete within header_timeout_s."""
        self.waiting.pop(self, None)
        self.waiting[self] = None
        self._cancel("header_timer")
        self.header_timer = self.loop.call_later(self.limits.header_timeout_s, self._close, 408,
                                                 f"the request's headers did not arrive within "
                                                 f"{self.limits.header_timeout_s:g} s")

    def _cancel(self, name: str) -> None:
        timer = getattr(self, name)
        if timer is not None:
            timer.cancel()
            setattr(self, name, None)

    def _close(self, status: int, message: str) -> None:
        """Close the connection; with a JSON answer if part of a request came and no answer is under way."""
        self.waiting.pop(self, None)
        if self.transport.is_closing():
            return
        if self.in_headers and (self.cycle is None or self.cycle.response_complete):
            self.transport.write(json_response(status, message))
        self._end()

    def _end(self) -> None:
        """Close; abort (RST) if what was written cannot be sent, a client that does not read: close() would wait
        for it to be sent, holding the connection forever."""
        if self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.waiting.pop(self, None)
        self._cancel("header_timer")
        self._cancel("request_timer")
        super().connection_lost(exc)

    # -- the parser -----------------------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        messages, in_headers, idle = self.messages, self.in_headers, not self.in_message
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # websockets are off: an upgrade request is answered as plain HTTP
            pass
        except httptools.HttpParserError as e:
            if isinstance(e.__context__, Refusal):
                self._close(e.__context__.status, str(e.__context__))
            else:
                self._close(400, "the request is not valid HTTP/1.1")
            return
        if self.in_headers and self.messages == messages + idle and (in_headers or idle):  # all of `data` was headers
            self.raw_bytes += len(data)  # the parser buffers an unfinished field: bound it before it completes
            if self.raw_bytes > self.limits.max_header_bytes:
                self._close(431, self._too_large())

    def _too_large(self) -> str:
        return (f"the request line and headers are over the limit of {self.limits.max_header_bytes} bytes in "
                f"{self.limits.max_headers} fields")

    def _count(self, size: int, fields: int = 0) -> None:
        """Count the request line's and the headers' fields as the parser completes them."""
        self.field_bytes += size
        self.header_count += fields
        if self.field_bytes > self.limits.max_header_bytes or self.header_count > self.limits.max_headers:
            raise Refusal(431, self._too_large())

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.in_headers = self.in_message = True
        self.field_bytes = self.raw_bytes = self.header_count = 0
        self.messages += 1

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4, 1)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self.in_headers = False
        self._cancel("header_timer")
        if self.cycle is None or self.cycle.response_complete:  # it is served now, not queued behind another
            self._start_request_timer()
        elif len(self.pipeline) >= MAX_PIPELINED:
            raise Refusal(429, f"over {MAX_PIPELINED} requests sent ahead of their answers; read the answers")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.waiting.pop(self, None)  # its request has arrived: it is served, not waiting
        self.in_message = False
        super().on_message_complete()

    # -- serving --------------------------------------------------------------------------------------------------

    def _start_request_timer(self) -> None:
        self._cancel("request_timer")
        self.request_timer = self.loop.call_later(self.limits.request_timeout_s, self._past_request_deadline)

    def _past_request_deadline(self) -> None:
        """The answer has not been sent (or read by the client) in time: close the connection."""
        self.request_timer = None
        self.waiting.pop(self, None)
        self._end()

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)
        self._cancel("request_timer")
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if pipelined:
            self._start_request_timer()
        else:
            self._wait()


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (not yet listening), or a UserError naming the address and the fix."""
    if not host.strip():
        raise UserError("--host is empty: give an address to listen on, e.g. 127.0.0.1 (this machine only)")
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port: give one in 1..65535 (0: any free port)")
    try:  # a name with several addresses (localhost: ::1 and 127.0.0.1) is served on its IPv4 one, if any
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = min(found, key=lambda a: a[0] != socket.AF_INET)
    except (socket.gaierror, UnicodeError, ValueError) as e:
        raise UserError(f"--host {host!r} is neither an IP address nor a known host name ({e}): give one, e.g. "
                        f"127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        hint = {errno.EADDRINUSE: "another process listens on this port: stop it or choose another --port",
                errno.EADDRNOTAVAIL: "it is not an address of this machine: choose one of its addresses, e.g. "
                                     "127.0.0.1 or 0.0.0.0",
                errno.EACCES: "ports below 1024 need privileges: choose another --port"}.get(e.errno or 0, "")
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}" + (f" ({hint})" if hint else "")) \
            from None
    sock.set_inheritable(True)
    return sock


def run(config: GuardedConfig, sock: socket.socket) -> bool:
    """Serve on the bound `sock` until SIGINT or SIGTERM: in this process, or in config.workers processes sharing
    it (config.app then an import string). -> whether it served (False: the server failed to start)."""
    if config.workers > 1:
        from uvicorn.supervisors import Multiprocess

        Multiprocess(config, sockets=[sock]).run()
        return True
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    return server.started


@contextlib.contextmanager
def run_in_thread(config: GuardedConfig, sock: socket.socket) -> Iterator[uvicorn.Server]:
    """Serve on `sock` in a thread of this process while the block runs (tests and benchmarks); stops after."""
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    try:
        while not server.started and thread.is_alive():
            threading.Event().wait(0.01)
        yield server
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
