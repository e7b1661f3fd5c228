"""`edge-fleet events` against a real mosquitto and a real collector (`edge-fleet collect`).

Events are built with the agent's own builder (`agent.wire.payloads.event`) and sent by
the operator account standing in for devices; tests/fleet/test_views_e2e.py watches the
events of real agents.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.wire import payloads
from fleet.cli import main
from fleet.db import open_database
from tests.fixtures.broker import Broker
from tests.fleet.test_status import broker_args, publish, status_payload

ROOT = Path(__file__).resolve().parents[2]
REASON = "parity: probabilities row 0 differs by 0.3 (tolerance 1e-05)"

pytestmark = pytest.mark.timeout(120)


def event(device: str, name: str = "rejected", model: str = "iris", **fields: Any) -> bytes:
    body = payloads.event(device, name, model=model, version="1.3.0", serial=9, **fields)
    return payloads.encode(body)


@pytest.fixture
def client(broker: Broker) -> Iterator[mqtt.Client]:
    c = broker.client()
    publish(c, "edge/devices/pi-1/status", status_payload("pi-1", "north"), retain=True)
    publish(c, "edge/devices/pi-2/status", status_payload("pi-2", "north"), retain=True)
    publish(c, "edge/devices/pi-3/status", status_payload("pi-3", "south"), retain=True)
    yield c
    c.disconnect()
    c.loop_stop()


@contextlib.contextmanager
def sending(client: mqtt.Client, make: Callable[[], list[tuple[str, bytes]]]) -> Iterator[None]:
    """Publish ``make()``'s events every 0.1 s until the block ends: a listener that
    subscribes at some moment is sure to receive some."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            for topic, body in make():
                client.publish(topic, body, qos=1)
            stop.wait(0.1)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_line_says_where_an_artifact_came_from_and_why_it_fell_back() -> None:
    from fleet.events import detail

    url = "https://cdn.example/9f2c"
    verified = payloads.event("pi-1", payloads.VERIFIED, artifact_source="origin", url=url)
    assert detail(verified) == f"from {url}"
    chunks = payloads.event("pi-1", payloads.VERIFIED, artifact_source="broker_chunks")
    assert detail(chunks) == "from broker_chunks"
    why = f"no origin served it (artifact origin {url}: HTTP 404 Not Found); broker chunks instead"
    fallback = payloads.event("pi-1", payloads.ARTIFACT_FALLBACK, artifact_source="broker_chunks",
                              errors=[{"url": url, "error": "HTTP 404"}], reason=why)  # fmt: skip
    assert detail(fallback) == why


def test_live_events_while_waiting_filtered_by_fleet_and_model(
    broker: Broker, client: mqtt.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    def batch() -> list[tuple[str, bytes]]:
        return [
            ("edge/devices/pi-1/events", event("pi-1", reason=REASON, retry=False)),
            ("edge/devices/pi-2/events", event("pi-2", "activated", model="wine", previous="1.0")),
            ("edge/devices/pi-3/events", event("pi-3", "rolled_back", from_version="1.4.0")),
        ]

    with sending(client, batch):
        code, out, err = run(capsys, "events", "--json", "--wait", "1.5", "--fleet", "north",
                             "--model", "iris", *broker_args(broker))  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert doc["source"] == "live" and doc["events"]
    assert {(e["device"], e["model"], e["event"]) for e in doc["events"]} == {
        ("pi-1", "iris", "rejected")
    }
    first = doc["events"][0]
    assert (first["version"], first["serial"], first["reason"]) == ("1.3.0", 9, REASON)

    with sending(client, batch):
        code, out, _ = run(capsys, "events", "--wait", "1.5", "--device", "pi-3",
                           *broker_args(broker))  # fmt: skip
    line = out.splitlines()[0]
    stamp, device, model, version, name, *rest = line.split()
    assert (device, model, version, name) == ("pi-3", "iris", "1.3.0", "rolled_back")
    assert stamp.endswith("Z") and len(stamp) == 20  # to the second, UTC
    assert " ".join(rest) == "from 1.4.0"


def test_nothing_heard_says_events_are_not_retained(
    broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "events", "--wait", "0.3", *broker_args(broker))
    assert (code, out) == (0, "")
    assert "events are not retained: --db URL reads the ones the collector stored" in err


@pytest.fixture
def collector(broker: Broker, tmp_path: Path) -> Iterator[str]:
    """A real ``edge-fleet collect`` storing into SQLite; yields the database URL."""
    creds = broker.add_collector("central")
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    log = (tmp_path / "collect.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet", "collect", "--db", url, "--broker", broker.operator_url,
         "--username", creds.username, "--password-file", str(creds.password_file)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def stored_events(url: str, n: int, timeout: float = 30) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            db = open_database(url, create=False)
            try:
                rows = db.query_events()
            finally:
                db.close()
            if len(rows) >= n:
                return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"the collector stored no {n} events within {timeout} s")
        time.sleep(0.2)


def test_stored_events_then_live_ones_each_once(
    broker: Broker, client: mqtt.Client, collector: str, capsys: pytest.CaptureFixture[str]
) -> None:
    first = event("pi-1", reason=REASON, retry=False)
    south = event("pi-3", "not_in_rollout", reason="not in rollout (bucket 52 >= 50%)")
    # The collector takes a device's events once it knows its fleet (from the status).
    deadline = time.monotonic() + 30
    while len(stored_events(collector, 0)) < 2 and time.monotonic() < deadline:
        client.publish("edge/devices/pi-1/events", first, qos=1)
        client.publish("edge/devices/pi-3/events", south, qos=1)
        time.sleep(1)
    assert len(stored_events(collector, 2)) == 2  # redeliveries are stored once

    code, out, err = run(capsys, "events", "--db", collector, *broker_args(broker))
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].split()[1:5] == ["pi-1", "iris", "1.3.0", "rejected"]
    assert lines[0].endswith(REASON)
    code, out, _ = run(capsys, "events", "--db", collector, "--fleet", "south", "--json",
                       *broker_args(broker))  # fmt: skip
    doc = json.loads(out)
    assert doc["source"] == "db"
    assert [(e["device"], e["event"]) for e in doc["events"]] == [("pi-3", "not_in_rollout")]
    code, out, _ = run(capsys, "events", "--db", collector, "--since", "1h", "--limit", "1",
                       "--json", *broker_args(broker))  # fmt: skip
    assert len(json.loads(out)["events"]) == 1

    # --db --follow: the stored ones, then live ones; the same payload again (a device
    # resending) is shown once.
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet", "events", "--db", collector, "--follow", "--json",
         "--device", "pi-1", *broker_args(broker)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        got = json.loads(proc.stdout.readline())
        assert (got["device"], got["event"], got["reason"]) == ("pi-1", "rejected", REASON)
        second = event("pi-1", "activated", previous="1.2.0")
        with sending(client, lambda: [("edge/devices/pi-1/events", first),
                                      ("edge/devices/pi-1/events", second)]):  # fmt: skip
            nxt = json.loads(proc.stdout.readline())
        assert (nxt["event"], nxt["detail"]) == ("activated", "was 1.2.0")
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0
        # Each payload once, however often it was sent; never the stored one again.
        assert rest == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
