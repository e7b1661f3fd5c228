"""Retained state survives a broker crash, saved by time; chunk-sized messages pass."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.fixtures.broker import Broker

SAVING = "Saving in-memory database"


def saves(broker: Broker) -> int:
    """How many times the broker wrote its database, from its whole log."""
    return sum(p.read_text().count(SAVING) for p in broker.logs if p.exists())


# mosquitto writes its whole database every autosave_interval seconds (1 s in the test
# brokers, 30 s as shipped): a crash before the next save loses what changed since the
# last one. Each test waits for the save, then crashes.


def saved(broker: Broker, marker: bytes, timeout: float = 10) -> None:
    """Wait until mosquitto's database file holds ``marker``: the save after that change."""
    db = broker.data_dir / "mosquitto.db"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if db.is_file() and marker in db.read_bytes():
            return
        time.sleep(0.02)
    raise AssertionError(f"{db} never held {marker!r}")


@pytest.mark.parametrize(
    ("autosave", "expected"),
    # Count mode: about one save per message (two PUBACKs in one loop make one save).
    [({"autosave_changes": 1}, range(20, 42)), ({"autosave_interval": None}, range(1))],
    ids=["count-1 (before)", "shipped default"],
)
def test_saves_do_not_follow_the_message_rate(
    broker_factory: Callable[..., Broker], autosave: dict[str, int | None], expected: range
) -> None:
    """mosquitto 2.0 counts every acknowledged QoS 1 delivery as a change: with
    autosave_on_changes and a count of 1, a collector subscribed at QoS 1 means one
    full database save (and one log line) per message a device sends."""
    broker = broker_factory(**autosave)
    device = broker.add_device("dev-1", fleet="f1")
    collected = broker.subscribe("edge/devices/+/health", qos=1)
    before = saves(broker)
    client = broker.client(device)
    for i in range(40):
        client.publish("edge/devices/dev-1/health", b"%d" % i, qos=1).wait_for_publish(5)
    collected.wait_for(lambda m: len(m) == 40)
    time.sleep(0.3)  # the save after the last PUBACK, in count mode
    assert saves(broker) - before in expected


def test_the_shipped_default_saves_every_30_s(broker_factory: Callable[..., Broker]) -> None:
    conf = broker_factory(autosave_interval=None).conf.read_text()
    assert "\nautosave_on_changes false\nautosave_interval 30\n" in conf


def test_retained_messages_survive_kill_9(broker: Broker) -> None:
    op = broker.client()
    op.publish("edge/fleets/f1/models/m/desired", b"v1", qos=1, retain=True).wait_for_publish(5)
    # The newer message is the one the default autosave (1800 s) would lose.
    op.publish("edge/fleets/f1/models/m/desired", b"v2", qos=1, retain=True).wait_for_publish(5)
    op.publish("edge/artifacts/abc/0", b"chunk-9f1e", qos=1, retain=True).wait_for_publish(5)
    saved(broker, b"chunk-9f1e")  # the last change is on disk: crash now
    broker.kill()
    broker.start()
    seen = broker.subscribe("edge/#")
    msgs = seen.wait_for(lambda m: len(m) >= 2)
    assert {m.topic: m.payload for m in msgs} == {
        "edge/fleets/f1/models/m/desired": b"v2",
        "edge/artifacts/abc/0": b"chunk-9f1e",
    }
    assert all(m.retain for m in msgs)


def test_cleared_retained_message_stays_cleared_after_kill_9(broker: Broker) -> None:
    op = broker.client()
    op.publish("edge/devices/d/models/m/desired", b"v1", qos=1, retain=True).wait_for_publish(5)
    op.publish("edge/devices/d/models/m/desired", b"", qos=1, retain=True).wait_for_publish(5)
    op.publish("edge/devices/d/commands/x", b"marker-5c2a", qos=1, retain=True).wait_for_publish(5)
    saved(broker, b"marker-5c2a")  # saved after the clearing, which came first
    broker.kill()
    broker.start()
    seen = broker.subscribe("edge/#")
    msgs = seen.wait_for(lambda m: len(m) >= 1)
    assert [m.topic for m in msgs] == ["edge/devices/d/commands/x"]


def test_256_kib_chunk_passes_and_4_mib_limit_is_configured(broker: Broker) -> None:
    chunk = bytes(range(256)) * 1024  # 256 KiB, the default chunk size
    seen = broker.subscribe("edge/artifacts/#")
    op = broker.client()
    op.publish("edge/artifacts/abc/0", chunk, qos=1, retain=True).wait_for_publish(5)
    msgs = seen.wait_for(lambda m: len(m) >= 1)
    assert msgs[0].payload == chunk
    assert "max_packet_size 4194304" in broker.conf.read_text()


def test_oversize_packet_disconnects_the_publisher(broker: Broker) -> None:
    seen = broker.subscribe("edge/artifacts/#")
    op = broker.client()
    op.publish("edge/artifacts/abc/0", b"\0" * (4 * 1024 * 1024 + 1), qos=1)
    # No PUBACK with a reason: the broker drops the connection. paho then resends the
    # same message on every reconnect, which is why agent/mqtt.py refuses payloads over
    # the broker's Maximum Packet Size before they reach paho.
    deadline = time.monotonic() + 10
    while "disconnected due to oversize packet" not in broker.log():
        assert time.monotonic() < deadline, broker.log()
        time.sleep(0.05)
    op.loop_stop()
    assert seen.messages == []
