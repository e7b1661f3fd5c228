"""Collector and reader accounts: what each may read and write on the central broker."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.broker.test_acl import publish_reason
from tests.fixtures.broker import Broker, MessageLog

KINDS = ["results", "health", "events", "status"]
# Retained state a read-only tool may see and one a collector may not.
DESIRED = [
    "edge/fleets/f1/models/m/desired",
    "edge/fleets/f1/models/m/history",
    "edge/devices/dev-1/models/m/desired",
    "edge/devices/dev-1/models/m/history",
]
ELSEWHERE = ["edge/artifacts/abc/0", "edge/devices/dev-1/commands/rollback"]


def retain_all(broker: Broker, topics: list[str]) -> None:
    op = broker.client()
    for topic in topics:
        op.publish(topic, topic.encode(), qos=1, retain=True).wait_for_publish(5)
    op.disconnect()
    op.loop_stop()


def until_marker(log: MessageLog, marker: bytes = b"marker") -> list[str]:
    """Topics received up to and including the marker (published last)."""
    msgs = log.wait_for(lambda m: any(x.payload == marker for x in m))
    return sorted(m.topic for m in msgs)


@pytest.mark.parametrize("shared", [False, True], ids=["plain", "shared"])
def test_collector_reads_every_devices_results_health_events_and_status(
    broker: Broker, shared: bool
) -> None:
    collector = broker.add_collector("coll-1")
    devices = {d: broker.client(broker.add_device(d, fleet="f1")) for d in ("dev-1", "dev-2")}
    logs = {}
    for kind in KINDS:
        topic = f"edge/devices/+/{kind}"
        # The collectors' way: MQTT 5 shared subscriptions, one message to one member.
        logs[kind] = broker.subscribe(f"$share/g-{kind}/{topic}" if shared else topic, collector)
    for device, client in devices.items():
        for kind in KINDS:
            assert publish_reason(client, f"edge/devices/{device}/{kind}", device.encode()) == 0
    for kind, log in logs.items():
        msgs = log.wait_for(lambda m: len(m) == 2)
        assert sorted(m.topic for m in msgs) == [f"edge/devices/{d}/{kind}" for d in devices]


def test_collector_acks_reach_the_device(broker: Broker) -> None:
    collector = broker.client(broker.add_collector("coll-1"))
    acks = broker.subscribe("edge/devices/dev-1/results/ack", broker.add_device("dev-1", "f1"))
    assert publish_reason(collector, "edge/devices/dev-1/results/ack", b"ack") == 0
    assert [m.payload for m in acks.wait_for(lambda m: len(m) == 1)] == [b"ack"]


@pytest.mark.parametrize(
    "topic",
    [
        *DESIRED,
        *ELSEWHERE,
        "edge/devices/dev-1/results",  # forging a device's results
        "edge/devices/dev-1/status",
        "edge/devices/coll-1/status",  # the device patterns (%u) do not make it a device
        "edge/devices/coll-1/results",
    ],
)
def test_collector_writes_nothing_but_acks(broker: Broker, topic: str) -> None:
    collector = broker.client(broker.add_collector("coll-1"))
    broker.add_device("dev-1", fleet="f1")
    seen = broker.subscribe("edge/#")
    assert publish_reason(collector, topic) == 135
    # Nothing reached subscribers: the ack sent after it arrives alone.
    assert publish_reason(collector, "edge/devices/dev-1/results/ack", b"marker") == 0
    assert until_marker(seen) == ["edge/devices/dev-1/results/ack"]


def test_collector_reads_no_desired_state_artifacts_commands_or_acks(broker: Broker) -> None:
    collector = broker.add_collector("coll-1")
    retain_all(broker, [*DESIRED, *ELSEWHERE])
    seen = broker.subscribe("edge/#", collector)
    op = broker.client()
    op.publish("edge/devices/dev-1/results/ack", b"ack", qos=1).wait_for_publish(5)
    op.publish("edge/devices/dev-1/events", b"marker", qos=1).wait_for_publish(5)
    assert until_marker(seen) == ["edge/devices/dev-1/events"]


@pytest.mark.parametrize(
    "topic",
    [
        *DESIRED,
        *ELSEWHERE,
        *(f"edge/devices/dev-1/{kind}" for kind in KINDS),
        "edge/devices/dev-1/results/ack",
        "edge/devices/exporter/status",  # its own name, as if it were a device
        "edge/devices/exporter/health",
        "edge/fleet-tools/abc/barrier",
    ],
)
def test_reader_cannot_publish_anything(broker: Broker, topic: str) -> None:
    reader = broker.client(broker.add_reader("exporter"))
    broker.add_device("dev-1", fleet="f1")
    seen = broker.subscribe("edge/#")
    assert publish_reason(reader, topic) == 135
    broker.client().publish("edge/devices/dev-1/events", b"marker", qos=1).wait_for_publish(5)
    assert until_marker(seen) == ["edge/devices/dev-1/events"]


def test_reader_reads_status_health_events_and_desired_state(broker: Broker) -> None:
    reader = broker.add_reader("exporter")
    retain_all(broker, [*DESIRED, *ELSEWHERE, "edge/devices/dev-1/status"])
    seen = broker.subscribe("edge/#", reader)
    op = broker.client()
    for topic in ["edge/devices/dev-1/results", "edge/devices/dev-1/results/ack",
                  "edge/devices/dev-1/health", "edge/devices/dev-1/events"]:  # fmt: skip
        op.publish(topic, b"x", qos=1).wait_for_publish(5)
    op.publish("edge/devices/dev-2/events", b"marker", qos=1).wait_for_publish(5)
    assert until_marker(seen) == sorted(
        [
            *DESIRED,
            "edge/devices/dev-1/status",
            "edge/devices/dev-1/health",
            "edge/devices/dev-1/events",
            "edge/devices/dev-2/events",
        ]
    )


def test_collectors_and_readers_log_in_on_the_operator_listener_only(broker: Broker) -> None:
    for creds in (broker.add_collector("coll-1"), broker.add_reader("exporter")):
        assert broker.can_login(creds)
        assert not broker.can_login(replace(creds, role="device"))
