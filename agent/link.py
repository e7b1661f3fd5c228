"""The broker link as components see it: a small protocol, messages and publish handles.

Delivery, the forwarder, health, commands and events depend on ``Link``, not on paho:
they are tested against a real broker through ``agent.paho_link.MqttClient``, and a
second broker family fits in behind the same protocol. Nothing here imports paho, so an
agent without a broker never loads it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from agent.wire.topics import Topics

log = logging.getLogger("agent.link")


@dataclass(frozen=True)
class Message:
    """An incoming message, as handlers see it (no paho types beyond this module)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    response_topic: str | None = None
    correlation_data: bytes | None = None


Handler = Callable[[Message], None]


class PublishHandle:
    """One publish: completes on PUBACK (QoS 1/2), or at once for QoS 0 and refusals."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.mid = 0
        self.reason_code: int | None = None
        self.error: str | None = None
        self._event = threading.Event()
        self._callbacks: list[Callable[[PublishHandle], None]] = []
        self._lock = threading.Lock()

    @property
    def ok(self) -> bool:
        return self._event.is_set() and self.error is None

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for completion; True when the broker accepted the message."""
        self._event.wait(timeout)
        return self.ok

    def add_done_callback(self, fn: Callable[[PublishHandle], None]) -> None:
        """Call ``fn(handle)`` on completion (at once if done): keep it short, never publish."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def _complete(self, reason_code: int, error: str | None = None) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self.reason_code, self.error = reason_code, error
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:
                log.exception("mqtt: publish callback for %s failed", self.topic)

    def __repr__(self) -> str:
        state = "pending" if not self.done() else ("ok" if self.ok else f"failed: {self.error}")
        return f"PublishHandle({self.topic!r}, mid={self.mid}, {state})"


class Link(Protocol):
    """What components need of the broker connection, without paho: delivery, the
    forwarder, health, commands and events depend on this, not on ``MqttClient``."""

    topics: Topics
    reconnects: int

    @property
    def connected(self) -> bool: ...

    def publish(
        self,
        topic: str,
        payload: bytes | str | Mapping[str, Any],
        qos: int = 1,
        retain: bool = False,
        *,
        correlation_data: bytes | None = None,
    ) -> PublishHandle: ...

    def publish_status(self, state: str = ..., reason: str | None = None) -> PublishHandle: ...

    def subscribe(self, topic: str, qos: int, handler: Handler) -> None: ...

    def unsubscribe(self, topic: str) -> None: ...

    def add_connection_listener(self, fn: Callable[[bool], None]) -> None: ...


def dispatcher(topic: str, handler: Handler) -> Callable[..., None]:
    """A paho message callback for ``topic`` that hands ``handler`` a ``Message``.

    A handler's exception is logged, never raised: it would end paho's network thread.
    """

    def dispatch(client: Any, userdata: Any, msg: Any) -> None:
        try:
            props = getattr(msg, "properties", None)
            handler(
                Message(
                    topic=msg.topic,
                    payload=bytes(msg.payload),
                    qos=msg.qos,
                    retain=bool(msg.retain),
                    response_topic=getattr(props, "ResponseTopic", None),
                    correlation_data=getattr(props, "CorrelationData", None),
                )
            )
        except Exception:
            log.exception("mqtt: handler for %s failed on %s", topic, msg.topic)

    return dispatch


class Refusals:
    """Publishes the broker refused or that could not be sent: counted by reason, logged
    once per reason and interval (a denied topic must not flood the journal)."""

    LOG_INTERVAL_S = 30.0

    def __init__(self, metrics: Any = None) -> None:
        self.counts: dict[str, int] = {}
        self._metrics = metrics  # agent.metrics.LinkMetrics, or None
        self._logged: dict[str, float] = {}

    def fail(self, handle: PublishHandle, reason: str, message: str, code: int = -1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if self._metrics is not None:
            self._metrics.failures.labels(reason).inc()
        now = time.monotonic()
        if now - self._logged.get(reason, -self.LOG_INTERVAL_S) >= self.LOG_INTERVAL_S:
            self._logged[reason] = now
            log.warning("mqtt: publish to %s refused: %s", handle.topic, message)
        handle._complete(code, message)
