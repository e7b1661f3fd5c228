"""Device commands over MQTT 5 and 3.1.1 (fleet/commands.py): the request always carries
``reply`` (topic and correlation), MQTT 5 properties only on MQTT 5, and the answer is
matched by correlation data or by the body's ``correlation``.

The device is a small real MQTT client with its own account on a real mosquitto that
answers as docs/protocol.md says a device does (the agent's side is
agent/updates/commands.py).
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.wire import payloads
from fleet.cli import main
from tests.fixtures.broker import HOST, Broker
from tests.fleet.publish_helpers import cli


class Responder:
    """pi-7 answering its ``rollback`` command: on the MQTT 5 response topic when the
    request has one (``prefer_properties``), else on ``reply.topic`` with the body's
    ``correlation`` (``correlation`` overrides what it sends back)."""

    def __init__(
        self,
        broker: Broker,
        *,
        mqtt5: bool,
        prefer_properties: bool = True,
        correlation: str | None = None,
    ) -> None:
        self.device = f"pi-{uuid.uuid4().hex[:6]}"
        self.prefer_properties = prefer_properties
        self.correlation = correlation
        self.requests: list[tuple[dict[str, Any], Any]] = []
        creds = broker.add_device(self.device, "f1")
        kwargs: dict[str, Any] = {"protocol": mqtt.MQTTv5 if mqtt5 else mqtt.MQTTv311}
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.device, **kwargs)
        self.client.username_pw_set(creds.username, creds.password)
        subscribed = threading.Event()
        self.client.on_connect = lambda c, *a: c.subscribe(
            f"edge/devices/{self.device}/commands/+", 1
        )
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_command
        self.client.connect(HOST, broker.port, keepalive=30)
        self.client.loop_start()
        assert subscribed.wait(10), "the device did not subscribe"
        status = payloads.status(self.device, "f1", payloads.ONLINE, {})
        info = self.client.publish(
            f"edge/devices/{self.device}/status", payloads.encode(status), qos=1, retain=True
        )
        info.wait_for_publish(10)

    def _on_command(self, c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        body = json.loads(msg.payload)
        props = getattr(msg, "properties", None)
        self.requests.append((body, props))
        answer = {"ok": True, "model": body["model"], "version": "1.0.0", "reason": body["reason"]}
        response_topic = getattr(props, "ResponseTopic", None)
        if response_topic and self.prefer_properties:
            out = Properties(PacketTypes.PUBLISH)
            out.CorrelationData = props.CorrelationData
            c.publish(response_topic, json.dumps(answer), qos=1, properties=out)
            return
        reply = body["reply"]
        answer["correlation"] = self.correlation or reply["correlation"]
        c.publish(reply["topic"], json.dumps(answer), qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.parametrize(
    ("fleet_protocol", "device_mqtt5", "prefer_properties"),
    [
        ("3.1.1", False, True),  # neither side has properties: reply field both ways
        ("5", True, True),  # response topic and correlation data, as before
        ("5", True, False),  # an MQTT 5 request answered the 3.1.1 way is matched too
        ("3.1.1", True, True),  # a 3.1.1 operator, an MQTT 5 device: no properties came
    ],
)
def test_a_command_is_answered_and_matched_over_both_versions(
    broker: Broker,
    capsys: pytest.CaptureFixture[str],
    fleet_protocol: str,
    device_mqtt5: bool,
    prefer_properties: bool,
) -> None:
    device = Responder(broker, mqtt5=device_mqtt5, prefer_properties=prefer_properties)
    try:
        argv = cli(broker, None, "rollback", "iris", "--device", device.device,
                   "--timeout", "10", "--json")  # fmt: skip
        assert main([*argv, "--mqtt-protocol", fleet_protocol]) == 0
        answer = json.loads(capsys.readouterr().out)["answer"]
        assert answer["ok"] is True and answer["version"] == "1.0.0"
        assert "correlation" not in answer
        [(body, props)] = device.requests
        reply = body["reply"]
        assert reply["topic"].startswith(f"edge/devices/{device.device}/responses/")
        assert isinstance(reply["correlation"], str) and 0 < len(reply["correlation"]) <= 64
        has_props = getattr(props, "ResponseTopic", None) is not None
        assert has_props is (fleet_protocol == "5")
        if has_props:
            assert props.ResponseTopic == reply["topic"]
            assert props.CorrelationData == reply["correlation"].encode()
    finally:
        device.close()


def test_an_answer_with_another_correlation_is_not_taken(
    broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    device = Responder(broker, mqtt5=False, correlation="someone-else")
    try:
        argv = cli(broker, None, "rollback", "iris", "--device", device.device, "--timeout", "2")
        assert main([*argv, "--mqtt-protocol", "3.1.1"]) == 1
        assert f"device {device.device} did not answer the rollback command within 2 s" in (
            capsys.readouterr().err
        )
        assert len(device.requests) == 1  # it did answer, with a token that is not ours
    finally:
        device.close()
