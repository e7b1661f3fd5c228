"""A rollback an operator asked for is not on trial; one probation made is not retried.

Real mosquitto, real agents. ``edge-fleet rollback`` publishes a desired state naming
an older version (with a new serial); a device command ``rollback`` and ``edge-agent
rollback`` activate the previous version at once. None of them is put on probation
against the version rolled back from (which would roll the rollback back), and each
ends the trial of the version it replaced.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fleet.publish import publish, rollback
from tests.agent.updates.test_probation import fails_on_large_first_feature
from tests.delivery_helpers import device_config, operator, serving, wait_event
from tests.fixtures.broker import Broker
from tests.fixtures.models import Keypair

pytestmark = [pytest.mark.timeout(150), pytest.mark.slow]

GOOD = [[5.1, 3.5, 1.4, 0.2]]
FAILING = [[12.0, 3.0, 4.0, 1.2]]  # valid, but the spoiled graph fails on x0 >= 10


def _probation_cfg(broker: Broker, keypair: Keypair, device: str) -> dict[str, Any]:
    return device_config(broker, keypair, device, probation_s=60, probation_min_requests=5,
                         probation_max_error_rate=0.2)  # fmt: skip


def test_fleet_rollback_to_an_older_version_is_not_put_on_trial(
    broker: Broker, keypair: Keypair, start_agent: Any, iris_package: Path,
    iris_package_v2: Path, tmp_path: Path,
) -> None:  # fmt: skip
    log = broker.subscribe("edge/devices/+/events")
    health = broker.subscribe("edge/devices/rb-0/health")
    cfg = _probation_cfg(broker, keypair, "rb-0")
    cfg["health"] = {"interval_s": 1}
    agent = start_agent(cfg)
    ops = operator(broker)
    # 1.0.0 fails some valid rows (x0 >= 10); 1.1.0 answers them all.
    old = fails_on_large_first_feature(iris_package, tmp_path / "old", keypair)
    publish(ops, old, fleet="f1", key=keypair.key)
    wait_event(log, "activated", device="rb-0", version="1.0.0")
    publish(ops, iris_package_v2, fleet="f1", key=keypair.key)
    wait_event(log, "activated", device="rb-0", version="1.1.0")
    assert agent.status()["models"]["iris"]["state"] == "probation"

    rollback(ops, "iris", fleet="f1", key=keypair.key)  # the operator: back to 1.0.0
    wait_event(log, "activated", device="rb-0", version="1.0.0", serial=3)
    iris = agent.status()["models"]["iris"]
    assert (iris["version"], iris["state"]) == ("1.0.0", "active"), iris
    assert "probation" not in iris  # neither 1.0.0 on trial nor 1.1.0's trial left over
    assert iris["reason"] == "rolled back from 1.1.0 by the desired state"

    # 1.0.0 fails requests now: the operator chose it; nothing rolls it back to 1.1.0.
    for _ in range(10):
        assert agent.request("POST", "/predict", {"features": FAILING})[0] >= 400
    seen = health.wait_for(
        lambda ms: sum(json.loads(m.payload)["models"].get("iris", {}).get("errors", 0)
                       for m in ms) >= 10,
        timeout=15,
    )  # fmt: skip
    count = len(seen)
    health.wait_for(lambda ms: len(ms) >= count + 2, timeout=15)  # probation ticked since
    assert serving(agent) == "1.0.0"
    assert not [m for m in log.messages if b'"rolled_back"' in m.payload]
    assert agent.status()["desired"]["iris"]["decision"] == "activated"


def test_command_rollback_ends_the_trial_of_the_version_it_replaced(
    broker: Broker, keypair: Keypair, start_agent: Any, iris_package: Path, tmp_path: Path,
    iris_package_v2: Path,
) -> None:  # fmt: skip
    log = broker.subscribe("edge/devices/+/events")
    agent = start_agent(_probation_cfg(broker, keypair, "rb-1"), packages=[iris_package])
    bad = fails_on_large_first_feature(iris_package_v2, tmp_path / "bad", keypair)
    publish(operator(broker), bad, fleet="f1", key=keypair.key)
    wait_event(log, "activated", device="rb-1", version="1.1.0")
    assert agent.status()["models"]["iris"]["probation"]["against"] == "1.0.0"

    client = broker.client()
    client.publish("edge/devices/rb-1/commands/rollback",
                   json.dumps({"model": "iris", "reason": "operator"}), qos=1).wait_for_publish(5)  # fmt: skip
    wait_event(log, "rolled_back", device="rb-1", version="1.0.0", reason="operator")
    client.loop_stop()
    client.disconnect()
    iris = agent.wait_for(lambda st: "probation" not in st["models"]["iris"], timeout=5)["models"][
        "iris"
    ]
    assert (iris["version"], iris["state"], iris["reason"]) == ("1.0.0", "rolled_back", "operator")
    # Desired against actual: 1.1.0 is desired still, and the device rolled it back.
    assert (iris["desired"]["version"], iris["desired"]["decision"]) == ("1.1.0", "rolled_back")


def test_local_rollback_beside_the_agent_ends_the_trial(
    broker: Broker, keypair: Keypair, start_agent: Any, iris_package: Path,
    iris_package_v2: Path,
) -> None:  # fmt: skip
    log = broker.subscribe("edge/devices/+/events")
    agent = start_agent(_probation_cfg(broker, keypair, "rb-2"), packages=[iris_package])
    publish(operator(broker), iris_package_v2, fleet="f1", key=keypair.key)
    wait_event(log, "activated", device="rb-2", version="1.1.0")
    assert agent.status()["models"]["iris"]["state"] == "probation"
    result = agent.cli("rollback", "iris")
    assert result.returncode == 0, result.stderr
    wait_event(log, "rolled_back", device="rb-2", version="1.0.0")
    iris = agent.wait_for(lambda st: "probation" not in st["models"]["iris"], timeout=5)["models"][
        "iris"
    ]
    assert (iris["version"], iris["state"]) == ("1.0.0", "rolled_back")
