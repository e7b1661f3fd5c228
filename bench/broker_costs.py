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
light MQTT sessions on one asyncio loop in this process (bench/fleet_lite.py: 200 paho
clients, 400 threads, starved their own consumer into single-digit rates here), so they
share the two cores with the broker: the rate is what this machine reached, the CPU per
message is the broker's own. Per-byte cost is
the difference of the two message sizes' costs over their size difference.
"""

from __future__ import annotations

import os
import sys

# bench/http.py would shadow the standard library's http package: keep bench/ off the path.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fleet_lite import Session  # noqa: E402

HOST = "127.0.0.1"
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Target:
    """Where the clients connect, and the broker processes whose CPU is counted."""

    name: str
    v5: bool  # MQTT 5 (mosquitto) or 3.1.1 (NATS)
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


class Counter(asyncio.Queue[tuple[str, memoryview]]):
    """An inbox that only counts what arrives (the loads need the number, not the data)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def put_nowait(self, item: tuple[str, memoryview]) -> None:
        self.count += 1


async def session(target: Target, index: int, client_id: str) -> Session:
    s = await Session.open(f"mqtt://{HOST}:{target.ports[index % len(target.ports)]}",
                           client_id, target.username, target.password,
                           target.v5, ("bench/will", b"gone"))  # fmt: skip
    s.reading = asyncio.create_task(s.reads())  # type: ignore[attr-defined]
    return s


async def measured(target: Target, inbox: Counter, seconds: float) -> tuple[int, float, float]:
    """Messages delivered, seconds and broker CPU-seconds of one window after a warm-up."""
    await asyncio.sleep(1.0)
    cpu0, t0, got0 = cpu_seconds(target.pids()), time.monotonic(), inbox.count
    await asyncio.sleep(seconds)
    cpu1, t1 = cpu_seconds(target.pids()), time.monotonic()
    return inbox.count - got0, t1 - t0, cpu1 - cpu0


async def stream_load(target: Target, clients: list[Session], size: int, seconds: float,
                      kind: str) -> Figure:  # fmt: skip
    """Each client publishes ``size`` bytes on its own topic; one consumer holds them all."""
    consumer = await session(target, 0, f"bench-consumer-{kind}")
    inbox = Counter()
    await consumer.subscribe(f"bench/{kind}/+", inbox)
    payload = os.urandom(size // 2).hex().encode()

    async def publish_loop(c: Session, topic: str) -> None:
        # Windows of 10 in flight, the last one waited for: enough messages that the
        # broker's fixed per-second work (keepalives, autosave) is a small share.
        while True:
            for _ in range(9):
                c.publish(topic, payload)
            await c.publish_acked(topic, payload)

    loops = [asyncio.create_task(publish_loop(c, f"bench/{kind}/d{i}"))
             for i, c in enumerate(clients)]  # fmt: skip
    delivered, took, cpu = await measured(target, inbox, seconds)
    for t in loops:
        t.cancel()
    await asyncio.sleep(0.5)  # in flight: drained before the next load
    consumer.writer.close()
    return Figure(target.name, kind, size, delivered, took, cpu)


async def fanout_load(target: Target, clients: list[Session], seconds: float) -> Figure:
    """A retained 1 KB message re-published on one topic every client holds."""
    topic = "bench/fleets/f1/models/m/desired"
    inbox = Counter()
    for c in clients:
        await c.subscribe(topic, inbox)
    operator = await session(target, 0, "bench-operator")
    payload = b"x" * 1024

    async def publish_loop() -> None:
        while True:  # a desired state is rare: bursts, not a stream
            await operator.publish_acked(topic, payload)
            await asyncio.sleep(0.05)

    loop = asyncio.create_task(publish_loop())
    delivered, took, cpu = await measured(target, inbox, seconds)
    loop.cancel()
    operator.writer.close()
    return Figure(target.name, "fanout", 1024, delivered, took, cpu)


@contextmanager
def mosquitto_target(root: Path) -> Iterator[Target]:
    from tests.fixtures.broker import Broker

    broker = Broker()
    try:
        assert broker.proc is not None
        pid = broker.proc.pid
        harness = broker.harness
        yield Target("mosquitto", True, [broker.port_for(harness)], harness.username,
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
        yield Target("nats (3 nodes)", False, [n.mqtt_port for n in cluster.nodes],
                     nats.USER, nats.PASSWORD,
                     lambda: [n.proc.pid for n in cluster.nodes if n.proc])  # fmt: skip
    finally:
        cluster.cleanup()


async def run(target: Target, n_clients: int, seconds: float) -> list[Figure]:
    clients = [await session(target, i, f"bench-dev-{i}") for i in range(n_clients)]
    try:
        return [
            await stream_load(target, clients, 1200, seconds, "health"),
            await stream_load(target, clients, 16000, seconds, "results"),
            await fanout_load(target, clients, seconds),
        ]
    finally:
        for c in clients:
            c.writer.close()


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
            figures += asyncio.run(run(target, args.clients, args.seconds))
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
