"""The central broker's ACL: a device is confined to its own topics, denials are visible."""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt
import pytest

from tests.fixtures.broker import Broker, Creds


def publish_reason(client: mqtt.Client, topic: str, payload: bytes = b"x") -> int:
    """Publish QoS 1 and return the PUBACK reason code (MQTT 5)."""
    got: list[int] = []
    done = threading.Event()

    def on_publish(c: mqtt.Client, u: object, mid: int, rc: mqtt.ReasonCode, p: object) -> None:
        got.append(rc.value)
        done.set()

    client.on_publish = on_publish
    client.publish(topic, payload, qos=1)
    assert done.wait(10), f"{topic}: no PUBACK"
    return got[0]


@pytest.mark.parametrize(
    "topic",
    [
        "edge/devices/dev-1/status",
        "edge/devices/dev-1/health",
        "edge/devices/dev-1/events",
        "edge/devices/dev-1/results",
    ],
)
def test_device_may_publish_its_own_topics(broker: Broker, topic: str) -> None:
    creds = broker.add_device("dev-1", fleet="f1")
    seen = broker.subscribe("edge/#")
    client = broker.client(creds)
    assert publish_reason(client, topic) == 0
    seen.wait_for(lambda msgs: any(m.topic == topic for m in msgs))


@pytest.mark.parametrize(
    "topic",
    [
        "edge/devices/dev-2/results",  # another device's results
        "edge/devices/dev-2/status",  # marking another device offline
        "edge/fleets/f1/models/m/desired",  # its fleet's desired state
        "edge/devices/dev-1/models/m/desired",  # its own desired state
        "edge/artifacts/abc/0",  # an artifact chunk
        "edge/devices/dev-1/commands/rollback",
        "edge/devices/dev-1/results/ack",  # acking its own results: only a collector may
        "edge/devices/dev-2/results/ack",
    ],
)
def test_device_cannot_publish_elsewhere_and_is_told(broker: Broker, topic: str) -> None:
    creds = broker.add_device("dev-1", fleet="f1")
    broker.add_device("dev-2", fleet="f1")
    seen = broker.subscribe("edge/#")
    client = broker.client(creds)
    # MQTT 5: the broker answers 135 "not authorized" instead of dropping silently.
    assert publish_reason(client, topic) == 135
    # Nothing reached subscribers: a marker sent after it arrives alone.
    assert publish_reason(client, "edge/devices/dev-1/events", b"marker") == 0
    msgs = seen.wait_for(lambda m: any(x.payload == b"marker" for x in m))
    assert [m.topic for m in msgs] == ["edge/devices/dev-1/events"]


def test_device_reads_its_own_and_its_fleets_desired_state_only(broker: Broker) -> None:
    creds = broker.add_device("dev-1", fleet="f1")
    op = broker.client()
    for topic in [
        "edge/fleets/f1/models/m/desired",
        "edge/fleets/f2/models/m/desired",
        "edge/devices/dev-1/models/m/desired",
        "edge/devices/dev-2/models/m/desired",
        "edge/artifacts/abc/0",
        "edge/devices/dev-2/commands/rollback",
    ]:
        op.publish(topic, topic.encode(), qos=1, retain=True).wait_for_publish(5)
    seen = broker.subscribe("edge/#", creds=creds)
    # A marker the device may read, published last: once it is here, all retained are too.
    op.publish("edge/devices/dev-1/commands/ping", b"marker", qos=1).wait_for_publish(5)
    msgs = seen.wait_for(lambda m: any(x.payload == b"marker" for x in m))
    assert sorted(m.topic for m in msgs) == [
        "edge/artifacts/abc/0",
        "edge/devices/dev-1/commands/ping",
        "edge/devices/dev-1/models/m/desired",
        "edge/fleets/f1/models/m/desired",
    ]


@pytest.mark.parametrize("shared", [False, True], ids=["plain", "shared"])
def test_device_reads_its_own_results_acks_only(broker: Broker, shared: bool) -> None:
    creds = broker.add_device("dev-1", fleet="f1")
    acks = "edge/devices/+/results/ack"
    seen = broker.subscribe(f"$share/dev-1/{acks}" if shared else acks, creds=creds)
    op = broker.client()
    op.publish("edge/devices/dev-2/results/ack", b"not yours", qos=1).wait_for_publish(5)
    op.publish("edge/devices/dev-1/results/ack", b"marker", qos=1).wait_for_publish(5)
    msgs = seen.wait_for(lambda m: any(x.payload == b"marker" for x in m))
    assert [m.topic for m in msgs] == ["edge/devices/dev-1/results/ack"]


def test_rerunning_mkcreds_moves_a_device_to_another_fleet(broker: Broker) -> None:
    broker.add_device("dev-1", fleet="f1")
    creds = broker.add_device("dev-1", fleet="f2")
    op = broker.client()
    op.publish("edge/fleets/f1/models/m/desired", b"f1", qos=1, retain=True).wait_for_publish(5)
    op.publish("edge/fleets/f2/models/m/desired", b"f2", qos=1, retain=True).wait_for_publish(5)
    seen = broker.subscribe("edge/fleets/+/models/+/desired", creds=creds)
    msgs = seen.wait_for(lambda m: len(m) >= 1)
    assert [m.payload for m in msgs] == [b"f2"]
    acl = (broker.conf_dir / "acl").read_text()
    assert acl.count("user dev-1\n") == 1


def test_anonymous_and_wrong_password_are_refused(broker: Broker) -> None:
    creds = broker.add_device("dev-1", fleet="f1")
    from tests.fixtures.broker import Creds

    wrong = Creds("dev-1", creds.password + "x", creds.password_file)
    assert not broker.can_login(wrong)
    assert not broker.can_login(Creds("", "", creds.password_file))
    assert broker.can_login(creds)


def test_a_device_cannot_take_another_devices_client_id(broker: Broker) -> None:
    """Device A connecting with B's client id gets its own id; B stays connected."""
    a = broker.add_device("pi-a", fleet="f1")
    b = broker.add_device("pi-b", fleet="f1")
    lost: list[object] = []
    real_b = broker.client(b, client_id="pi-b")
    real_b.on_disconnect = lambda *args: lost.append(args)
    status = broker.subscribe("edge/devices/+/status")
    impostor = broker.client(a, client_id="pi-b")  # CONNACK received: it is in
    # Before the fix the broker dropped the real pi-b right here, ahead of that CONNACK.
    assert publish_reason(real_b, "edge/devices/pi-b/status", b"still here") == 0
    assert not lost and real_b.is_connected()
    # The impostor speaks as pi-a (its own topics), not as pi-b.
    assert publish_reason(impostor, "edge/devices/pi-b/status", b"fake") == 135
    status.wait_for(lambda ms: any(m.payload == b"still here" for m in ms))
    assert not [m for m in status.messages if m.payload == b"fake"]
    assert "as pi-a" in broker.log()  # mosquitto logs the client id it gave
    for c in (impostor, real_b):
        c.disconnect()
        c.loop_stop()


def test_devices_cannot_log_in_on_the_operator_listener(broker: Broker) -> None:
    device = broker.add_device("pi-c", fleet="f1")
    as_operator = Creds(device.username, device.password, device.password_file, role="operator")
    assert not broker.can_login(as_operator)
    operator = Creds(broker.operator.username, broker.operator.password,
                     broker.operator.password_file, role="device")  # fmt: skip
    assert not broker.can_login(operator)  # and operators stay off the device listener
    assert broker.can_login(device) and broker.can_login(broker.operator)
