"""Every rollback is announced: one ``rolled_back`` event whatever asked for it.

Probation's rollback is tested in test_probation.py; here the three others: a device
command, ``edge-agent rollback`` beside the running agent, and the start-up fallback
from a version that no longer loads. Real mosquitto, real ``edge-agent run``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.wire.payloads import check_event
from agent.wire.times import parse_rfc3339
from tests.delivery_helpers import wait_event

DEVICE = "test-device-0"
# Real agents on a real broker: `make test-fast` leaves them out.
pytestmark = pytest.mark.slow


def _agent(start_agent: Any, broker: Any, keypair: Any, *packages: Path, start: bool = True) -> Any:
    creds = broker.add_device(DEVICE, "default")
    return start_agent(
        {"mqtt": broker.mqtt_settings(creds), "models": {"trusted_keys": [str(keypair.pub)]}},
        packages=list(packages),
        start=start,
    )


def _check_all(log: Any) -> None:
    """Every event on the topic is the documented shape, with one time format."""
    for m in list(log.messages):
        event = check_event(json.loads(m.payload), "events")
        assert event["time"].endswith("Z") and len(event["time"]) == len("2026-01-01T00:00:00.000Z")
        parse_rfc3339(event["time"])


def test_rollback_by_device_command_is_an_event(
    start_agent: Any, broker: Any, keypair: Any, iris_package: Path, iris_package_v2: Path
) -> None:
    agent = _agent(start_agent, broker, keypair, iris_package, iris_package_v2)
    agent.wait_for(lambda s: s["broker"]["connected"], timeout=15)
    events = broker.subscribe(f"edge/devices/{DEVICE}/events")
    operator = broker.client()
    operator.publish(
        f"edge/devices/{DEVICE}/commands/rollback", json.dumps({"model": "iris"}), qos=1
    ).wait_for_publish(5)
    event = wait_event(events, "rolled_back", device=DEVICE, timeout=20)
    assert (event["model"], event["version"], event["from_version"]) == ("iris", "1.0.0", "1.1.0")
    assert event["reason"] == "command from the fleet"
    _check_all(events)
    operator.loop_stop()
    operator.disconnect()


def test_rollback_beside_the_running_agent_is_an_event(
    start_agent: Any, broker: Any, keypair: Any, iris_package: Path, iris_package_v2: Path
) -> None:
    agent = _agent(start_agent, broker, keypair, iris_package, iris_package_v2)
    agent.wait_for(lambda s: s["broker"]["connected"], timeout=15)
    events = broker.subscribe(f"edge/devices/{DEVICE}/events")
    result = agent.cli("rollback", "iris")
    assert result.returncode == 0, result.stderr
    event = wait_event(events, "rolled_back", device=DEVICE, timeout=20)
    assert (event["model"], event["version"], event["from_version"]) == ("iris", "1.0.0", "1.1.0")
    _check_all(events)


def test_fallback_at_start_up_is_an_event(
    start_agent: Any, broker: Any, keypair: Any, iris_package: Path, iris_package_v2: Path
) -> None:
    # Installed but not started: the active version is broken before the agent runs.
    agent = _agent(start_agent, broker, keypair, iris_package, iris_package_v2, start=False)
    onnx = agent.state_dir / "models" / "iris" / "1.1.0" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-10])
    events = broker.subscribe(f"edge/devices/{DEVICE}/events")
    agent.start()
    event = wait_event(events, "rolled_back", device=DEVICE, timeout=30)
    assert (event["model"], event["version"], event["from_version"]) == ("iris", "1.0.0", "1.1.0")
    assert "1.1.0 cannot be loaded" in event["reason"]
    _check_all(events)
