"""The central side of bench/fleet.py: the broker (mosquitto or a 3-node NATS cluster),
the HTTP origin (nginx), and what they sent.

The servers are the test suite's own (tests/fixtures/broker.py, nats.py, nginx.py), so
the bench runs what the tests run, with what a fleet of thousands needs on top:

- mosquitto: broker-config/ as shipped (mkconf.sh defaults, persistence included).
- NATS: tests/fixtures/nats.py's node configuration, with room for a fleet: a larger
  file store, and the MQTT consumers (one per QoS 1 subscription of every device) kept
  in memory with one replica instead of three (``--nats-consumers``), since 5000
  devices x 3 subscriptions of R3 file consumers is 15000 raft groups on 2 cores.
- nginx: tests/fixtures/nginx.py with ``worker_connections`` raised from the tests' 64
  to room for every device at once.

Egress is counted by the kernel: ``ss -ti`` gives ``bytes_sent`` of every established
socket on the server's device-facing ports (the devices stay connected through the
run, so a before/after difference is what went to them). NATS also reports its own
``out_bytes`` (/varz), which includes the routes between the nodes (JetStream
replication); nginx its access log (``$body_bytes_sent``).
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from fleet.accounts import BrokerConf, role_account, write_password_file
from fleet.connection import BrokerOptions, broker_options
from tests.fixtures.broker import HOST, Broker, Creds
from tests.fixtures.nats import PASSWORD, USER, NatsCluster, NatsNode, node_conf
from tests.fixtures.nginx import Nginx

_BYTES_SENT = re.compile(r"\bbytes_sent:(\d+)")
_BYTES_RETRANS = re.compile(r"\bbytes_retrans:(\d+)")


def socket_bytes_sent(ports: list[int]) -> dict[str, int]:
    """Bytes the kernel sent on every established TCP socket bound to one of ``ports``
    (``devices``), and how many of them were retransmissions (``retrans``): on loopback
    those come from the kernel dropping segments under TCP memory pressure, when
    thousands of sockets each hold a megabyte their reader has not taken yet."""
    where = " or ".join(f"sport = :{p}" for p in ports)
    out = subprocess.run(
        ["ss", "-tinH", "state", "established", f"( {where} )"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    return {
        "devices": sum(int(n) for n in _BYTES_SENT.findall(out)),
        "retrans": sum(int(n) for n in _BYTES_RETRANS.findall(out)),
    }


def _options(url: str, username: str, password_file: Path, protocol: str) -> BrokerOptions:
    # Through the environment variables of edge-fleet, as an operator's shell would:
    # EDGE_MQTT_PROTOCOL is read once fleet/connection.py knows it (issue 14).
    env = {"EDGE_BROKER": url, "EDGE_USERNAME": username,
           "EDGE_PASSWORD_FILE": str(password_file), "EDGE_MQTT_PROTOCOL": protocol}  # fmt: skip
    import argparse

    return broker_options(argparse.Namespace(), environ=env)


class Mosquitto:
    """One mosquitto from broker-config/; devices on its device listener."""

    name = "mosquitto"
    protocol = "5"

    def __init__(self) -> None:
        self.broker = Broker(autosave_interval=None)  # mkconf.sh's own autosave
        self.operator = _options(self.broker.operator_url, self.broker.operator.username,
                                 self.broker.operator.password_file, "5")  # fmt: skip

    def add_devices(self, ids: list[str], fleet: str) -> list[tuple[str, str]]:
        """An account per device, as ``edge-fleet enroll`` makes them (fleet/accounts.py),
        written in one go; (username, password file) of each.

        Not one shared account: the device listener sets ``use_username_as_clientid``, so
        devices of one account would take each other's client id and knock each other off.
        """
        conf = BrokerConf(self.broker.conf_dir)
        prefix = self.broker.prefix
        passwords = conf.write([role_account("device", d, prefix, fleet) for d in ids])
        folder = self.broker.root / "device-creds"
        folder.mkdir()
        out = []
        for device in ids:
            path = write_password_file(folder / f"{device}.password", passwords[device])
            out.append((device, str(path)))
        last = ids[-1]
        self.broker.reload(Creds(last, passwords[last], folder / f"{last}.password"))
        return out

    def device_urls(self, index: int) -> list[str]:
        return [self.broker.url]

    @property
    def pids(self) -> list[int]:
        return [self.broker.proc.pid] if self.broker.proc is not None else []

    def egress(self) -> dict[str, int]:
        return socket_bytes_sent([self.broker.port])

    def alive(self) -> str | None:
        return None if self.broker.running else f"mosquitto exited\n{self.broker.log()}"

    def close(self) -> None:
        self.broker.cleanup()


NATS_CONSUMERS = {
    # MQTT consumers as tests/fixtures/nats.py makes them: file storage, the streams' R3.
    "r3-file": "",
    # One replica in memory: a consumer is a cursor of one device's session, not data.
    "r1-memory": "  consumer_replicas: 1\n  consumer_memory_storage: true\n",
}


class Nats:
    """tests/fixtures/nats.py's 3-node cluster; device ``i`` starts on node ``i % 3``."""

    name = "nats"
    protocol = "3.1.1"

    def __init__(self, consumers: str = "r1-memory", file_store: str = "8GB") -> None:
        self.root = Path(tempfile.mkdtemp(prefix="bench-nats-"))
        self.cluster = NatsCluster(self.root)
        for node in self.cluster.nodes:
            node.conf.write_text(self._conf(node, consumers, file_store))
        self.cluster.start()
        self.password_file = write_password_file(self.root / "harness.password", PASSWORD)
        self.operator = _options(self.cluster.nodes[0].mqtt_url, USER, self.password_file,
                                 "3.1.1")  # fmt: skip

    def add_devices(self, ids: list[str], fleet: str) -> list[tuple[str, str]]:
        """The cluster's one MQTT account for every device (NATS takes the client id as
        given, so devices of one account do not collide)."""
        return [(USER, str(self.password_file)) for _ in ids]

    def _conf(self, node: NatsNode, consumers: str, file_store: str) -> str:
        peers = [p for p in self.cluster.nodes if p is not node]
        text = node_conf(node, peers)
        for old, new in (
            ("  max_file_store: 512MB\n", f"  max_file_store: {file_store}\n"),
            ("  stream_replicas: 3\n", "  stream_replicas: 3\n" + NATS_CONSUMERS[consumers]),
        ):
            if old not in text:
                raise RuntimeError(f"tests/fixtures/nats.py node_conf no longer has {old!r}")
            text = text.replace(old, new)
        return text

    def device_urls(self, index: int) -> list[str]:
        urls = self.cluster.mqtt_urls
        first = index % len(urls)
        return urls[first:] + urls[:first]

    @property
    def pids(self) -> list[int]:
        return [n.proc.pid for n in self.cluster.nodes if n.proc is not None]

    def varz(self) -> list[dict[str, Any]]:
        return [n.monitor("varz") for n in self.cluster.nodes]

    def egress(self) -> dict[str, int]:
        out: dict[str, int] = socket_bytes_sent([n.mqtt_port for n in self.cluster.nodes])
        out["varz"] = sum(int(v.get("out_bytes", 0)) for v in self.varz())
        return out

    def consumers(self) -> int:
        """JetStream consumers, as node 1 counts them (the MQTT sessions' subscriptions)."""
        return int(self.cluster.nodes[0].monitor("jsz").get("consumers", 0))

    def alive(self) -> str | None:
        for node in self.cluster.nodes:
            if not node.running:
                return f"{node.name} exited\n{node.log()}"
        return None

    def close(self) -> None:
        self.cluster.cleanup()


class Origin(Nginx):
    """The tests' nginx with room for a whole fleet downloading at once."""

    def __init__(self, connections: int) -> None:
        self.connections = connections
        super().__init__()

    def _config(self) -> str:
        text = super()._config()
        if "worker_connections 64;" not in text:
            raise RuntimeError("tests/fixtures/nginx.py no longer sets worker_connections 64")
        room = self.connections + 256
        return (f"worker_rlimit_nofile {2 * room};\n"
                + text.replace("worker_connections 64;", f"worker_connections {room};"))  # fmt: skip

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def egress(self) -> dict[str, int]:
        return {"log": sum(r.bytes_sent for r in self.requests()),
                "requests": len(self.requests())}  # fmt: skip

    @property
    def pids(self) -> list[int]:
        parent = psutil.Process(self.proc.pid)
        return [parent.pid, *(c.pid for c in parent.children(recursive=True))]


class PeakRss:
    """Samples the RSS of process groups every second; ``peak[group]`` in bytes."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.peak = {g: 0 for g in groups}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)
        self._thread.start()

    def sample(self) -> dict[str, int]:
        now = {}
        for group, pids in self.groups.items():
            total = 0
            for pid in pids:
                with contextlib.suppress(psutil.Error):
                    total += psutil.Process(pid).memory_info().rss
            now[group] = total
            self.peak[group] = max(self.peak[group], total)
        return now

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds (user + system) each group has used so far."""
        out = {}
        for group, pids in self.groups.items():
            total = 0.0
            for pid in pids:
                with contextlib.suppress(psutil.Error):
                    times = psutil.Process(pid).cpu_times()
                    total += times.user + times.system
            out[group] = total
        return out

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def fetch_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as answer:
        data: dict[str, Any] = json.load(answer)
        return data


def wait_until(predicate: Any, timeout: float, step: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())
