"""A real serving stack for the HTTP tests: registry, buffer, service, and a server.

Not a fixture module: test files import ``serve`` and ``Client``. Packages are loaded
with the real runtime (``load_model``) and parity-checked, the buffer is a real SQLite
file. With ``transport=True`` (the default) the server is the real ``HttpServer`` on a
free loopback port; with ``transport=False`` requests go straight into the routes and
the inference core in process (``InProcessClient``, the idea of starlette's
TestClient): protocol tests need no socket, and the transport's own tests (limits,
auth, compression, keep-alive) keep the real one.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import Config
from agent.metrics import Metrics
from agent.models.registry import Registry
from agent.models.runtime import LoadedModel, check_parity, load_model
from agent.results.buffer import ResultBuffer
from agent.serving.routes import Service
from agent.serving.server import HttpServer
from agent.wire.package import read_manifest


def load(package: Path) -> LoadedModel:
    model = load_model(package, read_manifest(package))
    check_parity(model)
    return model


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> str:
        body = self.json
        assert set(body) == {"error"}, body
        return str(body["error"])


class Client:
    """One keep-alive connection; ``request`` never raises on 4xx/5xx."""

    def __init__(self, host: str, port: int, token: str | None = None) -> None:
        self.host, self.port, self.token = host, port, token
        self.conn = http.client.HTTPConnection(host, port, timeout=10)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        data = body if isinstance(body, bytes | None) else json.dumps(body).encode()
        hdrs = dict(headers or {})
        if self.token is not None and "Authorization" not in hdrs:
            hdrs["Authorization"] = f"Bearer {self.token}"
        try:
            self.conn.request(method, path, body=data, headers=hdrs)
            resp = self.conn.getresponse()
        except (ConnectionError, http.client.HTTPException):
            # The server closed a connection it could not keep (e.g. after a 413): reconnect.
            self.conn.close()
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
            self.conn.request(method, path, body=data, headers=hdrs)
            resp = self.conn.getresponse()
        out = Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        if resp.will_close:
            self.conn.close()
        return out

    def predict(self, body: Any, query: str = "") -> Response:
        return self.request("POST", "/predict" + query, body)

    def close(self) -> None:
        self.conn.close()


class _Headers(dict[str, str]):
    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return dict.get(self, name.lower(), default)


class InProcessClient:
    """``Client``'s interface over ``Service.handle``: no socket, no transport."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        data = (
            body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
        )
        route, _, query = path.partition("?")
        hdrs = _Headers({k.lower(): v for k, v in (headers or {}).items()})
        reply = self.service.handle(method, route, query, hdrs, data)
        out = {"content-type": reply.content_type, "content-length": str(len(reply.body))}
        out.update({k.lower(): v for k, v in reply.headers.items()})
        return Response(reply.status, out, reply.body)

    def predict(self, body: Any, query: str = "") -> Response:
        return self.request("POST", "/predict" + query, body)

    def close(self) -> None:
        pass


@dataclass
class Served:
    http: HttpServer | None
    service: Service
    registry: Registry
    buffer: ResultBuffer
    metrics: Metrics
    cfg: Config

    @property
    def host(self) -> str:
        assert self.http is not None, "served without a transport"
        return self.http.address[0]

    @property
    def port(self) -> int:
        assert self.http is not None, "served without a transport"
        return self.http.address[1]

    @property
    def url(self) -> str:
        assert self.http is not None, "served without a transport"
        return self.http.url

    def client(self, token: str | None = None) -> Client | InProcessClient:
        if self.http is None:
            return InProcessClient(self.service)
        return Client(self.host, self.port, token)


@contextmanager
def serve(
    tmp_path: Path,
    *packages: Path,
    token: str | None = None,
    max_body_bytes: int | None = None,
    default: str | None = None,
    status: Callable[[], Mapping[str, Any]] | None = None,
    transport: bool = True,
    configure: Callable[[Config], None] | None = None,
) -> Iterator[Served]:
    cfg = Config()
    cfg.state_dir = str(tmp_path / "state")
    cfg.http.port = 0
    if configure is not None:
        configure(cfg)
    if token is not None:
        token_file = tmp_path / "token"
        token_file.write_text(token + "\n")
        cfg.http.token_file = str(token_file)
    if max_body_bytes is not None:
        cfg.http.max_body_bytes = max_body_bytes
    metrics = Metrics()
    registry = Registry(default=default)
    for package in packages:
        registry.swap(load(package))
    buffer = ResultBuffer(cfg.buffer_path, cfg.buffer, metrics)
    service = Service(cfg, registry, buffer, metrics, status=status)
    server = HttpServer(cfg.http, service) if transport else None
    if server is not None:
        server.start()
    try:
        yield Served(server, service, registry, buffer, metrics, cfg)
    finally:
        if server is not None:
            server.stop()
        buffer.close()
