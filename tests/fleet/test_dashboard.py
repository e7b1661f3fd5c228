"""Every panel of docs/grafana-dashboard.json has data in a real Prometheus.

The real parts: mosquitto, ``edge-agent run`` serving iris under live traffic (answers,
the caller's bad requests, ground-truth feedback), ``edge-fleet collect`` storing into
SQLite, ``edge-fleet exporter --db`` on it and Debian's Prometheus scraping the exporter.
The package is the fleet's desired state, and a rollout plan is retained as an
operator's ``edge-fleet rollout`` leaves it. This VM has no thermal zone, so one
Raspberry Pi's health (the documented payload, with its SoC temperature) is published
beside the agent's. Each panel's PromQL is then queried as
Grafana would ($fleet and $device set to All); a panel with a query that returns no
series (or only NaN) fails the test, named.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.wire import payloads
from fleet.publish import publish
from tests.delivery_helpers import device_config, operator
from tests.fixtures.agent import RunningAgent
from tests.fixtures.broker import Broker
from tests.fixtures.models import Keypair
from tests.fixtures.prometheus import Prometheus, needs_prometheus, running_prometheus
from tests.fleet.rollout_plan import plan
from tests.fleet.test_exporter import DASHBOARD, exporter, quality_sections, target_of
from tests.test_collect_e2e import CollectorProcess

pytestmark = [needs_prometheus, pytest.mark.slow]

ROW = [5.1, 3.5, 1.4, 0.2]
ALL = {"$fleet": ".*", "$device": ".*"}


class Traffic:
    """A few requests a second, as a device's callers make them: answered ones with a
    request id and, a moment later, their ground truth; now and then a malformed one."""

    def __init__(self, agent: RunningAgent) -> None:
        self.agent = agent
        self.answered = 0
        self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(0.2):
            n += 1
            with_id = {"features": [ROW], "request_id": f"r-{n}"}
            code, body = self.agent.request("POST", "/predict", with_id)
            if code == 200:
                self.answered += 1
                self.agent.request("POST", "/feedback", {"request_id": f"r-{n}",
                                                         "label": body["prediction"][0]})  # fmt: skip
            if n % 3 == 0:  # the caller's mistake: three features instead of four
                code, _ = self.agent.request("POST", "/predict", {"features": [[1.0, 2.0, 3.0]]})
                self.refused += code == 400

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def panels() -> Iterator[tuple[str, list[str]]]:
    """(title, PromQL of each target) of every Prometheus panel."""
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        if (panel.get("datasource") or {}).get("type") != "prometheus":
            continue  # rows; the PostgreSQL panel is run by test_exporter_db
        exprs = [t["expr"] for t in panel.get("targets", [])]
        for var, value in ALL.items():
            exprs = [e.replace(var, value) for e in exprs]
        yield panel["title"], exprs


def without_data(prom: Prometheus) -> list[str]:
    """The panels (and the query) that have no series with a number."""
    empty = []
    for title, exprs in panels():
        for expr in exprs:
            values = [float(r["value"][1]) for r in prom.query(expr)]
            if not [v for v in values if not math.isnan(v)]:
                empty.append(f"{title!r}: {expr}")
    return empty


def variables_without_values(prom: Prometheus) -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    missing = []
    for var in doc["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        # label_values(METRIC, LABEL) is the series API's values of LABEL
        inner = query.removeprefix("label_values(").removesuffix(")")
        metric, label = (part.strip() for part in inner.rsplit(",", 1))
        for name, value in ALL.items():
            metric = metric.replace(name, value)
        if not prom.get(f"label/{label}/values", **{"match[]": metric}):
            missing.append(var["name"])
    return missing


def one_value(prom: Prometheus, expr: str) -> float:
    result = prom.query(expr)
    assert len(result) == 1, (expr, result)
    return float(result[0]["value"][1])


@pytest.mark.timeout(240)
def test_every_panel_has_data_in_a_real_prometheus(
    broker: Broker, keypair: Keypair, start_agent: Any, iris_package: Path, tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path / 'collect.db'}"
    collector = CollectorProcess(broker, broker.add_collector("central"), db,
                                 tmp_path / "collect.log", "collect-1")  # fmt: skip
    collector.start()
    cfg = device_config(broker, keypair, "d-1", "f1")
    cfg["health"] = {"interval_s": 1}
    agent = start_agent(cfg, packages=[iris_package])
    # The fleet's desired state names what the device runs (as after `edge-fleet publish`).
    publish(operator(broker), iris_package, fleet="f1", key=keypair.key)
    client = broker.client()
    board = payloads.health("pi-board", "f1", {
        "uptime_s": 3600.0, "cpu_percent": 20.0, "load": [0.4, 0.3, 0.2],
        "memory": {"used": 400_000_000, "available": 3_000_000_000, "agent_rss": 90_000_000},
        "disk_free_bytes": 20_000_000_000, "soc_temp_c": 51.2,
        "buffer": {"rows": 0, "bytes": 0, "oldest_age_s": None,
                   "dropped": dict.fromkeys(("max_rows", "max_bytes", "max_age", "disk_full", "io_error"), 0)},
        "mqtt": {"reconnects": 0}, "forwarded": 0, "models": {"region": quality_sections()},
    })  # fmt: skip
    client.publish("edge/fleets/f1/models/iris/rollout", json.dumps(plan(fleet="f1")).encode(),
                   qos=1, retain=True).wait_for_publish(5)  # fmt: skip
    try:
        with (
            exporter(broker, "--db", db, "--db-interval", "1") as (_, url),
            running_prometheus(tmp_path / "prometheus", [target_of(url)]) as prom,
        ):
            prom.wait_up()
            client.publish("edge/devices/pi-board/health", payloads.encode(board),
                           qos=1).wait_for_publish(5)  # fmt: skip
            # Traffic only once Prometheus scrapes: "per hour" and "last hour" panels are
            # increases, and an increase needs the count to grow while it is watched.
            with Traffic(agent) as traffic:
                deadline = time.monotonic() + 60
                while (empty := without_data(prom)) and time.monotonic() < deadline:
                    time.sleep(1)
            assert traffic.answered > 0 and traffic.refused > 0
            # The caller's bad rows are bad requests, not the model's errors: the error
            # ratio panel stays at 0 (it counted every 400 before).
            labels = 'model="iris", version="1.0.0"'
            ratio = (f"sum(rate(edge_fleet_model_errors_total{{{labels}}}[5m])) / "
                     f"sum(rate(edge_fleet_model_inferences_total{{{labels}}}[5m]))")  # fmt: skip
            assert one_value(prom, ratio) == 0.0
            assert one_value(prom, f"sum(edge_fleet_model_bad_requests_total{{{labels}}})") > 0
            assert not empty, "panels without data:\n" + "\n".join(empty)
            assert not variables_without_values(prom)
    finally:
        client.loop_stop()
        client.disconnect()
        collector.stop()
