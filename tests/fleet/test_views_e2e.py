"""The operator's views of real agents: status, events and forget, over a real mosquitto.

Two `edge-agent run` processes serve iris 1.0.0 in fleet `north`; a 1.1.0 whose parity
vectors are wrong is published to 50 % of the fleet. The device inside the rollout
refuses it (and keeps serving 1.0.0, "active" by its own word), the one outside says it
is not in the rollout: `edge-fleet status` must show both with the desired version and
the device's reason, `edge-fleet events` their events as they happen.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.wire.topics import rollout_bucket
from fleet.publish import publish
from tests.agent.updates.test_delivery import _spoiled
from tests.delivery_helpers import device_config, operator, serving
from tests.fixtures.broker import Broker
from tests.fixtures.models import Keypair
from tests.fleet.test_status import broker_args

ROOT = Path(__file__).resolve().parents[2]
SALT = "north/iris"

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


def edge_fleet(broker: Broker, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleet", *argv, *broker_args(broker)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "COLUMNS": "80"},
    )  # fmt: skip


def status_until(
    broker: Broker, check: Callable[[dict[str, Any]], bool], timeout: float = 60
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        done = edge_fleet(broker, "status", "--json", "--wait", "0.5")
        assert done.returncode == 0, done.stderr
        doc: dict[str, Any] = json.loads(done.stdout)
        if check(doc):
            return doc
        if time.monotonic() > deadline:
            raise AssertionError(f"edge-fleet status never matched: {done.stdout[:3000]}")
        time.sleep(0.5)


def deployment(doc: dict[str, Any], device: str) -> dict[str, Any] | None:
    for d in doc["devices"]:
        if d["device"] == device:
            return d["models"].get("iris", {}).get("deployment")  # type: ignore[no-any-return]
    return None


def test_a_refusal_and_a_device_outside_the_rollout_as_the_operator_sees_them(
    broker: Broker, keypair: Keypair, start_agent: Any, iris_package: Path,
    iris_package_v2: Path, tmp_path: Path,
) -> None:  # fmt: skip
    names = [f"view-{i}" for i in range(100)]
    inside = next(n for n in names if rollout_bucket(SALT, n) < 50)
    outside = next(n for n in names if rollout_bucket(SALT, n) >= 50)
    agents = {
        n: start_agent(device_config(broker, keypair, n, fleet="north"), packages=[iris_package])
        for n in (inside, outside)
    }
    status_until(broker, lambda doc: sum(d["state"] == "online" for d in doc["devices"]) == 2)
    follow = subprocess.Popen(
        [sys.executable, "-m", "fleet", "events", "--follow", "--json", "--fleet", "north",
         *broker_args(broker)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        time.sleep(2)  # let it subscribe: events are not retained
        bad = _spoiled(iris_package_v2, tmp_path / "parity", keypair, parity_shift=0.3)
        publish(operator(broker), bad, fleet="north", percent=50, key=keypair.key)

        # --- events: each device's answer, with its reason, as it happens
        seen: dict[tuple[str, str], dict[str, Any]] = {}
        assert follow.stdout is not None
        deadline = time.monotonic() + 60
        while not {(inside, "rejected"), (outside, "not_in_rollout")} <= set(seen):
            assert time.monotonic() < deadline, f"events seen: {list(seen)}"
            e = json.loads(follow.stdout.readline())
            seen[(e["device"], e["event"])] = e
        assert "parity" in seen[(inside, "rejected")]["reason"]
        assert seen[(inside, "rejected")]["version"] == "1.1.0"
        bucket = rollout_bucket(SALT, outside)
        assert seen[(outside, "not_in_rollout")]["reason"] == (
            f"not in rollout (bucket {bucket} >= 50%)"
        )
        follow.send_signal(signal.SIGINT)
        follow.communicate(timeout=10)
        assert follow.returncode == 0
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()

    # --- status: desired 1.1.0, actual 1.0.0, rejected with the device's reason
    doc = status_until(
        broker,
        lambda doc: (
            (deployment(doc, inside) or {}).get("state") == "rejected"
            and (deployment(doc, outside) or {}).get("state") == "not_in_rollout"
        ),
    )
    model = {d["device"]: d["models"]["iris"] for d in doc["devices"]}
    assert serving(agents[inside]) == "1.0.0"
    assert model[inside]["version"] == "1.0.0"
    assert model[inside]["desired"]["version"] == "1.1.0"
    assert model[inside]["desired"]["source"] == "fleet"
    assert "parity" in model[inside]["deployment"]["reason"]
    assert model[outside]["deployment"]["reason"] == f"not in rollout (bucket {bucket} >= 50%)"
    assert model[outside]["deployment"]["targeted"] is False
    (summary,) = doc["summary"]
    assert summary["line"] == "0/2 on 1.1.0, 1 rejected, 1 not in rollout"

    table = edge_fleet(broker, "status", "--wait", "0.5").stdout.splitlines()
    assert max(len(line) for line in table) <= 80, "\n".join(table)
    row = next(i for i, line in enumerate(table) if line.startswith(inside))
    assert table[row].split()[1:5] == ["iris", "1.0.0", "1.1.0", "rejected"]
    assert table[row + 1].startswith("    ") and "1.1.0" in table[row + 1]
    assert "iris (north): 0/2 on 1.1.0, 1 rejected, 1 not in rollout" in table

    # --- forget: refused while the agent runs; once it stopped (its last status says
    # offline), cleared; a started agent announces itself again, as the note says.
    done = edge_fleet(broker, "forget", outside)
    assert done.returncode == 1 and f"{outside}: online" in done.stderr
    agents[outside].stop()
    status_until(broker, lambda doc: any(d["device"] == outside and d["state"] == "offline"
                                         for d in doc["devices"]))  # fmt: skip
    done = edge_fleet(broker, "forget", outside)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{outside}: cleared status\n"
    assert "mkcreds.sh remove" in done.stderr
    doc = status_until(broker, lambda doc: [d["device"] for d in doc["devices"]] == [inside])
    agents[outside].start()
    status_until(broker, lambda doc: len(doc["devices"]) == 2)
