"""mqtt.protocol: MQTT 3.1.1 by choice, MQTT 5 kept where the broker speaks it, 3.1.1
learnt from a broker that does not (NATS), and device commands answered under 3.1.1.

Real brokers only: mosquitto speaks 5 and 3.1.1 on one listener; NATS 2.9 answers a
v5 CONNECT with a 3.1.1 CONNACK, return code 1, and closes the socket.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import struct
import threading
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import Config
from agent.link import Message
from agent.metrics import Metrics
from agent.paho_link import MqttClient
from tests.agent.test_paho_link import make_config, start, wait_until
from tests.fixtures.broker import HOST, Broker, MessageLog, Received
from tests.fixtures.nats import PASSWORD, USER, NatsCluster, NatsNode


@pytest.fixture
def clients() -> Any:
    made: list[MqttClient] = []
    yield made
    for c in made:
        c.stop(timeout=1)


def v311_subscriber(host: str, port: int, user: str, password: str, topic: str) -> MessageLog:
    """A plain paho MQTT 3.1.1 client collecting ``topic`` (the test's eyes)."""
    log = MessageLog()
    subscribed = threading.Event()
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"eyes-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv311,
    )  # fmt: skip
    client.username_pw_set(user, password)
    client.on_message = lambda c, u, m: log.add(Received(m.topic, m.payload, m.retain, m.qos))
    client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda c, u, mid, codes, p: (
        None if any(code.is_failure for code in codes) else subscribed.set()
    )
    client.connect(host, port, keepalive=30)
    client.loop_start()
    assert subscribed.wait(30), f"no SUBACK for {topic}"
    log.client = client  # type: ignore[attr-defined]
    return log


def states(log: MessageLog, topic: str) -> list[str]:
    return [json.loads(m.payload)["state"] for m in log.on(topic)]


# --- mosquitto: 3.1.1 by choice, 5 kept ------------------------------------------------


def test_explicit_311_connects_publishes_and_dispatches(
    broker: Broker, clients: list[MqttClient]
) -> None:
    creds = broker.add_device("dev-1", fleet="f1")
    status = broker.subscribe("edge/devices/dev-1/status")
    answers = broker.subscribe("edge/devices/dev-1/responses/#")
    c = start(clients, make_config(broker, creds, protocol="3.1.1"))
    assert c.wait_connected(10)
    assert c.protocol == "3.1.1" and c.report()["protocol"] == "3.1.1"
    assert c.max_payload is None  # no Maximum Packet Size without MQTT 5
    status.wait_for(lambda ms: "online" in states(status, "edge/devices/dev-1/status"))

    # The dispatcher hands 3.1.1 messages over (no properties: no response topic).
    got: list[Message] = []
    c.subscribe("edge/devices/dev-1/commands/+", 1, got.append)
    wait_until(lambda: c.subscriptions_granted >= 1, what="the SUBACK")
    broker.client().publish("edge/devices/dev-1/commands/x", b"hello", qos=1).wait_for_publish(5)
    wait_until(lambda: bool(got), what="the command delivered")
    assert got[0].payload == b"hello" and got[0].response_topic is None
    assert got[0].correlation_data is None

    # PUBACKs complete handles (reason 0: 3.1.1 has no reason codes); correlation data is
    # not sent under 3.1.1, and the publish still goes out.
    handle = c.publish("edge/devices/dev-1/responses/r1", b"{}", correlation_data=b"abc")
    assert handle.wait(10) and handle.reason_code == 0
    answers.wait_for(bool)


def test_auto_stays_on_mqtt5_with_mosquitto(broker: Broker, clients: list[MqttClient]) -> None:
    creds = broker.add_device("dev-1", fleet="f1")
    c = start(clients, make_config(broker, creds))  # protocol "auto", the default
    assert c.cfg.mqtt.protocol == "auto"
    assert c.wait_connected(10)
    assert c.report()["protocol"] == "5"
    # MQTT 5 still: an ACL denial comes back as PUBACK reason 135.
    denied = c.publish("edge/devices/dev-2/results", b"{}", qos=1)
    assert not denied.wait(10) and denied.reason_code == 135


# --- NATS: what it answers, and auto learning 3.1.1 ------------------------------------


def connect_packet(level: int) -> bytes:
    """A CONNECT of MQTT ``level`` (5 or 4 = 3.1.1) with the harness login."""

    def s(b: bytes) -> bytes:
        return struct.pack("!H", len(b)) + b

    head = s(b"MQTT") + bytes([level, 0xC2]) + struct.pack("!H", 30)
    if level == 5:
        head += b"\x00"  # no properties
    body = head + s(f"probe-{uuid.uuid4().hex[:6]}".encode()) + s(USER.encode())
    body += s(PASSWORD.encode())
    return bytes([0x10, len(body)]) + body


def raw_answer(node: NatsNode, level: int) -> tuple[bytes, bool]:
    """The bytes ``node`` answers a CONNECT with, and whether it then closed the socket."""
    with socket.create_connection((HOST, node.mqtt_port), timeout=5) as sock:
        sock.sendall(connect_packet(level))
        data, closed = b"", False
        sock.settimeout(2)
        try:
            while len(data) < 4 or level == 5:
                chunk = sock.recv(64)
                if not chunk:
                    closed = True
                    break
                data += chunk
        except TimeoutError:
            pass
        return data, closed


def nats_config(tmp_path: Path, *urls: str, **mqtt_keys: Any) -> Config:
    cfg = Config()
    cfg.device.id, cfg.device.fleet = f"dev-{uuid.uuid4().hex[:6]}", "f1"
    password = tmp_path / "nats.password"
    password.write_text(PASSWORD + "\n")
    cfg.mqtt.url, cfg.mqtt.username, cfg.mqtt.password_file = urls[0], USER, str(password)
    cfg.mqtt.urls = list(urls) if len(urls) > 1 else []
    cfg.mqtt.reconnect_min_s, cfg.mqtt.reconnect_max_s = 0.5, 2
    for key, value in mqtt_keys.items():
        setattr(cfg.mqtt, key, value)
    return cfg


@pytest.mark.slow
def test_nats_answers_a_v5_connect_with_311_return_code_1_and_closes(
    nats_cluster: NatsCluster,
) -> None:
    """The ground the auto detection stands on (NATS 2.9's MQTT listener)."""
    node = nats_cluster.node(1)
    assert raw_answer(node, 5) == (b"\x20\x02\x00\x01", True)  # CONNACK, rc 1: bad version
    assert raw_answer(node, 4)[0] == b"\x20\x02\x00\x00"  # CONNACK, accepted


@pytest.mark.slow
def test_auto_learns_311_from_a_nats_node(
    nats_cluster: NatsCluster,
    clients: list[MqttClient],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "agent.paho_link")
    node1, node2 = nats_cluster.node(1), nats_cluster.node(2)
    cfg = nats_config(tmp_path, node1.mqtt_url)
    topic = f"edge/devices/{cfg.device.id}/status"
    eyes = v311_subscriber(HOST, node2.mqtt_port, USER, PASSWORD, topic)
    c = start(clients, cfg, metrics=Metrics())
    assert c.wait_connected(30), c.last_error
    assert c.report()["protocol"] == "3.1.1" and c.report()["url"] == node1.mqtt_url
    learnt = [r.getMessage() for r in caplog.records if "does not speak MQTT 5" in r.getMessage()]
    assert len(learnt) == 1 and node1.mqtt_url in learnt[0]
    assert c.last_error is None and c.failed_attempts == 0  # learning is not a failure
    # Online through node 1, seen on node 2; a message through node 2 reaches a handler.
    eyes.wait_for(lambda ms: "online" in states(eyes, topic), 30)
    got: list[Message] = []
    c.subscribe(f"edge/devices/{cfg.device.id}/commands/+", 1, got.append)
    wait_until(lambda: c.subscriptions_granted >= 1, 30, "the SUBACK from NATS")
    sender = eyes.client  # type: ignore[attr-defined]
    sender.publish(f"edge/devices/{cfg.device.id}/commands/ping", b"{}", qos=1)
    wait_until(lambda: bool(got), 30, "the command through node 2")
    eyes.client.loop_stop()  # type: ignore[attr-defined]


@pytest.mark.slow
def test_explicit_5_against_nats_says_which_key_to_change(
    nats_cluster: NatsCluster, clients: list[MqttClient], tmp_path: Path
) -> None:
    cfg = nats_config(tmp_path, nats_cluster.node(1).mqtt_url, protocol="5")
    c = start(clients, cfg)
    wait_until(lambda: c.last_error is not None, 30, "the refused CONNECT recorded")
    assert not c.connected
    assert "does not speak MQTT 5" in (c.last_error or "")
    assert 'mqtt.protocol = "3.1.1"' in (c.last_error or "")
    assert c.report()["protocol"] == "5"


# --- a broker that hangs up on MQTT 5 without an answer ------------------------------


class HangUpOnV5:
    """A TCP relay in front of a real mosquitto that closes every MQTT 5 CONNECT without
    a CONNACK (as some 3.1.1-only brokers do) and relays 3.1.1 connections untouched."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.server = socket.create_server((HOST, 0))
        self.port = self.server.getsockname()[1]
        self.hung_up = 0
        threading.Thread(target=self._accept, daemon=True, name="hang-up-on-v5").start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        first = conn.recv(4096)  # the CONNECT: fixed header, length, "MQTT", level
        level = first[first.index(b"MQTT") + 4] if b"MQTT" in first else 0
        if level == 5:
            self.hung_up += 1
            conn.close()
            return
        try:
            upstream = socket.create_connection((HOST, self.target))
        except OSError:  # the broker is down: so is the relay's connection
            conn.close()
            return
        upstream.sendall(first)
        for a, b in ((conn, upstream), (upstream, conn)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):  # shutdown: wakes the other pipe's recv, sends the FIN
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self.server.close()


def test_auto_probes_311_after_two_v5_hang_ups_and_keeps_it(
    broker: Broker, clients: list[MqttClient], caplog: pytest.LogCaptureFixture
) -> None:
    creds = broker.add_device("dev-1", fleet="f1")
    relay = HangUpOnV5(broker.port)
    try:
        cfg = make_config(broker, creds, url=f"mqtt://{HOST}:{relay.port}")
        cfg.mqtt.reconnect_min_s = 0.2
        c = start(clients, cfg)
        assert c.wait_connected(15), c.last_error
        assert c.protocol == "3.1.1" and relay.hung_up == 2
        learnt = [r.getMessage() for r in caplog.records if "without an answer" in r.getMessage()]
        assert len(learnt) == 1 and str(relay.port) in learnt[0]
        # Kept: the next connection goes straight to 3.1.1.
        broker.stop()  # a restart: the link reconnects through the relay
        broker.start()
        wait_until(lambda: c.reconnects >= 1 and c.connected, 20, "connected again")
        assert relay.hung_up == 2 and c.protocol == "3.1.1"
    finally:
        relay.close()


# --- device commands under 3.1.1: the reply field --------------------------------------


def test_commands_answer_on_reply_topic_under_311(
    start_agent: Any, broker: Broker, keypair: Any, iris_package: Path, iris_package_v2: Path
) -> None:
    """A real agent on MQTT 3.1.1; the operator sends the reply field (no properties)."""
    creds = broker.add_device("test-device-0", "default")
    agent = start_agent(
        {
            "mqtt": {**broker.mqtt_settings(creds), "protocol": "3.1.1"},
            "models": {"trusted_keys": [str(keypair.pub)]},
        },
        packages=[iris_package, iris_package_v2],
    )
    agent.wait_for(lambda s: s["broker"]["connected"], timeout=15)
    assert agent.status()["broker"]["protocol"] == "3.1.1"
    base = "edge/devices/test-device-0"
    replies = broker.subscribe(f"{base}/responses/#")
    events = broker.subscribe(f"{base}/events")
    operator = broker.client()

    def send(command: str, body: dict[str, Any]) -> None:
        operator.publish(f"{base}/commands/{command}", json.dumps(body), qos=1).wait_for_publish(5)

    send("rollback", {"model": "iris", "reply": {"topic": f"{base}/responses/op-7",
                                                 "correlation": "req-42"}})  # fmt: skip
    replies.wait_for(bool, timeout=15)
    (reply,) = replies.messages
    answer = json.loads(reply.payload)
    assert reply.topic == f"{base}/responses/op-7"
    assert answer["ok"] is True and answer["correlation"] == "req-42"
    assert (answer["model"], answer["version"]) == ("iris", "1.0.0")

    # A reply topic outside the device's own responses/: not run, answered on events.
    send("rollback", {"model": "iris", "reply": {"topic": "edge/devices/other/responses/x",
                                                 "correlation": "req-43"}})  # fmt: skip
    send("rollback", {"model": "iris", "reply": {"topic": f"{base}/responses/a/b"}})
    events.wait_for(lambda ms: sum(b'"command"' in m.payload for m in ms) >= 2, timeout=15)
    errors = [json.loads(m.payload)["error"] for m in events.messages if b'"command"' in m.payload]
    assert all("reply.topic" in e and f"{base}/responses/<name>" in e for e in errors), errors
    assert agent.status()["models"]["iris"]["version"] == "1.0.0"  # neither ran
    operator.loop_stop()
    operator.disconnect()
