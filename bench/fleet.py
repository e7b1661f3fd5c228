"""Fleet simulation: N devices running the agent's own delivery code against a real broker.

    .venv/bin/python bench/fleet.py [--devices 500] [--model-bytes 1000000]
        [--broker mosquitto|nats] [--artifacts broker|http] [--first 10] [--matrix]
        [--device agent|lite]

Each simulated device is what the agent builds for delivery, in its own state folder
and on its own MQTT connection (bench/fleet_devices.py says what the devices of one
process share to fit thousands on one machine: the onnxruntime session of an artifact,
the broker account, the interpreter). ``--device lite`` runs light devices instead
(bench/fleet_lite.py: thousands per asyncio loop, each with its own MQTT connection,
signature and sha256 checks and state folder, without paho, threads or onnxruntime),
because the agent's own device costs more CPU than 2 cores give 5000 of them in 60 s. The servers are real (bench/fleet_servers.py):
mosquitto from broker-config/, or a 3-node NATS cluster with JetStream and its MQTT
listener (devices on MQTT 3.1.1, spread over the nodes); artifacts as retained broker
chunks, or served by nginx (``edge-fleet publish --artifact-url ... --upload-dir ...``,
so the broker carries the manifests only).

The run trains a forest of about ``--model-bytes`` of ONNX, signs it, publishes it to
the fleet with ``--first`` percent, waits until the devices whose bucket is below it
serve it, holds a few seconds to catch any other device taking it, then rolls out to
100% and times until every device serves it. Goals (issues 5 and 14): exactly the
bucketed share in stage one; every device within 60 s of the 100% publish. It prints
one table per run (``--matrix``: the four broker x artifacts combinations side by side):
time to connect every device, per-device activation p50/p95 after the 100% publish,
bytes the broker and the origin sent per device for the update (kernel socket counters,
nginx's access log, NATS's /varz), and the peak RSS of devices and servers.
"""

from __future__ import annotations

import os
import sys

# bench/http.py would shadow the standard library's http package: keep bench/ off the path.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse
import logging
import math
import multiprocessing as mp
import queue
import resource
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.wire.manifest import DEFAULT_CHUNK_SIZE  # noqa: E402
from bench.fleet_devices import FLEET, DeviceSpec, run_devices  # noqa: E402
from bench.fleet_lite import run_light  # noqa: E402

HOLD_S = 5.0
STEPS = ("downloading", "verified", "activated")  # the usual deployment events, timed
GOAL_S = 60.0
COMBINATIONS = [
    ("mosquitto", "broker"),
    ("mosquitto", "http"),
    ("nats", "broker"),
    ("nats", "http"),
]


@dataclass
class Tally:
    """What the worker processes reported, gathered by one thread."""

    connected: dict[str, float] = field(default_factory=dict)
    activated: dict[str, float] = field(default_factory=dict)
    lost: int = 0
    events: dict[str, int] = field(default_factory=dict)  # deployment events but STEPS
    steps: dict[str, dict[str, float]] = field(default_factory=dict)  # step -> device -> last
    ready: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def drain(self, events: Any, version: str, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                batch = events.get(timeout=0.2)
            except queue.Empty:
                continue
            with self.lock:
                for kind, device, detail, at in batch:
                    self._count(kind, device, detail, at, version)

    def _count(self, kind: str, device: str, detail: str, at: float, version: str) -> None:
        if kind == "connected":
            self.connected.setdefault(device, at)
        elif kind == "lost":
            self.lost += 1
        elif kind == "activated" and detail == version:
            self.activated.setdefault(device, at)
        elif kind == "event" and detail in STEPS:
            self.steps.setdefault(detail, {})[device] = at
        elif kind == "event":
            self.events[detail] = self.events.get(detail, 0) + 1
        elif kind == "__ready__":
            self.ready += 1

    def wait(self, what: str, count: Any, want: int, timeout: float, alive: Any) -> bool:
        """Until ``count()`` reaches ``want`` (False after ``timeout`` or a dead server);
        says how far it got every 10 s."""
        start = time.monotonic()
        told = start
        while (now := time.monotonic()) < start + timeout:
            with self.lock:
                got = count()
            if got >= want:
                return True
            if alive() is not None:
                return False
            if now - told >= 10:
                told = now
                print(f"    {what}: {got}/{want} after {now - start:.0f} s", flush=True)
            time.sleep(0.1)
        return False


def build_model(tmp: Path, model_bytes: int, key: Path) -> tuple[Path, str, str]:
    """A signed package of about ``model_bytes`` of ONNX: (folder, model name, version)."""
    from agent.wire.signing import load_private_key
    from converter.package import build_package

    if model_bytes < 20_000:  # the small model of issue 5's runs
        from sklearn.datasets import load_iris
        from sklearn.linear_model import LogisticRegression

        x, y = load_iris(return_X_y=True)
        estimator: Any = LogisticRegression(max_iter=500).fit(x, y)
        name = "iris"
    else:
        from sklearn.datasets import make_classification
        from sklearn.ensemble import RandomForestClassifier

        # ~11 KB of ONNX per tree of depth 12 on this data (bench/delivery.py's forest).
        x, y = make_classification(n_samples=2000, n_features=20, n_informative=8, random_state=0)
        trees = max(1, round(90 * model_bytes / 1e6))
        estimator = RandomForestClassifier(
            n_estimators=trees, max_depth=12, random_state=0, n_jobs=1
        ).fit(x, y)
        name = "forest"
    package = build_package(estimator, name=name, version="2.0.0", out_dir=tmp / "package",
                            private_key=load_private_key(key))  # fmt: skip
    return package, name, "2.0.0"


def raise_open_files() -> int:
    """The soft limit of open files up to the hard one: a broker holds a socket per device,
    and the servers and workers inherit this from us."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def percentile(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)]


def run(args: argparse.Namespace, broker_kind: str, artifacts: str) -> dict[str, Any]:
    """One simulation; returns its figures (``row``) for the table."""
    from agent.wire.signing import generate_keypair
    from agent.wire.topics import in_rollout
    from bench.fleet_servers import Mosquitto, Nats, Origin, PeakRss
    from fleet.publish import publish, rollout

    row: dict[str, Any] = {"broker": broker_kind, "artifacts": artifacts,
                           "devices": args.devices}  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-", dir=args.state_root))
    key, pub = generate_keypair(tmp / "keys")
    package, model, version = build_model(tmp, args.model_bytes, key)
    row["model_bytes"] = (package / "model.onnx").stat().st_size
    row["chunk_size"] = args.chunk_size if artifacts == "broker" else "-"
    server: Any = Mosquitto() if broker_kind == "mosquitto" else Nats(args.nats_consumers)
    origin = Origin(args.devices) if artifacts == "http" else None
    ids = [f"sim-{i:05d}" for i in range(args.devices)]
    expected_first = {d for d in ids if in_rollout(f"{FLEET}/{model}", d, args.first)}
    accounts = server.add_devices(ids, FLEET)
    light = args.device == "lite"
    row["device"] = args.device
    # Light devices: one asyncio loop per core holds thousands; the agent's: 300 a process.
    processes = args.processes or (
        (os.cpu_count() or 2) if light else min(24, max(2, math.ceil(args.devices / 300)))
    )
    row["processes"] = processes

    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    stop = ctx.Event()
    tally, done = Tally(), threading.Event()
    drainer = threading.Thread(target=tally.drain, args=(events, version, done), daemon=True)
    drainer.start()
    procs = []
    rss: PeakRss | None = None
    try:
        t_start = time.time()
        for p in range(processes):
            mine = list(range(p, args.devices, processes))
            spec = DeviceSpec(
                ids=[ids[i] for i in mine], urls=[server.device_urls(i) for i in mine],
                protocol=server.protocol, accounts=[accounts[i] for i in mine],
                trusted_key=str(pub),
                root=str(tmp / "devices"), share_sessions=not args.own_sessions,
            )  # fmt: skip
            target = run_light if light else run_devices
            proc = ctx.Process(target=target, args=(spec, events, stop), name=f"devices-{p}")
            proc.start()
            procs.append(proc)
        groups = {"devices": [p.pid for p in procs if p.pid], "broker": server.pids}
        if origin is not None:
            groups["origin"] = origin.pids
        rss = PeakRss(groups)
        all_up = tally.wait("connected", lambda: len(tally.connected), args.devices, args.connect_timeout,
                            server.alive)  # fmt: skip
        with tally.lock:
            connected = len(tally.connected)
            last = max(tally.connected.values(), default=t_start)
        row["connected"] = connected
        row["connect_s"] = last - t_start if all_up else math.nan
        row["rss_connected"] = rss.sample()
        print(f"  {connected}/{args.devices} devices connected in {last - t_start:.1f} s"
              f" ({processes} processes); RSS devices {row['rss_connected']['devices'] / 1e6:.0f}"
              f" MB, broker {row['rss_connected']['broker'] / 1e6:.0f} MB", flush=True)  # fmt: skip
        if isinstance(server, Nats):
            row["consumers_connected"] = server.consumers()
            print(f"  NATS JetStream consumers: {row['consumers_connected']}", flush=True)
        if connected == 0:
            raise RuntimeError(f"no device connected\n{server.alive() or ''}")

        before = server.egress()
        origin_before = origin.egress() if origin is not None else {}
        http: dict[str, Any] = {}
        if origin is not None:
            http = {"urls": [f"{origin.base_url}/{{sha256}}"], "upload_dir": origin.root}
        ops = server.operator
        cpu_before = rss.cpu_s()
        t1 = time.time()
        publish(ops, package, fleet=FLEET, percent=args.first, key=key,
                chunk_size=args.chunk_size, **http)  # fmt: skip
        row["publish_s"] = time.time() - t1
        tally.wait(
            "stage one", lambda: len(tally.activated), len(expected_first), GOAL_S * 2, server.alive
        )
        time.sleep(HOLD_S)
        with tally.lock:
            stage1 = dict(tally.activated)
        row["first_s"] = max(stage1.values(), default=t1) - t1
        row["stage1"] = (len(stage1), len(expected_first), set(stage1) == expected_first)

        t2 = time.time()
        rollout(ops, model, fleet=FLEET, percent=100, key=key)
        row["rollout_s"] = time.time() - t2
        converged = tally.wait("stage two", lambda: len(tally.activated), args.devices, args.timeout,
                               server.alive)  # fmt: skip
        with tally.lock:
            activated = dict(tally.activated)
        # Devices of stage one re-activate (new serial) without a download: the rest count.
        took = [at - t2 for d, at in activated.items() if d not in stage1]
        row["converged"] = len(activated)
        row["converge_s"] = max(took, default=0.0) if converged else math.nan
        row["p50_s"], row["p95_s"] = percentile(took, 50), percentile(took, 95)
        with tally.lock:
            for step in STEPS[:2]:
                times = [at - t2 for d, at in tally.steps.get(step, {}).items() if d not in stage1]
                row[f"{step}_p50_s"] = percentile(times, 50)
        cpu = rss.cpu_s()
        row["cpu_s"] = {g: cpu[g] - cpu_before.get(g, 0.0) for g in cpu}
        time.sleep(1.0)  # the last PUBACKs and ACKs in the counters
        after = server.egress()
        row["egress"] = {k: (after[k] - before[k]) / args.devices for k in after}
        if origin is not None:
            now = origin.egress()
            row["origin"] = {k: (now[k] - origin_before.get(k, 0)) / args.devices for k in now}
        if isinstance(server, Nats):
            row["consumers_end"] = server.consumers()
        with tally.lock:
            row["lost"], row["events"] = tally.lost, dict(tally.events)
        row["ok"] = bool(row["stage1"][2] and converged and row["converge_s"] < GOAL_S)
    except Exception as e:  # a run that breaks still prints what it measured
        row["error"] = f"{type(e).__name__}: {e}"[:2000]
        with tally.lock:
            row.setdefault("converged", len(tally.activated))
            row["lost"], row["events"] = tally.lost, dict(tally.events)
    finally:
        if rss is not None:
            rss.stop()
            row["rss_peak"] = dict(rss.peak)
        stop.set()
        deadline = time.monotonic() + 30
        for proc in procs:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        done.set()
        if origin is not None:
            origin.close()
        server.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return row


# --- the table --------------------------------------------------------------------


def _s(value: Any, fmt: str = ".1f") -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, fmt)
    )


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.2f} MB"


def table(rows: list[dict[str, Any]]) -> str:
    """Figures as lines, runs as columns."""
    lines: list[tuple[str, list[str]]] = [
        ("broker / artifacts", [f"{r['broker']}/{r['artifacts']}" for r in rows]),
        ("devices (processes)", [f"{r['devices']} ({r.get('processes', '-')})" for r in rows]),
        ("simulated device", [r.get("device", "agent") for r in rows]),
        ("model ONNX bytes", [str(r.get("model_bytes", "-")) for r in rows]),
        ("broker chunk bytes", [str(r.get("chunk_size", "-")) for r in rows]),
        ("connected", [f"{r.get('connected', '-')}/{r['devices']}" for r in rows]),
        ("connect all (s)", [_s(r.get("connect_s")) for r in rows]),
        ("stage one exact", [_stage1(r) for r in rows]),
        (
            "publish / rollout cmd (s)",
            [f"{_s(r.get('publish_s'), '.2f')} / {_s(r.get('rollout_s'), '.2f')}" for r in rows],
        ),
        ("stage one done (s)", [_s(r.get("first_s"), ".2f") for r in rows]),
        ("converged", [f"{r.get('converged', 0)}/{r['devices']}" for r in rows]),
        (f"convergence (s, goal <{GOAL_S:g})", [_s(r.get("converge_s"), ".2f") for r in rows]),
        (
            "downloading / verified p50 (s)",
            [
                f"{_s(r.get('downloading_p50_s'), '.2f')} / {_s(r.get('verified_p50_s'), '.2f')}"
                for r in rows
            ],
        ),
        ("activation p50 (s)", [_s(r.get("p50_s"), ".2f") for r in rows]),
        ("activation p95 (s)", [_s(r.get("p95_s"), ".2f") for r in rows]),
        ("broker egress/device", [_mb(r.get("egress", {}).get("devices")) for r in rows]),
        ("  of which TCP retransmits", [_mb(r.get("egress", {}).get("retrans")) for r in rows]),
        ("  NATS varz out/device", [_mb(r.get("egress", {}).get("varz")) for r in rows]),
        ("origin egress/device", [_mb(r.get("origin", {}).get("log")) for r in rows]),
        (
            "  origin requests/device",
            [_s(r.get("origin", {}).get("requests"), ".2f") for r in rows],
        ),
        ("CPU s of the update: devices", [_s(r.get("cpu_s", {}).get("devices")) for r in rows]),
        (
            "  broker / origin",
            [
                f"{_s(r.get('cpu_s', {}).get('broker'))} / {_s(r.get('cpu_s', {}).get('origin'))}"
                for r in rows
            ],
        ),
        ("peak RSS devices", [_mb(r.get("rss_peak", {}).get("devices")) for r in rows]),
        ("  per device", [_per_device(r) for r in rows]),
        ("peak RSS broker", [_mb(r.get("rss_peak", {}).get("broker")) for r in rows]),
        ("peak RSS origin", [_mb(r.get("rss_peak", {}).get("origin")) for r in rows]),
        (
            "JetStream consumers",
            [str(r.get("consumers_end", r.get("consumers_connected", "-"))) for r in rows],
        ),
        ("connections lost", [str(r.get("lost", "-")) for r in rows]),
        ("other events", [_events(r) for r in rows]),
        (
            "result",
            [
                ("OK" if r.get("ok") else "MISSED") + (" (error)" if "error" in r else "")
                for r in rows
            ],
        ),
    ]
    width = max(len(label) for label, _ in lines)
    col = max(18, *(len(v) for _, vals in lines for v in vals))
    out = [f"{label:<{width}}  " + "  ".join(f"{v:>{col}}" for v in vals) for label, vals in lines]
    out += [f"error ({r['broker']}/{r['artifacts']}): {r['error']}" for r in rows if "error" in r]
    return "\n".join(out)


def _stage1(r: dict[str, Any]) -> str:
    if "stage1" not in r:
        return "-"
    got, want, exact = r["stage1"]
    return f"{'yes' if exact else 'NO'} {got}/{want}"


def _per_device(r: dict[str, Any]) -> str:
    peak = r.get("rss_peak", {}).get("devices")
    return "-" if peak is None else f"{peak / r['devices'] / 1e6:.2f} MB"


def _events(r: dict[str, Any]) -> str:
    return ",".join(f"{k}:{v}" for k, v in sorted(r.get("events", {}).items())) or "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--processes", type=int, default=0,
                        help="worker processes (default: one per 300 devices, 2..24)")  # fmt: skip
    parser.add_argument("--first", type=float, default=10.0, help="stage one percent")
    parser.add_argument("--model-bytes", type=int, default=1_000_000,
                        help="ONNX size of the forest (under 20000: the iris model)")  # fmt: skip
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                        help="broker chunk size (edge-fleet publish --chunk-size)")  # fmt: skip
    parser.add_argument("--broker", choices=["mosquitto", "nats"], default="mosquitto")
    parser.add_argument("--device", choices=["agent", "lite"], default="agent",
                        help="the agent's delivery code, or light devices (bench/fleet_lite.py)")  # fmt: skip
    parser.add_argument("--artifacts", choices=["broker", "http"], default="broker")
    parser.add_argument("--matrix", action="store_true",
                        help="run the four broker x artifacts combinations, one after another")  # fmt: skip
    parser.add_argument("--nats-consumers", choices=["r1-memory", "r3-file"], default="r1-memory",
                        help="how NATS keeps the MQTT consumers (bench/fleet_servers.py)")  # fmt: skip
    parser.add_argument("--own-sessions", action="store_true",
                        help="one onnxruntime session per device (not per process)")  # fmt: skip
    parser.add_argument("--connect-timeout", type=float, default=600.0)
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="how long to wait for convergence after the 100%% publish")  # fmt: skip
    parser.add_argument("--state-root", default="/dev/shm" if Path("/dev/shm").is_dir() else None,
                        help="where the devices' state folders go (default: tmpfs)")  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    files = raise_open_files()
    load = os.getloadavg()
    print(f"open files limit {files}; {os.cpu_count()} CPUs; load average "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")  # fmt: skip
    if args.device == "lite":
        print("light devices (bench/fleet_lite.py): own MQTT connection, account (mosquitto),"
              " signature, rollout bucket, serial, chunk/size/sha256 checks and state folder"
              " each, and its online status and will; no paho, threads, onnxruntime, parity,"
              " registry, probation, health or failover.")  # fmt: skip
    else:
        print("shared: per process, the onnxruntime session of an artifact"
              + (" (off: --own-sessions)" if args.own_sessions else "")
              + "; on NATS one MQTT account for all devices (mosquitto: one each);"
              " the worker interpreter."
              " Own per device: MQTT connection, state folder, store, registry, download,"
              " sha256/signature/serial/parity checks, activation.")  # fmt: skip
    combos = COMBINATIONS if args.matrix else [(args.broker, args.artifacts)]
    rows = []
    for broker_kind, artifacts in combos:
        print(f"== {broker_kind} / {artifacts}: {args.devices} devices", flush=True)
        row = run(args, broker_kind, artifacts)
        load = os.getloadavg()
        row["load"] = load
        rows.append(row)
        print(table([row]))
        print(f"load average after the run {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}", flush=True)
    if len(rows) > 1:
        print("\n== side by side")
        print(table(rows))
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
