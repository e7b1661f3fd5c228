"""Collector benchmark: results stored per second, answer-to-stored delay, /predict cost.

    .venv/bin/python bench/collect.py [--rows 200000] [--agents 3] [--agent-rows 50000]
                                      [--rate 300] [--seconds 15] [--engines sqlite,postgresql]

Real programs throughout: mosquitto from broker-config/, PostgreSQL initdb'd into a
temporary folder (tests/fixtures/postgres.py), ``edge-fleet collect`` and ``edge-agent``
as processes. For each database engine, side by side:

1. collector alone: ``--rows`` results (batches of 1000, as devices send them) queued
   at the broker for the collector's persistent session while it is stopped, then the
   collector started: results/s from its first to its last commit (``stored_at``).
2. agents draining: ``--agents`` real agents, each on a buffer of ``--agent-rows``
   results, forward to the running collector with ``forward.ack = "collector"`` (rows
   deleted on the ack): results/s stored, and the time until every agent's buffer is
   empty (everything acknowledged).
3. steady load: one agent answering ``--rate`` /predict calls per second for
   ``--seconds``; answer-to-stored delay (``stored_at - time`` of each row) p50/p99.

And once (PostgreSQL, default ``forward.cpu_share``): /predict req/s with wrk while an
agent drains a 100,000-result backlog to the collector, against the same agent right
after the drain (the method of bench/forward.py). Goals of issue 12: >= 50,000
results/s into SQLite, >= 20,000/s into PostgreSQL, p99 answer-to-stored < 2 s,
/predict slowed <= 10%. Needs wrk and taskset, and the postgres extra.
"""

from __future__ import annotations

import os
import sys

# Keep bench/ off the import path (bench/http.py would shadow the standard library).
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse
import importlib.util
import json
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.wire import payloads  # noqa: E402
from tests.fixtures.broker import Broker, Creds, free_port  # noqa: E402
from tests.fixtures.postgres import Postgres  # noqa: E402

PY = sys.executable
GOALS = {"sqlite": 50_000.0, "postgresql": 20_000.0}
GOAL_P99_S = 2.0
GOAL_SLOWDOWN = 0.10
BATCH = 1000


def _load_forward() -> Any:
    """bench/forward.py's helpers (package, seeded buffers, wrk, agent processes)."""
    spec = importlib.util.spec_from_file_location("bench_forward", ROOT / "bench" / "forward.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


forward = _load_forward()


# --- the parts ---------------------------------------------------------------------


# Extra `edge-fleet collect` options for every collector of the run (--collector-args).
EXTRA_ARGS: list[str] = []


class Collector:
    """``edge-fleet collect`` as a process; the same client id keeps its session."""

    def __init__(self, broker: Broker, creds: Creds, db: str, name: str, log: Path) -> None:
        self.metrics_port = free_port()
        self.command = [
            PY, "-m", "fleet", "collect", "--db", db, "--broker", broker.operator_url,
            "--username", creds.username, "--password-file", str(creds.password_file),
            "--client-id", name, "--metrics", f"127.0.0.1:{self.metrics_port}",
            # A group of its own: a stopped collector's session keeps its share of its
            # group's stream (mosquitto 2.0 does not skip offline members).
            "--group", name, *EXTRA_ARGS,
        ]  # fmt: skip
        self.log = log
        self.creds, self.name = creds, name
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"collector exited:\n{self.log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/", timeout=1)
                time.sleep(0.5)  # its subscriptions follow the connection
                return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError("collector did not start within 30 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def forget(self, broker: Broker) -> None:
        """End the session at the broker: each group gets a copy of the stream, and a
        stopped collector's session would be queued every later phase's results."""
        self.stop()
        client = broker.client(self.creds, connect=False, client_id=self.name)
        done = threading.Event()
        client.on_connect = lambda *a: done.set()
        client.connect("127.0.0.1", broker.port_for(self.creds), clean_start=True)
        client.loop_start()
        done.wait(10)
        client.disconnect()
        client.loop_stop()


class Db:
    """Reads what the collector stored (its own connection, the same engines)."""

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("sqlite:///"):
            import sqlite3

            self._path = url.removeprefix("sqlite:///")
            self._connect: Any = lambda: sqlite3.connect(self._path, timeout=30)
        else:
            import psycopg

            self._connect = lambda: psycopg.connect(url, autocommit=True)

    def one(self, sql: str) -> tuple[Any, ...]:
        try:
            conn = self._connect()
        except Exception:
            return (0, None, None)
        try:
            row = conn.execute(sql).fetchone()
            return tuple(row) if row else ()
        except Exception:  # the table may not exist yet
            return (0, None, None)
        finally:
            conn.close()

    def span(self, where: str = "TRUE") -> tuple[int, float, float]:
        n, first, last = self.one(
            f"SELECT count(*), min(stored_at), max(stored_at) FROM results WHERE {where}"
        )
        return int(n or 0), float(first or 0), float(last or 0)

    def stored(self, devices: str) -> int:
        """Results stored for devices LIKE ``devices``, from the collector's summary
        table (counting the results table while it grows would load the machine)."""
        (n,) = self.one(f"SELECT sum(results_stored) FROM devices WHERE device LIKE '{devices}'")[
            :1
        ]
        return int(n or 0)

    def wait_count(self, n: int, devices: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while (got := self.stored(devices)) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {got} of {n} results stored")
            time.sleep(0.5)

    def delays(self, where: str) -> list[float]:
        conn = self._connect()
        try:
            rows = conn.execute(f"SELECT stored_at - time FROM results WHERE {where}").fetchall()
        finally:
            conn.close()
        return sorted(float(r[0]) for r in rows)


def batch_payload(device: str, first_seq: int, row: list[float], t: float) -> bytes:
    inputs, outputs = json.dumps([row]), '{"prediction":[1],"probabilities":[[0.25,0.75]]}'

    def one(seq: int) -> str:
        return payloads.result_json(
            seq, t=t, model="clf", version="1.0.0", inputs=inputs, outputs=outputs,
            latency_ms=0.31,
        )  # fmt: skip

    parts = [one(seq) for seq in range(first_seq, first_seq + BATCH)]
    return payloads.results_head(device) + ",".join(parts).encode() + payloads.RESULTS_TAIL


def agent_config(
    work: Path, name: str, port: int, broker: Broker, creds: Creds, **forward_keys: Any
) -> Path:
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    mqtt = broker.mqtt_settings(creds)
    keys = "\n".join(f"{k} = {json.dumps(v)}" for k, v in forward_keys.items())
    text = (
        f'state_dir = "{folder / "state"}"\n\n[device]\nid = "{name}"\nfleet = "bench"\n\n'
        f'[http]\nhost = "127.0.0.1"\nport = {port}\n\n'
        '[buffer]\ndurability = "commit"\nmax_rows = 10000000\nbatch_size = 1000\n\n'
        "[mqtt]\n" + "\n".join(f'{k} = "{v}"' for k, v in mqtt.items()) + "\n\n"
        f"[forward]\n{keys}\n\n[health]\ninterval_s = 5\n"
    )
    config = folder / "agent.toml"
    config.write_text(text)
    return config


def spawn_agent(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [PY, "-m", "agent", "run", "--config", str(config)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def buffer_rows(port: int) -> float:
    try:
        return float(forward.metric(port, "edge_buffer_rows"))
    except OSError:
        return float("inf")


# --- the measurements --------------------------------------------------------------


@dataclass
class Figures:
    alone: float = 0.0
    alone_wall: float = 0.0
    agents: float = 0.0
    agents_drained_s: float = 0.0
    p50: float = 0.0
    p99: float = 0.0
    worst: float = 0.0
    notes: list[str] = field(default_factory=list)


def collector_alone(
    broker: Broker, creds: Creds, url: str, work: Path, engine: str, rows: int
) -> tuple[float, float]:
    collector = Collector(broker, creds, url, f"bench-alone-{engine}", work / f"alone-{engine}.log")
    collector.start()  # makes the session and its subscriptions ...
    collector.stop()  # ... which the broker keeps, queueing for it
    client = broker.client()
    row = [round(0.1 * i, 2) for i in range(forward.FEATURES)]
    now = time.time()
    devices = 10
    per_device = rows // BATCH // devices
    infos = []
    for d in range(devices):
        for b in range(per_device):
            body = batch_payload(f"dev-{d}", 1 + b * BATCH, row, now)
            infos.append(client.publish(f"edge/devices/dev-{d}/results", body, qos=1))
    for info in infos:
        info.wait_for_publish(60)
    client.disconnect()
    client.loop_stop()
    total = devices * per_device * BATCH
    db = Db(url)
    t0 = time.monotonic()
    collector.start()
    db.wait_count(total, "dev-%")
    wall = time.monotonic() - t0
    collector.forget(broker)
    n, first, last = db.span("device LIKE 'dev-%'")
    return n / max(last - first, 1e-6), wall


def agents_draining(
    broker: Broker, creds: Creds, url: str, work: Path, engine: str, agents: int, rows: int
) -> tuple[float, float]:
    collector = Collector(
        broker, creds, url, f"bench-agents-{engine}", work / f"agents-{engine}.log"
    )
    collector.start()
    row = [round(0.1 * i, 2) for i in range(forward.FEATURES)]
    procs: list[tuple[subprocess.Popen[bytes], int]] = []
    names = [f"{engine}-agent-{i}" for i in range(agents)]
    for name in names:
        port = free_port()
        config = agent_config(work, name, port, broker, broker.add_device(name, fleet="bench"),
                              ack="collector", cpu_share=1.0)  # fmt: skip
        forward.seed_buffer(work / name / "state" / "buffer.db", rows, row)
        procs.append((spawn_agent(config), port))
    t0 = time.monotonic()
    db = Db(url)
    where = "device LIKE '" + engine + "-agent-%'"
    try:
        db.wait_count(agents * rows, f"{engine}-agent-%")
        deadline = time.monotonic() + 120
        while any(buffer_rows(port) > 0 for _, port in procs) and time.monotonic() < deadline:
            time.sleep(0.2)
        drained = time.monotonic() - t0
    finally:
        for proc, _ in procs:
            forward.stop_agent(proc)
        collector.forget(broker)
    n, first, last = db.span(where)
    return n / max(last - first, 1e-6), drained


def steady_load(
    broker: Broker, creds: Creds, url: str, work: Path, engine: str, package: Path,
    body: dict[str, Any], rate: float, seconds: float,
) -> list[float]:  # fmt: skip
    collector = Collector(
        broker, creds, url, f"bench-steady-{engine}", work / f"steady-{engine}.log"
    )
    collector.start()
    name, port = f"{engine}-steady", free_port()
    config = agent_config(work, name, port, broker, broker.add_device(name, fleet="bench"),
                          ack="collector")  # fmt: skip
    subprocess.run([PY, "-m", "agent", "install", str(package), "--config", str(config)],
                   cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    proc = forward.start_agent(config, port, json.dumps(body).encode())
    db = Db(url)
    sent = 0
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            due = t0 + sent / rate
            if (pause := due - time.monotonic()) > 0:
                time.sleep(pause)
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/predict",
                data=json.dumps({**body, "request_id": f"steady-{sent}"}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=5) as r:
                r.read()
            sent += 1
        where = f"device = '{name}' AND request_id LIKE 'steady-%'"
        db.wait_count(sent, name, timeout=60)
        return db.delays(where)
    finally:
        forward.stop_agent(proc)
        collector.forget(broker)


def predict_slowdown(
    broker: Broker, creds: Creds, url: str, work: Path, package: Path, body: bytes,
    rows: int = 100_000,
) -> tuple[float, float, list[float], list[float], float]:  # fmt: skip
    """wrk /predict while an agent drains to the collector, then right after."""
    collector = Collector(broker, creds, url, "bench-slowdown", work / "slowdown.log")
    collector.start()
    name, port = "slowdown-agent", free_port()
    config = agent_config(work, name, port, broker, broker.add_device(name, fleet="bench"),
                          ack="collector")  # fmt: skip
    subprocess.run([PY, "-m", "agent", "install", str(package), "--config", str(config)],
                   cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    row = json.loads(body)["features"][0]
    forward.seed_buffer(work / name / "state" / "buffer.db", rows, row)
    script = work / "predict.lua"
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                      f"wrk.body = {json.dumps(body.decode())}\n")  # fmt: skip
    target = f"http://127.0.0.1:{port}/predict"
    # The agent on core 0; wrk, the broker, the collector and the database on core 1.
    for proc_ in (collector.proc, broker.proc):
        if proc_ is not None:
            subprocess.run(["taskset", "-pc", forward.LOAD_CORE, str(proc_.pid)],
                           check=False, capture_output=True)  # fmt: skip
    t0 = time.monotonic()
    proc = forward.start_agent(config, port, body)
    during: list[float] = []
    done = threading.Event()
    drained: list[float] = []

    def watch() -> None:
        while not done.is_set():
            if forward.metric(port, "edge_forwarded_results_total") >= rows:
                drained.append(time.monotonic() - t0)
                done.set()
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()
    try:
        while not done.is_set() and time.monotonic() - t0 < 300:
            rps = forward.wrk(target, script, 8, 1)
            if not done.is_set():
                during.append(rps)
        done.set()
        after = [forward.wrk(target, script, 8, 1) for _ in range(max(4, len(during)))]
    finally:
        forward.stop_agent(proc)
        collector.forget(broker)
    base = statistics.median(after)
    under = statistics.median(during) if during else float("nan")
    return under, base, during, after, drained[0] if drained else float("nan")


# --- the report --------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000, help="results queued for the collector")
    p.add_argument("--agents", type=int, default=3, help="agents draining at once")
    p.add_argument("--agent-rows", type=int, default=50_000, help="backlog of each agent")
    p.add_argument("--rate", type=float, default=300.0, help="steady /predict calls per second")
    p.add_argument("--seconds", type=float, default=15.0, help="steady load duration")
    p.add_argument("--engines", default="sqlite,postgresql")
    p.add_argument("--no-slowdown", action="store_true", help="skip the wrk /predict part")
    p.add_argument(
        "--autosave-changes", type=int, default=1,
        help="the broker's mkconf.sh --autosave-changes (1, as shipped: the whole"
        " persistence file is rewritten after every change)",
    )  # fmt: skip
    p.add_argument("--collector-args", default="", help="extra edge-fleet collect options")
    args = p.parse_args(argv)
    EXTRA_ARGS.extend(args.collector_args.split())
    engines = [e for e in args.engines.split(",") if e]

    work = Path(tempfile.mkdtemp(prefix="edge-bench-collect-"))
    work.chmod(0o755)
    package, row = forward.build_package(work)
    body = {"features": [row]}
    broker = Broker(autosave_changes=args.autosave_changes)
    creds = broker.add_collector("bench-collect")
    postgres = Postgres() if "postgresql" in engines else None
    figures: dict[str, Figures] = {}
    slowdown: tuple[float, float, list[float], list[float], float] | None = None
    try:
        if postgres is not None:
            postgres.start()
        for engine in engines:
            url = f"sqlite:///{work}/collect.db" if engine == "sqlite" else ""
            if engine == "postgresql":
                assert postgres is not None
                url = postgres.create_database()
            f = figures[engine] = Figures()
            print(f"{engine}: collector alone, {args.rows} queued results ...", flush=True)
            f.alone, f.alone_wall = collector_alone(broker, creds, url, work, engine, args.rows)
            print(f"{engine}: {args.agents} agents draining {args.agent_rows} each ...", flush=True)
            f.agents, f.agents_drained_s = agents_draining(
                broker, creds, url, work, engine, args.agents, args.agent_rows
            )
            print(f"{engine}: steady {args.rate:.0f}/s for {args.seconds:.0f} s ...", flush=True)
            delays = steady_load(
                broker, creds, url, work, engine, package, body, args.rate, args.seconds
            )
            f.p50, f.p99, f.worst = pct(delays, 0.5), pct(delays, 0.99), delays[-1]
        if not args.no_slowdown:
            url = postgres.create_database() if postgres else f"sqlite:///{work}/slow.db"
            print("/predict while draining 100000 results to the collector ...", flush=True)
            slowdown = predict_slowdown(
                broker, creds, url, work, package, json.dumps(body).encode()
            )
    finally:
        broker.cleanup()
        if postgres is not None:
            postgres.close()
        shutil.rmtree(work, ignore_errors=True)

    ok = True
    print(f"\n{'':44}" + "".join(f"{e:>14}" for e in engines))
    lines = [
        ("collector alone, results/s", lambda f: f"{f.alone:,.0f}"),
        ("  (wall time incl. start-up, s)", lambda f: f"{f.alone_wall:.1f}"),
        (f"{args.agents} agents draining, results/s", lambda f: f"{f.agents:,.0f}"),
        ("  (until every buffer empty, s)", lambda f: f"{f.agents_drained_s:.1f}"),
        ("answer-to-stored p50 (s)", lambda f: f"{f.p50:.3f}"),
        ("answer-to-stored p99 (s)", lambda f: f"{f.p99:.3f}"),
        ("answer-to-stored max (s)", lambda f: f"{f.worst:.3f}"),
    ]
    for label, show in lines:
        print(f"{label:44}" + "".join(f"{show(figures[e]):>14}" for e in engines))
    print()
    for engine in engines:
        f = figures[engine]
        goal = GOALS[engine]
        good = f.alone >= goal
        ok &= good and f.p99 < GOAL_P99_S
        print(f"goal: >= {goal:,.0f} results/s into {engine}: {f.alone:,.0f} "
              f"{'ok' if good else 'MISSED'}")  # fmt: skip
        print(f"goal: p99 answer-to-stored < {GOAL_P99_S} s ({engine}): {f.p99:.3f} s "
              f"{'ok' if f.p99 < GOAL_P99_S else 'MISSED'}")  # fmt: skip
    if slowdown is not None:
        under, base, during, after, drain_s = slowdown
        slow = 1 - under / base
        ok &= slow <= GOAL_SLOWDOWN
        print(f"\n/predict req/s: {under:,.0f} while draining, {base:,.0f} after "
              f"(drain {drain_s:.1f} s)")  # fmt: skip
        print(f"  windows while draining: {[round(x) for x in during]}")
        print(f"  windows after:          {[round(x) for x in after]}")
        print(f"goal: /predict slowed <= {GOAL_SLOWDOWN:.0%}: {slow:.1%} "
              f"{'ok' if slow <= GOAL_SLOWDOWN else 'MISSED'}")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
