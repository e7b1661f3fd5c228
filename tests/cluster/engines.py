"""The same end-to-end tests on two broker engines: one mosquitto from broker-config/
speaking MQTT 5, and a 3-node NATS cluster (JetStream, its MQTT listener) speaking
MQTT 3.1.1.

An ``Engine`` hands out what the programs need to reach node N (agent ``[mqtt]`` keys,
``edge-fleet`` broker options), watches topics, and crashes the node a device is on.
mosquitto has one node: every N is that broker, and a crash is kill -9 followed by a
start (the device comes back to the same URL). On NATS the killed node stays down, so
the device has to move to another of its ``mqtt.urls``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as mqtt

from tests.fixtures import nats as nats_fixture
from tests.fixtures.broker import HOST, Broker, MessageLog, Received
from tests.fixtures.nats import NatsCluster


class Engine(Protocol):
    name: str
    protocol: str  # what the programs are told to speak: "5" or "3.1.1"

    def device_mqtt(self, device: str, fleet: str, nodes: list[int]) -> dict[str, Any]:
        """The agent's ``[mqtt]`` keys for ``device``, trying ``nodes`` in that order."""
        ...

    def fleet_args(self, nodes: list[int], role: str = "operator") -> list[str]:
        """``edge-fleet`` broker options for ``role`` (operator, collector) on ``nodes``."""
        ...

    def watch(self, topic: str, node: int) -> MessageLog:
        """Every message on ``topic`` (a filter) as seen through ``node``."""
        ...

    def retained(self, topic: str, node: int, timeout: float = 5.0) -> dict[str, Any] | None:
        """The retained JSON message on ``topic`` read through ``node`` (None: none)."""
        ...

    def crash(self, node: int) -> None:
        """kill -9 the broker process behind ``node``."""
        ...


@dataclass
class Mosquitto:
    broker: Broker
    name: str = "mosquitto"
    protocol: str = "5"

    def device_mqtt(self, device: str, fleet: str, nodes: list[int]) -> dict[str, Any]:
        creds = self.broker.add_device(device, fleet)
        return {**self.broker.mqtt_settings(creds), "protocol": self.protocol}

    def fleet_args(self, nodes: list[int], role: str = "operator") -> list[str]:
        creds = self.broker.operator if role == "operator" else self.broker.add_collector(role)
        return ["--broker", self.broker.operator_url, "--username", creds.username,
                "--password-file", str(creds.password_file),
                "--mqtt-protocol", self.protocol]  # fmt: skip

    def watch(self, topic: str, node: int) -> MessageLog:
        return self.broker.subscribe(topic)

    def retained(self, topic: str, node: int, timeout: float = 5.0) -> dict[str, Any] | None:
        return read_retained(self.broker.client(connect=False), HOST, self.broker.port_for(
            self.broker.harness), topic, timeout)  # fmt: skip

    def crash(self, node: int) -> None:
        self.broker.kill()
        self.broker.start()


@dataclass
class Nats:
    cluster: NatsCluster
    root: Path
    name: str = "nats"
    protocol: str = "3.1.1"
    _clients: list[mqtt.Client] = field(default_factory=list)

    @property
    def password_file(self) -> Path:
        path = self.root / "harness.password"
        if not path.exists():
            path.write_text(nats_fixture.PASSWORD + "\n")
            path.chmod(0o600)
        return path

    def _urls(self, nodes: list[int]) -> list[str]:
        return [self.cluster.node(n).mqtt_url for n in nodes]

    def device_mqtt(self, device: str, fleet: str, nodes: list[int]) -> dict[str, Any]:
        # NATS's MQTT permissions are NATS subjects, not broker-config's ACL: every
        # program logs in with the harness account here (docs/scaling.md says so).
        return {"urls": self._urls(nodes), "username": nats_fixture.USER,
                "password_file": str(self.password_file), "protocol": self.protocol}  # fmt: skip

    def fleet_args(self, nodes: list[int], role: str = "operator") -> list[str]:
        brokers = [arg for url in self._urls(nodes) for arg in ("--broker", url)]
        return [*brokers, "--username", nats_fixture.USER,
                "--password-file", str(self.password_file),
                "--mqtt-protocol", self.protocol]  # fmt: skip

    def watch(self, topic: str, node: int) -> MessageLog:
        log = MessageLog()
        subscribed = threading.Event()
        client = nats_fixture.mqtt_client()
        client.on_message = lambda c, u, m: log.add(Received(m.topic, m.payload, m.retain, m.qos))

        def on_subscribe(c: mqtt.Client, u: Any, mid: int, rcs: list[Any], p: Any) -> None:
            if all(not rc.is_failure for rc in rcs):
                subscribed.set()
            else:  # a JetStream election in progress: NATS refuses, ask again
                threading.Timer(1.0, lambda: c.subscribe(topic, qos=1)).start()

        client.on_subscribe = on_subscribe
        client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        client.connect(HOST, self.cluster.node(node).mqtt_port, keepalive=30)
        client.loop_start()
        self._clients.append(client)
        if not subscribed.wait(30):
            raise RuntimeError(f"subscribe {topic} on n{node}: no SUBACK\n{self.cluster.log()}")
        return log

    def retained(self, topic: str, node: int, timeout: float = 5.0) -> dict[str, Any] | None:
        return read_retained(nats_fixture.mqtt_client(), HOST,
                             self.cluster.node(node).mqtt_port, topic, timeout)  # fmt: skip

    def crash(self, node: int) -> None:
        self.cluster.kill9(self.cluster.node(node))

    def close(self) -> None:
        for client in self._clients:
            client.disconnect()
            client.loop_stop()


def read_retained(
    client: mqtt.Client, host: str, port: int, topic: str, timeout: float
) -> dict[str, Any] | None:
    """The retained message on ``topic`` through a fresh connection of ``client``."""
    got: list[bytes] = []
    done = threading.Event()

    def on_message(c: mqtt.Client, u: Any, m: mqtt.MQTTMessage) -> None:
        if m.retain and m.payload:
            got.append(bytes(m.payload))
            done.set()

    client.on_message = on_message
    client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
    try:
        client.connect(host, port, keepalive=10)
    except OSError:
        return None
    client.loop_start()
    done.wait(timeout)
    client.disconnect()
    client.loop_stop()
    return dict(json.loads(got[-1])) if got else None


def make_engine(kind: str, broker_factory: Any, root: Path) -> Iterator[Engine]:
    """A running engine of ``kind`` (``"mosquitto"`` or ``"nats"``), stopped at the end."""
    if kind == "mosquitto":
        yield Mosquitto(broker_factory())
        return
    cluster = NatsCluster(root)
    try:
        cluster.start()
        engine = Nats(cluster, root)
        yield engine
        engine.close()
    finally:
        cluster.cleanup()
