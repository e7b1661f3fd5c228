"""The forwarding half of an agent in the test's process, and filling its buffer."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import BufferConfig, Config
from agent.metrics import Metrics
from agent.paho_link import MqttClient
from agent.results.buffer import Result, ResultBuffer
from agent.results.forwarder import Forwarder
from tests.fixtures.broker import Broker, MessageLog


def make_config(broker: Broker, device: str, username: str | None = None) -> Config:
    creds = broker.add_device(username or device, fleet="f1")
    cfg = Config()
    cfg.device.id, cfg.device.fleet = device, "f1"
    for key, value in broker.mqtt_settings(creds).items():
        setattr(cfg.mqtt, key, value)
    cfg.mqtt.reconnect_min_s, cfg.mqtt.reconnect_max_s = 1, 1
    cfg.buffer.batch_size = 100
    cfg.forward.ack = "broker"
    return cfg


def fill(buffer: ResultBuffer, n: int) -> None:
    for i in range(n):
        buffer.record(Result(time.time(), "iris", "1.0", [[i, 0.5]], [i % 3], 0.25))
    buffer.flush()


def seqs_of(log: MessageLog) -> list[int]:
    return [r["seq"] for m in log.messages for r in json.loads(m.payload)["results"]]


class Agent:
    """The forwarding half of an agent, in this process."""

    def __init__(self, cfg: Config, path: Path) -> None:
        self.metrics = Metrics()
        self.buffer = ResultBuffer(path, BufferConfig(durability="batched"), self.metrics)
        self.mqtt = MqttClient(cfg, self.metrics)
        self.forwarder = Forwarder(cfg, self.buffer, self.mqtt, self.metrics)

    def start(self) -> Agent:
        self.mqtt.start()
        self.forwarder.start()
        return self

    def stop(self) -> None:
        self.forwarder.stop()
        self.mqtt.stop(timeout=1)
        self.buffer.close()


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    made: list[Agent] = []
    yield made
    for a in made:
        a.stop()
