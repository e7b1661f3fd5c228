"""`edge-fleet collect`: results, health, events and status from a real mosquitto into
SQLite and PostgreSQL, acknowledged to the devices only after the commit.

Devices publish as the agent does (their own accounts, the payload builders of
agent/wire/payloads.py); acks are watched by an operator on every device's ack topic.
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.wire import payloads
from fleet.collector import Collector, Settings, merge_ranges
from fleet.connection import BrokerOptions
from fleet.db import open_database
from tests.fixtures.broker import HOST, Broker, Creds, MessageLog, free_port
from tests.fixtures.postgres import Postgres

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_767_000_000.0


# --- what a device sends -------------------------------------------------------------


def batch(device: str, seqs: list[int], *, model: str = "iris", version: str = "1.0.0") -> bytes:
    """A results batch built as the forwarder builds it."""
    rows = [
        payloads.result_json(
            s, t=T0 + s, model=model, version=version, inputs="[[5.1,3.5,1.4,0.2]]",
            outputs='{"prediction":[0]}', latency_ms=0.8, request_id=f"r{s}",
        )
        for s in seqs
    ]  # fmt: skip
    return payloads.results_head(device) + ",".join(rows).encode() + payloads.RESULTS_TAIL


class Device:
    """A device's MQTT client: its retained status first, as the agent does at connect."""

    def __init__(self, broker: Broker, device: str, fleet: str = "default") -> None:
        self.id = device
        self.fleet = fleet
        self.creds = broker.add_device(device, fleet)
        self.client = broker.client(self.creds)
        status = payloads.status(device, fleet, payloads.ONLINE, {})
        self.publish(f"edge/devices/{device}/status", payloads.encode(status), retain=True)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)

    def results(self, seqs: list[int], **kw: Any) -> None:
        self.publish(f"edge/devices/{self.id}/results", batch(self.id, seqs, **kw))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def acked(log: MessageLog, device: str) -> set[int]:
    """Every seq the collector acknowledged to ``device``."""
    seqs: set[int] = set()
    for m in log.on(f"edge/devices/{device}/results/ack"):
        ack = payloads.check_ack(payloads.decode(m.payload, m.topic), m.topic)
        assert ack["device"] == device
        for first, last in payloads.ack_ranges(ack):
            seqs.update(range(first, last + 1))
    return seqs


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(0.05)


def count(url: str, table: str, where: str = "") -> int:
    """Rows of ``table`` in the collector's database, read with the engine's own driver."""
    sql = f"SELECT count(*) FROM {table} {where}"
    if url.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as conn:
            return int(conn.execute(sql).fetchone()[0])
    import psycopg

    with psycopg.connect(url, connect_timeout=5) as conn:
        row = conn.execute(sql).fetchone()
        assert row is not None
        return int(row[0])


def seqs_stored(url: str, device: str) -> list[int]:
    database = open_database(url)
    try:
        return sorted(r["seq"] for r in database.query_results(device=device))
    finally:
        database.close()


# --- the collector, in this process or as the command -------------------------------


@pytest.fixture
def collector_creds(broker: Broker) -> Creds:
    return broker.add_collector("collector-1")


@pytest.fixture
def acks(broker: Broker) -> MessageLog:
    return broker.subscribe("edge/devices/+/results/ack")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'collect.db'}"


@pytest.fixture
def collectors(broker: Broker, collector_creds: Creds) -> Iterator[Callable[..., Collector]]:
    """Start collectors in this process; each stopped (SIGTERM's path) after the test."""
    made: list[Collector] = []

    def start(url: str, client_id: str = "collector-a", **settings: Any) -> Collector:
        options = BrokerOptions(
            url=broker.operator_url, host=HOST, port=broker.operator_port, tls=False,
            username=collector_creds.username, password=collector_creds.password,
        )  # fmt: skip
        c = Collector(options, open_database(url), Settings(client_id=client_id, **settings))
        c.start()
        made.append(c)
        return c

    yield start
    for c in made:
        c.stop()
        c.database.close()


def ready(c: Collector, statuses: int = 1) -> None:
    """Subscribed: the retained status of ``statuses`` devices came (one SUBSCRIBE for all)."""
    wait_for(
        lambda: c.metrics.value("edge_collector_messages_total", kind="status") >= statuses,
        what="the retained status",
    )


class Command:
    """`edge-fleet collect` as a process, with its /metrics to watch it."""

    def __init__(self, broker: Broker, creds: Creds, url: str, *extra: str) -> None:
        self.port = free_port()
        self.args = [
            sys.executable, "-m", "fleet", "collect", "--db", url,
            "--broker", broker.operator_url, "--username", creds.username,
            "--password-file", str(creds.password_file), "--client-id", "collector-cmd",
            "--metrics", f"127.0.0.1:{self.port}", *extra,
        ]  # fmt: skip
        self.proc = self.start()

    def start(self) -> subprocess.Popen[str]:
        self.proc = subprocess.Popen(
            self.args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        return self.proc

    def metric(self, name: str, **labels: str) -> float | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return None
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and s.labels == labels:
                    return float(s.value)
        return None

    def wait_metric(self, name: str, at_least: float, **labels: str) -> None:
        assert self.proc.poll() is None, self.proc.communicate()[1]
        wait_for(
            lambda: (self.metric(name, **labels) or 0) >= at_least or self.proc.poll() is not None,
            what=f"{name}{labels} >= {at_least}",
        )
        assert self.proc.poll() is None, self.proc.communicate()[1]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def command(broker: Broker, collector_creds: Creds) -> Iterator[Callable[..., Command]]:
    made: list[Command] = []

    def start(url: str, *extra: str) -> Command:
        made.append(Command(broker, collector_creds, url, *extra))
        return made[-1]

    yield start
    for c in made:
        c.close()


# --- storing and acknowledging -------------------------------------------------------


def test_merge_ranges_joins_adjacent_and_overlapping_ranges_only() -> None:
    assert merge_ranges([(11, 20), (1, 10), (30, 31), (15, 25)]) == [(1, 25), (30, 31)]
    assert merge_ranges([(5, 5)]) == [(5, 5)]


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_results_are_stored_then_acked_with_the_ranges_stored(
    engine: str,
    request: pytest.FixtureRequest,
    broker: Broker,
    collectors: Callable[..., Collector],
    acks: MessageLog,
) -> None:
    url = request.getfixturevalue("sqlite_url" if engine == "sqlite" else "pg_url")
    device = Device(broker, "pi-1")
    c = collectors(url)
    ready(c)
    device.results([1, 2, 3])
    device.results([4, 5, 6])
    device.results([7, 9])  # the device dropped 8: [7, 9] is still one range to delete
    wait_for(lambda: acked(acks, "pi-1") == set(range(1, 10)), what="acks for 1..9")
    assert seqs_stored(url, "pi-1") == [1, 2, 3, 4, 5, 6, 7, 9]
    ranges = [
        r
        for m in acks.on("edge/devices/pi-1/results/ack")
        for r in payloads.ack_ranges(payloads.decode(m.payload, m.topic))
    ]
    assert all(r in [(1, 3), (4, 6), (7, 9), (1, 6), (4, 9), (1, 9)] for r in ranges), ranges
    ack = payloads.decode(acks.on("edge/devices/pi-1/results/ack")[0].payload, "ack")
    assert ack["collector"] == "collector-a"
    assert c.metrics.value("edge_collector_rows_stored_total", table="results") == 8


def test_a_duplicate_batch_is_stored_once_and_acked_again(
    broker: Broker, collectors: Callable[..., Collector], acks: MessageLog, sqlite_url: str
) -> None:
    device = Device(broker, "pi-1")
    c = collectors(sqlite_url)
    ready(c)
    device.results([1, 2, 3])
    acks.wait_for(lambda ms: len(ms) >= 1)
    device.results([1, 2, 3])  # no ack came in time, say: the device sends it again
    acks.wait_for(lambda ms: len(ms) >= 2)
    assert acked(acks, "pi-1") == {1, 2, 3}
    assert seqs_stored(sqlite_url, "pi-1") == [1, 2, 3]
    assert c.metrics.value("edge_collector_duplicates_total") == 3
    assert c.metrics.value("edge_collector_rows_stored_total", table="results") == 3


def test_health_events_and_status_are_stored(
    broker: Broker, collectors: Callable[..., Collector], sqlite_url: str
) -> None:
    device = Device(broker, "pi-1", fleet="north")
    c = collectors(sqlite_url)
    ready(c)
    health = payloads.health("pi-1", "north", {"uptime_s": 12.0, "cpu_percent": 3.5})
    device.publish("edge/devices/pi-1/health", payloads.encode(health))
    event = payloads.event("pi-1", payloads.ACTIVATED, model="iris", version="1.0.0", serial=3)
    device.publish("edge/devices/pi-1/events", payloads.encode(event))
    device.publish("edge/devices/pi-1/events", payloads.encode(event))  # redelivered: once
    offline = payloads.status("pi-1", "north", payloads.OFFLINE, {}, t=T0 + 60)
    device.publish("edge/devices/pi-1/status", payloads.encode(offline), retain=True)
    wait_for(
        lambda: (
            c.metrics.value("edge_collector_batches_total") >= 1
            and count(sqlite_url, "status") == 2
            and count(sqlite_url, "health") == 1
            and count(sqlite_url, "events") == 1
        ),
        what="one health, one event and two status rows",
    )


def test_an_invalid_message_is_refused_with_its_reason_and_the_stream_goes_on(
    broker: Broker,
    collectors: Callable[..., Collector],
    acks: MessageLog,
    sqlite_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    device = Device(broker, "pi-1")
    c = collectors(sqlite_url)
    ready(c)
    caplog.set_level("DEBUG", logger="fleet.intake")
    topic = "edge/devices/pi-1/results"
    device.publish(topic, b"{not json")
    device.publish(topic, b'{"device":"pi-1","results":[{"seq":0}]}')
    device.publish(topic, batch("pi-2", [1]))  # names another device than its topic
    device.publish(topic, batch("pi-1", [2**63]))  # no database column holds it
    device.results([1, 2])
    wait_for(lambda: acked(acks, "pi-1") == {1, 2}, what="the valid batch acked")
    assert c.metrics.value("edge_collector_invalid_messages_total", kind="results") == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings  # once per device; the rest at debug
    assert f"collector: refused {topic}: not JSON" in warnings[0]
    debug = " ".join(r.getMessage() for r in caplog.records if r.levelname == "DEBUG")
    assert "missing time, model, version" in debug
    assert "'pi-2' is not the topic's device 'pi-1'" in debug
    assert f"results[0].seq: {2**63} is past 2**63-1" in debug
    assert seqs_stored(sqlite_url, "pi-1") == [1, 2]


def test_fleet_stores_only_its_fleet_and_waits_for_an_unknown_devices_status(
    broker: Broker, collectors: Callable[..., Collector], acks: MessageLog, sqlite_url: str
) -> None:
    north, south = Device(broker, "n-1", "north"), Device(broker, "s-1", "south")
    c = collectors(sqlite_url, fleet="north", group="edge-collect-north")
    ready(c, statuses=2)
    skipped = c.metrics.value("edge_collector_skipped_messages_total", reason="other_fleet")
    assert skipped == 1  # the south device's status
    south.results([1, 2])
    wait_for(
        lambda: c.metrics.value("edge_collector_skipped_messages_total", reason="other_fleet") == 2
    )
    north.results([1, 2])
    wait_for(lambda: acked(acks, "n-1") == {1, 2})
    assert seqs_stored(sqlite_url, "s-1") == [] and acked(acks, "s-1") == set()
    assert count(sqlite_url, "status", "WHERE device = 's-1'") == 0

    # A device whose status has not come yet: its results wait for it.
    late = broker.add_device("n-2", "north")
    client = broker.client(late)
    client.publish("edge/devices/n-2/results", batch("n-2", [1]), qos=1).wait_for_publish(10)
    wait_for(lambda: c.metrics.value("edge_collector_messages_total", kind="results") == 3)
    assert acked(acks, "n-2") == set()
    status = payloads.status("n-2", "north", payloads.ONLINE, {})
    client.publish("edge/devices/n-2/status", payloads.encode(status), qos=1, retain=True)
    wait_for(lambda: acked(acks, "n-2") == {1}, what="the parked batch stored")
    assert seqs_stored(sqlite_url, "n-2") == [1]
    client.disconnect()


def test_a_burst_over_the_memory_bound_is_left_at_the_broker_and_stored_later(
    broker: Broker, collectors: Callable[..., Collector], acks: MessageLog, sqlite_url: str
) -> None:
    device = Device(broker, "pi-1")
    size = len(batch("pi-1", list(range(1, 21))))
    c = collectors(sqlite_url, max_bytes=3 * size)
    ready(c)
    for n in range(30):  # without waiting for PUBACKs, as fast as paho sends
        device.client.publish(
            "edge/devices/pi-1/results", batch("pi-1", list(range(n * 20 + 1, n * 20 + 21))), qos=1
        )
    wait_for(
        lambda: acked(acks, "pi-1") == set(range(1, 601)), timeout=30, what="every batch acked"
    )
    assert seqs_stored(sqlite_url, "pi-1") == list(range(1, 601))
    assert c.intake.nbytes == 0


# --- processes: SIGTERM, kill -9 ------------------------------------------------------


def test_sigterm_stops_the_command_cleanly(
    broker: Broker, command: Callable[..., Command], acks: MessageLog, sqlite_url: str
) -> None:
    device = Device(broker, "pi-1")
    cmd = command(sqlite_url)
    cmd.wait_metric("edge_collector_messages_total", 1, kind="status")
    device.results([1, 2, 3])
    wait_for(lambda: acked(acks, "pi-1") == {1, 2, 3})
    cmd.proc.send_signal(signal.SIGTERM)
    _, err = cmd.proc.communicate(timeout=15)
    assert cmd.proc.returncode == 0, err
    assert "collector: stopped" in err and "Traceback" not in err


def test_kill_9_before_the_commit_loses_nothing_the_broker_redelivers(
    broker: Broker,
    command: Callable[..., Command],
    acks: MessageLog,
    postgres: Postgres,
    pg_url: str,
) -> None:
    device = Device(broker, "pi-1")
    cmd = command(pg_url)
    cmd.wait_metric("edge_collector_messages_total", 1, kind="status")
    postgres.stop()  # the commit cannot happen: the messages stay un-PUBACKed
    try:
        device.results([1, 2, 3])
        device.results([4, 5])
        cmd.wait_metric("edge_collector_messages_total", 2, kind="results")
        wait_for(lambda: cmd.metric("edge_collector_database_up") == 0)
        assert acked(acks, "pi-1") == set()
        cmd.proc.kill()
        cmd.proc.communicate()
    finally:
        postgres.start()
    cmd.start()  # same client id: the session and its unacknowledged messages
    wait_for(lambda: acked(acks, "pi-1") == {1, 2, 3, 4, 5}, timeout=30, what="acks after restart")
    assert seqs_stored(pg_url, "pi-1") == [1, 2, 3, 4, 5]


def test_kill_9_in_the_middle_of_a_stream_stores_every_row_once(
    broker: Broker, command: Callable[..., Command], acks: MessageLog, sqlite_url: str
) -> None:
    device = Device(broker, "pi-1")
    cmd = command(sqlite_url)
    cmd.wait_metric("edge_collector_messages_total", 1, kind="status")
    for n in range(40):
        device.results(list(range(n * 25 + 1, n * 25 + 26)))
        if n == 15:
            cmd.proc.kill()  # wherever it is: between receive, commit, PUBACK and ack
            cmd.proc.communicate()
        if n == 25:
            cmd.start()
    wait_for(lambda: acked(acks, "pi-1") == set(range(1, 1001)), timeout=30, what="all acked")
    assert seqs_stored(sqlite_url, "pi-1") == list(range(1, 1001))


# --- scale and the database going away ---------------------------------------------


def test_two_collectors_in_one_group_share_the_stream_and_store_each_row_once(
    broker: Broker, collectors: Callable[..., Collector], acks: MessageLog, pg_url: str
) -> None:
    devices = [Device(broker, f"pi-{i}") for i in range(3)]
    a = collectors(pg_url, client_id="collector-a")
    b = collectors(pg_url, client_id="collector-b")
    ready(a, statuses=3)
    ready(b, statuses=3)
    for n in range(20):
        for d in devices:
            d.results(list(range(n * 50 + 1, n * 50 + 51)))
    every = set(range(1, 1001))
    wait_for(lambda: all(acked(acks, d.id) == every for d in devices), timeout=30)
    assert count(pg_url, "results") == 3000
    stored = [c.metrics.value("edge_collector_rows_stored_total", table="results") for c in (a, b)]
    assert sum(stored) == 3000 and min(stored) > 0, stored  # split, each row by one of them
    assert a.metrics.value("edge_collector_duplicates_total") == 0
    assert b.metrics.value("edge_collector_duplicates_total") == 0


def test_database_down_nothing_is_acked_and_everything_is_stored_when_it_returns(
    broker: Broker,
    collectors: Callable[..., Collector],
    acks: MessageLog,
    postgres: Postgres,
    pg_url: str,
) -> None:
    device = Device(broker, "pi-1")
    size = len(batch("pi-1", list(range(1, 11))))
    c = collectors(pg_url, max_bytes=4 * size)  # held: 4 batches; the rest stays at the broker
    ready(c)
    postgres.stop()
    try:
        for n in range(12):
            device.results(list(range(n * 10 + 1, n * 10 + 11)))
        wait_for(lambda: c.metrics.value("edge_collector_messages_total", kind="results") == 12)
        wait_for(lambda: c.metrics.value("edge_collector_database_up") == 0)
        assert c.metrics.value("edge_collector_shed_messages_total") >= 8
        assert c.intake.nbytes <= 4 * size
        assert acked(acks, "pi-1") == set()
    finally:
        postgres.start()
    wait_for(lambda: acked(acks, "pi-1") == set(range(1, 121)), timeout=60, what="all acked")
    assert seqs_stored(pg_url, "pi-1") == list(range(1, 121))
    assert c.metrics.value("edge_collector_database_up") == 1


# --- the command line ------------------------------------------------------------------


def test_help_and_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    from fleet.cli import main

    with pytest.raises(SystemExit) as e:
        main(["collect", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--db", "--fleet", "--group", "--client-id", "--metrics", "--broker"):
        assert flag in out
    assert main(["collect", "--db", "sqlite:///x.db", "--group", "a/b"]) == 2
    assert "--group: 'a/b' is not a plain name" in capsys.readouterr().err
    assert main(["collect", "--db", "sqlite:///x.db", "--metrics", "nowhere"]) == 2
    assert "--metrics: 'nowhere' is not HOST:PORT" in capsys.readouterr().err
