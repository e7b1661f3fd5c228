"""The agent's MQTT connection against a real mosquitto."""

from __future__ import annotations

import itertools
import json
import logging
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


def wait_until(predicate: Callable[[], bool], timeout: float = 15, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


def connect_logs(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records
        if r.name == "agent.paho_link" and r.getMessage().startswith("mqtt: cannot connect")
    ]  # fmt: skip


def other_ca(tmp_path: Path) -> Path:
    """A CA of its own: the broker's certificate does not verify against it."""
    ca = tmp_path / "other-ca.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(tmp_path / "other-ca.key"), "-subj", "/CN=other", "-out",
         str(ca)],
        check=True, capture_output=True,
    )  # fmt: skip
    return ca


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
    wait_until(lambda: c.last_error is not None, what="the refused TCP connect recorded")
    assert c.last_error is not None and "broker not reachable" in c.last_error
    assert "Connection refused" in c.last_error and "mqtt.url" in c.last_error
    # A QoS 1 publish made while offline is kept and delivered after the connect.
    handle = c.publish("edge/devices/dev-1/events", {"event": "queued"}, qos=1)
    broker.start()
    assert c.wait_connected(15)
    assert handle.wait(10), handle
    assert c.last_error is None and c.failed_attempts == 0


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
    deadline = time.monotonic() + 10  # the SUBSCRIBEs go out right after CONNACK
    while c.subscriptions_granted < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert c.subscriptions_granted == 2
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
    agent = start_agent(
        {"device": {"id": "pi-1", "fleet": "f1"},
         "mqtt": {**broker.mqtt_settings(creds), "reconnect_min_s": 1, "reconnect_max_s": 1}},
        packages=[iris_package],
    )  # fmt: skip
    code, body = agent.request("POST", "/predict", {"features": [[5.1, 3.5, 1.4, 0.2]]})
    assert code == 200, body  # answered while the broker is still down: no wait for it
    assert agent.status()["broker"]["connected"] is False
    # /status says why, naming the key to fix.
    broker_status = agent.wait_for(lambda st: bool(st["broker"]["last_error"]), timeout=15)
    assert "mqtt.url" in broker_status["broker"]["last_error"]
    # The broker comes back: the agent connects and announces itself.
    broker.start()
    seen = broker.subscribe("edge/devices/pi-1/status")
    msgs = seen.wait_for(lambda m: any(json.loads(x.payload)["state"] == "online" for x in m))
    status = json.loads(msgs[-1].payload)
    assert status["models"]["iris"]["version"] == "1.0.0"
    assert agent.wait_for(lambda st: st["broker"]["connected"])["broker"]["last_error"] is None


def test_a_wrong_ca_is_logged_once_with_the_reason_and_the_key(
    tls_broker: Broker,
    clients: list[MqttClient],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.DEBUG)  # as with --verbose: still one line, not one per retry
    creds = tls_broker.add_device("dev-1", fleet="f1")
    ca = other_ca(tmp_path)
    c = start(clients, make_config(tls_broker, creds, tls=True, ca=str(ca)))
    wait_until(lambda: c.failed_attempts >= 3, what="three failed TLS handshakes")
    assert not c.connected
    records = connect_logs(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].levelno == logging.ERROR
    message = records[0].getMessage()
    assert "certificate verify failed" in message
    assert f"mqtt.ca must be the CA that signed the broker's certificate (now {str(ca)!r})" in (
        message
    )
    assert c.last_error is not None
    assert c.last_error.startswith("TLS: certificate verify failed")
    assert "mqtt.ca" in c.last_error


def test_a_refused_password_is_logged_once_per_change_naming_user_and_file(
    broker: Broker,
    clients: list[MqttClient],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.DEBUG)
    creds = broker.add_device("dev-1", fleet="f1")
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password\n")
    c = start(clients, make_config(broker, creds, password_file=str(wrong)))
    wait_until(lambda: c.failed_attempts >= 3, what="three refused logins")
    records = connect_logs(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    message = records[0].getMessage()
    assert records[0].levelno == logging.ERROR
    assert "the broker refused the login: Not authorized (reason 135)" in message
    assert "user 'dev-1' (mqtt.username)" in message
    assert f"mqtt.password_file ({str(wrong)!r})" in message
    assert c.last_error is not None and "Not authorized" in c.last_error
    assert "mqtt.password_file" in c.last_error
    # Each change of cause is logged once: the broker goes away, then comes back.
    broker.stop()
    wait_until(lambda: "not reachable" in (c.last_error or ""), what="broker away")
    attempts = c.failed_attempts
    wait_until(lambda: c.failed_attempts > attempts, what="a retry while away")
    broker.start()
    wait_until(lambda: "refused the login" in (c.last_error or ""), what="login refused again")
    attempts = c.failed_attempts
    wait_until(lambda: c.failed_attempts > attempts, what="a refused retry")
    causes = [r.getMessage().split(": ", 2)[2].split(";")[0] for r in connect_logs(caplog)]
    refused = "the broker refused the login: Not authorized (reason 135)"
    # (A stop that lands between CONNECT and CONNACK may add a cause of its own.)
    assert causes[0] == causes[-1] == refused and causes.count(refused) == 2, causes
    assert "broker not reachable: [Errno 111] Connection refused" in causes
    assert all(a != b for a, b in itertools.pairwise(causes)), causes
    assert not c.connected


def test_a_missing_client_certificate_names_cert_and_key(
    broker_factory: Callable[..., Broker],
    clients: list[MqttClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # TLS 1.3: the handshake completes, then the broker's alert ends the connection.
    b = broker_factory(tls=True, require_certificate=True)
    creds = b.add_device("dev-1", fleet="f1")
    cfg = make_config(b, creds, tls=True)
    cfg.mqtt.username = cfg.mqtt.password_file = ""
    c = start(clients, cfg)
    wait_until(lambda: c.failed_attempts >= 2, what="two refused handshakes")
    records = connect_logs(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    message = records[0].getMessage()
    assert "TLS: the broker refused the client certificate" in message
    assert "certificate required" in message
    assert "mqtt.cert / mqtt.key" in message and "none is set" in message
    assert c.last_error is not None and "mqtt.cert" in c.last_error


def test_tls_ca_from_the_credentials_directory(
    tls_broker: Broker,
    clients: list[MqttClient],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A Config built in code with a relative name: resolved like a secret.
    creds = tls_broker.add_device("dev-1", fleet="f1")
    folder = tmp_path / "creds"
    folder.mkdir()
    (folder / "edge_ca.crt").write_bytes(tls_broker.ca.read_bytes())
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(folder))
    monkeypatch.chdir(tmp_path)
    c = start(clients, make_config(tls_broker, creds, tls=True, ca="ca.crt"))
    assert c.wait_connected(10), c.last_error


@pytest.mark.slow
def test_a_silent_broker_shows_in_status_and_is_left_within_two_keepalives(
    broker: Broker, start_agent: Callable[..., Any], iris_package: Path
) -> None:
    """The broker's host stops answering (SIGSTOP: its sockets stay open, nothing moves)."""
    creds = broker.add_device("pi-s", fleet="f1")
    agent = start_agent(
        {"device": {"id": "pi-s", "fleet": "f1"},
         "mqtt": {**broker.mqtt_settings(creds), "keepalive": 5}},
        packages=[iris_package],
    )  # fmt: skip
    up = agent.wait_for(lambda s: s["broker"]["connected"], timeout=15)["broker"]
    assert up["keepalive_s"] == 5 and up["last_packet_s"] is not None
    assert up["last_packet_s"] < 10  # PINGRESPs count: a quiet but live link stays fresh
    assert broker.proc is not None
    os.kill(broker.proc.pid, signal.SIGSTOP)
    try:
        quiet = agent.wait_for(lambda s: (s["broker"]["last_packet_s"] or 0) > 5, timeout=15)
        assert quiet["broker"]["connected"] is True  # not yet noticed: this is why it shows
        gone = agent.wait_for(lambda s: not s["broker"]["connected"], timeout=20)["broker"]
        assert gone["last_packet_s"] >= 5
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    agent.wait_for(lambda s: s["broker"]["connected"], timeout=30)
