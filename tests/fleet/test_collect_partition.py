"""``edge-fleet collect --partition I/N``: collectors without shared subscriptions (MQTT
3.1.1, as on NATS), each storing and acknowledging only its own devices.

Two collectors on a real mosquitto over MQTT 3.1.1, partitions 0/2 and 1/2, each with
its own SQLite file; devices publish result batches as the agent builds them
(agent/wire/payloads.py) over MQTT 3.1.1 with their own accounts.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.wire import payloads
from fleet.cli import main
from fleet.collector import Collector, Settings, parse_partition, partition_of
from fleet.connection import BrokerOptions
from fleet.db import open_database
from tests.fixtures.broker import HOST, Broker, Creds
from tests.fleet.test_collect import acked, batch, seqs_stored, wait_for

DEVICES = [f"pi-{i}" for i in range(1, 9)]


class Device311:
    """A device on MQTT 3.1.1: its retained status, then result batches (QoS 1)."""

    def __init__(self, broker: Broker, device: str) -> None:
        self.id = device
        creds = broker.add_device(device, "default")
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{device}-{uuid.uuid4().hex[:6]}",
            protocol=mqtt.MQTTv311,
        )
        self.client.username_pw_set(creds.username, creds.password)
        connected = threading.Event()
        self.client.on_connect = lambda *a: connected.set()
        self.client.connect(HOST, broker.port, keepalive=30)
        self.client.loop_start()
        assert connected.wait(10), f"{device}: no CONNACK"
        status = payloads.status(device, "default", payloads.ONLINE, {})
        self.publish(f"edge/devices/{device}/status", payloads.encode(status), retain=True)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def results(self, seqs: list[int]) -> None:
        self.publish(f"edge/devices/{self.id}/results", batch(self.id, seqs))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def devices(broker: Broker) -> Iterator[list[Device311]]:
    made = [Device311(broker, d) for d in DEVICES]
    yield made
    for d in made:
        d.close()


@pytest.fixture
def partitioned(broker: Broker) -> Iterator[Callable[..., Collector]]:
    creds: Creds = broker.add_collector("collector-p")
    made: list[Collector] = []

    def start(url: str, part: tuple[int, int], **settings: Any) -> Collector:
        options = BrokerOptions(
            url=broker.operator_url, host=HOST, port=broker.operator_port, tls=False,
            username=creds.username, password=creds.password, protocol="3.1.1",
        )  # fmt: skip
        s = Settings(client_id=f"collector-{part[0]}of{part[1]}", partition=part, **settings)
        c = Collector(options, open_database(url), s)
        c.start()
        made.append(c)
        return c

    yield start
    for c in made:
        c.stop()
        c.database.close()


def test_parse_partition_names_the_flag() -> None:
    assert parse_partition("1/4") == (1, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/65", "0/0"):
        with pytest.raises(Exception, match=rf"--partition: '{bad}' is not I/N"):
            parse_partition(bad)


def test_each_device_is_stored_once_and_acked_by_its_owner_only(
    broker: Broker,
    partitioned: Callable[..., Collector],
    devices: list[Device311],
    tmp_path: Any,
) -> None:
    owners = {d: partition_of(d, 2) for d in DEVICES}
    assert set(owners.values()) == {0, 1}, owners  # both collectors own some
    acks = broker.subscribe("edge/devices/+/results/ack")
    urls = [f"sqlite:///{tmp_path / f'p{i}.db'}" for i in (0, 1)]
    collectors = [partitioned(urls[i], (i, 2)) for i in (0, 1)]
    for c in collectors:
        assert c.client is not None and not c.client.mqtt5
        # Subscribed: every device's retained status came to each collector.
        wait_for(
            lambda c=c: (
                c.metrics.value("edge_collector_messages_total", kind="status")
                + c.metrics.value("edge_collector_skipped_messages_total", reason="other_partition")
                >= len(DEVICES)
            ),
            what="the retained statuses",
        )
    for d in devices:
        d.results([1, 2, 3])
        d.results([4, 5])
    for d in DEVICES:
        wait_for(lambda d=d: acked(acks, d) == {1, 2, 3, 4, 5}, what=f"acks of {d}")

    for d in DEVICES:
        owner = owners[d]
        assert seqs_stored(urls[owner], d) == [1, 2, 3, 4, 5]
        assert seqs_stored(urls[1 - owner], d) == []
        named = {
            payloads.decode(m.payload, m.topic)["collector"]
            for m in acks.on(f"edge/devices/{d}/results/ack")
        }
        assert named == {f"collector-{owner}of2"}, (d, named)
    for i, c in enumerate(collectors):
        mine = sum(1 for o in owners.values() if o == i)
        assert c.metrics.value("edge_collector_rows_stored_total", table="results") == 5 * mine
        assert c.metrics.value("edge_collector_duplicates_total") == 0
        others = len(DEVICES) - mine
        # Theirs: a status and two result batches each, PUBACKed and skipped.
        assert c.metrics.value(
            "edge_collector_skipped_messages_total", reason="other_partition"
        ) == pytest.approx(3 * others)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--group", "g", "--mqtt-protocol", "3.1.1"],
         "--group: MQTT 3.1.1 (--mqtt-protocol) has no shared subscriptions; split the devices"
         " between collectors with --partition I/N"),
        (["--partition", "2/2"], "--partition: '2/2' is not I/N with 0 <= I < N <= 64"),
        (["--partition", "0/2", "--group", "g"],
         "--partition 0/2 and --group g: a partitioned collector subscribes without a shared"
         " group; give one of them"),
    ],
)  # fmt: skip
def test_collect_usage_errors_exit_2(
    extra: list[str], message: str, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["collect", "--db", f"sqlite:///{tmp_path / 'c.db'}", "--broker", "mqtt://127.0.0.1:1"]
    assert main([*argv, *extra]) == 2
    assert message in capsys.readouterr().err
