"""The thin HTTP transport: stdlib server, TCP_NODELAY, keep-alive, auth, limits, gzip.

Chosen by measurement (``bench/http.py``): the standard library's threading server
with Nagle's algorithm off on every accepted socket and HTTP/1.1 keep-alive serves
within reach of a bare reference server and adds no dependency to a 1 GB Pi. Without
TCP_NODELAY every keep-alive answer waits ~40 ms for the peer's delayed ACK.

This module only speaks HTTP: it checks the bearer token, refuses oversized or
oddly encoded bodies before they cost memory, decompresses, hands the request to
``Service.handle`` and writes the reply (compressed when asked and worth it) in a
single send.
"""

from __future__ import annotations

import gzip
import hmac
import logging
import socket
import time
import zlib
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

from agent.serving.codecs import choose_encoding, decompress
from agent.serving.connections import BODY, BUSY, HEAD, IDLE
from agent.serving.routes import Reply, error_reply
from agent.wire.errors import (
    BadRequest,
    EdgeError,
    PayloadTooLarge,
    Unauthorized,
)

if TYPE_CHECKING:
    from agent.serving.server import _Server

log = logging.getLogger(__name__)
_monotonic = time.monotonic
_BUSY = (BUSY, 0.0)  # no deadline while the agent works on an answer

# Liveness and readiness stay open without the token: probes (systemd, Docker
# HEALTHCHECK, a load balancer) have no secret, and an empty 200/503 reveals nothing.
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
COMPRESS_MIN_BYTES = 1024  # below this, gzip costs more time than the bytes it saves
IDLE_TIMEOUT_S = 60.0  # a keep-alive connection idle this long is closed
MAX_HEADERS = 100
MAX_HEADER_LINE = 65536
STOP_GRACE_S = 2.0  # how long stop() waits for answers in flight
# A refused body the client still sends is read and thrown away for this long (and at
# most this much) before the connection closes, as nginx's lingering close does.
LINGER_S = 2.0
LINGER_MAX_BYTES = 16 * 1024 * 1024
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}


class _Headers(dict[str, str]):
    """Request headers by lowercase name; ``get`` takes any case, as email.Message does."""

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return dict.get(self, name.lower(), default)


# The transport's own look-ups use lowercase names: the plain dict's get, without the
# Python-level case folding of _Headers.get (five look-ups on every request).
_header: Callable[..., Any] = dict.get


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT_S
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle_one_request(self) -> None:
        """Wait for a request (idle deadline), read it (header deadline), answer it.

        The standard library's loop body, with the phases the reaper watches written
        inline (this runs once per request) and every method going to ``_handle``.
        """
        phases, conn = self.server.conns.phases, self.connection
        phases[conn] = (IDLE, _monotonic())
        try:
            if not self.rfile.peek(1):  # type: ignore[attr-defined]
                self.close_connection = True  # the client closed, or the reaper did
                return
            phases[conn] = (HEAD, _monotonic())
            self.raw_requestline = self.rfile.readline(MAX_HEADER_LINE + 1)
            if len(self.raw_requestline) > MAX_HEADER_LINE:
                self.requestline = self.request_version = self.command = ""
                self.send_error(414, "request line too long")
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return
            phases[conn] = _BUSY
            self._handle()
        except OSError:  # a timeout, a reset, or the reaper's shutdown
            self.close_connection = True

    def finish(self) -> None:
        self.server.conns.leave(self.connection)
        super().finish()

    def handle_expect_100(self) -> bool:
        """Refuse an oversized body before the client sends it (curl asks above 1 MB)."""
        raw = _header(self.headers, "content-length", "")
        if raw.isdigit() and int(raw) > self.server.max_body:
            self.close_connection = True
            self.server.service.metrics.request("transport", "", "", 413)
            error = PayloadTooLarge(int(raw), self.server.max_body)
            self._write(error_reply(error.status, error.message))
            return False
        return super().handle_expect_100()

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # Formatting an access line costs more than some inferences: only when asked.
        if log.isEnabledFor(logging.DEBUG):
            super().log_request(code, size)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Malformed HTTP (bad request line, huge headers): a JSON error, then close."""
        self.close_connection = True
        self._write(error_reply(code, f"request: {message or HTTPStatus(code).phrase}"))

    def parse_request(self) -> bool:
        """The request line and headers, without the email package.

        The standard library parses headers with ``email.parser``: a third of the CPU
        time of a small request. HTTP headers need far less: name, colon, value.
        """
        self.command = ""
        self.request_version = self.default_request_version
        self.close_connection = True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if not words:
            return False
        if len(words) != 3 or not words[2].startswith("HTTP/1."):
            self.send_error(400, f"bad request line {self.requestline[:100]!r}")
            return False
        self.command, self.path, self.request_version = words
        if self.request_version != "HTTP/1.0":
            self.close_connection = False  # HTTP/1.1: keep-alive unless told otherwise
        headers = _Headers()
        last = ""
        readline = self.rfile.readline
        for _ in range(MAX_HEADERS + 1):
            line = readline(MAX_HEADER_LINE + 1)
            if len(line) > MAX_HEADER_LINE:
                self.send_error(431, "header line too long")
                return False
            if line in (b"\r\n", b"\n", b""):
                break
            text = line.decode("iso-8859-1")
            if text[0] in " \t" and last:  # obsolete line folding
                headers[last] += " " + text.strip()
                continue
            name, sep, value = text.partition(":")
            if not sep or not name or name != name.strip():
                self.send_error(400, f"bad header line {text[:100].rstrip()!r}")
                return False
            last = name.lower()
            value = value.strip()
            headers[last] = f"{headers[last]}, {value}" if last in headers else value
        else:
            self.send_error(431, f"more than {MAX_HEADERS} headers")
            return False
        self.headers = headers  # type: ignore[assignment]
        connection = _header(headers, "connection", "").lower()
        if connection == "close":
            self.close_connection = True
        elif connection == "keep-alive":
            self.close_connection = False
        if (
            _header(headers, "expect", "").lower() == "100-continue"
            and self.request_version != "HTTP/1.0"
        ):
            return self.handle_expect_100()
        return True

    def _handle(self) -> None:
        service = self.server.service
        path, _, query = self.path.partition("?")
        method = "GET" if self.command == "HEAD" else self.command
        try:
            self._authorize(path)
            body = self._body()
        except EdgeError as e:
            reply = error_reply(e.status, e.message, route="transport")
            if e.status == 401:
                reply.headers["WWW-Authenticate"] = 'Bearer realm="edge-agent"'
            service.metrics.request("transport", "", "", e.status)
            self._write(reply)
            if self.close_connection:
                self._linger()
            return
        reply = service.handle(method, path, query, self.headers, body)
        if reply.compressible and len(reply.body) >= COMPRESS_MIN_BYTES:
            encoding = choose_encoding(_header(self.headers, "accept-encoding"))
            if encoding is not None:
                reply.body = (
                    gzip.compress(reply.body, 5, mtime=0)
                    if encoding == "gzip"
                    else zlib.compress(reply.body, 5)
                )
                reply.headers["Content-Encoding"] = encoding
                reply.headers["Vary"] = "Accept-Encoding"
        self._write(reply)

    def _linger(self) -> None:
        """Read and discard what the client still sends of a refused body, then close.

        Closing a socket with unread data sends a reset, and a client that writes its
        whole body before reading (urllib, most scripts) then gets a broken pipe instead
        of the 413. Half-closing first and draining, bounded in time and bytes, lets
        every client read the answer.
        """
        sock = self.connection
        try:
            self.wfile.flush()
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        deadline = time.monotonic() + LINGER_S
        left = LINGER_MAX_BYTES
        try:
            while left > 0 and (remaining := deadline - time.monotonic()) > 0:
                sock.settimeout(remaining)
                data = self.rfile.read1(min(65536, left))  # type: ignore[attr-defined]
                if not data:
                    break
                left -= len(data)
        except OSError:  # a timeout or a reset: the client had its chance
            pass

    def _authorize(self, path: str) -> None:
        token = self.server.token
        if token is None or path in OPEN_PATHS:
            return
        given = _header(self.headers, "authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not value:
            self._discard_body()
            raise Unauthorized(
                "Authorization: missing bearer token (send 'Authorization: Bearer <token>')"
            )
        if not hmac.compare_digest(value.strip().encode(), token):
            self._discard_body()
            raise Unauthorized("Authorization: the bearer token is wrong")

    def _discard_body(self) -> None:
        # An unread body would be taken for the next request: close instead of reading it.
        headers = self.headers
        if _header(headers, "content-length", "0") != "0" or _header(headers, "transfer-encoding"):
            self.close_connection = True

    def _body(self) -> bytes:
        headers = self.headers
        if (
            _header(headers, "content-length") is None
            and _header(headers, "transfer-encoding") is None
        ):
            return self._read_body()  # no body to wait for (a GET): no deadline to set
        phases, conn = self.server.conns.phases, self.connection
        phases[conn] = (BODY, _monotonic())
        try:
            return self._read_body()
        finally:
            phases[conn] = _BUSY

    def _read_body(self) -> bytes:
        limit = self.server.max_body
        headers = self.headers
        transfer = _header(headers, "transfer-encoding")
        if transfer is not None and "chunked" in transfer.lower():
            data = self._read_chunked(limit)
        else:
            raw = _header(headers, "content-length")
            if raw is None:
                data = b""
            else:
                try:
                    length = int(raw)
                    if length < 0:
                        raise ValueError
                except ValueError:
                    self.close_connection = True
                    raise BadRequest(f"Content-Length: {raw!r} is not a byte count") from None
                if length > limit:
                    self.close_connection = True  # refused before reading: the body stays unread
                    raise PayloadTooLarge(length, limit)
                data = self.rfile.read(length)
                if len(data) != length:
                    self.close_connection = True
                    raise BadRequest(f"body: got {len(data)} bytes, Content-Length said {length}")
        encoding = _header(headers, "content-encoding")
        if encoding is not None:
            encoding = encoding.strip().lower()
            if encoding not in ("identity", ""):
                data = decompress(data, encoding, limit)
        return data

    def _read_chunked(self, limit: int) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                raise BadRequest(f"body: bad chunk size line {line[:40]!r}") from None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            total += size
            if total > limit:
                self.close_connection = True
                raise PayloadTooLarge(total, limit)
            parts.append(self.rfile.read(size))
            self.rfile.readline(8)

    def _write(self, reply: Reply) -> None:
        body = b"" if self.command == "HEAD" else reply.body
        head = [
            _STATUS_LINES.get(reply.status) or f"HTTP/1.1 {reply.status} \r\n".encode(),
            b"Content-Type: ",
            reply.content_type.encode(),
            b"\r\nContent-Length: ",
            str(len(reply.body)).encode(),
            b"\r\n",
        ]
        for key, value in reply.headers.items():
            head.append(f"{key}: {value}\r\n".encode("latin-1"))
        if self.close_connection:
            head.append(b"Connection: close\r\n")
        head.append(b"\r\n")
        # One send per answer: with TCP_NODELAY two sends would be two packets.
        self.wfile.write(b"".join(head) + body)
        self.log_request(reply.status, len(body))
