"""What the result buffer holds and reports: results, rows read back, stats, metrics.

Kept apart from ``agent/buffer.py`` (which owns the SQLite file) so the forwarder,
health and serving can use these shapes without the database behind them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from agent.wire import payloads

# Drop reasons, as they appear in health reports and /metrics (defined with the payload).
DROP_REASONS = payloads.DROP_REASONS
MAX_ROWS, MAX_BYTES, MAX_AGE, DISK_FULL, IO_ERROR = DROP_REASONS


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays, without importing numpy here.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


_ENCODER = json.JSONEncoder(separators=(",", ":"), default=_json_default)


def dumps(obj: Any) -> str:
    """Compact JSON for the buffer; numpy values become lists and numbers.

    One shared encoder: ``json.dumps`` with arguments builds a new one per call.
    """
    return _ENCODER.encode(obj)


@dataclass
class Result:
    """One answered prediction, as the serving side hands it over."""

    time: float
    model: str
    version: str
    inputs: Any
    outputs: Any
    latency_ms: float
    request_id: str | None = None


@dataclass(frozen=True)
class BufferedRow:
    """A row read back for forwarding; ``inputs``/``outputs`` stay JSON text."""

    seq: int
    time: float
    model: str
    version: str
    inputs: str | None  # None: not recorded (buffer.record_inputs = "none")
    outputs: str
    latency_ms: float
    request_id: str | None = None
    feedback: str | None = None  # a feedback row: the JSON of payloads.feedback()

    def to_json(self) -> str:
        """The row object of the ``results`` payload, built without re-parsing."""
        if self.feedback is not None:
            return payloads.feedback_json(self.seq, t=self.time, feedback=self.feedback)
        return payloads.result_json(
            self.seq,
            t=self.time,
            model=self.model,
            version=self.version,
            inputs="null" if self.inputs is None else self.inputs,
            outputs="null" if self.outputs is None else self.outputs,
            latency_ms=self.latency_ms,
            request_id=self.request_id,
        )


@dataclass(frozen=True)
class JsonBatch:
    """Rows ``first``..``last`` (``count`` of them, gaps allowed) as joined JSON objects."""

    first: int
    last: int
    count: int
    json: str


@dataclass
class BufferStats:
    rows: int
    bytes: int
    oldest_age_s: float | None
    dropped: dict[str, int] = field(default_factory=dict)
    recorded: int = 0
    last_seq: int = 0
    delivered: int = 0  # delivered rows a full disk kept from being deleted (not backlog)


class _HasStats(Protocol):
    def stats(self) -> BufferStats: ...


class BufferCollector(Collector):
    """Buffer backlog and drops on /metrics, read from the buffer at scrape time."""

    def __init__(self, buffer: _HasStats) -> None:
        self.buffer = buffer

    def collect(self) -> Iterable[Any]:
        s = self.buffer.stats()
        yield GaugeMetricFamily("edge_buffer_rows", "Results waiting to be forwarded", s.rows)
        yield GaugeMetricFamily(
            "edge_buffer_bytes", "Approximate size of the buffered results", s.bytes
        )
        yield GaugeMetricFamily(
            "edge_buffer_oldest_age_seconds",
            "Age of the oldest buffered result",
            s.oldest_age_s or 0.0,
        )
        yield CounterMetricFamily(
            "edge_buffer_recorded", "Results recorded since start", value=s.recorded
        )
        drops = CounterMetricFamily(
            "edge_buffer_dropped", "Results dropped, by reason", labels=["reason"]
        )
        for reason in DROP_REASONS:
            drops.add_metric([reason], s.dropped.get(reason, 0))
        yield drops
