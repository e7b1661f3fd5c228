"""What the HTTP routes call: one place maps a request to core calls and errors to replies.

The transport (``agent/http_server.py``) deals with sockets, auth, body limits and
compression, then hands ``Service.handle`` a method, path, query, headers and body.
Here the route is matched, the core (``Predictor``, ``OpenInference``) is called and
every ``EdgeError`` becomes ``(status, {"error": message})``. Anything else is a bug: a
500 that is logged with its traceback and counted on ``/metrics``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qs

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent import __version__
from agent.config import Config
from agent.metrics import Metrics
from agent.models.registry import Registry
from agent.quality.drift import DriftMonitor
from agent.quality.shadow import ShadowRunner
from agent.results.buffer import ResultBuffer
from agent.serving.codecs import parse_json
from agent.serving.core import InferenceCore
from agent.serving.oip import OpenInference
from agent.serving.predict import Predictor
from agent.wire import payloads
from agent.wire.errors import BadRequest, EdgeError, StorageFull

log = logging.getLogger(__name__)

JSON = "application/json"
_MODEL_ROUTE = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer|/config)?$")


class Headers(Protocol):
    """Request headers, looked up case-insensitively (``http.client.HTTPMessage``, a dict of
    lowercase names in tests)."""

    def get(self, name: str, /) -> str | None: ...


@dataclass
class Reply:
    """An answer before it meets the wire."""

    status: int
    body: bytes = b""
    content_type: str = JSON
    headers: dict[str, str] = field(default_factory=dict)
    compressible: bool = False  # only infer answers are worth compressing
    route: str = ""
    model: str = ""
    version: str = ""


# json.dumps with options builds a new encoder per call; one shared encoder is stateless
# (thread-safe) and gives the same text.
_encode = json.JSONEncoder(separators=(",", ":")).encode


def json_reply(status: int, obj: Any, **kw: Any) -> Reply:
    return Reply(status, _encode(obj).encode(), **kw)


def error_reply(status: int, message: str, **kw: Any) -> Reply:
    return json_reply(status, {"error": message}, **kw)


# Static routes: path -> (methods, route label).
_STATIC: dict[str, tuple[str, ...]] = {
    "/predict": ("POST",),
    "/feedback": ("POST",),
    "/v2": ("GET",),
    "/v2/health/live": ("GET",),
    "/v2/health/ready": ("GET",),
    "/metrics": ("GET",),
    "/status": ("GET",),
}


def _canonical(path: str) -> str:
    """The path as routed: one trailing slash under /v2 is dropped (the protocol's OpenAPI
    file writes ``GET /v2/``), so ``/v2/models/iris/`` is ``/v2/models/iris``."""
    if path.startswith("/v2/") and path.endswith("/") and not path.endswith("//"):
        return path[:-1]
    return path


class Service:
    """The routes of the agent's HTTP API, without the HTTP."""

    def __init__(
        self,
        cfg: Config,
        registry: Registry,
        buffer: ResultBuffer | None,
        metrics: Metrics,
        status: Callable[[], Mapping[str, Any]] | None = None,
        *,
        drift: DriftMonitor | None = None,
        shadow: ShadowRunner | None = None,
    ) -> None:
        self.cfg = cfg
        self.registry = registry
        self.buffer = buffer
        self.metrics = metrics
        self.status = status
        self.core = InferenceCore(registry, buffer, metrics.inference, drift, shadow)
        self.predictor = Predictor(self.core)
        self.oip = OpenInference(self.core)
        self.started = time.time()

    # --- dispatch --------------------------------------------------------------------

    def handle(self, method: str, path: str, query: str, headers: Headers, body: bytes) -> Reply:
        """Answer one request; never raises."""
        try:
            reply = self._dispatch(method, path, query, headers, body)
        except EdgeError as e:
            reply = error_reply(e.status, e.message)
            reply.route = _route_label(path)
            reply.model, reply.version = self._labels(path, query)
            if e.status >= 500:
                log.warning("%s %s: %s %s", method, path, e.status, e.message)
        except Exception as e:
            # A bug, never the caller's fault: keep the traceback, count it, keep serving.
            log.exception("%s %s: unexpected error", method, path)
            reply = error_reply(
                500, f"internal error ({type(e).__name__}); this is a bug, see the agent's log"
            )
            reply.route = _route_label(path)
        self.metrics.request(reply.route, reply.model, reply.version, reply.status)
        return reply

    def _dispatch(self, method: str, raw: str, query: str, headers: Headers, body: bytes) -> Reply:
        methods = _STATIC.get(raw)  # the common case first: no canonical form to make
        path = raw if methods is not None else _canonical(raw)
        if methods is None:
            methods = _STATIC.get(path)
        if methods is not None:
            if method not in methods:
                return _not_allowed(method, path, methods)
            return self._static(path, query, headers, body)
        match = _MODEL_ROUTE.match(path)
        if match is None:
            return error_reply(404, f"path: no route {raw!r} (see docs/http-api.md)", route="other")
        name, version, action = match.groups()
        allowed = ("POST",) if action == "/infer" else ("GET",)
        if method not in allowed:
            return _not_allowed(method, path, allowed)
        if action == "/infer":
            header = headers.get("inference-header-content-length")
            length: int | None = None
            if header is not None:
                try:
                    length = int(header)
                except ValueError:
                    raise BadRequest(
                        f"Inference-Header-Content-Length: {header!r} is not a byte count"
                    ) from None
            answer = self.oip.infer(name, version, body, length, headers.get("x-edge-key"))
            reply = Reply(200, answer.body, compressible=True)
            if answer.json_length is not None:
                reply.content_type = "application/octet-stream"
                reply.headers["Inference-Header-Content-Length"] = str(answer.json_length)
        elif action == "/ready":
            self.oip.model(name, version)  # a 404 unless installed
            reply = json_reply(200, {"ready": True})
        elif action == "/config":
            reply = json_reply(200, self.oip.model_config(name, version))
        else:
            reply = json_reply(200, self.oip.model_metadata(name, version))
        reply.route = _route_label(path)
        model = self.registry.get(name)
        reply.model, reply.version = model.manifest.name, model.manifest.version
        if action == "/infer":
            reply.version = answer.version  # the arm of a split that answered
        return reply

    def _static(self, path: str, query: str, headers: Headers, body: bytes) -> Reply:
        if path == "/predict":
            model = parse_qs(query).get("model", [None])[-1] if query else None
            rid = headers.get("x-request-id")
            key = headers.get("x-edge-key")
            answer = self.predictor.predict(parse_json(body), model, rid, key)
            return json_reply(
                200, answer, route=path, model=answer["model"], version=answer["version"]
            )
        if path == "/feedback":
            return json_reply(200, self.feedback(parse_json(body)), route=path)
        if path == "/v2/health/live":
            return json_reply(200, {"live": True}, route=path)
        if path == "/v2/health/ready":
            ready = self.oip.ready()
            return json_reply(200 if ready else 503, {"ready": ready}, route=path)
        if path == "/v2":
            return json_reply(200, self.oip.server_metadata(), route=path)
        if path == "/metrics":
            return Reply(
                200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST, route=path
            )
        return json_reply(200, self.status_report(), route=path)

    def feedback(self, body: Any) -> dict[str, Any]:
        """``POST /feedback``: the true outcome of an earlier request, buffered like a
        result (its own seq, forwarded and acknowledged the same way); the collector
        joins it to the result by request id or seq."""
        if type(body) is not dict:
            raise BadRequest("body: expected a JSON object with 'label' and 'request_id' or 'seq'")
        unknown = sorted(set(body) - {"label", "request_id", "seq"})
        if unknown:
            raise BadRequest(f"{unknown[0]}: unknown field (expected label, request_id, seq)")
        if "label" not in body:
            raise BadRequest("label: missing (the true outcome)")
        try:
            fb = payloads.feedback(
                body.get("label"), request_id=body.get("request_id"), result_seq=body.get("seq")
            )
        except payloads.InvalidPayload as e:
            # The wire's words, with the HTTP field names.
            raise BadRequest(
                e.message.removeprefix("feedback: ").replace("result_seq", "seq")
            ) from None
        if self.buffer is None:
            raise StorageFull("feedback: this agent keeps no result buffer")
        seq = self.buffer.record_feedback(fb)
        if seq is None:
            raise StorageFull("feedback: not recorded: the result buffer cannot write (disk full?)")
        return {"recorded": True, "seq": seq}

    def _labels(self, path: str, query: str) -> tuple[str, str]:
        """Model and version labels of a failed request: only names that are installed,
        so a caller's typo cannot grow the metric's label set without bound."""
        name: str | None = None
        path = _canonical(path)
        match = _MODEL_ROUTE.match(path)
        if match is not None:
            name = match.group(1)
        elif path == "/predict":
            name = parse_qs(query).get("model", [None])[-1] if query else None
        else:
            return "", ""
        try:
            model = self.registry.get(name)
        except EdgeError:
            return "", ""
        return model.manifest.name, model.manifest.version

    # --- /status ---------------------------------------------------------------------

    def status_report(self) -> dict[str, Any]:
        """Device, models, broker and buffer at a glance; the supervisor's report when wired."""
        if self.status is not None:
            return dict(self.status())
        report: dict[str, Any] = {
            "device": self.cfg.device.id,
            "fleet": self.cfg.device.fleet,
            "agent_version": __version__,
            "uptime_s": round(time.time() - self.started, 3),
            "models": self.registry.status(),
            "broker": {"url": self.cfg.mqtt.url or None, "connected": False},
        }
        if self.buffer is not None:
            stats = self.buffer.stats()
            report["buffer"] = {
                "rows": stats.rows,
                "bytes": stats.bytes,
                "oldest_age_s": stats.oldest_age_s,
                "dropped": stats.dropped,
            }
        return report


def _not_allowed(method: str, path: str, allowed: tuple[str, ...]) -> Reply:
    return error_reply(
        405,
        f"method: {method} is not allowed on {path} (allowed: {', '.join(allowed)})",
        headers={"Allow": ", ".join(allowed)},
        route=_route_label(path),
    )


def _route_label(path: str) -> str:
    """The route template, never the raw path: label values must stay few."""
    path = _canonical(path)
    if path in _STATIC:
        return path
    match = _MODEL_ROUTE.match(path)
    if match is None:
        return "other"
    versioned = "/versions/{version}" if match.group(2) else ""
    return f"/v2/models/{{model}}{versioned}{match.group(3) or ''}"
