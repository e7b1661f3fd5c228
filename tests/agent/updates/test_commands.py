"""Device commands over MQTT: rollback by command, answers on the response topic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def answers(log: Any) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in log.messages if b'"command"' in m.payload]


def test_rollback_command_is_answered_on_the_response_topic(
    start_agent: Any, broker: Any, keypair: Any, iris_package: Path, iris_package_v2: Path
) -> None:
    creds = broker.add_device("test-device-0", "default")
    agent = start_agent(
        {"mqtt": broker.mqtt_settings(creds), "models": {"trusted_keys": [str(keypair.pub)]}},
        packages=[iris_package, iris_package_v2],
    )
    agent.wait_for(lambda s: s["broker"]["connected"], timeout=15)
    assert agent.status()["models"]["iris"]["version"] == "1.1.0"

    response_topic = "edge/devices/test-device-0/responses/op-1"
    replies = broker.subscribe(response_topic)
    events = broker.subscribe("edge/devices/test-device-0/events")
    operator = broker.client()
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = response_topic
    props.CorrelationData = b"req-42"
    operator.publish(
        "edge/devices/test-device-0/commands/rollback",
        json.dumps({"model": "iris", "reason": "operator says so"}),
        qos=1,
        properties=props,
    ).wait_for_publish(5)

    replies.wait_for(lambda ms: bool(answers(replies)), timeout=15)
    (answer,) = answers(replies)
    assert answer["ok"] is True
    assert (answer["model"], answer["version"]) == ("iris", "1.0.0")
    assert answer["reason"] == "operator says so"
    code, body = agent.request("POST", "/predict", {"features": [[5.1, 3.5, 1.4, 0.2]]})
    assert code == 200 and body["version"] == "1.0.0"

    # No response topic: the answer goes to events; a bad command says what is wrong.
    operator.publish("edge/devices/test-device-0/commands/reboot", b"{}", qos=1).wait_for_publish(5)
    operator.publish(
        "edge/devices/test-device-0/commands/rollback", b"not json", qos=1
    ).wait_for_publish(5)
    events.wait_for(lambda ms: len(answers(events)) >= 2, timeout=15)
    errors = sorted(a["error"] for a in answers(events))
    assert errors[0].startswith("command rollback: payload is not JSON")
    assert errors[1] == "command: 'reboot' is not known (known: rollback)"
    assert all(a["ok"] is False for a in answers(events))
    assert agent.status()["models"]["iris"]["version"] == "1.0.0"  # unchanged
    operator.loop_stop()
    operator.disconnect()
