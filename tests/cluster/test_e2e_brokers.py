"""The same delivery, results and status flows on mosquitto (MQTT 5) and on a 3-node
NATS cluster (MQTT 3.1.1), with a crash of the broker node the device is on.

Real programs throughout: ``edge-agent run`` with the device's ``mqtt.urls`` (nodes 2,
3, 1: it starts on node 2), ``edge-fleet`` commands through node 1 and ``edge-fleet
collect`` on nodes 3 then 1, with a SQLite store. On NATS, node 2 is killed with
SIGKILL and stays down: the device must move to node 3 and converge, its retained
status must say ``online`` there, and every answered prediction must be stored once.
On mosquitto (one node) the broker is killed and started again: the same assertions,
without a move.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.engines import Engine, make_engine
from tests.fixtures.agent import RunningAgent
from tests.fixtures.models import Keypair
from tests.programs import ROOT, Program, Traffic, wait

pytestmark = pytest.mark.slow

DEVICE = "pi-1"
FLEET = "f1"
DEVICE_NODES = [2, 3, 1]  # the device starts on node 2, the one that is crashed
OPERATOR_NODES = [1]
COLLECTOR_NODES = [3, 1]


@pytest.fixture(params=["mosquitto", "nats"])
def engine(
    request: pytest.FixtureRequest,
    broker_factory: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Engine]:
    yield from make_engine(request.param, broker_factory, tmp_path_factory.mktemp("engine"))


def run_fleet(engine: Engine, *args: str, nodes: list[int]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleet", *args, *engine.fleet_args(nodes)],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip


def fleet(engine: Engine, *args: str, nodes: list[int] = OPERATOR_NODES) -> str:
    """Run ``edge-fleet ARGS`` through ``nodes``; its stdout (fails on a non-zero exit)."""
    done = run_fleet(engine, *args, nodes=nodes)
    assert done.returncode == 0, f"edge-fleet {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def device_agent(
    engine: Engine,
    start_agent: Callable[..., RunningAgent],
    keypair: Keypair,
    packages: tuple[Path, ...] = (),
    **sections: Any,
) -> RunningAgent:
    mqtt = {**engine.device_mqtt(DEVICE, FLEET, DEVICE_NODES),
            "reconnect_min_s": 0.5, "reconnect_max_s": 2}  # fmt: skip
    return start_agent(
        {
            "device": {"id": DEVICE, "fleet": FLEET},
            "mqtt": mqtt,
            "health": {"interval_s": 2},
            "models": {
                "trusted_keys": [str(keypair.pub)],
                "probation_s": 0,
                "delivery_chunk_timeout_s": 5,
                "delivery_retry_s": 2,
            },
            **sections,
        },
        packages=packages,
    )


def status_row(engine: Engine, nodes: list[int]) -> dict[str, Any] | None:
    """This device's row of ``edge-fleet status --json`` read through ``nodes``; None
    while the command cannot subscribe (NATS refuses SUBACKs for a while after a node's
    crash, until JetStream has new leaders: the operator runs it again)."""
    done = run_fleet(engine, "status", "--json", "--wait", "1.5", nodes=nodes)
    if done.returncode != 0 and "not granted" in done.stderr:
        return None
    assert done.returncode == 0, f"edge-fleet status:\n{done.stdout}\n{done.stderr}"
    body = json.loads(done.stdout)
    rows = [d for d in body["devices"] if d["device"] == DEVICE]
    return rows[0] if rows else None


def test_delivery_and_status_survive_a_crash_of_the_devices_node(
    engine: Engine,
    start_agent: Callable[..., RunningAgent],
    keypair: Keypair,
    iris_package: Path,
    iris_package_v2: Path,
) -> None:
    agent = device_agent(engine, start_agent, keypair)
    agent.wait_for(lambda s: s["broker"]["connected"], timeout=60)
    assert agent.status()["broker"]["protocol"] == engine.protocol

    key = ["--signing-key", str(keypair.key)]
    fleet(engine, "publish", str(iris_package), "--fleet", FLEET, *key)
    agent.wait_for(lambda s: s["models"].get("iris", {}).get("version") == "1.0.0", timeout=90)
    # What the device reported through its node reaches the operator through another.
    wait(lambda: (engine.retained(f"edge/devices/{DEVICE}/status", 3) or {}).get("models", {})
         .get("iris", {}).get("version") == "1.0.0", 60, "status 1.0.0 seen on node 3")  # fmt: skip

    # The next version goes out and the device's node dies before the device has it.
    fleet(engine, "publish", str(iris_package_v2), "--fleet", FLEET, *key)
    crashed = time.monotonic()
    engine.crash(2)
    agent.wait_for(lambda s: serving_version(s) == "1.1.0", timeout=120)
    converged = time.monotonic() - crashed

    def online_on_11(row: dict[str, Any] | None) -> bool:
        if row is None or row["state"] != "online":
            return False
        return bool(row["models"].get("iris", {}).get("version") == "1.1.0")

    wait(lambda: online_on_11(status_row(engine, [3, 1])), 90, "edge-fleet status: online on 1.1.0")
    link = agent.status()["broker"]
    if engine.name == "nats":
        assert link["url"] != engine.device_mqtt(DEVICE, FLEET, DEVICE_NODES)["urls"][0]
        assert link["moves"] >= 1
    print(f"\n{engine.name}: converged on 1.1.0 {converged:.1f} s after the node's crash")

    # A clean stop leaves the retained status offline, read through a surviving node.
    assert agent.stop() == 0
    wait(lambda: (engine.retained(f"edge/devices/{DEVICE}/status", 1) or {}).get("state")
         == "offline", 60, "status offline after the stop")  # fmt: skip


def serving_version(status: dict[str, Any]) -> str | None:
    return status["models"].get("iris", {}).get("version")  # type: ignore[no-any-return]


def stored(db: Path) -> dict[str, int]:
    if not db.exists():
        return {}
    con = sqlite3.connect(db, timeout=5)
    try:
        rows = con.execute(
            "SELECT request_id, count(*) FROM results WHERE request_id IS NOT NULL"
            " GROUP BY request_id"
        ).fetchall()
    except sqlite3.OperationalError:  # the collector has not made its tables yet
        return {}
    finally:
        con.close()
    return {str(rid): int(n) for rid, n in rows}


def test_results_survive_a_crash_of_the_devices_node(
    engine: Engine,
    start_agent: Callable[..., RunningAgent],
    keypair: Keypair,
    iris_package: Path,
    tmp_path: Path,
) -> None:
    db = tmp_path / "results.db"
    collector = Program(
        [sys.executable, "-m", "fleet", "-v", "collect", "--db", f"sqlite:///{db}",
         "--client-id", "collect-1", *engine.fleet_args(COLLECTOR_NODES, role="central")],
        tmp_path / "collect.log",
    )  # fmt: skip
    collector.start()
    try:
        agent = device_agent(
            engine, start_agent, keypair, packages=(iris_package,),
            forward={"ack_timeout_s": 3}, buffer={"batch_size": 50},
        )  # fmt: skip
        with Traffic(agent) as traffic:
            wait(lambda: len(stored(db)) >= 50, 90, "first results stored")
            engine.crash(2)
            before = len(stored(db))
            wait(lambda: len(stored(db)) >= before + 200, 120, "results stored after the crash")
        answered = set(traffic.answered)
        try:
            wait(lambda: answered <= set(stored(db)), 120, "every answered prediction stored")
            agent.wait_for(lambda s: s["buffer"]["rows"] == 0, timeout=60)
        except (AssertionError, TimeoutError):
            missing = sorted(answered - set(stored(db)))[:20]
            raise AssertionError(
                f"missing {missing}\ncollector log:\n{collector.tail()}\n"
                f"agent log:\n{agent.logs()[-3000:]}"
            ) from None
        doubled = {rid: n for rid, n in stored(db).items() if n != 1}
        assert doubled == {}, f"stored more than once: {list(doubled.items())[:10]}"
        assert collector.running(), collector.tail()
    finally:
        assert collector.stop() == 0, collector.tail()
