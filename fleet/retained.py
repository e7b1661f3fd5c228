"""The desired state as the broker keeps it: retained reads, acknowledged publishes,
signed desired manifests with their history, and chunked artifact uploads.

Used by ``fleet/publish.py`` (publish, rollout, rollback), ``fleet/artifacts.py``
(chunk layout, gc) and ``fleet/unpublish.py``. The layout of the topics and payloads is
described in ``fleet/publish.py`` and docs/fleet.md.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from agent.wire.errors import BrokerUnavailable, EdgeError
from agent.wire.manifest import chunk_count
from agent.wire.signing import load_private_key, sign_manifest
from agent.wire.times import rfc3339
from agent.wire.topics import Topics

from fleet.connection import BrokerOptions, connect, disconnect
from fleet.term import Progress

log = logging.getLogger(__name__)

HISTORY_KEEP = 10
WINDOW = 16  # chunks in flight: enough to fill loopback, bounded memory
PUBACK_TIMEOUT_S = 60.0


class PublishRefused(EdgeError):
    """The broker refused (or never acknowledged) a publish."""


# --- reading retained state -------------------------------------------------------


class Session:
    """A connected operator client with retained reads and acknowledged publishes."""

    def __init__(self, options: BrokerOptions, purpose: str) -> None:
        self.options = options
        self.topics = options.topics
        self._lock = threading.Lock()
        self._acks: dict[int, Any] = {}
        self._acked = threading.Condition(self._lock)
        self._inbox: dict[str, bytes] = {}
        self._barrier = f"{self.topics.prefix}/fleet-tools/{secrets.token_hex(6)}/barrier"
        self._barrier_seen = threading.Event()
        self.client = connect(
            options, purpose=purpose, subscriptions=[(self._barrier, 1)], on_message=self._on_msg
        )
        self.client.on_publish = self._on_publish
        if not self.client.mqtt5:
            # A 3.1.1 PUBACK has no reason code: mosquitto acknowledges a publish its ACL
            # denies all the same (and drops it), so a refusal cannot be seen here.
            log.warning(
                "broker %s speaks MQTT 3.1.1: a publish the broker refuses is not reported"
                " (denied publishes not checked under MQTT 3.1.1)",
                self.client.url,
            )

    def close(self) -> None:
        disconnect(self.client)

    def _on_msg(self, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self._barrier:
            self._barrier_seen.set()
        elif msg.retain:
            with self._lock:
                self._inbox[msg.topic] = bytes(msg.payload)

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        with self._acked:
            self._acks[mid] = rc
            self._acked.notify_all()

    def read_retained(self, filters: Sequence[str], timeout: float = 10.0) -> dict[str, bytes]:
        """Every retained message on ``filters`` (wildcards allowed), empty ones left out.

        mosquitto sends a subscription's retained messages before it handles our next
        packet, so once our own barrier message comes back, all of them are here.
        """
        with self._lock:
            self._inbox = {}
        self._barrier_seen.clear()
        self.client.subscribe([(f, 1) for f in filters])
        mid = self.publish(self._barrier, b"x", retain=False)
        # An account that may not publish hears "not authorized" here, not a timeout.
        self.wait([mid], f"reading the retained state (publish to {self._barrier})", timeout)
        if not self._barrier_seen.wait(timeout):
            # Under 3.1.1 a publish the ACL denies is acknowledged and dropped: the
            # barrier never comes back, and that is the likelier reason.
            hint = "" if self.client.mqtt5 else (
                f" (under MQTT 3.1.1 a publish the ACL denies is dropped without a word:"
                f" may {self.options.username or 'this account'} publish to {self._barrier}?)"
            )  # fmt: skip
            raise BrokerUnavailable(
                f"broker {self.client.url}: no answer within {timeout:g} s{hint}"
            )
        self.client.unsubscribe(list(filters))
        with self._lock:
            return {t: p for t, p in self._inbox.items() if p}

    def publish(self, topic: str, payload: bytes, *, retain: bool = True) -> int:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise PublishRefused(f"publish to {topic}: {mqtt.error_string(info.rc)}")
        return int(info.mid)

    def wait(self, mids: Iterable[int], what: str, timeout: float = PUBACK_TIMEOUT_S) -> None:
        """Wait for each PUBACK; an MQTT 5 refusal (e.g. not authorized) names the topic
        (under 3.1.1 a PUBACK carries no reason: not checked, see ``__init__``)."""
        deadline = time.monotonic() + timeout
        with self._acked:
            for mid in mids:
                while mid not in self._acks:
                    left = deadline - time.monotonic()
                    if left <= 0 or (not self.client.is_connected() and timeout - left > 5):
                        raise PublishRefused(
                            f"{what}: broker {self.client.url} did not acknowledge within "
                            f"{timeout:g} s (is the chunk size over its packet limit?)"
                        )
                    self._acked.wait(min(left, 0.5))
                rc = self._acks.pop(mid)
                if getattr(rc, "is_failure", False):
                    raise PublishRefused(
                        f"{what}: broker {self.client.url} refused it: {rc} "
                        f"(reason {int(rc.value)}; check the account's ACL)"
                    )


# --- topics and state ------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where desired state goes: a fleet, or one device."""

    fleet: str | None = None
    device: str | None = None

    def desired(self, t: Topics, model: str) -> str:
        if self.device:
            return t.device_desired(self.device, model)
        assert self.fleet
        return t.fleet_desired(self.fleet, model)

    def history(self, t: Topics, model: str) -> str:
        if self.device:
            return t.device_history(self.device, model)
        assert self.fleet
        return t.fleet_history(self.fleet, model)

    def __str__(self) -> str:
        return f"device {self.device}" if self.device else f"fleet {self.fleet}"


@dataclass
class ModelState:
    """What the broker holds for one model: every desired manifest and history."""

    desired: dict[str, dict[str, Any]] = field(default_factory=dict)  # topic -> manifest
    history: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # topic -> entries

    def max_serial(self) -> int:
        serials = [int(m.get("serial", 0)) for m in self.desired.values()]
        serials += [int(e.get("serial", 0)) for h in self.history.values() for e in h]
        return max(serials, default=0)


def read_model_state(session: Session, model: str) -> ModelState:
    t = session.topics
    filters = [
        t.fleet_desired("+", model),
        t.device_desired("+", model),
        t.fleet_history("+", model),
        t.device_history("+", model),
    ]
    state = ModelState()
    for topic, payload in session.read_retained(filters).items():
        try:
            data = json.loads(payload)
        except ValueError:
            log.warning("ignoring %s: not JSON", topic)
            continue
        if topic.endswith("/desired") and isinstance(data, dict):
            state.desired[topic] = data
        elif topic.endswith("/history") and isinstance(data, dict):
            entries = data.get("entries")
            if isinstance(entries, list):
                state.history[topic] = [e for e in entries if isinstance(e, dict)]
    return state


def salt_for(target: Target, model: str) -> str:
    return f"{target.fleet or target.device}/{model}"


def sign_desired(
    body: dict[str, Any],
    *,
    serial: int,
    chunk_size: int,
    target: Target,
    percent: float,
    key: Path,
    where: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The manifest a device gets: fresh serial and time, chunking and rollout, signed.

    ``where`` (tag -> value, a fleet target only) narrows the rollout to devices with
    every one of those tags; it is signed with the percent, so nobody widens it."""
    manifest = {k: v for k, v in body.items() if k not in {"signature", "rollout"}}
    manifest["serial"] = serial
    manifest["issued_at"] = rfc3339()
    art = dict(manifest["artifact"])
    art["chunk_size"] = chunk_size
    art["chunks"] = chunk_count(int(art["size"]), chunk_size)
    manifest["artifact"] = art
    if target.fleet and not target.device:
        manifest["rollout"] = {"percent": percent, "salt": salt_for(target, body["name"])}
        if where:
            manifest["rollout"]["where"] = dict(sorted(where.items()))
    return sign_manifest(manifest, load_private_key(key))


def history_key(entry: dict[str, Any]) -> tuple[Any, Any]:
    """What names one history entry: its version and artifact (two versions may share
    an artifact, and each must stay a rollback target)."""
    artifact = entry.get("artifact")
    return entry.get("version"), artifact.get("sha256") if isinstance(artifact, dict) else None


def publish_desired(
    session: Session, target: Target, signed: dict[str, Any], state: ModelState
) -> None:
    """Retain the signed manifest, then append it to the target's history."""
    t, model = session.topics, signed["name"]
    mid = session.publish(target.desired(t, model), json.dumps(signed).encode())
    session.wait([mid], f"desired state of {model} for {target}")
    history = list(state.history.get(target.history(t, model), []))
    entry = {k: v for k, v in signed.items() if k not in {"signature", "rollout"}}
    # One entry per version and artifact: a rollout of the same version replaces its
    # older entry, so re-signing never pushes other versions out of reach of a
    # rollback. The version is part of the key: two versions may share an artifact
    # (a release that only fixes its manifest), and a rollback must find the older one.
    key = (entry.get("version"), entry["artifact"]["sha256"])
    history = [e for e in history if history_key(e) != key] + [entry]
    payload = json.dumps({"entries": history[-HISTORY_KEEP:]}).encode()
    session.wait([session.publish(target.history(t, model), payload)], f"history of {model}")


# --- artifact upload --------------------------------------------------------------


def upload_artifact(session: Session, path: Path, sha256: str, chunk_size: int) -> int:
    """Publish every chunk retained (QoS 1, a bounded window in flight); returns chunk count."""
    size = path.stat().st_size
    chunks = chunk_count(size, chunk_size)
    bar = Progress(f"uploading {sha256[:12]}", size)
    in_flight: list[int] = []
    with path.open("rb") as f:
        for index in range(chunks):
            data = f.read(chunk_size)
            in_flight.append(session.publish(session.topics.artifact_chunk(sha256, index), data))
            if len(in_flight) >= WINDOW:
                session.wait(in_flight[:1], f"chunk {index - WINDOW + 1} of {sha256[:12]}")
                in_flight.pop(0)
            bar.update(min(size, (index + 1) * chunk_size))
    session.wait(in_flight, f"chunks of {sha256[:12]}")
    bar.done()
    return chunks
