"""Several broker URLs and the MQTT version of ``edge-fleet``'s connection
(fleet/connection.py), against real mosquitto brokers and a real NATS cluster.

What an operator sees: the command works through the second URL when the first is
dead, bad URLs are named with their flag, a client stays served when its broker dies,
and ``--mqtt-protocol auto`` speaks 5 to mosquitto and 3.1.1 to NATS.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.wire.errors import BrokerUnavailable, UsageError
from fleet.accounts import OPERATORS, BrokerConf
from fleet.cli import main
from fleet.connection import (
    BrokerOptions,
    BrokerUnreachable,
    Rotation,
    add_broker_arguments,
    broker_options,
    connect,
    disconnect,
)
from fleet.retained import Session
from tests.fixtures.broker import HOST, Broker, Creds, MessageLog, Received, free_port
from tests.fixtures.nats import PASSWORD, USER, NatsCluster


def dead_url() -> str:
    """A URL nothing listens on."""
    return f"mqtt://{HOST}:{free_port()}"


def options(creds: Creds, *urls: str, protocol: str | None = None) -> BrokerOptions:
    ns = argparse.Namespace(
        broker=list(urls),
        username=creds.username,
        password_file=str(creds.password_file),
        mqtt_protocol=protocol,
    )
    return broker_options(ns, environ={})


def creds_args(creds: Creds) -> list[str]:
    return ["--username", creds.username, "--password-file", str(creds.password_file)]


def topic() -> str:
    return f"edge/test/{uuid.uuid4().hex[:8]}"


def logged(log: MessageLog):  # type: ignore[no-untyped-def]
    return lambda m: log.add(Received(m.topic, bytes(m.payload), bool(m.retain), m.qos))


# --- several URLs -------------------------------------------------------------------------


def test_repeated_broker_first_dead_second_used(
    broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["status", "--json", "--wait", "0", "--broker", dead_url(),
            "--broker", broker.operator_url, *creds_args(broker.operator)]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["broker"] == broker.operator_url


def test_edge_broker_holds_several_urls_comma_separated(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    first = dead_url()
    monkeypatch.setenv("EDGE_BROKER", f"{first}, {broker.operator_url}")
    o = broker_options(argparse.Namespace(), environ={"EDGE_BROKER": f"{first},{broker.url}"})
    assert o.urls == (first, broker.url)
    assert (o.url, o.host, o.port) == (first, HOST, int(first.rsplit(":", 1)[1]))
    assert main(["status", "--json", "--wait", "0", *creds_args(broker.operator)]) == 0
    assert json.loads(capsys.readouterr().out)["broker"] == broker.operator_url


def test_no_url_answering_names_each_of_them() -> None:
    a, b = dead_url(), dead_url()
    o = broker_options(argparse.Namespace(broker=[a, b]), environ={})
    started = time.monotonic()
    with pytest.raises(BrokerUnreachable) as exc:
        connect(o, purpose="test", timeout=3)
    assert time.monotonic() - started < 10
    text = str(exc.value)
    assert text.startswith(f"brokers {a}, {b}: none connected within 3 s (")
    assert f"broker {a}: cannot connect: Connection refused" in text
    assert f"broker {b}: cannot connect: Connection refused" in text


def test_one_dead_url_fails_at_once_as_before() -> None:
    url = dead_url()
    started = time.monotonic()
    with pytest.raises(BrokerUnreachable, match=rf"^broker {url}: cannot connect: Connection"):
        connect(broker_options(argparse.Namespace(broker=[url]), environ={}), purpose="test")
    assert time.monotonic() - started < 2


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--broker", "mqtt://h", "--broker", "tcp://x"], {},
         "--broker: 'tcp://x' is not a broker URL like mqtt://host:1883"),
        ([], {"EDGE_BROKER": "mqtt://h,tcp://x"},
         "$EDGE_BROKER: 'tcp://x' is not a broker URL like mqtt://host:1883"),
        ([], {"EDGE_BROKER": "mqtt://h,,mqtt://i"},
         "$EDGE_BROKER: 'mqtt://h,,mqtt://i' has an empty entry"),
        (["--broker", "mqtt://h", "--broker", "mqtt://i:99999"], {},
         "--broker: 'mqtt://i:99999': Port out of range"),
        (["--broker", "mqtt://h", "--broker", "mqtts://i"], {},
         "--broker: 'mqtt://h' and 'mqtts://i': every URL must be mqtt:// or every one mqtts://"),
        (["--broker", "mqtt://h", "--broker", "mqtt://h"], {}, "--broker: 'mqtt://h' is given twice"),
        (["--mqtt-protocol", "4"], {}, "--mqtt-protocol: '4' is not one of auto, 5, 3.1.1"),
        ([], {"EDGE_MQTT_PROTOCOL": "v5"}, "$EDGE_MQTT_PROTOCOL: 'v5' is not one of auto, 5"),
    ],
)  # fmt: skip
def test_bad_broker_options_name_the_flag_and_value(
    argv: list[str], env: dict[str, str], message: str
) -> None:
    parser = argparse.ArgumentParser()
    add_broker_arguments(parser)
    with pytest.raises(UsageError) as exc:
        broker_options(parser.parse_args(argv), environ=env)
    assert message in str(exc.value)
    assert exc.value.exit_code == 2


def test_bad_url_from_the_command_line_exits_2_naming_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["status", "--broker", "mqtt://h", "--broker", "http://x"]) == 2
    assert "edge-fleet: error: --broker: 'http://x' is not a broker URL" in capsys.readouterr().err


def test_rotation_moves_then_backs_off_per_round() -> None:
    class Highest:
        """An rng that always draws the top of the range, to read the bounds."""

        def uniform(self, a: float, b: float) -> float:
            return b

    r = Rotation(["a", "b", "c"], min_s=1.0, max_s=10.0, rng=Highest())  # type: ignore[arg-type]
    waits = [r.failed() for _ in range(12)]
    # a move within a round: min_s; after whole rounds: 2, 4, 8, then capped at 10
    assert waits == [1, 1, 2, 1, 1, 4, 1, 1, 8, 1, 1, 10]
    assert r.current == "a"
    r.connected()
    assert r.lost() == 1 and r.current == "b"  # a connection lost: a move, a short wait
    assert r.failed() == 1 and r.current == "c"  # and the count of failures starts again


def _same_harness_password(broker: Broker, creds: Creds) -> None:
    """Give ``broker``'s harness account the password of ``creds`` (another broker's):
    one account on both, as on the nodes of one cluster."""
    BrokerConf(broker.conf_dir)._set_passwords(OPERATORS, {creds.username: creds.password})
    broker.reload(creds)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_connected_client_moves_to_the_next_url_when_its_broker_dies(
    broker_factory: Callable[..., Broker], protocol: str
) -> None:
    a, b = broker_factory(), broker_factory()
    _same_harness_password(b, a.harness)
    t = topic()
    log = MessageLog()
    client = connect(
        options(a.harness, a.operator_url, b.operator_url, protocol=protocol),
        purpose="test",
        subscriptions=[(t, 1)],
        on_message=logged(log),
    )
    publisher = b.client(a.harness)  # the one account of both
    try:
        assert client.url == a.operator_url
        a.kill()
        deadline = time.monotonic() + 30
        while not log.on(t):
            assert time.monotonic() < deadline, "nothing arrived through the second broker"
            publisher.publish(t, b"after the move", qos=1).wait_for_publish(5)
            time.sleep(0.3)
        assert client.url == b.operator_url and client.moves == 1
        assert client.is_connected()
    finally:
        publisher.disconnect()
        publisher.loop_stop()
        disconnect(client)


# --- the MQTT version ----------------------------------------------------------------------


@pytest.mark.parametrize(("protocol", "mqtt5"), [(None, True), ("5", True), ("3.1.1", False)])
def test_protocol_against_mosquitto(broker: Broker, protocol: str | None, mqtt5: bool) -> None:
    t = topic()
    log = MessageLog()
    s = Session(options(broker.harness, broker.operator_url, protocol=protocol), "test")
    try:
        s.wait([s.publish(t, b"retained")], t)
        assert s.client.mqtt5 is mqtt5
    finally:
        s.close()
    client = connect(
        options(broker.harness, broker.operator_url, protocol=protocol),
        purpose="test",
        subscriptions=[(t, 1)],
        on_message=logged(log),
    )
    try:
        assert client.mqtt5 is mqtt5 and client.protocol_name == ("5" if mqtt5 else "3.1.1")
        got = log.wait_for(bool, 10)
        assert (got[0].topic, got[0].payload, got[0].retain) == (t, b"retained", True)
    finally:
        disconnect(client)


def test_a_publish_under_311_says_refusals_are_not_checked(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="fleet.retained"):
        s = Session(options(broker.harness, broker.operator_url, protocol="3.1.1"), "test")
        s.close()
    assert "denied publishes not checked under MQTT 3.1.1" in caplog.text


def test_a_persistent_session_under_311_keeps_what_came_while_away(broker: Broker) -> None:
    """session_expiry_s under 3.1.1 is clean_session=False: QoS 1 messages sent while the
    client was away are delivered when it is back (mosquitto keeps the session)."""
    t = topic()
    o = options(broker.harness, broker.operator_url, protocol="3.1.1")
    client_id = f"test-session-{uuid.uuid4().hex[:6]}"
    first = connect(o, purpose="test", subscriptions=[(t, 1)], client_id=client_id,
                    session_expiry_s=3600, receive_maximum=10)  # fmt: skip
    disconnect(first)
    publisher = broker.client(broker.harness)
    publisher.publish(t, b"while away", qos=1).wait_for_publish(5)
    publisher.disconnect()
    publisher.loop_stop()
    log = MessageLog()
    present = threading.Event()
    back = connect(o, purpose="test", subscriptions=[(t, 1)], client_id=client_id,
                   session_expiry_s=3600, on_message=logged(log),
                   on_session=lambda c, p: present.set() if p else None)  # fmt: skip
    try:
        got = log.wait_for(bool, 10)
        assert got[0].payload == b"while away" and present.is_set()
    finally:
        disconnect(back)


@pytest.mark.slow
def test_auto_against_nats_becomes_311_and_5_is_refused(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    pw = tmp_path / "harness.password"
    pw.write_text(PASSWORD)
    harness = Creds(USER, PASSWORD, pw, role="operator")
    url = nats_cluster.node(1).mqtt_url
    client = connect(options(harness, url), purpose="test")
    try:
        assert client.mqtt5 is False and client.url == url
    finally:
        disconnect(client)
    with pytest.raises(BrokerUnavailable) as exc:
        connect(options(harness, url, protocol="5"), purpose="test")
    assert not isinstance(exc.value, BrokerUnreachable)  # waiting would not fix it
    assert f"broker {url}: Unsupported protocol version: it does not speak MQTT 5" in str(exc.value)
