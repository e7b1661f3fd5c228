"""Desired against actual, as a device tells it: tags, ``where``, states and reasons.

Real mosquitto, real agents. A fleet manifest whose signed ``rollout.where`` names a
tag reaches only the devices with it; the others stay where they are and say why, in
their ``not_in_rollout`` event, their ``/status``, their retained status and the 503
a caller gets while nothing serves. A refused delivery leaves the model ``rejected``
with the reason and the desired version beside the one serving, also after a restart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.wire.package import read_manifest
from agent.wire.signing import key_id, load_private_key, load_public_key, sign_manifest
from fleet.publish import publish
from fleet.retained import Session, Target, sign_desired, upload_artifact
from tests.agent.updates.test_delivery import _spoiled
from tests.delivery_helpers import device_config, operator, retained_status, wait_event
from tests.fixtures.broker import Broker
from tests.fixtures.models import Keypair

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

ROW = {"features": [[5.1, 3.5, 1.4, 0.2]]}
STABLE_REASON = "not in rollout (tag ring=canary wanted, device has ring=stable)"


def publish_where(
    broker: Broker, package: Path, keypair: Keypair, *, serial: int, where: dict[str, str]
) -> None:
    """A fleet manifest whose signed rollout names the tags it is for (the shared spec)."""
    session = Session(operator(broker), "test")
    try:
        m = read_manifest(package)
        upload_artifact(session, package / m.artifact.file, m.artifact.sha256, 256)
        body = sign_desired(m.to_dict(), serial=serial, chunk_size=256, target=Target(fleet="f1"),
                            percent=100, key=keypair.key)  # fmt: skip
        body.pop("signature")
        body["rollout"]["where"] = where
        signed = sign_manifest(body, load_private_key(keypair.key))
        topic = Target(fleet="f1").desired(session.topics, m.name)
        session.wait([session.publish(topic, json.dumps(signed).encode())], "desired")
    finally:
        session.close()


def test_where_takes_the_tagged_device_and_the_others_say_why(
    broker: Broker, keypair: Keypair, start_agent: Any, iris_package: Path
) -> None:
    events = broker.subscribe("edge/devices/+/events")
    statuses = broker.subscribe("edge/devices/+/status")
    canary_cfg = device_config(broker, keypair, "tag-canary")
    canary_cfg["device"]["tags"] = {"ring": "canary", "site": "north"}
    canary = start_agent(canary_cfg)
    # The env form of the same setting.
    stable = start_agent(device_config(broker, keypair, "tag-stable"),
                         env={"EDGE_AGENT_DEVICE_TAGS": "ring=stable,site=north"})  # fmt: skip
    publish_where(broker, iris_package, keypair, serial=10, where={"ring": "canary"})

    wait_event(events, "activated", device="tag-canary", version="1.0.0")
    assert canary.request("POST", "/predict", ROW)[0] == 200
    status = retained_status(
        statuses, "tag-canary",
        lambda s: (s["models"].get("iris", {}).get("desired") or {}).get("decision") == "activated",
    )  # fmt: skip
    assert status["tags"] == {"ring": "canary", "site": "north"}
    assert status["trusted_keys"] == [key_id(load_public_key(keypair.pub))]
    iris = status["models"]["iris"]
    assert (iris["state"], iris["serial"]) == ("active", 10)
    assert iris["desired"] == {"version": "1.0.0", "serial": 10, "source": "fleet",
                               "decision": "activated", "reason": None}  # fmt: skip

    event = wait_event(events, "not_in_rollout", device="tag-stable")
    assert event["reason"] == STABLE_REASON
    code, body = stable.request("POST", "/predict", ROW)
    assert (code, body) == (503, {"error": f"no model is loaded yet (iris: {STABLE_REASON})"})
    local = stable.status()
    assert local["tags"] == {"ring": "stable", "site": "north"}
    assert (local["models"]["iris"]["state"], local["models"]["iris"]["reason"]) == (
        "not_in_rollout", STABLE_REASON,
    )  # fmt: skip
    status = retained_status(
        statuses, "tag-stable", lambda s: "iris" in s["models"] and s["models"]["iris"]["desired"]
    )
    iris = status["models"]["iris"]
    assert (iris["version"], iris["state"], iris["reason"]) == (None, "not_in_rollout",
                                                                STABLE_REASON)  # fmt: skip
    assert iris["desired"]["decision"] == "not_in_rollout"
    assert (iris["desired"]["version"], iris["desired"]["serial"]) == ("1.0.0", 10)


def test_a_refused_version_is_rejected_beside_the_one_serving_also_after_a_restart(
    broker: Broker, keypair: Keypair, start_agent: Any, iris_package: Path,
    iris_package_v2: Path, tmp_path: Path,
) -> None:  # fmt: skip
    events = broker.subscribe("edge/devices/+/events")
    statuses = broker.subscribe("edge/devices/+/status")
    agent = start_agent(device_config(broker, keypair, "rej-0"), packages=[iris_package])
    bad = _spoiled(iris_package_v2, tmp_path / "bad", keypair, parity_shift=0.5)
    publish(operator(broker), bad, fleet="f1", key=keypair.key)
    event = wait_event(events, "rejected", device="rej-0")
    assert "parity" in event["reason"]

    def refused(s: dict[str, Any]) -> bool:
        iris = s["models"].get("iris", {})
        return iris.get("state") == "rejected" and (iris.get("desired") or {}).get(
            "decision") == "rejected"  # fmt: skip

    for _restart in range(2):
        iris = retained_status(statuses, "rej-0", refused)["models"]["iris"]
        assert iris["version"] == "1.0.0"  # still serving what it had
        assert (
            iris["reason"].startswith("delivery of 1.1.0 refused: ") and "parity" in iris["reason"]
        )
        assert (iris["desired"]["version"], iris["desired"]["serial"]) == ("1.1.0", 2)
        assert agent.request("POST", "/predict", ROW)[1]["version"] == "1.0.0"
        statuses.messages.clear()
        agent.stop()
        agent.start()
