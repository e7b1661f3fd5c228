"""Delivery end to end: real mosquitto, real ``edge-agent run`` processes, real packages.

The operator side is ``fleet.publish`` (the code behind ``edge-fleet publish``); the
device side is the agent's own delivery. Each test asserts on what an operator or a
client sees: the version /predict answers with, /status, and the device's events.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.wire.topics import rollout_bucket
from fleet.publish import publish, rollback, rollout
from tests.delivery_helpers import (
    device_config,
    events,
    operator,
    predict_version,
    serving,
    wait_event,
)
from tests.fixtures.broker import Broker
from tests.fixtures.models import Keypair

# Real agents delivering over a real broker: `make test-fast` leaves them out.
pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


def test_fleet_of_agents_converges_and_one_offline_catches_up(
    broker: Broker, keypair: Keypair, start_agent: Any, iris_package: Path,
    iris_package_v2: Path,
) -> None:  # fmt: skip
    log = broker.subscribe("edge/devices/+/events")
    agents = [
        start_agent(device_config(broker, keypair, f"conv-{i}"), packages=[iris_package])
        for i in range(3)
    ]
    offline = start_agent(
        device_config(broker, keypair, "conv-late"), packages=[iris_package], start=False
    )
    publish(operator(broker), iris_package_v2, fleet="f1", key=keypair.key)
    for agent in agents:
        agent.wait_for(lambda s: s["models"]["iris"]["version"] == "1.1.0", timeout=30)
        assert predict_version(agent) == "1.1.0"
    for device in ("conv-0", "conv-1", "conv-2"):
        for step in ("downloading", "verified", "activated"):
            wait_event(log, step, device=device, version="1.1.0")
    # A device that was off during the publish converges from the retained messages alone.
    offline.start()
    offline.wait_for(lambda s: s["models"]["iris"]["version"] == "1.1.0", timeout=30)
    assert predict_version(offline) == "1.1.0"


def test_staged_rollout_selects_the_bucketed_devices_then_widens(
    broker: Broker, keypair: Keypair, start_agent: Any, iris_package: Path,
    iris_package_v2: Path,
) -> None:  # fmt: skip
    salt = "f1/iris"
    names = [f"stage-{i}" for i in range(40)]
    low = [n for n in names if rollout_bucket(salt, n) < 30][:2]
    high = [n for n in names if rollout_bucket(salt, n) >= 30][:2]
    log = broker.subscribe("edge/devices/+/events")
    agents = {
        n: start_agent(device_config(broker, keypair, n), packages=[iris_package])
        for n in low + high
    }
    ops = operator(broker)
    publish(ops, iris_package_v2, fleet="f1", percent=30, key=keypair.key)
    for n in low:
        agents[n].wait_for(lambda s: s["models"]["iris"]["version"] == "1.1.0", timeout=30)
    # The others saw the same manifest and said why they stay where they are.
    for n in high:
        event = wait_event(log, "not_in_rollout", device=n, timeout=30)
        assert event["reason"] == f"not in rollout (bucket {rollout_bucket(salt, n)} >= 30%)"
        status = agents[n].status()["models"]["iris"]
        # It keeps serving 1.0.0, and its state says it is outside this rollout.
        assert (status["state"], status["reason"]) == ("not_in_rollout", event["reason"])
        assert (status["desired"]["version"], status["desired"]["decision"]) == (
            "1.1.0", "not_in_rollout",
        )  # fmt: skip
        assert serving(agents[n]) == "1.0.0"
        assert not [e for e in events(log, n) if e["event"] == "activated"]
    rollout(ops, "iris", fleet="f1", percent=100, key=keypair.key)
    for n in high:
        agents[n].wait_for(lambda s: s["models"]["iris"]["version"] == "1.1.0", timeout=30)
    # The first stage was re-signed with a new serial and kept serving 1.1.0 throughout.
    for n in low:
        agents[n].wait_for(lambda s: s["models"]["iris"]["serial"] >= 3, timeout=30)
        assert predict_version(agents[n]) == "1.1.0"


def test_rollback_goes_back_to_the_older_artifact(
    broker: Broker, keypair: Keypair, start_agent: Any, iris_package: Path,
    iris_package_v2: Path,
) -> None:  # fmt: skip
    ops = operator(broker)
    agent = start_agent(device_config(broker, keypair, "rb-0"))
    publish(ops, iris_package, fleet="f1", key=keypair.key)
    agent.wait_for(lambda s: s["models"].get("iris", {}).get("version") == "1.0.0", timeout=30)
    publish(ops, iris_package_v2, fleet="f1", key=keypair.key)
    agent.wait_for(lambda s: s["models"]["iris"]["version"] == "1.1.0", timeout=30)
    signed = rollback(ops, "iris", fleet="f1", key=keypair.key)
    assert signed["version"] == "1.0.0"
    assert signed["serial"] > 2
    status = agent.wait_for(lambda s: s["models"]["iris"]["version"] == "1.0.0", timeout=30)
    assert status["models"]["iris"]["serial"] == signed["serial"]
    assert predict_version(agent) == "1.0.0"
    # A device that joins after the rollback goes straight to the rolled-back version.
    late = start_agent(device_config(broker, keypair, "rb-late"))
    late.wait_for(lambda s: s["models"].get("iris", {}).get("version") == "1.0.0", timeout=30)


def test_device_specific_desired_state_wins_over_the_fleets(
    broker: Broker, keypair: Keypair, start_agent: Any, iris_package: Path,
    iris_package_v2: Path,
) -> None:  # fmt: skip
    ops = operator(broker)
    pinned = start_agent(device_config(broker, keypair, "pin-0"))
    other = start_agent(device_config(broker, keypair, "pin-1"))
    publish(ops, iris_package, fleet="f1", devices=["pin-0"], key=keypair.key)
    publish(ops, iris_package_v2, fleet="f1", key=keypair.key)
    other.wait_for(lambda s: s["models"].get("iris", {}).get("version") == "1.1.0", timeout=30)
    pinned.wait_for(lambda s: s["models"].get("iris", {}).get("version") == "1.0.0", timeout=30)
    # The pinned device has weighed the fleet's 1.1.0 too, and its own desired state won.
    view = pinned.wait_for(
        lambda s: (
            s["desired"].get("iris", {}).get("sources", {}).get("fleet", {}).get("version")
            == "1.1.0"
        ),
        timeout=30,
    )["desired"]["iris"]
    assert view["applies"] == "device" and view["sources"]["device"]["version"] == "1.0.0"
    assert serving(pinned) == "1.0.0"
