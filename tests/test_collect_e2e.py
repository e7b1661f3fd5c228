"""Every answered prediction reaches PostgreSQL exactly once, whatever is killed.

The real programs: ``edge-agent`` serving the iris model, mosquitto from broker-config/,
``edge-fleet collect`` as a process with the collector's own broker account, and
PostgreSQL started by the suite. Traffic runs throughout; the collector, the broker and
the agent are each killed with SIGKILL in the middle of it and started again, and the
database is stopped for a while. At the end every request that got an answer is in the
database exactly once, and the device's buffer is empty (everything acknowledged).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fixtures.agent import RunningAgent
from tests.fixtures.broker import Broker, Creds
from tests.fixtures.postgres import Postgres
from tests.programs import Program, Traffic, wait

pytestmark = pytest.mark.slow


class CollectorProcess(Program):
    """``edge-fleet collect`` as its own process, restartable under the same session."""

    def __init__(self, broker: Broker, creds: Creds, db: str, log: Path, name: str) -> None:
        super().__init__(
            [sys.executable, "-m", "fleet", "-v", "collect", "--db", db,
             "--broker", broker.operator_url, "--username", creds.username,
             "--password-file", str(creds.password_file), "--client-id", name],
            log,
        )  # fmt: skip


@pytest.fixture
def collectors() -> Iterator[list[CollectorProcess]]:
    made: list[CollectorProcess] = []
    yield made
    for c in made:
        if c.proc is not None and c.proc.poll() is None:
            c.proc.kill()
            c.proc.wait()


def stored(postgres: Postgres, database: str) -> dict[str, int]:
    rows = postgres.sql(
        "SELECT request_id, count(*) FROM results WHERE request_id IS NOT NULL GROUP BY request_id",
        database,
    )
    return {str(rid): int(n) for rid, n in rows}


def test_kill_9_of_collector_broker_and_agent_loses_and_doubles_nothing(
    broker: Broker,
    postgres: Postgres,
    start_agent: Callable[..., RunningAgent],
    iris_package: Path,
    tmp_path: Path,
    collectors: list[CollectorProcess],
) -> None:
    db = postgres.create_database()
    database = db.rsplit("/", 1)[1]
    device = broker.add_device("pi-1", fleet="f1")
    collector = CollectorProcess(
        broker, broker.add_collector("central"), db, tmp_path / "collect.log", "collect-1"
    )
    collectors.append(collector)
    collector.start()
    agent = start_agent(
        {"device": {"id": "pi-1", "fleet": "f1"},
         "mqtt": {**broker.mqtt_settings(device), "reconnect_min_s": 1, "reconnect_max_s": 1},
         # Short, so the resends after each kill come within the test's time.
         "forward": {"ack_timeout_s": 3},
         "buffer": {"batch_size": 50}},
        packages=[iris_package],
    )  # fmt: skip

    def progress(what: str, more: int = 200) -> None:
        """Wait until the restarted part carries the flow again: more results stored."""
        before = len(stored(postgres, database))
        wait(lambda: len(stored(postgres, database)) >= before + more, 90, what)

    with Traffic(agent) as traffic:
        wait(lambda: len(stored(postgres, database)) >= 50, 60, "first results stored")

        collector.kill()  # mid-transaction or mid-ack: the broker keeps its session
        time.sleep(1)
        collector.start()
        progress("results stored after the collector's kill")

        broker.kill()  # what it held in memory is gone; the devices still have the rows
        time.sleep(1)
        broker.start()
        progress("results stored after the broker's kill")

        agent.kill()  # committed rows outlive the process; unanswered requests do not count
        agent.start()
        progress("results stored after the agent's kill")

        postgres.stop()  # the database away for a while: nothing is acked meanwhile
        time.sleep(4)
        assert agent.status()["buffer"]["rows"] > 0
        postgres.start()
        progress("results stored after the database's return")

    answered = set(traffic.answered)
    assert len(answered) == len(traffic.answered)

    def all_in() -> bool:
        return answered <= set(stored(postgres, database))

    try:
        wait(all_in, 120, "every answered prediction stored")
        agent.wait_for(lambda s: s["buffer"]["rows"] == 0, timeout=60)
    except (AssertionError, TimeoutError):
        missing = sorted(answered - set(stored(postgres, database)))[:20]
        raise AssertionError(
            f"missing {missing}\ncollector log:\n{collector.tail()}\nagent log:\n{agent.logs()[-3000:]}"
        ) from None
    counts = stored(postgres, database)
    doubled = {rid: n for rid, n in counts.items() if n != 1}
    assert doubled == {}, f"stored more than once: {list(doubled.items())[:10]}"
    # Stored by (device, seq) once: a request id appears once, and seqs have no twins.
    [(rows, distinct)] = postgres.sql(
        "SELECT count(*), count(DISTINCT (device, seq)) FROM results", database
    )
    assert rows == distinct
    assert collector.stop() == 0


def test_a_collector_started_before_its_broker_waits_for_it(
    broker: Broker, tmp_path: Path, collectors: list[CollectorProcess]
) -> None:
    from agent.wire import payloads

    creds = broker.add_collector("central")
    db = f"sqlite:///{tmp_path / 'results.db'}"
    collector = CollectorProcess(broker, creds, db, tmp_path / "collect.log", "collect-1")
    collectors.append(collector)
    broker.stop()
    collector.start()
    time.sleep(3)
    assert collector.proc is not None and collector.proc.poll() is None, collector.tail()
    assert "waiting for the broker" in collector.tail()
    broker.start()
    device = broker.add_device("pi-1", fleet="f1")
    acks = broker.subscribe("edge/devices/pi-1/results/ack")
    client = broker.client(device)
    row = payloads.result_json(
        1, t=time.time(), model="m", version="1", inputs="[1]", outputs='{"prediction":[1]}',
        latency_ms=0.1,
    )  # fmt: skip
    body = payloads.results_head("pi-1") + row.encode() + payloads.RESULTS_TAIL
    deadline = time.monotonic() + 30
    while not acks.messages and time.monotonic() < deadline:
        client.publish("edge/devices/pi-1/results", body, qos=1)  # until it is subscribed
        time.sleep(0.5)
    client.disconnect()
    assert acks.messages, collector.tail()
    assert payloads.ack_ranges(json.loads(acks.messages[0].payload)) == [(1, 1)]
    assert collector.stop() == 0
