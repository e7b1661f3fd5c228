"""``edge-fleet`` against a real 3-node NATS cluster, which speaks MQTT 3.1.1 only.

Publish through node 1 with ``--mqtt-protocol auto`` (it settles on 3.1.1) and read the
retained desired state and chunks on node 3; ``status``, ``list`` and ``history`` through
node 2; a collector on node 3 (``--broker`` node 3 then node 1) storing what a device on
node 1 sends, kill -9 of node 3, and the collector going on through node 1 with nothing
lost.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.wire import payloads
from agent.wire.manifest import parse_manifest
from fleet.cli import main
from fleet.connection import broker_options
from fleet.retained import Session
from tests.fixtures.broker import HOST, free_port
from tests.fixtures.models import Keypair
from tests.fixtures.nats import PASSWORD, USER, NatsCluster, NatsNode, mqtt_client
from tests.fleet.test_collect import batch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
WAIT = 60.0  # a JetStream leader election after a kill takes seconds on a busy machine


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "harness.password"
    path.write_text(PASSWORD + "\n")
    return path


def broker_args(password_file: Path, *nodes: NatsNode) -> list[str]:
    urls = [a for n in nodes for a in ("--broker", n.mqtt_url)]
    return [*urls, "--username", USER, "--password-file", str(password_file)]


def read_on(node: NatsNode, password_file: Path, *filters: str) -> dict[str, bytes]:
    """Retained messages on ``filters``, read through ``node`` with edge-fleet's Session."""
    ns = argparse.Namespace(broker=[node.mqtt_url], username=USER,
                            password_file=str(password_file))  # fmt: skip
    session = Session(broker_options(ns, environ={}), "test")
    try:
        assert not session.client.mqtt5
        return session.read_retained(list(filters), timeout=WAIT)
    finally:
        session.close()


def publish_on(node: NatsNode, topic: str, payload: bytes, *, retain: bool = False) -> None:
    client = mqtt_client()
    client.connect(HOST, node.mqtt_port, keepalive=30)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(WAIT)
        assert info.is_published(), f"no PUBACK from {node.name} for {topic}"
    finally:
        client.disconnect()
        client.loop_stop()


def test_publish_on_node_1_is_read_on_node_3_and_status_on_node_2(
    nats_cluster: NatsCluster,
    keypair: Keypair,
    iris_package: Path,
    password_file: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    node1, node2, node3 = (nats_cluster.node(i) for i in (1, 2, 3))
    argv = ["publish", str(iris_package), "--fleet", "f1", "--chunk-size", "512",
            "--signing-key", str(keypair.key), "--mqtt-protocol", "auto",
            *broker_args(password_file, node1)]  # fmt: skip
    assert main(argv) == 0
    assert "iris 1.0.0: desired for fleet f1 (serial 1" in capsys.readouterr().out
    assert "denied publishes not checked under MQTT 3.1.1" in caplog.text

    topic = "edge/fleets/f1/models/iris/desired"
    manifest = parse_manifest(json.loads(read_on(node3, password_file, topic)[topic]))
    sha, chunks = manifest.artifact.sha256, manifest.artifact.chunks
    got = read_on(node3, password_file, f"edge/artifacts/{sha}/+")
    data = b"".join(got[f"edge/artifacts/{sha}/{i}"] for i in range(chunks))
    assert data == (iris_package / "model.onnx").read_bytes()

    # A device on node 1 says it is online; status, list and history through node 2.
    status = payloads.status("pi-1", "f1", payloads.ONLINE, {})
    publish_on(node1, "edge/devices/pi-1/status", payloads.encode(status), retain=True)
    # Each node learns a retained message published elsewhere from JetStream, a moment
    # later; a status command run just then would not see it yet (nor would it later).
    deadline = time.monotonic() + WAIT
    while not read_on(node2, password_file, "edge/devices/pi-1/status"):
        assert time.monotonic() < deadline, "the retained status never reached node 2"
        time.sleep(0.2)
    assert main(["status", "--json", "--wait", "2", *broker_args(password_file, node2)]) == 0
    view = json.loads(capsys.readouterr().out)
    assert view["broker"] == node2.mqtt_url
    assert [(d["device"], d["state"]) for d in view["devices"]] == [("pi-1", "online")]
    assert main(["list", "--json", *broker_args(password_file, node2)]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [(r["fleet"], r["model"], r["version"]) for r in listing["desired"]] == [
        ("f1", "iris", "1.0.0")
    ]
    assert main(["history", "iris", "--fleet", "f1", "--json",
                 *broker_args(password_file, node2)]) == 0  # fmt: skip
    history = json.loads(capsys.readouterr().out)
    assert [e["version"] for e in history["history"]] == ["1.0.0"]


# --- a collector across a node's death ------------------------------------------------


class CollectCommand:
    """``edge-fleet collect`` as a process; its metrics tell whether it is connected."""

    def __init__(self, db: str, password_file: Path, *nodes: NatsNode) -> None:
        self.port = free_port()
        self.log_path = Path(db.removeprefix("sqlite:///")).with_suffix(".log")
        argv = [sys.executable, "-m", "fleet", "collect", "--db", db, "--mqtt-protocol",
                "3.1.1", "--client-id", "collector-nats", "--metrics", f"127.0.0.1:{self.port}",
                *broker_args(password_file, *nodes)]  # fmt: skip
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_started(self) -> None:
        """Until it is subscribed (it logs where it stores once the SUBACK came)."""
        deadline = time.monotonic() + WAIT
        while "collector: storing into" not in self.output():
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.1)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def collect(tmp_path: Path, password_file: Path) -> Iterator[list[CollectCommand]]:
    made: list[CollectCommand] = []
    yield made
    for c in made:
        c.close()


def stored(db: str) -> list[int]:
    path = db.removeprefix("sqlite:///")
    if not Path(path).exists():
        return []
    with sqlite3.connect(path) as conn:
        try:
            rows = conn.execute("SELECT seq FROM results WHERE device = 'pi-1' ORDER BY seq")
            return [int(r[0]) for r in rows]
        except sqlite3.OperationalError:
            return []  # not made yet


def wait_stored(db: str, want: list[int], command: CollectCommand, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while stored(db) != want:
        assert command.proc.poll() is None, command.output()
        if time.monotonic() > deadline:
            raise AssertionError(f"stored {stored(db)}, want {want}\n{command.output()[-3000:]}")
        time.sleep(0.2)


class Device:
    """pi-1 on node 1 over MQTT 3.1.1: its status, then result batches (QoS 1)."""

    def __init__(self, node: NatsNode) -> None:
        self.client = mqtt_client("pi-1")
        connected = threading.Event()
        self.client.on_connect = lambda *a: connected.set()
        self.client.connect(HOST, node.mqtt_port, keepalive=30)
        self.client.loop_start()
        assert connected.wait(WAIT), "pi-1: no CONNACK from node 1"
        status = payloads.status("pi-1", "f1", payloads.ONLINE, {})
        self.send("edge/devices/pi-1/status", payloads.encode(status), retain=True)

    def send(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(WAIT)
        assert info.is_published(), f"no PUBACK for {topic}"

    def results(self, seqs: list[int]) -> None:
        self.send("edge/devices/pi-1/results", batch("pi-1", seqs))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_collector_moves_to_node_1_when_node_3_dies_and_loses_nothing(
    nats_cluster: NatsCluster,
    collect: list[CollectCommand],
    password_file: Path,
    tmp_path: Path,
) -> None:
    node1, node3 = nats_cluster.node(1), nats_cluster.node(3)
    db = f"sqlite:///{tmp_path / 'collect.db'}"
    command = CollectCommand(db, password_file, node3, node1)
    collect.append(command)
    command.wait_started()  # results sent before the subscription would reach nobody
    device = Device(node1)
    try:
        device.results([1, 2, 3])
        device.results([4, 5])
        wait_stored(db, [1, 2, 3, 4, 5], command)
        assert "over MQTT 3.1.1" in command.output()

        nats_cluster.kill9(node3)
        # While the collector finds node 1 (and JetStream elects new leaders), the
        # device goes on sending: the collector's persistent session keeps it.
        device.results([6, 7])
        device.results([8, 9, 10])
        wait_stored(db, list(range(1, 11)), command)
        output = command.output()
        assert f"connected to {node1.mqtt_url} (moved from {node3.mqtt_url})" in output, output
        device.results([11])
        wait_stored(db, list(range(1, 12)), command)
    finally:
        device.close()
