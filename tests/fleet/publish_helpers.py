"""Shared pieces of the publish-side tests: the CLI against a real mosquitto, what the
broker retains afterwards, and device statuses or enrolments retained as devices and
``edge-fleet enroll`` write them."""

from __future__ import annotations

import json
from typing import Any

from agent.wire import payloads
from fleet.retained import Session
from tests.delivery_helpers import operator
from tests.fixtures.broker import Broker
from tests.fixtures.models import Keypair

SIGNING = ("publish", "rollout", "rollback")


def cli(broker: Broker, keypair: Keypair | None, *args: str, creds: Any = None) -> list[str]:
    """``args`` plus the broker options (and the signing key for the commands that sign)."""
    creds = creds or broker.operator
    url = broker.operator_url if creds.role == "operator" else broker.url
    key = ["--signing-key", str(keypair.key)] if keypair and args[0] in SIGNING else []
    return [*args, "--broker", url, "--username", creds.username,
            "--password-file", str(creds.password_file), *key]  # fmt: skip


def retained(broker: Broker, *filters: str) -> dict[str, bytes]:
    s = Session(operator(broker), "test")
    try:
        return s.read_retained(list(filters))
    finally:
        s.close()


def retain(broker: Broker, topic: str, payload: bytes) -> None:
    s = Session(operator(broker), "test")
    try:
        s.wait([s.publish(topic, payload)], topic)
    finally:
        s.close()


def desired(broker: Broker, fleet: str = "f1", model: str = "iris") -> dict[str, Any]:
    topic = f"edge/fleets/{fleet}/models/{model}/desired"
    return dict(json.loads(retained(broker, topic)[topic]))


def retain_status(
    broker: Broker, device: str, fleet: str, state: str = "online", **extra: Any
) -> None:
    """A device's retained status as the agent publishes it (``extra``: trusted_keys, tags)."""
    body = {**payloads.status(device, fleet, state, {}), **extra}
    retain(broker, f"edge/devices/{device}/status", payloads.encode(body))


def retain_enrolment(broker: Broker, device: str, fleet: str, **tags: str) -> None:
    body = {"device": device, "fleet": fleet, "tags": tags, "enrolled_at": "2026-01-01T00:00:00Z"}
    retain(broker, f"edge/devices/{device}/enrolment", json.dumps(body).encode())
