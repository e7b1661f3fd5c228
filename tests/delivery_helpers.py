"""Shared pieces of the delivery tests: agent configs on a real broker, publishing, events."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from agent.wire.payloads import check_status
from fleet.connection import BrokerOptions, broker_options
from tests.fixtures.broker import Broker, MessageLog, Received
from tests.fixtures.models import Keypair


def operator(broker: Broker) -> BrokerOptions:
    ns = argparse.Namespace(
        broker=broker.operator_url,
        username=broker.operator.username,
        password_file=str(broker.operator.password_file),
        ca=None,
        cert=None,
        key=None,
        topic_prefix=None,
    )
    return broker_options(ns, environ={})


def device_config(
    broker: Broker, keypair: Keypair, device: str, fleet: str = "f1", **models: Any
) -> dict[str, Any]:
    """An agent config for ``device`` in ``fleet`` on ``broker``, trusting the test key."""
    creds = broker.add_device(device, fleet)
    return {
        "device": {"id": device, "fleet": fleet},
        "mqtt": broker.mqtt_settings(creds),
        "models": {
            "trusted_keys": [str(keypair.pub)],
            "probation_s": 0,
            "delivery_chunk_timeout_s": 3,
            "delivery_retry_s": 2,
            **models,
        },
    }


def events(log: MessageLog, device: str | None = None) -> list[dict[str, Any]]:
    out = []
    for m in list(log.messages):
        body = json.loads(m.payload)
        if device is None or body.get("device") == device:
            out.append(body)
    return out


def wait_event(
    log: MessageLog, event: str, *, device: str | None = None, timeout: float = 30, **match: Any
) -> dict[str, Any]:
    """The first event ``event`` (of ``device``) whose fields include ``match``."""

    def find(msgs: list[Received]) -> dict[str, Any] | None:
        for m in msgs:
            body = json.loads(m.payload)
            if body.get("event") != event or (device and body.get("device") != device):
                continue
            if all(body.get(k) == v for k, v in match.items()):
                return dict(body)
        return None

    log.wait_for(lambda msgs: find(msgs) is not None, timeout)
    found = find(list(log.messages))
    assert found is not None
    return found


def retained_status(log: MessageLog, device: str, predicate: Any) -> dict[str, Any]:
    """The device's latest retained status once ``predicate`` holds for it (checked by the
    fleet side's own checker)."""
    topic = f"edge/devices/{device}/status"

    def latest(msgs: list[Any]) -> dict[str, Any] | None:
        mine = [m for m in msgs if m.topic == topic and m.payload]
        return check_status(json.loads(mine[-1].payload), topic) if mine else None

    log.wait_for(lambda msgs: (s := latest(msgs)) is not None and bool(predicate(s)), 30)
    found = latest(list(log.messages))
    assert found is not None
    return found


def serving(agent: Any, model: str = "iris") -> str | None:
    """The version /status says is active for ``model`` (None when not loaded)."""
    return agent.status()["models"].get(model, {}).get("version")  # type: ignore[no-any-return]


def predict_version(agent: Any, rows: list[list[float]] | None = None) -> str:
    code, body = agent.request("POST", "/predict", {"features": rows or [[5.1, 3.5, 1.4, 0.2]]})
    assert code == 200, body
    return str(body["version"])


def package_copy(src: Path, dst: Path) -> Path:
    """A writable copy of a package folder, to spoil in a test."""
    import shutil

    shutil.copytree(src, dst)
    return dst
