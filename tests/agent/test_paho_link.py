"""The agent's MQTT connection against a real mosquitto."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from agent.config import Config
from agent.link import Message
from agent.metrics import Metrics
from agent.paho_link import MqttClient
from tests.fixtures.broker import ROOT, Broker, Creds


def make_config(broker: Broker, creds: Creds, *, tls: bool = False, **mqtt: object) -> Config:
    cfg = Config()
    cfg.device.id, cfg.device.fleet = creds.username, "f1"
    for key, value in {**broker.mqtt_settings(creds, tls=tls), **mqtt}.items():
        setattr(cfg.mqtt, key, value)
    cfg.mqtt.reconnect_min_s, cfg.mqtt.reconnect_max_s = 1, 2
    return cfg


@pytest.fixture
def clients() -> object:
    made: list[MqttClient] = []
    yield made
    for c in made:
        c.stop(timeout=1)


def start(clients: list[MqttClient], cfg: Config, **kw: object) -> MqttClient:
    c = MqttClient(cfg, **kw)  # type: ignore[arg-type]
    clients.append(c)
    c.start()
    return c


def test_connect_announces_online_with_models(broker: Broker, clients: list[MqttClient]) -> None:
    creds = broker.add_device("dev-1", fleet="f1")
    seen = broker.subscribe("edge/devices/dev-1/status")
    models = {"iris": {"version": "1.2", "previous": "1.1", "state": "active", "serial": 7}}
    c = start(
        clients, make_config(broker, creds), status=lambda: {"models": models, "device": "dev-1"}
    )
    assert c.wait_connected(10)
    msgs = seen.wait_for(lambda m: len(m) >= 1)
    status = json.loads(msgs[0].payload)
    assert status["state"] == "online"
    assert status["device"] == "dev-1" and status["fleet"] == "f1"
    assert status["models"] == models
    assert status["since"].endswith("Z")


def test_stop_leaves_a_retained_offline_status(broker: Broker, clients: list[MqttClient]) -> None:
    creds = broker.add_device("dev-1", fleet="f1")
    c = start(clients, make_config(broker, creds))
    assert c.wait_connected(10)
    c.stop()
    seen = broker.subscribe("edge/devices/dev-1/status")
    msgs = seen.wait_for(lambda m: len(m) >= 1)
    assert msgs[0].retain
    assert json.loads(msgs[0].payload)["state"] == "offline"


def test_absent_broker_does_not_delay_start(broker: Broker, clients: list[MqttClient]) -> None:
    creds = broker.add_device("dev-1", fleet="f1")
    broker.stop()
    t0 = time.monotonic()
    c = start(clients, make_config(broker, creds))
    assert time.monotonic() - t0 < 0.5
    assert not c.wait_connected(1.5)
    assert c.alive()
    # A QoS 1 publish made while offline is kept and delivered after the connect.
    handle = c.publish("edge/devices/dev-1/events", {"event": "queued"}, qos=1)
    broker.start()
    assert c.wait_connected(15)
    assert handle.wait(10), handle


def test_denied_publish_is_reported_with_reason_135(
    broker: Broker, clients: list[MqttClient], caplog: pytest.LogCaptureFixture
) -> None:
    creds = broker.add_device("dev-1", fleet="f1")
    metrics = Metrics()
    c = start(clients, make_config(broker, creds), metrics=metrics)
    assert c.wait_connected(10)
    denied = c.publish("edge/devices/dev-2/results", b"{}", qos=1)
    desired = c.publish("edge/fleets/f1/models/m/desired", b"{}", qos=1, retain=True)
    allowed = c.publish("edge/devices/dev-1/results", b"{}", qos=1)
    assert allowed.wait(10)
    assert not denied.wait(10) and denied.reason_code == 135
    assert not desired.wait(10) and desired.reason_code == 135
    assert "Not authorized" in (denied.error or "")
    assert c.failures == {"not_authorized": 2}
    # Logged once per reason and interval, naming the topic and the reason.
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refused == [
        "mqtt: publish to edge/devices/dev-2/results refused: Not authorized (reason 135)"
    ]
    text = generate_latest(metrics.registry).decode()
    assert 'edge_mqtt_publish_failures_total{reason="not_authorized"} 2.0' in text
    assert "edge_mqtt_connected 1.0" in text


def test_payload_over_the_broker_limit_is_refused_locally(
    broker: Broker, clients: list[MqttClient]
) -> None:
    creds = broker.add_device("dev-1", fleet="f1")
    c = start(clients, make_config(broker, creds))
    assert c.wait_connected(10)
    assert c.max_payload is not None and c.max_payload < 4 * 1024 * 1024
    big = c.publish("edge/devices/dev-1/results", b"\0" * (4 * 1024 * 1024), qos=1)
    assert big.done() and not big.ok and "maximum" in (big.error or "")
    # The connection is unharmed.
    assert c.publish("edge/devices/dev-1/results", b"{}", qos=1).wait(10)


def test_handlers_survive_exceptions_and_reconnects(
    broker: Broker, clients: list[MqttClient]
) -> None:
    creds = broker.add_device("dev-1", fleet="f1")
    c = start(clients, make_config(broker, creds))
    got: list[Message] = []
    arrived = threading.Event()

    def handler(msg: Message) -> None:
        got.append(msg)
        arrived.set()
        if msg.payload == b"boom":
            raise RuntimeError("a handler bug")

    c.subscribe("edge/devices/dev-1/commands/+", 1, handler)
    c.subscribe("edge/fleets/f1/models/+/desired", 1, handler)
    assert c.wait_connected(10)
    time.sleep(0.3)  # the SUBSCRIBE goes out right after CONNACK
    op = broker.client()
    op.publish("edge/devices/dev-1/commands/x", b"boom", qos=1).wait_for_publish(5)
    op.publish("edge/devices/dev-1/commands/x", b"after", qos=1).wait_for_publish(5)
    deadline = time.monotonic() + 10
    while len(got) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [m.payload for m in got] == [b"boom", b"after"]
    assert c.alive()
    # After a broker restart the subscriptions are renewed (clean start) and
    # retained desired state arrives again.
    op.publish("edge/fleets/f1/models/m/desired", b"v1", qos=1, retain=True).wait_for_publish(5)
    op.disconnect()
    broker.stop()
    got.clear()
    broker.start()
    assert c.wait_connected(15)
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [(m.topic, m.payload, m.retain) for m in got] == [
        ("edge/fleets/f1/models/m/desired", b"v1", True)
    ]
    assert c.reconnects == 1


def test_last_will_marks_a_killed_agent_offline(broker: Broker, tmp_path: Path) -> None:
    creds = broker.add_device("dev-1", fleet="f1")
    settings = broker.mqtt_settings(creds)
    script = textwrap.dedent(f"""
        import time
        from agent.config import Config
        from agent.paho_link import MqttClient
        cfg = Config()
        cfg.device.id = "dev-1"
        cfg.mqtt.url, cfg.mqtt.username = {settings["url"]!r}, "dev-1"
        cfg.mqtt.password_file = {settings["password_file"]!r}
        c = MqttClient(cfg)
        c.start()
        assert c.wait_connected(10)
        print("connected", flush=True)
        time.sleep(60)
    """)
    seen = broker.subscribe("edge/devices/dev-1/status")
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "connected"
        seen.wait_for(lambda m: any(json.loads(x.payload)["state"] == "online" for x in m))
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    msgs = seen.wait_for(lambda m: json.loads(m[-1].payload)["state"] == "offline")
    assert json.loads(msgs[-1].payload)["reason"] == "connection lost"
    # Retained: a status reader arriving later sees the device offline.
    later = broker.subscribe("edge/devices/dev-1/status")
    assert json.loads(later.wait_for(lambda m: len(m) >= 1)[0].payload)["state"] == "offline"


def test_tls_with_the_scripts_ca(tls_broker: Broker, clients: list[MqttClient]) -> None:
    creds = tls_broker.add_device("dev-1", fleet="f1")
    c = start(clients, make_config(tls_broker, creds, tls=True))
    assert c.wait_connected(10)
    assert c.publish("edge/devices/dev-1/health", b"{}", qos=1).wait(10)


def test_tls_with_a_client_certificate(broker_factory: object, clients: list[MqttClient]) -> None:
    b: Broker = broker_factory(tls=True, require_certificate=True)  # type: ignore[operator]
    creds = b.add_device("dev-1", fleet="f1")
    cfg = make_config(b, creds, tls=True, cert=str(creds.cert), key=str(creds.key))
    cfg.mqtt.username = cfg.mqtt.password_file = ""
    c = start(clients, cfg)
    assert c.wait_connected(10)
    # The certificate's CN is the username the ACL sees.
    assert c.publish("edge/devices/dev-1/health", b"{}", qos=1).wait(10)
    other = c.publish("edge/devices/dev-2/health", b"{}", qos=1)
    assert not other.wait(10) and other.reason_code == 135


def test_agent_serves_at_once_while_its_broker_is_away(
    broker: Broker, start_agent: Callable[..., Any], iris_package: Path
) -> None:
    creds = broker.add_device("pi-1", fleet="f1")
    broker.stop()
    t0 = time.monotonic()
    agent = start_agent(
        {"device": {"id": "pi-1", "fleet": "f1"},
         "mqtt": {**broker.mqtt_settings(creds), "reconnect_min_s": 1, "reconnect_max_s": 1}},
        packages=[iris_package],
    )  # fmt: skip
    code, body = agent.request("POST", "/predict", {"features": [[5.1, 3.5, 1.4, 0.2]]})
    assert code == 200, body
    started = time.monotonic() - t0
    assert agent.status()["broker"]["connected"] is False
    # The broker comes back: the agent connects and announces itself.
    broker.start()
    seen = broker.subscribe("edge/devices/pi-1/status")
    msgs = seen.wait_for(lambda m: any(json.loads(x.payload)["state"] == "online" for x in m))
    status = json.loads(msgs[-1].payload)
    assert status["models"]["iris"]["version"] == "1.0.0"
    assert started < 20  # install + start-up; no wait for the broker in it
