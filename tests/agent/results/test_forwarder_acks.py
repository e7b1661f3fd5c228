"""Rows leave the device only on a collector's ack (``forward.ack = "collector"``).

The peer here is the test itself on a real mosquitto: it reads the results topic and
answers with the wire's own ``payloads.ack``, or stays silent, or lies, so each rule of
the device's side of the protocol is seen alone. The real collector is in
tests/fleet/test_collect.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client import generate_latest

from agent.config import Config
from agent.wire import payloads
from tests.agent.results.conftest import Agent, fill, make_config
from tests.fixtures.broker import Broker


class Peer:
    """Subscribes to a device's results; acks each batch unless told otherwise."""

    def __init__(self, broker: Broker, device: str) -> None:
        self.device = device
        self.topic = f"edge/devices/{device}/results"
        self.ack_topic = f"edge/devices/{device}/results/ack"
        self.answer = True
        self.seen: list[tuple[int, int]] = []
        self.lock = threading.Lock()
        self.client = broker.client(connect=False, client_id=f"peer-{device}")
        subscribed = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: subscribed.set()
        # In on_connect, and a persistent session, as a collector has: what the device
        # sends while the peer reconnects after a broker restart is queued for it.
        self.client.on_connect = lambda c, *a: c.subscribe(self.topic, qos=1)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect(
            "127.0.0.1", broker.port_for(broker.operator), keepalive=30, clean_start=False,
            properties=props,
        )  # fmt: skip
        self.client.loop_start()
        assert subscribed.wait(10)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        rows = payloads.check_results(json.loads(msg.payload), msg.topic)["results"]
        span = (rows[0]["seq"], rows[-1]["seq"])
        with self.lock:
            self.seen.append(span)
        if self.answer:
            self.send([span])

    def send(self, ranges: list[tuple[int, int]], device: str | None = None) -> None:
        body = payloads.ack(device or self.device, ranges, collector="test")
        self.client.publish(self.ack_topic, payloads.encode(body), qos=1)

    def received(self) -> list[int]:
        with self.lock:
            return sorted({s for a, b in self.seen for s in range(a, b + 1)})

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def collector_config(broker: Broker, device: str, timeout_s: float = 60.0) -> Config:
    cfg = make_config(broker, device)
    cfg.forward.ack = "collector"
    cfg.forward.ack_timeout_s = timeout_s
    return cfg


def wait(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_rows_stay_until_the_collector_acks_them(
    broker: Broker, tmp_path: Path, agents: list[Agent]
) -> None:
    peer = Peer(broker, "dev-1")
    peer.answer = False
    agent = Agent(collector_config(broker, "dev-1"), tmp_path / "buffer.db")
    agents.append(agent)
    fill(agent.buffer, 500)
    agent.start()
    wait(lambda: len(peer.received()) == 500)
    time.sleep(0.5)
    # The broker has every batch (PUBACKed) but nothing is stored centrally yet.
    assert agent.buffer.stats().rows == 500
    assert agent.forwarder.forwarded == 0
    peer.send([(1, 200)])
    wait(lambda: agent.buffer.stats().rows == 300)
    assert agent.forwarder.forwarded == 200
    peer.answer = True
    peer.send([(201, 300), (301, 500)])  # one ack, several ranges: one transaction
    wait(lambda: agent.buffer.stats().rows == 0)
    assert agent.forwarder.forwarded == 500
    text = generate_latest(agent.metrics.registry).decode()
    assert "edge_forwarded_results_total 500.0" in text
    peer.close()


def test_no_ack_in_time_sends_the_window_again(
    broker: Broker, tmp_path: Path, agents: list[Agent]
) -> None:
    peer = Peer(broker, "dev-1")
    peer.answer = False  # a collector that is down, or lost the batches
    agent = Agent(collector_config(broker, "dev-1", timeout_s=1), tmp_path / "buffer.db")
    agents.append(agent)
    fill(agent.buffer, 300)
    agent.start()
    wait(lambda: agent.forwarder.ack_timeouts >= 1)
    wait(lambda: len(peer.seen) > 3)  # 3 batches, then again
    assert agent.buffer.stats().rows == 300  # kept: nothing was stored
    peer.answer = True  # the collector is back: the resent batches are acked
    wait(lambda: agent.buffer.stats().rows == 0, timeout=15)
    assert peer.received() == list(range(1, 301))
    assert "edge_forward_ack_timeouts_total" in generate_latest(agent.metrics.registry).decode()
    peer.close()


def test_acks_that_would_lose_rows_change_nothing(
    broker: Broker, tmp_path: Path, agents: list[Agent]
) -> None:
    peer = Peer(broker, "dev-1")
    peer.answer = False
    agent = Agent(collector_config(broker, "dev-1"), tmp_path / "buffer.db")
    agents.append(agent)
    fill(agent.buffer, 100)
    agent.start()
    wait(lambda: len(peer.received()) == 100)
    fill(agent.buffer, 100)  # seqs 101..200, not sent yet if the forwarder lingers
    peer.send([(1, 10**9)])  # beyond anything sent: a confused collector
    peer.send([(1, 100)], device="dev-2")  # another device's ack on this topic
    peer.client.publish(peer.ack_topic, b"{not json", qos=1)
    peer.client.publish(peer.ack_topic, b'{"device":"dev-1","ranges":[[5,1]]}', qos=1)
    wait(lambda: agent.forwarder.invalid_acks >= 4)
    assert agent.buffer.stats().rows == 200
    peer.close()


def test_a_reconnect_resends_what_was_not_acked_at_once(
    broker: Broker, tmp_path: Path, agents: list[Agent]
) -> None:
    peer = Peer(broker, "dev-1")
    peer.answer = False
    agent = Agent(collector_config(broker, "dev-1"), tmp_path / "buffer.db")
    agents.append(agent)
    fill(agent.buffer, 100)
    agent.start()
    wait(lambda: len(peer.seen) == 1)
    broker.stop()  # the ack for that batch would be lost with the connection
    wait(lambda: not agent.mqtt.connected)
    broker.start()
    peer.answer = True
    # Well before forward.ack_timeout_s (60 s): sent again on the reconnect.
    wait(lambda: agent.buffer.stats().rows == 0, timeout=20)
    assert len(peer.seen) >= 2 and agent.forwarder.ack_timeouts == 0
    peer.close()


def test_broker_mode_deletes_on_puback_with_no_one_listening(
    broker: Broker, tmp_path: Path, agents: list[Agent]
) -> None:
    cfg = make_config(broker, "dev-1")
    assert cfg.forward.ack == "broker"
    agent = Agent(cfg, tmp_path / "buffer.db")
    agents.append(agent)
    fill(agent.buffer, 100)
    agent.start()
    # The old behaviour, for users with their own consumer: gone once the broker has it.
    wait(lambda: agent.buffer.stats().rows == 0)


def test_the_documented_default_is_the_one_that_loses_nothing() -> None:
    assert Config().forward.ack == "collector"
