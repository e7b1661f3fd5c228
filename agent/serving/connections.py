"""The HTTP server's connections: a cap, a deadline per phase, and a reserve descriptor.

A thread serves each connection, so without bounds a flood of idle or slow clients
(slowloris) holds every thread and file descriptor: new requests then hang, and once
``accept`` fails with EMFILE the listening socket stays readable and the server spins
a core. Here:

- at most ``http.max_connections`` are served at once; one more is answered at once
  with a 503 and closed;
- each connection is in a phase with a deadline (waiting for a request: idle timeout;
  from its first byte to the end of the headers: header timeout; receiving the body:
  body timeout); a reaper loop shuts down what overstays, which ends the blocked read;
- one descriptor is kept in reserve: when ``accept`` fails for lack of descriptors the
  reserve is freed, the connection taken and refused with the same 503, and the
  reserve opened again, so the server neither spins nor leaves a client hanging.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import socket
import threading
import time

from agent.config import HttpConfig
from agent.loops import Loop
from agent.metrics import Metrics

log = logging.getLogger(__name__)

IDLE, HEAD, BODY, BUSY = "idle", "head", "body", "busy"
REAP_INTERVAL_S = 0.5
REQUEST_WAIT_S = 0.05  # a refused client's request, out of descriptors (refuse())
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
)


def refusal(message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return _REFUSAL % (len(body), body)


class Connections:
    def __init__(self, cfg: HttpConfig, metrics: Metrics) -> None:
        self.max = cfg.max_connections
        self.deadlines = {
            IDLE: cfg.idle_timeout_s,
            HEAD: cfg.header_timeout_s,
            BODY: cfg.body_timeout_s,
        }
        self._lock = threading.Lock()
        # The handler writes (phase, since) here itself, once per phase: a hot path.
        self.phases: dict[socket.socket, tuple[str, float]] = {}
        self.active = 0  # admitted, counted before their thread starts
        self._reserve: int | None = os.open(os.devnull, os.O_RDONLY)
        self.loop = Loop("http-reaper", self._reap, stall_s=60.0, first_wait_s=REAP_INTERVAL_S)
        self.metrics = metrics

    # --- admission -------------------------------------------------------------------

    def admit(self) -> bool:
        """Count a new connection in; False when the cap is reached (refuse it)."""
        with self._lock:
            if self.active >= self.max:
                return False
            self.active += 1
        self.metrics.connections_open.inc()
        return True

    def release(self) -> None:
        with self._lock:
            self.active -= 1
        self.metrics.connections_open.dec()

    def refuse(self, conn: socket.socket, reason: str) -> None:
        """Answer 503 without a thread, drain what the client sent, close."""
        self.metrics.connections_refused.labels(reason).inc()
        message = (
            f"too many connections ({self.max} being served); try again"
            if reason == "limit"
            else "the agent is out of file descriptors; try again"
        )
        with contextlib.suppress(OSError):
            # The accepting thread does this: it must never wait on the client. The
            # answer fits the socket's send buffer; what the client has sent already is
            # read without waiting, so the close is a FIN and not a reset. Out of
            # descriptors (rare, and nothing else can be accepted anyway) it waits up to
            # REQUEST_WAIT_S for the request first: a request that arrives after the
            # close meets a reset, and the client sees a broken pipe instead of the 503.
            if reason == "descriptors":
                select.select([conn], [], [], REQUEST_WAIT_S)
            conn.setblocking(False)
            conn.send(refusal(message))
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):
                pass
        conn.close()

    def accept(self, listener: socket.socket) -> tuple[socket.socket, object]:
        """``listener.accept()``, refusing a connection when descriptors ran out."""
        try:
            return listener.accept()
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE) or self._reserve is None:
                raise
            os.close(self._reserve)
            self._reserve = None
            try:
                conn, _ = listener.accept()
                self.refuse(conn, "descriptors")
            finally:
                with contextlib.suppress(OSError):
                    self._reserve = os.open(os.devnull, os.O_RDONLY)
            raise  # socketserver ignores it: nothing to serve

    # --- phases ----------------------------------------------------------------------

    def leave(self, conn: socket.socket) -> None:
        self.phases.pop(conn, None)

    def sockets(self) -> list[socket.socket]:
        return list(self.phases)

    def _reap(self) -> float:
        now = time.monotonic()
        for conn, (phase, since) in list(self.phases.items()):
            limit = self.deadlines.get(phase)
            if limit is not None and now - since > limit:
                self.phases.pop(conn, None)
                self.metrics.connections_closed.labels(phase).inc()
                log.debug("http: closing a connection %s for %.1f s", phase, now - since)
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        return REAP_INTERVAL_S

    def close(self) -> None:
        self.loop.stop(2)
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
