"""The fleet as the operator sees it: each device's retained status and latest health.

Fed by MQTT messages (``apply``) from any thread; read as immutable snapshots
(``snapshot``) by the status table and the exporter. Times of arrival are this
process's clock, so "last seen" never depends on a device's clock being right.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from agent.wire import payloads
from agent.wire.payloads import InvalidPayload
from agent.wire.topics import Topics

log = logging.getLogger(__name__)


@dataclass
class ModelCounters:
    """Inferences, model errors and caller mistakes (4xx) summed over the health windows
    this process received."""

    inferences: int = 0
    errors: int = 0
    bad_requests: int = 0


@dataclass
class DeviceState:
    device: str
    status: dict[str, Any] | None = None
    status_at: float | None = None  # when a live (not retained) status arrived
    health: dict[str, Any] | None = None
    health_at: float | None = None
    health_count: int = 0
    counters: dict[tuple[str, str], ModelCounters] = field(default_factory=dict)

    @property
    def fleet(self) -> str | None:
        for payload in (self.status, self.health):
            if payload and isinstance(payload.get("fleet"), str):
                return str(payload["fleet"])
        return None

    @property
    def state(self) -> str:
        """online / offline from the retained status; unknown when only health was seen."""
        if self.status and self.status.get("state") in ("online", "offline"):
            return str(self.status["state"])
        return "unknown"

    @property
    def last_seen_at(self) -> float | None:
        seen = [t for t in (self.status_at, self.health_at) if t is not None]
        return max(seen) if seen else None

    def models(self) -> dict[str, dict[str, Any]]:
        """Per model: the status fields merged with the latest health window."""
        merged: dict[str, dict[str, Any]] = {}
        status_models = (self.status or {}).get("models") or {}
        health_models = (self.health or {}).get("models") or {}
        for name in sorted(set(status_models) | set(health_models)):
            s = status_models.get(name) or {}
            h = health_models.get(name) or {}
            merged[name] = {
                "version": s.get("version") or h.get("version"),
                "previous": s.get("previous"),
                "state": s.get("state"),
                "serial": s.get("serial"),
                "inferences": h.get("inferences"),
                "errors": h.get("errors"),
                "p50_ms": h.get("p50_ms"),
                "p99_ms": h.get("p99_ms"),
            }
        return merged


class FleetState:
    """Thread-safe map of device id -> DeviceState, fed by MQTT messages."""

    def __init__(self, topics: Topics | None = None) -> None:
        self.topics = topics or Topics()
        self._lock = threading.Lock()
        self._devices: dict[str, DeviceState] = {}
        self.invalid_messages = 0
        self._warned: set[str] = set()

    def first_problem(self, topic: str) -> bool:
        """True the first time a topic carries a bad payload: log it loudly once, not every interval."""
        with self._lock:
            if topic in self._warned:
                return False
            self._warned.add(topic)
            return True

    def receive(self, topic: str, payload: bytes | bytearray, *, retained: bool) -> None:
        """``apply`` for a subscriber: a bad payload is logged (loudly once per topic), kept out."""
        try:
            self.apply(topic, payload, retained=retained)
        except InvalidPayload as e:
            level = logging.WARNING if self.first_problem(topic) else logging.DEBUG
            log.log(level, "ignored: %s", e)

    def apply(
        self,
        topic: str,
        payload: bytes | bytearray,
        *,
        retained: bool = False,
        now: float | None = None,
    ) -> str | None:
        """Take one status or health message; returns the device it was about.

        Raises ``InvalidPayload`` naming the topic and field when the payload is not the
        documented shape (the caller logs it; the device's previous state is kept).
        """
        now = time.time() if now is None else now
        device = self.topics.device_of(topic)
        kind = topic.rsplit("/", 1)[-1]
        if device is None or kind not in ("status", "health"):
            return None
        if kind == "status" and not payload:
            # An empty retained status is how an operator forgets a decommissioned device.
            with self._lock:
                self._devices.pop(device, None)
            return device
        try:
            decoded = payloads.decode(payload, topic)
            check = payloads.check_status if kind == "status" else payloads.check_health
            checked = check(decoded, topic)
        except InvalidPayload:
            with self._lock:
                self.invalid_messages += 1
            raise
        with self._lock:
            state = self._devices.setdefault(device, DeviceState(device))
            if kind == "status":
                state.status = checked
                if not retained:
                    state.status_at = now
            else:
                if (
                    state.health is not None
                    and checked.get("time") == state.health.get("time")
                    and checked.get("time") is not None
                ):
                    return device  # a QoS 1 redelivery: do not count its window twice
                state.health = checked
                state.health_at = now
                state.health_count += 1
                for name, m in (checked.get("models") or {}).items():
                    c = state.counters.setdefault((name, str(m.get("version"))), ModelCounters())
                    c.inferences += int(m.get("inferences") or 0)
                    c.errors += int(m.get("errors") or 0)
                    bad = m.get("bad_requests")  # newer agents only: 0 when absent
                    if isinstance(bad, int | float) and not isinstance(bad, bool):
                        c.bad_requests += int(bad)
        return device

    def snapshot(self, fleet: str | None = None) -> list[DeviceState]:
        """Copies of the devices (of one fleet), sorted by fleet then device id."""
        with self._lock:
            devices = [
                DeviceState(
                    d.device,
                    d.status,
                    d.status_at,
                    d.health,
                    d.health_at,
                    d.health_count,
                    {k: dataclasses.replace(v) for k, v in d.counters.items()},
                )
                for d in self._devices.values()
            ]
        if fleet is not None:
            devices = [d for d in devices if d.fleet == fleet]
        return sorted(devices, key=lambda d: (d.fleet or "", d.device))
