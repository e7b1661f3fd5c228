"""Retained state survives a broker crash; chunk-sized messages pass the size limit."""

from __future__ import annotations

import time

from tests.fixtures.broker import Broker

# mosquitto writes its database right after the loop iteration that handled the change,
# just after the PUBACK went out: a crash inside that window (a few milliseconds for a
# small database) still loses the newest change. Crash after it.


def saved(broker: Broker, marker: bytes, timeout: float = 10) -> None:
    """Wait until mosquitto's database file holds ``marker``: the save after that change."""
    db = broker.data_dir / "mosquitto.db"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if db.is_file() and marker in db.read_bytes():
            return
        time.sleep(0.02)
    raise AssertionError(f"{db} never held {marker!r}")


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
