"""The forwarder against a real mosquitto: in order, nothing lost, duplicates by seq.

These run with ``forward.ack = "broker"`` (rows deleted on PUBACK): the transport's own
guarantees. Deletion on the collector's ack is in test_forwarder_acks.py.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
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

from agent.config import BufferConfig
from agent.metrics import Metrics
from agent.paho_link import MqttClient
from agent.results.buffer import Result, ResultBuffer
from agent.results.forwarder import Forwarder
from tests.agent.results.conftest import Agent, fill, make_config, seqs_of
from tests.fixtures.broker import ROOT, Broker
from tests.fixtures.disk import fill_disk


def test_backlog_arrives_in_order_and_is_deleted(
    broker: Broker, tmp_path: Path, agents: list[Agent]
) -> None:
    cfg = make_config(broker, "dev-1")
    consumer = broker.subscribe("edge/devices/dev-1/results")
    agent = Agent(cfg, tmp_path / "buffer.db")
    agents.append(agent)
    fill(agent.buffer, 1000)
    agent.start()
    consumer.wait_for(lambda m: len(seqs_of(consumer)) >= 1000)
    assert seqs_of(consumer) == list(range(1, 1001))
    first = json.loads(consumer.messages[0].payload)
    assert first["device"] == "dev-1"
    assert first["results"][0] == {
        "seq": 1, "time": first["results"][0]["time"], "model": "iris", "version": "1.0",
        "inputs": [[0, 0.5]], "outputs": [0], "latency_ms": 0.25,
    }  # fmt: skip
    assert len(first["results"]) == 100  # buffer.batch_size
    deadline = time.monotonic() + 5
    while agent.buffer.stats().rows and time.monotonic() < deadline:
        time.sleep(0.05)
    assert agent.buffer.stats().rows == 0
    assert agent.forwarder.forwarded == 1000
    assert agent.forwarder.alive()
    text = generate_latest(agent.metrics.registry).decode()
    assert "edge_forwarded_results_total 1000.0" in text
    assert "edge_buffer_rows 0.0" in text


def test_results_made_while_the_broker_is_down_all_arrive(
    broker: Broker, tmp_path: Path, agents: list[Agent]
) -> None:
    cfg = make_config(broker, "dev-1")
    consumer = broker.subscribe("edge/devices/dev-1/results", persistent=True)
    agent = Agent(cfg, tmp_path / "buffer.db").start()
    agents.append(agent)
    assert agent.mqtt.wait_connected(10)
    fill(agent.buffer, 300)
    consumer.wait_for(lambda m: len(seqs_of(consumer)) >= 300)
    deadline = time.monotonic() + 10  # and acknowledged: the first 300 are deleted
    while agent.buffer.stats().rows and time.monotonic() < deadline:
        time.sleep(0.05)
    assert agent.buffer.stats().rows == 0
    broker.stop()
    deadline = time.monotonic() + 10
    while agent.mqtt.connected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not agent.mqtt.connected
    fill(agent.buffer, 700)  # made while the broker is away
    assert agent.buffer.stats().rows == 700  # kept, not lost, not deleted
    broker.start()
    consumer.wait_for(lambda m: len(set(seqs_of(consumer))) >= 1000, timeout=30)
    assert sorted(set(seqs_of(consumer))) == list(range(1, 1001))
    deadline = time.monotonic() + 5
    while agent.buffer.stats().rows and time.monotonic() < deadline:
        time.sleep(0.05)
    assert agent.buffer.stats().rows == 0


@pytest.mark.slow
def test_kill_9_mid_forwarding_loses_nothing(broker: Broker, tmp_path: Path) -> None:
    cfg = make_config(broker, "dev-1")
    path = tmp_path / "buffer.db"
    seed = ResultBuffer(path, BufferConfig(durability="batched"))
    fill(seed, 20_000)
    seed.close()
    consumer = broker.subscribe("edge/devices/dev-1/results", persistent=True)
    script = textwrap.dedent(f"""
        import time
        from agent.results.buffer import ResultBuffer
        from agent.config import BufferConfig, Config
        from agent.results.forwarder import Forwarder
        from agent.paho_link import MqttClient
        cfg = Config()
        cfg.device.id = "dev-1"
        cfg.mqtt.url, cfg.mqtt.username = {cfg.mqtt.url!r}, "dev-1"
        cfg.mqtt.password_file = {cfg.mqtt.password_file!r}
        cfg.buffer.batch_size = 50
        cfg.forward.ack = "broker"
        buf = ResultBuffer({str(path)!r}, BufferConfig())
        mqtt = MqttClient(cfg)
        mqtt.start()
        Forwarder(cfg, buf, mqtt).start()
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    try:
        consumer.wait_for(lambda m: len(m) >= 20, timeout=30)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    before = set(seqs_of(consumer))
    assert 0 < len(before) < 20_000, "the kill should land mid-forwarding"
    # The agent comes back on the same buffer and finishes the job.
    agent = Agent(cfg, path).start()
    try:
        consumer.wait_for(lambda m: len(set(seqs_of(consumer))) >= 20_000, timeout=60)
    finally:
        agent.stop()
    got = seqs_of(consumer)
    # The consumer drops duplicates by seq and has every result exactly once.
    assert sorted(set(got)) == list(range(1, 20_001))


def test_refused_batches_stay_buffered_and_are_counted(
    broker: Broker, tmp_path: Path, agents: list[Agent]
) -> None:
    # Logged in as dev-1 but configured as dev-2: the ACL refuses dev-2's results topic.
    cfg = make_config(broker, "dev-2", username="dev-1")
    cfg.mqtt.client_id = "dev-1"
    agent = Agent(cfg, tmp_path / "buffer.db")
    agents.append(agent)
    fill(agent.buffer, 250)
    agent.start()
    deadline = time.monotonic() + 10
    while agent.forwarder.failed_batches == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert agent.forwarder.failed_batches >= 1
    assert agent.buffer.stats().rows == 250
    assert agent.forwarder.forwarded == 0
    assert agent.mqtt.failures.get("not_authorized", 0) >= 1
    text = generate_latest(agent.metrics.registry).decode()
    assert 'edge_mqtt_publish_failures_total{reason="not_authorized"}' in text


@pytest.mark.slow
def test_large_results_are_split_below_the_message_limit(
    broker: Broker, tmp_path: Path, agents: list[Agent]
) -> None:
    from agent.results.forwarder import MAX_MESSAGE_BYTES

    cfg = make_config(broker, "dev-1")
    consumer = broker.subscribe("edge/devices/dev-1/results")
    agent = Agent(cfg, tmp_path / "buffer.db")
    agents.append(agent)
    big = "é" * 150_000  # 300 kB of UTF-8 per result: 100 rows would be 30 MB
    for i in range(10):
        agent.buffer.record(Result(time.time(), "text-model", "2.0", [big], [i], 1.0))
    agent.buffer.flush()
    agent.start()
    consumer.wait_for(lambda m: len(seqs_of(consumer)) >= 10)
    assert seqs_of(consumer) == list(range(1, 11))
    assert all(len(m.payload) <= MAX_MESSAGE_BYTES for m in consumer.messages)
    assert len(consumer.messages) >= 4
    first = json.loads(consumer.messages[0].payload)["results"][0]
    assert first["inputs"] == [big] and first["model"] == "text-model"


def test_cpu_share_paces_the_drain(broker: Broker, tmp_path: Path) -> None:
    cfg = make_config(broker, "dev-1")
    metrics = Metrics()
    buffer = ResultBuffer(tmp_path / "buffer.db", BufferConfig(durability="batched"), metrics)
    fill(buffer, 60_000)
    mqtt = MqttClient(cfg, metrics)
    mqtt.start()
    assert mqtt.wait_connected(10)
    forwarder = Forwarder(cfg, buffer, mqtt, metrics, cpu_share=0.02)
    t0 = time.monotonic()
    forwarder.start()
    try:
        time.sleep(1.5)
        [thread] = [t for t in threading.enumerate() if t.name == "forwarder"]
        wall = time.monotonic() - t0
        # The forwarder thread's own CPU time (utime + stime), from /proc.
        stat = Path(f"/proc/self/task/{thread.native_id}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        assert 0 < forwarder.forwarded < 60_000  # still draining: paced
        # Unpaced it would use a whole core until the backlog is gone.
        assert cpu / wall < 0.1, f"forwarder used {cpu:.2f} s CPU in {wall:.1f} s"
    finally:
        forwarder.stop()
        mqtt.stop(timeout=1)
        buffer.close()


def test_running_agent_forwards_results_made_while_the_broker_was_down(
    broker: Broker, start_agent: Callable[..., Any], iris_package: Path
) -> None:
    creds = broker.add_device("pi-1", fleet="f1")
    consumer = broker.subscribe("edge/devices/pi-1/results", persistent=True)
    broker.stop()
    agent = start_agent(
        {"device": {"id": "pi-1", "fleet": "f1"},
         "mqtt": {**broker.mqtt_settings(creds), "reconnect_min_s": 1, "reconnect_max_s": 1},
         "forward": {"ack": "broker"}},
        packages=[iris_package],
    )  # fmt: skip
    for i in range(50):
        code, _ = agent.request("POST", "/predict", {"features": [[5.1, 3.5, 1.4, 0.1 * i]]})
        assert code == 200
    assert agent.status()["buffer"]["rows"] == 50
    # kill -9 while offline: the buffered results outlive the process too.
    agent.kill()
    agent.start()
    broker.start()
    consumer.wait_for(lambda m: len(set(seqs_of(consumer))) >= 50, timeout=30)
    assert sorted(set(seqs_of(consumer))) == list(range(1, 51))
    agent.wait_for(lambda s: s["buffer"]["rows"] == 0)


def test_rows_delivered_on_a_full_disk_are_deleted_once_there_is_room(
    broker: Broker, tiny_disk: Path, agents: list[Agent]
) -> None:
    cfg = make_config(broker, "dev-1")
    consumer = broker.subscribe("edge/devices/dev-1/results", persistent=True)
    agent = Agent(cfg, tiny_disk / "buffer.db")
    fill(agent.buffer, 2000)
    filler = tiny_disk / "someone-elses-log"
    fill_disk(filler)
    agents.append(agent.start())
    consumer.wait_for(lambda m: len(set(seqs_of(consumer))) >= 2000, timeout=30)
    # Delivered, but the deletes failed: no backlog reported, not sent again.
    deadline = time.monotonic() + 15
    while agent.buffer.stats().delivered < 2000 and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = agent.buffer.stats()
    assert (stats.rows, stats.delivered) == (0, 2000)
    filler.unlink()  # room again: the remembered deletes go through
    deadline = time.monotonic() + 15
    while agent.buffer.stats().delivered and time.monotonic() < deadline:
        time.sleep(0.05)
    assert agent.buffer.stats().delivered == 0
    with sqlite3.connect(tiny_disk / "buffer.db") as db:
        assert db.execute("SELECT count(*) FROM results").fetchone() == (0,)
    assert sorted(seqs_of(consumer)) == list(range(1, 2001))  # each sent once
