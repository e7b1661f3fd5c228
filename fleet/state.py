"""The fleet as the operator sees it: each device's retained status and latest health,
and what the broker says it should run.

Fed by MQTT messages (``apply``) from any thread; read as immutable snapshots
(``snapshot``, ``desired``, ``rollouts``) by the status table and the exporter. Times of
arrival are this process's clock, so "last seen" never depends on a device's clock
being right.

``read_retained`` gathers retained messages with a subscription alone (for ``list``,
``history`` and other read-only views: a viewer account cannot publish the barrier
message ``fleet/retained.py`` uses).

Besides status and health it keeps, when subscribed to them, the retained desired
manifests (fleet and device), the rollout plans and the enrolment records: desired
against actual needs both sides, and an enrolled device that never connected is a
device too. Those are operator payloads read defensively (a JSON object, else ignored
with one warning): the device is what checks a manifest, this view only shows it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from agent.wire import payloads
from agent.wire.errors import BrokerUnavailable
from agent.wire.payloads import InvalidPayload
from agent.wire.topics import Topics

from fleet.connection import BrokerOptions, connect, disconnect

log = logging.getLogger(__name__)

QUIET_S = 0.5  # retained messages come back to back; this long without one means all are here


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
    enrolment: dict[str, Any] | None = None  # the retained enrolment record, when read

    @property
    def fleet(self) -> str | None:
        for payload in (self.status, self.health, self.enrolment):
            if payload and isinstance(payload.get("fleet"), str):
                return str(payload["fleet"])
        return None

    @property
    def tags(self) -> dict[str, str]:
        """The device's tags: as it reports them, else as it was enrolled with."""
        for payload in (self.status, self.enrolment):
            tags = (payload or {}).get("tags")
            if isinstance(tags, dict):
                return {str(k): str(v) for k, v in tags.items()}
        return {}

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
                "reason": s.get("reason"),
                "desired": s.get("desired") if isinstance(s.get("desired"), dict) else None,
                "inferences": h.get("inferences"),
                "errors": h.get("errors"),
                "p50_ms": h.get("p50_ms"),
                "p99_ms": h.get("p99_ms"),
            }
        return merged


# What a topic is about: (kind, scope, name, model); scope "fleet" or "device".
Subject = tuple[str, str, str, str | None]
FLEET, DEVICE = "fleet", "device"


def subject_of(topics: Topics, topic: str) -> Subject | None:
    """``devices/D/status`` -> ("status", "device", D, None), ``fleets/F/models/M/desired``
    -> ("desired", "fleet", F, M), ...; None for a topic this view does not keep."""
    head = topics.prefix.split("/")
    parts = topic.split("/")
    if parts[: len(head)] != head:
        return None
    rest = parts[len(head) :]
    if len(rest) == 3 and rest[0] == "devices" and rest[2] in ("status", "health", "enrolment"):
        return rest[2], DEVICE, rest[1], None
    if len(rest) == 5 and rest[0] in ("devices", "fleets") and rest[2] == "models":
        scope = DEVICE if rest[0] == "devices" else FLEET
        if rest[4] == "desired" or (rest[4] == "rollout" and scope == FLEET):
            return rest[4], scope, rest[1], rest[3]
    return None


class FleetState:
    """Thread-safe map of device id -> DeviceState, fed by MQTT messages, with the
    retained desired manifests and rollout plans beside it."""

    def __init__(self, topics: Topics | None = None) -> None:
        self.topics = topics or Topics()
        self._lock = threading.Lock()
        self._devices: dict[str, DeviceState] = {}
        # (scope, fleet or device, model) -> manifest; (fleet, model) -> rollout plan
        self._desired: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._rollouts: dict[tuple[str, str], dict[str, Any]] = {}
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
        """Take one status, health, desired, rollout or enrolment message; returns the
        device (or fleet) it was about.

        Raises ``InvalidPayload`` naming the topic and field when the payload is not the
        documented shape (the caller logs it; the previous state is kept).
        """
        now = time.time() if now is None else now
        subject = subject_of(self.topics, topic)
        if subject is None:
            return None
        kind, _scope, name, _model = subject
        if kind in ("desired", "rollout"):
            self._apply_operator(subject, payload, topic)
            return name
        if not payload and kind in ("status", "enrolment"):
            # An empty retained status (and enrolment) is how an operator forgets a device.
            with self._lock:
                state = self._devices.get(name)
                if state is not None:
                    if kind == "status":
                        state.status, state.status_at = None, None
                    else:
                        state.enrolment = None
                    if state.status is None and state.enrolment is None:
                        self._devices.pop(name, None)
            return name
        try:
            decoded = payloads.decode(payload, topic)
            if kind == "status":
                checked = payloads.check_status(decoded, topic)
            elif kind == "health":
                checked = payloads.check_health(decoded, topic)
            else:
                checked = decoded  # an operator's record: shown, never acted on
        except InvalidPayload:
            with self._lock:
                self.invalid_messages += 1
            raise
        with self._lock:
            state = self._devices.setdefault(name, DeviceState(name))
            if kind == "enrolment":
                state.enrolment = checked
            elif kind == "status":
                state.status = checked
                if not retained:
                    state.status_at = now
            else:
                if (
                    state.health is not None
                    and checked.get("time") == state.health.get("time")
                    and checked.get("time") is not None
                ):
                    return name  # a QoS 1 redelivery: do not count its window twice
                state.health = checked
                state.health_at = now
                state.health_count += 1
                for m_name, m in (checked.get("models") or {}).items():
                    c = state.counters.setdefault((m_name, str(m.get("version"))), ModelCounters())
                    c.inferences += int(m.get("inferences") or 0)
                    c.errors += int(m.get("errors") or 0)
                    bad = m.get("bad_requests")  # newer agents only: 0 when absent
                    if isinstance(bad, int | float) and not isinstance(bad, bool):
                        c.bad_requests += int(bad)
        return name

    def _apply_operator(self, subject: Subject, payload: bytes | bytearray, topic: str) -> None:
        """A desired manifest or rollout plan: kept as the JSON object it is; empty clears."""
        kind, scope, name, model = subject
        assert model is not None
        data: Any = None
        if payload:
            try:
                data = json.loads(payload)
            except (UnicodeDecodeError, ValueError):
                data = None
            if not isinstance(data, dict):
                with self._lock:
                    self.invalid_messages += 1
                raise InvalidPayload(f"{topic}: expected a JSON object")
        with self._lock:
            if kind == "desired":
                key = (scope, name, model)
                if data is None:
                    self._desired.pop(key, None)
                else:
                    self._desired[key] = data
            elif data is None:
                self._rollouts.pop((name, model), None)
            else:
                self._rollouts[(name, model)] = data

    def snapshot(self, fleet: str | None = None) -> list[DeviceState]:
        """Copies of the devices (of one fleet), sorted by fleet then device id."""
        with self._lock:
            devices = [
                dataclasses.replace(
                    d,
                    counters={k: dataclasses.replace(v) for k, v in d.counters.items()},
                )
                for d in self._devices.values()
            ]
        if fleet is not None:
            devices = [d for d in devices if d.fleet == fleet]
        return sorted(devices, key=lambda d: (d.fleet or "", d.device))

    def desired(self) -> dict[tuple[str, str, str], dict[str, Any]]:
        """Every retained desired manifest: (``"fleet"``/``"device"``, name, model) -> manifest."""
        with self._lock:
            return dict(self._desired)

    def desired_for(self, device: DeviceState) -> dict[str, dict[str, dict[str, Any]]]:
        """Per model, what the broker asks of this device: ``{"device": manifest,
        "fleet": manifest}`` (either may be missing; the device's own wins on the device)."""
        fleet = device.fleet
        out: dict[str, dict[str, dict[str, Any]]] = {}
        with self._lock:
            for (scope, name, model), manifest in self._desired.items():
                if (scope == DEVICE and name == device.device) or (
                    scope == FLEET and fleet is not None and name == fleet
                ):
                    out.setdefault(model, {})[scope] = manifest
        return out

    def rollouts(self) -> dict[tuple[str, str], dict[str, Any]]:
        """Every retained rollout plan: (fleet, model) -> plan."""
        with self._lock:
            return dict(self._rollouts)


# --- reading retained messages without publishing ---------------------------------


def read_retained(
    options: BrokerOptions,
    filters: Sequence[str],
    *,
    purpose: str,
    quiet: float = QUIET_S,
    timeout: float = 10.0,
) -> dict[str, bytes]:
    """Every non-empty retained message on ``filters``, read with a subscription only.

    The broker sends a subscription's retained messages right after its SUBACK, back to
    back; once ``quiet`` seconds pass without one (or ``timeout`` is reached), all of
    them are here. Live messages on the same filters are left out.
    """
    lock = threading.Lock()
    inbox: dict[str, bytes] = {}
    last = [time.monotonic()]
    subacked = threading.Event()

    def on_message(message: mqtt.MQTTMessage) -> None:
        if message.retain:
            with lock:
                inbox[message.topic] = bytes(message.payload)
                last[0] = time.monotonic()

    client = connect(options, purpose=purpose, on_message=on_message)
    try:

        def on_subscribe(_c: Any, _u: Any, _m: int, reasons: list[Any], _p: Any) -> None:
            for f, reason in zip(filters, reasons, strict=False):
                if reason.is_failure:
                    log.warning("subscription to %s refused: %s", f, reason)
            with lock:
                last[0] = time.monotonic()
            subacked.set()

        client.on_subscribe = on_subscribe
        client.subscribe([(f, 1) for f in filters])
        deadline = time.monotonic() + timeout
        if not subacked.wait(timeout):
            raise BrokerUnavailable(
                f"broker {options.url}: no answer to SUBSCRIBE within {timeout:g} s"
            )
        while True:
            now = time.monotonic()
            with lock:
                idle = now - last[0]
            if idle >= quiet or now >= deadline:
                break
            time.sleep(min(quiet - idle, max(0.0, deadline - now), 0.1) or 0.01)
    finally:
        disconnect(client)
    with lock:
        return {t: p for t, p in inbox.items() if p}
