"""The HTTP listener: a threading server with its connections bounded, and its lifecycle.

``agent/serving/http.py`` speaks HTTP on one connection; this module owns the listening
socket, admits connections (``agent/serving/connections.py``), and starts and stops it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Any

from agent.config import HttpConfig
from agent.secrets import read_secret
from agent.serving.connections import Connections
from agent.serving.http import STOP_GRACE_S, Handler
from agent.serving.routes import Service
from agent.wire.errors import EdgeError

log = logging.getLogger(__name__)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], service: Service, cfg: HttpConfig) -> None:
        self.service = service
        self.max_body = cfg.max_body_bytes
        self.token = read_secret(cfg.token_file).encode() if cfg.token_file else None
        self.conns = Connections(cfg, service.metrics)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)

    def get_request(self) -> tuple[Any, Any]:
        return self.conns.accept(self.socket)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.conns.admit():
            self.conns.refuse(request, "limit")
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.conns.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.conns.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that goes away mid-answer is routine; anything else is a bug to log."""
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError | TimeoutError):
            log.debug("%s: connection ended: %s", client_address, error)
        else:
            log.exception("HTTP connection from %s failed", client_address)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall for seconds
        # on a device without DNS; the name is never used.
        # SO_REUSEADDR as TCPServer.server_bind would set it: a restart after a crash
        # must not fail on the old connections' TIME_WAIT.
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])


class HttpServer:
    """The agent's HTTP listener: ``start()``, ``stop()``, ``alive()``, ``.address``."""

    def __init__(self, cfg: HttpConfig, service: Service) -> None:
        self.cfg = cfg
        self.service = service
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            return (self.cfg.host, self.cfg.port)
        host, port = self._server.server_address[:2]
        return (str(host), int(port))

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> None:
        try:
            self._server = _Server((self.cfg.host, self.cfg.port), self.service, self.cfg)
        except OSError as e:
            raise EdgeError(
                f"http.host/http.port: cannot listen on {self.cfg.host}:{self.cfg.port} "
                f"({e.strerror or e})"
            ) from None
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.5},
            name="http",
            daemon=True,
        )
        self._thread.start()
        self._server.conns.loop.start()
        log.info("serving HTTP on %s", self.url)

    def stop(self) -> None:
        if self._server is None:
            return
        server = self._server
        server.shutdown()  # no new connections
        # Idle keep-alive connections would otherwise outlive the server (and the buffer
        # the supervisor closes next): end their reading side; an answer in flight is
        # still written, then the handler sees EOF and returns.
        for conn in server.conns.sockets():
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RD)
        deadline = time.monotonic() + STOP_GRACE_S
        while server.conns.active and time.monotonic() < deadline:
            time.sleep(0.01)
        server.server_close()
        server.conns.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        log.info("HTTP server stopped")
        self._server = None

    def alive(self) -> bool:
        running = self._thread is not None and self._thread.is_alive()
        return running and self._server is not None and self._server.conns.loop.alive()
