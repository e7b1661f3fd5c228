"""What one message costs the broker: CPU per message and per byte, and fan-out, on
mosquitto (MQTT 5, broker-config/) and on a 3-node NATS cluster (MQTT 3.1.1, JetStream).

    .venv/bin/python bench/broker_costs.py [--engine mosquitto|nats|both] [--clients 200]

The figures docs/scaling.md builds its capacity model from. Three loads, each for
``--seconds``:

- ``health``: ``--clients`` device connections publish 1.2 KB QoS 1 messages on their
  own health topic; one collector-like consumer holds ``edge/devices/+/health`` (QoS 1).
- ``results``: the same with 16 KB messages (a result batch of about 50 rows).
- ``fanout``: one retained 1 KB message on a fleet topic, re-published; every client
  holds that topic (QoS 1), as devices hold their fleet's desired state.

The broker's CPU is read from /proc (user + system, summed over its processes) around
each load and divided by the messages delivered; the publishers and the consumer are
paho clients in this process, so they share the two cores with the broker: the rate is
what this machine reached, the CPU per message is the broker's own. Per-byte cost is
the difference of the two message sizes' costs over their size difference.
"""

from __future__ import annotations

import os
import sys

# bench/http.py would shadow the standard library's http package: keep bench/ off the path.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

HOST = "127.0.0.1"
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Target:
    """Where the clients connect, and the broker processes whose CPU is counted."""

    name: str
    protocol: int  # paho's MQTTv5 or MQTTv311
    ports: list[int]  # spread the clients over these (one per node)
    username: str
    password: str
    pids: Callable[[], list[int]]


@dataclass
class Figure:
    engine: str
    load: str
    size: int
    delivered: int
    seconds: float
    cpu_s: float

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds else 0.0

    @property
    def us_per_message(self) -> float:
        return self.cpu_s / self.delivered * 1e6 if self.delivered else float("nan")


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def client(target: Target, index: int, client_id: str) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=target.protocol)
    c.username_pw_set(target.username, target.password)
    c.max_inflight_messages_set(100)
    connected = threading.Event()
    c.on_connect = lambda *a: connected.set()
    c.connect(HOST, target.ports[index % len(target.ports)], keepalive=60)
    c.loop_start()
    if not connected.wait(30):
        raise RuntimeError(f"{target.name}: client {client_id} got no CONNACK")
    return c


def subscribe(c: mqtt.Client, topic: str, on_message: Callable[..., None]) -> None:
    done = threading.Event()

    def on_subscribe(cl: mqtt.Client, u: object, mid: int, rcs: list[object], p: object) -> None:
        if any(getattr(rc, "is_failure", False) for rc in rcs):
            threading.Timer(1.0, lambda: cl.subscribe(topic, qos=1)).start()  # NATS election
        else:
            done.set()

    c.on_subscribe = on_subscribe
    c.on_message = on_message
    c.subscribe(topic, qos=1)
    if not done.wait(60):
        raise RuntimeError(f"subscribe {topic}: no SUBACK")


def stream_load(target: Target, clients: list[mqtt.Client], size: int, seconds: float,
                kind: str) -> Figure:  # fmt: skip
    """Each client publishes ``size`` bytes on its own topic; one consumer holds them all."""
    got = [0]
    lock = threading.Lock()

    def on_message(*a: object) -> None:
        with lock:
            got[0] += 1

    consumer = client(target, 0, f"bench-consumer-{kind}")
    subscribe(consumer, f"bench/{kind}/+", on_message)
    payload = os.urandom(size // 2).hex().encode()
    stop = threading.Event()

    def publish_loop(c: mqtt.Client, topic: str) -> None:
        # Bursts of 20 in flight, then wait for the last PUBACK: enough messages that
        # the broker's fixed per-second work (keepalives, autosave) is a small share.
        while not stop.is_set():
            infos = [c.publish(topic, payload, qos=1) for _ in range(20)]
            try:
                infos[-1].wait_for_publish(5)
            except (RuntimeError, ValueError):
                time.sleep(0.05)

    threads = [threading.Thread(target=publish_loop, args=(c, f"bench/{kind}/d{i}"), daemon=True)
               for i, c in enumerate(clients)]  # fmt: skip
    for t in threads:
        t.start()
    time.sleep(1.0)  # warm up
    cpu0, t0 = cpu_seconds(target.pids()), time.monotonic()
    with lock:
        got0 = got[0]
    time.sleep(seconds)
    cpu1, t1 = cpu_seconds(target.pids()), time.monotonic()
    with lock:
        got1 = got[0]
    stop.set()
    for t in threads:
        t.join(5)
    consumer.disconnect()
    consumer.loop_stop()
    return Figure(target.name, kind, size, got1 - got0, t1 - t0, cpu1 - cpu0)


def fanout_load(target: Target, clients: list[mqtt.Client], seconds: float) -> Figure:
    """A retained 1 KB message re-published on one topic every client holds."""
    got = [0]
    lock = threading.Lock()

    def on_message(*a: object) -> None:
        with lock:
            got[0] += 1

    topic = "bench/fleets/f1/models/m/desired"
    for c in clients:
        subscribe(c, topic, on_message)
    operator = client(target, 0, "bench-operator")
    payload = b"x" * 1024
    stop = threading.Event()

    def publish_loop() -> None:
        while not stop.is_set():
            operator.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
            time.sleep(0.05)  # a desired state is rare: this is a burst, not a stream

    thread = threading.Thread(target=publish_loop, daemon=True)
    thread.start()
    time.sleep(1.0)
    cpu0, t0 = cpu_seconds(target.pids()), time.monotonic()
    with lock:
        got0 = got[0]
    time.sleep(seconds)
    cpu1, t1 = cpu_seconds(target.pids()), time.monotonic()
    with lock:
        got1 = got[0]
    stop.set()
    thread.join(10)
    operator.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
    operator.disconnect()
    operator.loop_stop()
    return Figure(target.name, "fanout", 1024, got1 - got0, t1 - t0, cpu1 - cpu0)


@contextmanager
def mosquitto_target(root: Path) -> Iterator[Target]:
    from tests.fixtures.broker import Broker

    broker = Broker()
    try:
        assert broker.proc is not None
        pid = broker.proc.pid
        harness = broker.harness
        yield Target("mosquitto", mqtt.MQTTv5, [broker.port_for(harness)], harness.username,
                     harness.password, lambda: [pid])  # fmt: skip
    finally:
        broker.cleanup()


@contextmanager
def nats_target(root: Path) -> Iterator[Target]:
    from tests.fixtures import nats

    root.mkdir(parents=True, exist_ok=True)
    cluster = nats.NatsCluster(root)
    try:
        cluster.start()
        yield Target("nats (3 nodes)", mqtt.MQTTv311, [n.mqtt_port for n in cluster.nodes],
                     nats.USER, nats.PASSWORD,
                     lambda: [n.proc.pid for n in cluster.nodes if n.proc])  # fmt: skip
    finally:
        cluster.cleanup()


def run(target: Target, n_clients: int, seconds: float) -> list[Figure]:
    clients = [client(target, i, f"bench-dev-{i}") for i in range(n_clients)]
    try:
        return [
            stream_load(target, clients, 1200, seconds, "health"),
            stream_load(target, clients, 16000, seconds, "results"),
            fanout_load(target, clients, seconds),
        ]
    finally:
        for c in clients:
            c.disconnect()
            c.loop_stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", choices=["mosquitto", "nats", "both"], default="both")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-broker-"))
    figures: list[Figure] = []
    makers = {"mosquitto": mosquitto_target, "nats": nats_target}
    for name in ["mosquitto", "nats"] if args.engine == "both" else [args.engine]:
        with makers[name](root / name) as target:
            figures += run(target, args.clients, args.seconds)
    print(f"\n{args.clients} clients, {args.seconds:g} s per load, 2-core machine shared "
          "by the broker and the clients\n")  # fmt: skip
    print(f"{'engine':<16}{'load':<9}{'bytes':>7}{'msg/s':>10}{'broker CPU µs/msg':>19}")
    for f in figures:
        print(f"{f.engine:<16}{f.load:<9}{f.size:>7}{f.rate:>10.0f}{f.us_per_message:>19.1f}")
    for engine in dict.fromkeys(f.engine for f in figures):
        small, big = (next(f for f in figures if f.engine == engine and f.load == load)
                      for load in ("health", "results"))  # fmt: skip
        per_byte = (big.us_per_message - small.us_per_message) / (big.size - small.size)
        base = small.us_per_message - per_byte * small.size
        print(f"{engine}: about {base:.1f} µs per message + {per_byte * 1000:.2f} µs per KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
