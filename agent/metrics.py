"""Metrics: the one Prometheus registry, and per-model inference statistics.

``Metrics.registry`` is the ``CollectorRegistry`` every component registers on (the
buffer its backlog and drops, MQTT its connection state, delivery its updates);
``/metrics`` renders it with prometheus_client, never by hand. ``Metrics.inference``
keeps the latency samples health reports and probation read: each reader subscribes
its own window, so one ``take()`` does not steal samples from another.
"""

from __future__ import annotations

import math
import random
import threading
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

# Sub-millisecond to seconds: an RF on a desktop core answers in ~0.1 ms, on a Pi in
# ~1 ms, and a slow model or a swapping device in seconds.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
)  # fmt: skip

# Latency samples a window keeps per (model, version) between two takes. Past this a
# reservoir sample keeps the percentiles honest while memory stays bounded.
WINDOW_SAMPLES = 4096

Key = tuple[str, str]  # (model, version)


@dataclass(frozen=True)
class WindowStats:
    """One (model, version) over one window.

    ``count``: inferences the model ran (answered or failed); ``errors``: the model's own
    failures among them; ``bad_requests``: requests the codec refused before the model
    ran (bad rows, wrong shape: the caller's mistake), not in ``count``.
    """

    count: int
    errors: int
    p50_ms: float | None
    p99_ms: float | None
    bad_requests: int = 0


class _Series:
    __slots__ = ("bad_requests", "count", "errors", "samples", "seen")

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.bad_requests = 0
        self.samples: list[float] = []
        self.seen = 0  # successful inferences offered to the reservoir


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile; the values are already sorted."""
    rank = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[rank]


class InferenceWindow:
    """Statistics since the last ``take()``; one reader owns one window."""

    def __init__(self, capacity: int = WINDOW_SAMPLES) -> None:
        self._capacity = capacity
        self._series: dict[Key, _Series] = {}

    def _add(self, key: Key, latency_s: float, ok: bool) -> None:
        s = self._series.get(key)
        if s is None:
            s = self._series[key] = _Series()
        s.count += 1
        if not ok:
            s.errors += 1
            return
        s.seen += 1
        if len(s.samples) < self._capacity:
            s.samples.append(latency_s)
        else:
            j = random.randrange(s.seen)
            if j < self._capacity:
                s.samples[j] = latency_s

    def _refused(self, key: Key) -> None:
        s = self._series.get(key)
        if s is None:
            s = self._series[key] = _Series()
        s.bad_requests += 1

    def _swap(self) -> dict[Key, _Series]:
        series, self._series = self._series, {}
        return series

    def take(self) -> dict[Key, WindowStats]:
        """Per (model, version): count, errors, p50, p99 in ms, bad requests since the last take."""
        with _LOCK:
            series = self._swap()
        out: dict[Key, WindowStats] = {}
        for key, s in series.items():
            values = sorted(s.samples)
            p50 = _percentile(values, 0.50) * 1000 if values else None
            p99 = _percentile(values, 0.99) * 1000 if values else None
            out[key] = WindowStats(s.count, s.errors, p50, p99, s.bad_requests)
        return out


# One lock for all windows: observe() touches each window under it, and a take()
# must not see a half-updated series. Held for a few dict operations only.
_LOCK = threading.Lock()


class InferenceStats:
    """Every inference, answered or failed, feeds the histogram and each open window;
    a request refused before the model ran is counted apart (``refused``)."""

    def __init__(self, histogram: Histogram | None = None) -> None:
        self._histogram = histogram
        self._windows: list[InferenceWindow] = []
        self._children: dict[Key, object] = {}

    def subscribe(self, capacity: int = WINDOW_SAMPLES) -> InferenceWindow:
        window = InferenceWindow(capacity)
        with _LOCK:
            self._windows = [*self._windows, window]
        return window

    def unsubscribe(self, window: InferenceWindow) -> None:
        with _LOCK:
            self._windows = [w for w in self._windows if w is not window]

    def observe(self, model: str, version: str, latency_s: float, ok: bool) -> None:
        """Hot path: a few dict operations under one lock, plus the histogram."""
        key = (model, version)
        if ok and self._histogram is not None:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._histogram.labels(model, version)
            child.observe(latency_s)  # type: ignore[attr-defined]
        with _LOCK:
            for window in self._windows:
                window._add(key, latency_s, ok)

    def refused(self, model: str, version: str) -> None:
        """A caller's request the codec refused (4xx) before ``model`` ran: never the
        model's fault, so neither its error rate nor its latency sees it."""
        key = (model, version)
        with _LOCK:
            for window in self._windows:
                window._refused(key)


class Metrics:
    """The registry and the serving metrics; other components add theirs to ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        # Process CPU seconds, RSS, open fds: read from /proc at scrape time.
        ProcessCollector(registry=self.registry)
        self.requests = Counter(
            "edge_http_requests",
            "HTTP requests answered, by route template, model, version and status",
            ["route", "model", "version", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "edge_http_errors",
            "HTTP requests answered with a 4xx or 5xx status",
            ["route", "model", "version", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "edge_inference_latency_seconds",
            "Time from decoded request to model outputs, per model and version",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inference = InferenceStats(self.latency)
        # The transport's own refusals and closes (agent/serving/connections.py).
        self.connections_refused = Counter(
            "edge_http_connections_refused",
            "Connections answered 503 at once, by reason (limit, descriptors)",
            ["reason"],
            registry=self.registry,
        )
        self.connections_closed = Counter(
            "edge_http_connections_closed",
            "Connections the server closed for overstaying a phase (idle, head, body)",
            ["reason"],
            registry=self.registry,
        )
        self.connections_open = Gauge(
            "edge_http_connections_open", "Connections being served", registry=self.registry
        )
        self._request_children: dict[tuple[str, str, str, int], tuple[object, object | None]] = {}

    def request(self, route: str, model: str, version: str, status: int) -> None:
        """Count one answered HTTP request (labelled children cached: this is the hot path)."""
        key = (route, model, version, status)
        pair = self._request_children.get(key)
        if pair is None:
            labels = (route, model, version, str(status))
            err = self.errors.labels(*labels) if status >= 400 else None
            pair = self._request_children[key] = (self.requests.labels(*labels), err)
        pair[0].inc()  # type: ignore[attr-defined]
        if pair[1] is not None:
            pair[1].inc()  # type: ignore[attr-defined]


class LinkMetrics:
    """The broker link's own metrics, registered when the agent has a broker."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.connected = Gauge(
            "edge_mqtt_connected", "1 while connected to the broker", registry=registry
        )
        self.reconnects = Counter(
            "edge_mqtt_reconnects", "Connections re-established after a loss", registry=registry
        )
        self.moves = Counter(
            "edge_agent_mqtt_moves",
            "Changes of broker URL (mqtt.urls): after a lost connection or a failed attempt",
            registry=registry,
        )
        self.subscribe_retries = Counter(
            "edge_mqtt_subscribe_retries",
            "Subscriptions asked for again after the broker refused them (SUBACK 0x80)",
            registry=registry,
        )
        self.failures = Counter(
            "edge_mqtt_publish_failures",
            "Publishes the broker refused (PUBACK reason) or that could not be sent",
            ["reason"],
            registry=registry,
        )
